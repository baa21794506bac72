"""lm-evaluation-harness on hippos models, through the Hugging Face wrapper.

`import hippos` registers H3LM with transformers' Auto classes, so lm-eval's own "hf" model class loads a
`save_pretrained` folder (or a `hippos train` run directory, which also holds the tokenizer's files) like any
causal LM. The command line equivalent, for the record:

    python -c "import hippos, lm_eval.__main__ as m; m.cli_evaluate()" --model hf \\
        --model_args pretrained=runs/shakespeare --tasks lambada_openai --device cpu

`hippos eval harness` does the same with the registration taken care of. Tasks can come from lm-eval's
registry (downloaded from the Hub) or from YAML files in `include_path` (local data, for offline use).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..data.tokenizers import ByteTokenizer, default_tokenizer
from ..models.config import H3Config


def run_harness(
    model: str,
    tasks: list[str],
    tokenizer: str | None = None,
    include_path: str | None = None,
    limit: int | None = None,
    batch_size: int = 1,
    device: str = "cpu",
) -> dict:
    """lm-eval's results for `tasks` on a model folder: {"results": {task: {metric: value}}, ...}.

    tokenizer: a Hugging Face tokenizer name or folder, or "bytes" (default: the model's, by hippos' one rule).
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ImportError("the harness needs lm-eval: pip install 'hungry-hippos[eval]'") from None
    from ..models import hf_registration

    hf_registration.register()
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = _hugging_face_tokenizer(model, tokenizer, scratch)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device, backend="causal")
        manager = TaskManager(include_path=include_path) if include_path else None
        return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=manager)


def _hugging_face_tokenizer(model: str, tokenizer: str | None, scratch: str) -> str:
    """The tokenizer lm-eval should load: the one given, else hippos' default for the model (one rule,
    hippos.data.tokenizers.default_tokenizer); the byte tokenizer is written as Hugging Face files to scratch."""
    if tokenizer is None:
        config = Path(model) / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"{model} has no config.json: give a save_pretrained folder or run directory")
        tokenizer = default_tokenizer(model, H3Config.load(config).vocab_size)
    if tokenizer == "bytes":
        ByteTokenizer().save_pretrained(scratch)
        return scratch
    return tokenizer
