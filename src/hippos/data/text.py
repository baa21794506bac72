"""Text corpora as token shards: read the sources, tokenize once, memory-map the result.

Sources (`find_sources`), one spec or several:
- a text file, a folder (every file below it, sorted) or a glob such as "corpus/*.txt";
- JSON lines (`.jsonl`, `.jsonl.gz` is not read): one document per line, its text in `text_field`;
- "hf:NAME" or "hf:NAME:SPLIT" or "hf:NAME:CONFIG:SPLIT": a Hugging Face dataset (a Hub id or a local
  folder), its `text_field` column (needs the `datasets` package);
- "example:NAME": an example text file (`hippos.data.examples`: tinyshakespeare, wikitext2-valid, ...),
  downloaded on first use, checked by SHA-256 and cached.

Every document becomes its tokens followed by the tokenizer's end-of-text id (when it has one), and the
documents are packed back to back. A plain text file is one document. Bytes that are not valid UTF-8 are
replaced by U+FFFD (with a warning that counts them), so one bad byte never stops a long job halfway.

The tokens are written once to `<cache_dir>/<key>/`: shards `tokens-00000.bin`, ... (uint16 when the
vocabulary fits, else uint32) and `meta.json`. The key is a hash of the tokenizer and of every source's
content, so editing a file re-tokenizes and nothing else does. The folder is built under a temporary name and
renamed when complete: an interrupted job leaves no half-written corpus behind.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .examples import PREFIX as EXAMPLE_PREFIX
from .examples import default_cache_dir, fetch_example, get_example  # default_cache_dir: one cache for both
from .files import atomic_write

FORMAT_VERSION = 1
TEXT_BLOCK = 1 << 20  # characters per tokenizer call: large files are encoded in line-aligned blocks
SHARD_TOKENS = 1 << 28  # tokens per shard file (512 MiB of uint16)
FLUSH_TOKENS = 1 << 22  # tokens held in memory before they are appended to the shard file
BINARY_PROBE = 1 << 16  # bytes of each file looked at for NUL bytes before it is taken as text


@dataclass(frozen=True)
class Source:
    """One input: a file (text or JSON lines) or a Hugging Face dataset split."""

    kind: str  # "text", "jsonl" or "hf"
    location: str  # a path, or the dataset name
    config: str | None = None  # hf: dataset configuration
    split: str = "train"  # hf: split

    def describe(self) -> str:
        """How the source appears in messages and in meta.json."""
        if self.kind != "hf":
            return self.location
        return f"hf:{self.location}" + (f":{self.config}" if self.config else "") + f":{self.split}"


def _parse_hf(spec: str) -> Source:
    parts = spec[3:].split(":")
    if not parts[0] or len(parts) > 3:
        raise ValueError(f"{spec!r}: write hf:NAME, hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
    if len(parts) == 1:
        return Source("hf", parts[0])
    if len(parts) == 2:
        return Source("hf", parts[0], split=parts[1])
    return Source("hf", parts[0], parts[1], parts[2])


def _file_source(path: Path) -> Source:
    return Source("jsonl" if path.suffix == ".jsonl" else "text", str(path))


def check_source_spec(spec: str) -> None:
    """Refuse an empty spec, a malformed hf: spec or an unknown example: name, reading no file and no network."""
    if not spec.strip():
        raise ValueError("an empty data source: name a file, folder, glob, hf:NAME or example:NAME")
    if spec.startswith("hf:"):
        _parse_hf(spec)
    elif spec.startswith(EXAMPLE_PREFIX):
        get_example(spec[len(EXAMPLE_PREFIX) :])


def find_sources(specs: str | list[str], progress: bool = True) -> list[Source]:
    """Resolve file, folder, glob, hf: and example: specs to sources; every file is checked readable now.

    An example: file is downloaded here when it is not cached yet (with a progress bar unless `progress` is
    False).
    """
    specs = [specs] if isinstance(specs, str) else list(specs)
    if not specs:
        raise ValueError("no data sources given")
    sources = []
    for spec in specs:
        if spec.startswith("hf:"):
            sources.append(_parse_hf(spec))
            continue
        if spec.startswith(EXAMPLE_PREFIX):
            sources.append(_file_source(fetch_example(spec[len(EXAMPLE_PREFIX) :], progress)))
            continue
        path = Path(spec).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        elif path.is_file():
            files = [path]
        else:
            files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"data source {spec!r}: no such file, or no files in that folder or glob")
        for file in files:
            _check_text_file(file)
        sources.extend(_file_source(f) for f in files)
    return sources


def _check_text_file(path: Path) -> None:
    """Refuse an unreadable file, or a binary one: text has no NUL bytes (the test git and grep use too)."""
    if not os.access(path, os.R_OK):
        raise PermissionError(f"data source {path}: the file is not readable")
    with open(path, "rb") as f:
        if b"\0" in f.read(BINARY_PROBE):
            raise ValueError(f"data source {path} is a binary file (it holds NUL bytes), not text")


def _fingerprint(source: Source) -> str:
    """A content hash of a file source, or the dataset's own fingerprint."""
    if source.kind == "hf":
        return _load_hf(source)._fingerprint
    digest = hashlib.sha256()
    with open(source.location, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_hf(source: Source):
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"{source.describe()} needs the datasets package: pip install 'hungry-hippos[data]'"
        ) from None
    try:
        if Path(source.location).is_dir() and (Path(source.location) / "dataset_dict.json").is_file():
            return datasets.load_from_disk(source.location)[source.split]  # a save_to_disk() folder
        if Path(source.location).is_dir() and (Path(source.location) / "dataset_info.json").is_file():
            return datasets.load_from_disk(source.location)
        return datasets.load_dataset(source.location, source.config, split=source.split)
    except Exception as err:  # offline, unknown name, bad split: say which source it was
        raise OSError(f"could not load {source.describe()} ({type(err).__name__}: {err})") from err


def _decode(raw: bytes, name: str) -> str:
    text = raw.decode("utf-8", errors="replace")
    if "\ufffd" in text:
        bad = text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")
        if bad:
            warnings.warn(f"{name}: {bad} invalid UTF-8 sequence(s) replaced by U+FFFD", stacklevel=3)
    return text


def _blocks(text: str) -> Iterator[str]:
    """The text in pieces of about TEXT_BLOCK characters, cut after a newline where there is one."""
    start = 0
    while start < len(text):
        end = min(len(text), start + TEXT_BLOCK)
        if end < len(text):
            newline = text.rfind("\n", start, end)
            end = newline + 1 if newline > start else end
        yield text[start:end]
        start = end


def iter_documents(source: Source, text_field: str = "text") -> Iterator[list[str]]:
    """Each document of a source as a list of text blocks (concatenated, they are the document)."""
    if source.kind == "text":
        yield list(_blocks(_decode(Path(source.location).read_bytes(), source.location)))
    elif source.kind == "jsonl":
        with open(source.location, "rb") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{source.location} line {number}"
                try:
                    record = json.loads(_decode(line, where))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise ValueError(f"{where}: expected an object with a string field {text_field!r}")
                yield list(_blocks(record[text_field]))
    else:
        dataset = _load_hf(source)
        if text_field not in dataset.column_names:
            raise ValueError(f"{source.describe()} has no column {text_field!r} (columns: {dataset.column_names})")
        for text in dataset[text_field]:
            yield list(_blocks(text or ""))


@dataclass
class TokenCorpus:
    """Token shards on disk, memory-mapped: `segments` are 1-D uint16/uint32 arrays in corpus order."""

    path: Path
    segments: list[np.ndarray]
    num_bytes: int  # UTF-8 bytes of the text the tokens came from (after `split`: shared out by tokens)
    tokenizer: str  # the tokenizer's name
    sources: list[str]

    @property
    def num_tokens(self) -> int:
        """Tokens in all segments."""
        return sum(len(s) for s in self.segments)

    @classmethod
    def open(cls, path: str | Path) -> TokenCorpus:
        """Memory-map a corpus folder written by `tokenize_corpus`."""
        path = Path(path)
        meta = json.loads((path / "meta.json").read_text())
        segments = []
        for shard in meta["shards"]:
            size = (path / shard["file"]).stat().st_size
            expected = shard["tokens"] * np.dtype(meta["dtype"]).itemsize
            if size != expected:
                raise ValueError(f"{path / shard['file']}: {size} bytes, expected {expected}; delete {path} to rebuild")
            segments.append(np.memmap(path / shard["file"], dtype=meta["dtype"], mode="r"))
        return cls(path, segments, meta["num_bytes"], meta["tokenizer"], meta["sources"])

    def split(self, fraction: float) -> tuple[TokenCorpus, TokenCorpus]:
        """(first `fraction` of the tokens, the rest): a split by position, the rest never seen in training."""
        if not 0 < fraction < 1:
            raise ValueError(f"split fraction must be in (0, 1), got {fraction}")
        cut = round(self.num_tokens * fraction)
        head, tail, seen = [], [], 0
        for segment in self.segments:
            local = min(max(cut - seen, 0), len(segment))
            head += [segment[:local]] if local else []
            tail += [segment[local:]] if local < len(segment) else []
            seen += len(segment)
        bytes_head = round(self.num_bytes * cut / max(self.num_tokens, 1))
        return (
            TokenCorpus(self.path, head, bytes_head, self.tokenizer, self.sources),
            TokenCorpus(self.path, tail, self.num_bytes - bytes_head, self.tokenizer, self.sources),
        )

    def concatenated(self) -> np.ndarray:
        """All tokens as one array (a copy unless there is a single segment)."""
        if len(self.segments) == 1:
            return self.segments[0]
        return np.concatenate(self.segments) if self.segments else np.zeros(0, dtype=np.uint16)


def tokenizer_identity(tokenizer) -> str:
    """What distinguishes a tokenizer's output: its name and, for a Hugging Face one, a hash of its vocabulary."""
    inner = getattr(tokenizer, "_tok", None)
    if inner is None:
        return f"{tokenizer.name}:{tokenizer.vocab_size}"
    vocab = json.dumps(sorted(inner.get_vocab().items()))
    return f"{tokenizer.name}:{hashlib.sha256(vocab.encode()).hexdigest()[:16]}"


def corpus_key(sources: list[Source], tokenizer, text_field: str = "text") -> str:
    """The cache key of a tokenized corpus: format, tokenizer and every source's content."""
    digest = hashlib.sha256(f"v{FORMAT_VERSION}|{tokenizer_identity(tokenizer)}|{text_field}".encode())
    for source in sources:
        digest.update(f"|{source.describe()}={_fingerprint(source)}".encode())
    return digest.hexdigest()[:24]


def tokenize_corpus(
    specs: str | list[str],
    tokenizer,
    cache_dir: str | Path | None = None,
    text_field: str = "text",
    progress: bool = True,
) -> TokenCorpus:
    """Tokenize the sources once (or find them already tokenized) and memory-map the shards."""
    sources = find_sources(specs, progress)
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    final = root / "corpora" / corpus_key(sources, tokenizer, text_field)
    if (final / "meta.json").is_file():
        return TokenCorpus.open(final)
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32

    def write(work: Path) -> None:  # fills the temporary folder that atomic_write renames to `final`
        shards, num_bytes = _write_shards(sources, tokenizer, work, dtype, text_field, progress)
        if not shards or sum(s["tokens"] for s in shards) == 0:
            raise ValueError(f"no text in {', '.join(s.describe() for s in sources)}: the corpus is empty")
        meta = {"format": FORMAT_VERSION, "dtype": np.dtype(dtype).name, "shards": shards, "num_bytes": num_bytes,
                "tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size,
                "sources": [s.describe() for s in sources]}  # fmt: skip
        (work / "meta.json").write_text(json.dumps(meta, indent=1))

    try:
        atomic_write(final, write, directory=True)
    except OSError:  # another process (a parallel run) finished the same corpus first: theirs is as good
        if not (final / "meta.json").is_file():
            raise
    return TokenCorpus.open(final)


def _write_shards(sources, tokenizer, work: Path, dtype, text_field: str, progress: bool):
    """Tokenize every document into shard files under work; returns (shard records, UTF-8 bytes read)."""
    from tqdm import tqdm

    shards, num_bytes, total, pending, held = [], 0, 0, [], 0
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]

    def flush() -> int:  # append the pending documents to the current shard
        with open(work / shards[-1]["file"], "ab") as f:
            np.concatenate(pending).astype(dtype, copy=False).tofile(f)
        pending.clear()
        return 0

    with tqdm(sources, desc="tokenizing", unit="source", disable=not progress, dynamic_ncols=True) as bar:
        for source in bar:
            for blocks in iter_documents(source, text_field):
                ids = [i for block in blocks for i in tokenizer.encode(block)] + eos
                num_bytes += sum(len(block.encode("utf-8")) for block in blocks)
                if len(ids) == len(eos):
                    continue  # an empty document adds nothing, not even a separator
                if not shards or shards[-1]["tokens"] >= SHARD_TOKENS:  # documents never straddle shards
                    held = flush() if pending else 0
                    shards.append({"file": f"tokens-{len(shards):05d}.bin", "tokens": 0})
                pending.append(np.asarray(ids, dtype=np.int64))
                shards[-1]["tokens"] += len(ids)
                total += len(ids)
                held += len(ids)
                if held >= FLUSH_TOKENS:
                    held = flush()
            bar.set_postfix(tokens=total, refresh=False)
    if pending:
        flush()
    return shards, num_bytes
