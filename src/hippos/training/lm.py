"""Language modeling on real text: tokenize once, train on packed sequences, score validation perplexity.

A run is three typed sections, like a synthetic one: the model (H3Config), the text (LMDataConfig) and the
training (TrainConfig). Under torchrun every rank reads its own share of each global batch; rank 0 tokenizes
(the others wait, then find the cached shards), evaluates and writes the files.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from ..config import check_numbers
from ..data.packing import PackedBatches
from ..data.text import TokenCorpus, check_source_spec, find_sources, tokenize_corpus
from ..data.tokenizers import load_tokenizer
from ..evaluation.perplexity import perplexity
from ..models import H3LM, H3Config
from .distributed import Distributed, init_distributed, rank_device
from .flops import flops_per_token
from .loop import TrainConfig, train


@dataclass
class LMDataConfig:
    """The text a language model trains and is validated on, and how it is cut."""

    train: tuple[str, ...] = ()  # training text: files, folders, globs, .jsonl files or hf:NAME[:CONFIG]:SPLIT
    valid: tuple[str, ...] = ()  # validation text (empty: the last valid_fraction of the training text)
    valid_fraction: float = 0.1  # share of the training text held out for validation when `valid` is empty
    tokenizer: str = "bytes"  # "bytes", a Hugging Face tokenizer name, or a folder (`hippos tokenizer train`)
    text_field: str = "text"  # the text's field in JSON lines and datasets
    seq_len: int = 256  # tokens per training sequence (packed: documents run on, separated by end-of-text)
    eval_tokens: int = 0  # validation tokens scored at each evaluation (0: all of them)
    cache_dir: str = ""  # where tokenized text is kept ("": $HIPPOS_CACHE or ~/.cache/hippos)

    POSITIVE: ClassVar[tuple[str, ...]] = ("seq_len", "valid_fraction")

    def __post_init__(self) -> None:
        check_numbers(self)
        if not self.train:
            raise ValueError("data.train is empty: name the training text (files, folders, globs or hf:NAME)")
        if self.valid_fraction >= 1:
            raise ValueError(f"valid_fraction must be below 1, got {self.valid_fraction}")
        if not self.tokenizer or not self.text_field:
            raise ValueError("data.tokenizer and data.text_field must not be empty")
        for spec in (*self.train, *self.valid):
            check_source_spec(spec)

    def check_sources(self) -> None:
        """Find the text now (example files are fetched): missing, binary or empty text is refused before any work."""
        for name, specs in (("data.train", self.train), ("data.valid", self.valid)):
            sources = find_sources(list(specs)) if specs else []
            if sources and all(s.kind != "hf" and Path(s.location).stat().st_size == 0 for s in sources):
                raise ValueError(f"{name} is empty: {', '.join(s.describe() for s in sources)} hold no text")


@dataclass
class LMCorpora:
    """Tokenized training and validation text."""

    train: TokenCorpus
    valid_tokens: np.ndarray  # the validation tokens scored at each evaluation
    valid_bytes: int  # UTF-8 bytes of the text they encode (for bits per byte)


def prepare_corpora(data: LMDataConfig, tokenizer, progress: bool = True) -> LMCorpora:
    """Tokenize (or find cached) training and validation text; validation capped at data.eval_tokens."""
    cache = data.cache_dir or None
    corpus = tokenize_corpus(list(data.train), tokenizer, cache, data.text_field, progress)
    if data.valid:
        valid = tokenize_corpus(list(data.valid), tokenizer, cache, data.text_field, progress)
    else:
        corpus, valid = corpus.split(1 - data.valid_fraction)
    tokens = valid.concatenated()
    if data.eval_tokens:
        tokens = tokens[: data.eval_tokens]
    if len(tokens) < 2:
        raise ValueError("the validation text holds fewer than 2 tokens: give more text or a larger valid_fraction")
    # Bytes from the tokens themselves: exact for the scored slice, whatever the tokenizer.
    valid_bytes = len(tokenizer.decode([int(t) for t in tokens]).encode("utf-8"))
    return LMCorpora(corpus, np.asarray(tokens), valid_bytes)


def check_tokenizer_fits(config: H3Config, tokenizer) -> None:
    """Refuse a model whose vocabulary cannot hold the tokenizer's ids."""
    if config.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"model vocab_size {config.vocab_size} is smaller than the {tokenizer.vocab_size} ids of tokenizer "
            f"{tokenizer.name!r}"
        )


def run_lm(
    model_cfg: H3Config,
    data: LMDataConfig,
    train_cfg: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool | str = True,
) -> dict:
    """Train a fresh language model on text, validating every train_cfg.eval_every steps; returns the metrics.

    out_dir gets log.jsonl (loss, tokens/s, TFLOP/s, and MFU when train_cfg.peak_tflops is set; validation loss,
    perplexity, bits per byte), run.json, checkpoints, the trained model (from_pretrained) and the tokenizer's
    Hugging Face files. Run under torchrun for several processes.
    """
    where = init_distributed(train_cfg.device)
    train_cfg = dataclasses.replace(train_cfg, device=rank_device(train_cfg.device, where))
    tokenizer = load_tokenizer(data.tokenizer)
    check_tokenizer_fits(model_cfg, tokenizer)
    corpora = _prepare_on_every_rank(data, tokenizer, where, progress)
    batches = PackedBatches(
        corpora.train.segments, data.seq_len, train_cfg.batch_size, train_cfg.seed, where.rank, where.world_size
    )
    if where.is_main:  # the run directory is a complete model: AutoTokenizer and lm-eval load it from there
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(ImportError):  # without the tokenizers package: no tokenizer files
            tokenizer.save_pretrained(out_dir)
    torch.manual_seed(train_cfg.seed)  # the same initialisation on every rank
    model = H3LM(model_cfg)
    extra = {
        "data": asdict(data),
        "parameters": model.num_parameters(),
        "train_tokens": corpora.train.num_tokens,
        "valid_tokens": len(corpora.valid_tokens),
        "steps_per_epoch": batches.steps_per_epoch,
    }
    valid, valid_bytes = corpora.valid_tokens, corpora.valid_bytes
    evaluate = lambda m: perplexity(m, valid, data.seq_len, batch_size=16, num_bytes=valid_bytes)  # noqa: E731
    flops = flops_per_token(model_cfg, model.num_parameters(), data.seq_len)
    return train(model, batches, train_cfg, out_dir, evaluate, resume=resume, progress=progress, extra=extra,
                 flops_per_token=flops, where=where)  # fmt: skip


def _prepare_on_every_rank(data: LMDataConfig, tokenizer, where: Distributed, progress: bool | str) -> LMCorpora:
    """prepare_corpora on every rank: rank 0 tokenizes first, the others then find the shards in the cache."""
    if where.is_main:
        corpora = prepare_corpora(data, tokenizer, progress=bool(progress))
    if where.enabled:
        torch.distributed.barrier()
    if not where.is_main:
        corpora = prepare_corpora(data, tokenizer, progress=False)
    return corpora
