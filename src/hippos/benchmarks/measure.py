"""Measuring tools shared by the benchmarks: wall time, peak memory, the machine's matmul rate.

Every wall time in hippos.benchmarks comes from `timed` (one call) or `median_time` (the median of several),
which wait for an accelerator's queued kernels, so that a figure covers the work and not only its launch.

Peak memory on the CPU is the rise of the process's resident set (Linux VmHWM, reset through
/proc/self/clear_refs) while the measured call runs. Because an allocator keeps freed memory, every
measurement that reports memory runs in a fresh process (`run_isolated`), so nothing earlier hides it.
On CUDA the allocator's own peak counter is used.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import platform
import statistics
import time
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

import torch

T = TypeVar("T")


def sync(device: torch.device | str) -> None:
    """Wait for queued kernels on an accelerator so that wall time covers them."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], T], device="cpu") -> tuple[T, float]:
    """(fn(), its wall time in seconds), queued accelerator kernels included."""
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def median_time(fn: Callable[[], object], repeats: int, device="cpu", warmup: int = 1) -> float:
    """Median wall time of fn() in seconds over `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    return statistics.median(timed(fn, device)[1] for _ in range(repeats))


def _read_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Context manager: `.mib` is the peak extra memory (MiB) used inside the block, or None if unknown."""

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.mib: float | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        self._base = _read_status_kib("VmRSS")
        try:  # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self._base = None
        return self

    def read(self) -> float | None:
        """Peak extra memory (MiB) since the block was entered, readable while it is still open."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self._base) / 2**20
        peak = _read_status_kib("VmHWM")
        if self._base is None or peak is None:
            return None
        return max(0, peak - self._base) / 1024

    def __exit__(self, *exc) -> None:
        self.mib = self.read()


def run_isolated(fn: Callable, *args, **kwargs):
    """Run fn(*args, **kwargs) in a fresh Python process and return its result (fn must be importable)."""
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def run_jobs(fn: Callable, jobs: list[tuple[dict, tuple]], progress=None) -> list[dict]:
    """fn(*args) for every (fields, args) job, each in a fresh process.

    A job that fails (a worker killed for memory, a missing baseline) becomes {**fields, "error": why}, and
    the rest still run. progress(done, total, what) is called before each job and at the end.
    """
    rows = []
    for i, (fields, args) in enumerate(jobs):
        if progress:
            progress(i, len(jobs), " ".join(f"{k} {v}" for k, v in fields.items()))
        try:
            rows.append(run_isolated(fn, *args))
        except Exception as err:
            reason = "worker died (out of memory?)" if isinstance(err, BrokenProcessPool) else repr(err)
            rows.append({**fields, "error": reason})
    if progress:
        progress(len(jobs), len(jobs), "done")
    return rows


def format_cells(cells: list[list[str]], markdown: bool = False) -> list[str]:
    """Rows of strings (the first one the header) as right-aligned text columns, or a Markdown table."""
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in cells]
        lines.insert(1, "|" + "---|" * len(cells[0]))
        return lines
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]


def matmul_tflops(device="cpu", size: int = 2048, repeats: int = 5) -> float:
    """Measured fp32 matmul rate (TFLOP/s) of this device: the peak that MFU is quoted against on a CPU."""
    a = torch.randn(size, size, device=device)
    return 2 * size**3 / median_time(lambda: a @ a, repeats, device) / 1e12


def matmul_gflops(device="cpu", size: int = 2048, repeats: int = 5) -> float:
    """Measured fp32 matmul rate (GFLOP/s) of this machine: the floor of every FLOP count."""
    return 1e3 * matmul_tflops(device, size, repeats)


class ReadBandwidth:
    """This machine's read bandwidth (GB/s), sampled on demand: sums over a tensor far larger than any cache.

    The tensor is made once, so that samples can be taken between other measurements at little cost.
    """

    def __init__(self, device="cpu", gib: float = 1.0):
        self.device = device
        self.x = torch.ones(int(gib * 2**30) // 4, device=device)
        self.x.sum()  # first touch of every page stays out of the samples

    def sample(self, repeats: int = 7) -> float:
        """The best of `repeats` timed sums, as bandwidth benchmarks report it: the highest bandwidth gives
        the lowest (strictest) floor for anything compared against it."""
        best = min(timed(self.x.sum, self.device)[1] for _ in range(repeats))
        return self.x.numel() * 4 / best / 1e9


def machine_info(device="cpu") -> dict:
    """What the figures were measured on."""
    info = {
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info
