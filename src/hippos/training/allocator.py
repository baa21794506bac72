"""Keep freed memory inside the process (glibc on Linux), so that large CPU tensors stop page-faulting.

glibc serves each allocation above its mmap threshold (at most 32 MiB) with a fresh memory mapping and
unmaps it on free, so the next tensor of that size faults its pages in again, 4 KiB at a time. A training
step allocates and frees the same large activations and gradients every step; on the virtual machine of
benchmarks/RESULTS.md a page fault costs several microseconds (a 154 MB zero-filled tensor: 42-45 ms from a
fresh mapping), and a 125M-parameter step at L = 2048 ran 26-32% faster with the freed memory kept (measured,
same process settings for both: H3 168 -> 211 tokens/s, Hugging Face GPT-2 141 -> 186). The price: the
process keeps its peak memory until it exits instead of handing it back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Serve every allocation from the heap and keep what is freed (glibc only); True when it took effect."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mmap off: large blocks come from the heap, whose freed space the next allocation reuses; and
    # the heap is shrunk only when over 2 GiB lie free at its top, not between steps.
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
