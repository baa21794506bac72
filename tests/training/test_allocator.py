"""keep_freed_memory: freed large tensors stay in the process (glibc), ready for the next allocation."""

import platform
import subprocess
import sys

import pytest

PROBE = """
import sys, torch
from hippos.training.allocator import keep_freed_memory
def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
before = rss_mib()
x = torch.ones(50_000_000)  # 200 MB
del x
print(applied, rss_mib() - before)
"""


def _probe(mode: str) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    applied, kept = out.split()
    return applied, float(kept)


@pytest.mark.slow  # fresh Python processes
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_freed_memory_is_kept_only_when_asked():
    applied, kept = _probe("keep")
    assert applied == "True" and kept > 150  # the 200 MB stayed resident for reuse
    applied, kept = _probe("default")
    assert applied == "False" and kept < 50  # glibc unmapped it at once
