"""lm-evaluation-harness on hippos models, through the Hugging Face wrapper.

Importing `hippos.models.hf` registers H3LM with transformers' Auto classes, so lm-eval's own "hf" model loads a
`save_pretrained` folder (or a `hippos train` run directory, which also holds the tokenizer's files) like any
causal LM. The command line equivalent, for the record:

    python -c "import hippos.models.hf, lm_eval.__main__ as m; m.cli_evaluate()" --model hf \\
        --model_args pretrained=runs/shakespeare --tasks lambada_openai --device cpu

`hippos eval harness` does the same with the registration taken care of. Tasks can come from lm-eval's
registry (downloaded from the Hub) or from YAML files in `include_path` (local data, for offline use).
"""

from __future__ import annotations

import tempfile

from ..data.tokenizers import ByteTokenizer


def run_harness(
    model: str,
    tasks: list[str],
    tokenizer,
    include_path: str | None = None,
    limit: int | None = None,
    batch_size: int = 1,
    device: str = "cpu",
) -> dict:
    """lm-eval's results for `tasks` on a model folder: {"results": {task: {metric: value}}, ...}.

    tokenizer: "bytes", a Hugging Face tokenizer name or folder, or a tokenizer object with save_pretrained
    (ByteTokenizer, HFTokenizer). The caller chooses it: `hippos eval harness` applies hippos' one default
    rule (hippos.training.run.default_tokenizer) when none is named.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ImportError("the harness needs lm-eval: pip install 'hungry-hippos[eval]'") from None
    from ..models import hf  # noqa: F401  (importing it registers H3LM with the Auto classes lm-eval uses)

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = _hugging_face_tokenizer(tokenizer, scratch)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device, backend="causal")
        manager = TaskManager(include_path=include_path) if include_path else None
        return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=manager)


def _hugging_face_tokenizer(tokenizer, scratch: str) -> str:
    """What lm-eval should load: a name or folder as given; "bytes" or a tokenizer object is written as Hugging
    Face files to scratch (a bytes model needs no tokenizer files of its own)."""
    if tokenizer == "bytes":
        tokenizer = ByteTokenizer()
    if isinstance(tokenizer, str):
        return tokenizer
    tokenizer.save_pretrained(scratch)
    return scratch
