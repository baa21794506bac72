"""Writing files so that a reader never sees half of one: the one atomic writer of the project.

Everything hippos keeps on disk (models, checkpoints, inference states, downloads, tokenized corpora, run
results) is written under a temporary name in the folder it will live in, then renamed into place. A rename
within one folder is atomic, so the path holds either the old complete file or the new complete one, never a
torn write, whatever interrupts the job (an exception, Ctrl-C, a killed process between the two steps leaves
only a hidden temporary file).
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[Path], object], *, directory: bool = False) -> Path:
    """Call write(tmp) on a temporary path beside `path`, then rename tmp to `path`; returns `path`.

    directory=False: write creates the file tmp. directory=True: tmp is an empty folder made here, for write
    to fill (the rename then fails if `path` is a folder that is not empty; the caller decides what that means).
    Whatever goes wrong, tmp is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A random name rather than mkstemp: the file is created by `write`, so it gets the umask's permissions
    # like any other file the user writes (mkstemp's are 0600), and concurrent writers never share a name.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    if directory:
        tmp.mkdir()
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        _remove(tmp)
    return path


def _remove(path: Path) -> None:
    """Delete a file or folder if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
