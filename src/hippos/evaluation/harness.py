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

from pathlib import Path


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

    tokenizer: a Hugging Face tokenizer name or folder (default: the model folder's own tokenizer files).
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ImportError("the harness needs lm-eval: pip install 'hungry-hippos[eval]'") from None
    from ..models import hf_registration

    hf_registration.register()
    if tokenizer is None and not (Path(model) / "tokenizer.json").is_file() and Path(model).is_dir():
        raise ValueError(
            f"{model} holds no tokenizer files: pass --tokenizer (a Hugging Face name or folder; `hippos train` "
            "runs save theirs)"
        )
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device, backend="causal")
    manager = TaskManager(include_path=include_path) if include_path else None
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=manager)
