"""Example text files: fetched from their public source on first use, checked by SHA-256, then cached.

`example:NAME` names one as a data source (`hippos.data.text.find_sources`), so a run file or a command line
can say `--data example:tinyshakespeare` on any machine. The file is kept at `<cache>/examples/<file>` (the
cache is $HIPPOS_CACHE, default ~/.cache/hippos); once there it is used without any network access, and its
SHA-256 is checked at every use, so a damaged or edited copy is refused instead of silently trained on.

A download streams into a temporary file beside the final one and is renamed into place only when its size
and SHA-256 match: an interrupted or corrupted download never looks like a cached file, and several
processes fetching the same file at once each rename a complete copy. Offline, the error says where to get
the file and where to put it, so it can be fetched on another machine and copied over.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from .files import atomic_write

PREFIX = "example:"  # the data-source scheme: "example:NAME"
TIMEOUT = 30.0  # seconds a download may wait for the server (to connect, or between two reads)
CHUNK = 1 << 16  # bytes per read while downloading


@dataclass(frozen=True)
class Example:
    """One example file: its public source, its exact size and SHA-256, and its name in the cache."""

    url: str  # pinned to a commit, never a branch: a moved branch would change the bytes
    size: int  # bytes
    sha256: str  # hex digest of the whole file
    filename: str  # the file's name under <cache>/examples/
    description: str  # what the text is, for messages and listings


_WIKITEXT2 = (
    "https://raw.githubusercontent.com/pytorch/examples/77f55b912142e11fcfdf5b530231fb9c52f181e8/"
    "word_language_model/data/wikitext-2"
)

EXAMPLES: dict[str, Example] = {
    "tinyshakespeare": Example(
        url="https://raw.githubusercontent.com/karpathy/char-rnn/6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e/"
        "data/tinyshakespeare/input.txt",
        size=1115394,
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        filename="tinyshakespeare.txt",
        description="Tiny Shakespeare, from Karpathy's char-rnn (1.1 MB)",
    ),
    # WikiText-2 in its tokenized form (rare words as <unk>), as pytorch/examples keeps it. The training split
    # (train.txt beside these) is not offered: its SHA-256 could not be verified against a trusted copy.
    "wikitext2-valid": Example(
        url=f"{_WIKITEXT2}/valid.txt",
        size=1121681,
        sha256="f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
        filename="wikitext2-valid.txt",
        description="WikiText-2 validation split, tokenized with <unk> (1.1 MB)",
    ),
    "wikitext2-test": Example(
        url=f"{_WIKITEXT2}/test.txt",
        size=1256449,
        sha256="d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
        filename="wikitext2-test.txt",
        description="WikiText-2 test split, tokenized with <unk> (1.3 MB)",
    ),
}


def default_cache_dir() -> Path:
    """$HIPPOS_CACHE or ~/.cache/hippos: where example files and tokenized corpora are kept."""
    # Defined here rather than in text.py, which imports this module: one definition, no import cycle.
    return Path(os.environ.get("HIPPOS_CACHE", Path.home() / ".cache" / "hippos"))


def get_example(name: str) -> Example:
    """The registry entry of an example; an unknown name is a ValueError listing the known ones."""
    if name not in EXAMPLES:
        raise ValueError(f"unknown example {name!r}: known examples are {', '.join(sorted(EXAMPLES))}")
    return EXAMPLES[name]


def example_path(name: str) -> Path:
    """Where an example file is cached (whether or not it is there yet)."""
    return default_cache_dir() / "examples" / get_example(name).filename


def fetch_example(name: str, progress: bool = True) -> Path:
    """The path of an example file: the verified cached copy, else downloaded, verified and cached first."""
    entry, path = get_example(name), example_path(name)
    if path.is_file():  # no network at all once the file is here
        size, digest = path.stat().st_size, _sha256(path)
        if size != entry.size or digest != entry.sha256:
            raise ValueError(
                f"{PREFIX}{name}: the cached file {path} is damaged ({size} bytes, SHA-256 {digest}; expected "
                f"{entry.size} bytes, SHA-256 {entry.sha256}): delete it and it will be downloaded again"
            )
        return path
    _download(name, entry, path, progress)
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(name: str, entry: Example, path: Path, progress: bool) -> None:
    """Stream the file into a temporary file beside `path`, check it, and rename it into place."""

    def write(tmp: Path) -> None:  # atomic_write renames only a complete, checked file; a failure leaves none
        with open(tmp, "wb") as out:
            size, digest = _stream(name, entry, path, out, progress)
        if size != entry.size or digest != entry.sha256:
            raise ValueError(
                f"{PREFIX}{name}: the download from {entry.url} does not match: expected {entry.size} bytes, "
                f"SHA-256 {entry.sha256}; got {size} bytes, SHA-256 {digest}. Nothing was kept"
            )

    atomic_write(path, write)


def _stream(name: str, entry: Example, path: Path, out, progress: bool) -> tuple[int, str]:
    """Copy the URL's bytes to `out`; returns (bytes read, SHA-256). Network failures become one OSError."""
    import http.client  # imported on download only: urllib.request pulls in ssl and email (~50 ms)
    import urllib.request

    from tqdm import tqdm

    digest, size = hashlib.sha256(), 0
    try:
        with (
            urllib.request.urlopen(entry.url, timeout=TIMEOUT) as response,
            tqdm(total=entry.size, unit="B", unit_scale=True, desc=f"downloading {name}", disable=not progress,
                 dynamic_ncols=True, leave=False) as bar,
        ):  # fmt: skip
            for block in iter(lambda: response.read(CHUNK), b""):
                digest.update(block)
                out.write(block)
                size += len(block)
                bar.update(len(block))
                if size > entry.size:  # a wrong file: stop reading it, the size check refuses it
                    break
    except (OSError, http.client.HTTPException) as err:  # offline, DNS, refused, timeout, HTTP error, cut off
        raise OSError(_offline_message(name, entry, path, err)) from None
    return size, digest.hexdigest()


def _offline_message(name: str, entry: Example, path: Path, err: BaseException) -> str:
    """One line: why, the URL to fetch, where to put the file, and the alternative of one's own text."""
    code = getattr(err, "code", None)
    reason = f"HTTP {code} {getattr(err, 'reason', '')}".strip() if code else str(getattr(err, "reason", err) or err)
    reason = " ".join(reason.split()) or type(err).__name__  # the message must stay on one line
    return (
        f"could not download {PREFIX}{name} ({reason}): download {entry.url} and save it as {path} "
        f"(SHA-256 {entry.sha256}), or train on your own text file with --data.train FILE (--data FILE for "
        f"hippos eval ppl)"
    )
