"""`python -m hippos.benchmarks.gpu_check --json gpu-check.json`: everything that needs a CUDA GPU, in one go.

Runs the GPU tests (`pytest -m gpu`, and tests/test_devices.py on real CUDA tensors through HIPPOS_TEST_DEVICE)
and a short set of the existing benchmarks on the GPU (layer, generate, train, at small settings), within a time
budget of 10 minutes, and writes one JSON record: the machine, torch and CUDA versions, the GPU, test counts and the
benchmark records. Exit status 0 when every test passed and every benchmark ran, 1 otherwise; without a CUDA
device it stops at once with status 2 and a one-line message.

The tests are those of the source checkout this module sits in (src/hippos/benchmarks -> ../../../tests), or
--tests DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import torch

from .measure import machine_info

TIME_BUDGET_S = 600.0  # the whole check
BENCH_RESERVE_S = 180.0  # no benchmark starts later than this before the end of the budget (each takes 1-3 min)
TEST_TIMEOUT_S = 240.0  # each pytest run
DEVICE_VARIABLE = "HIPPOS_TEST_DEVICE"  # tests/test_devices.py runs on this device instead of a simulated one


# ---- the machine -------------------------------------------------------------------------------------------------
def cuda_missing() -> str | None:
    """Why this machine cannot run the check, in one line; None when a CUDA device is there."""
    if torch.cuda.is_available():
        return None
    build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
    return f"gpu-check needs a CUDA GPU, and torch {torch.__version__} ({build}) sees none"


def gpu_info(device: str) -> dict:
    """Name, memory and compute capability of the CUDA device, and the CUDA and cuDNN versions torch uses."""
    props = torch.cuda.get_device_properties(torch.device(device))
    return {
        "name": props.name,
        "memory_gib": props.total_memory / 2**30,
        "capability": f"{props.major}.{props.minor}",
        "count": torch.cuda.device_count(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }


# ---- tests -------------------------------------------------------------------------------------------------------
def default_tests_dir() -> Path | None:
    """tests/ of the source checkout this module belongs to (None for an installed package without one)."""
    tests = Path(__file__).resolve().parents[3] / "tests"
    return tests if (tests / "test_devices.py").is_file() else None


def junit_counts(path: Path) -> dict:
    """{"passed", "failed", "errors", "skipped"} from a pytest --junitxml report."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    totals = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
    for suite in suites:
        for key in totals:
            totals[key] += int(suite.get(key, 0))
    bad = totals["failures"] + totals["errors"] + totals["skipped"]
    return {"passed": totals["tests"] - bad, "failed": totals["failures"], "errors": totals["errors"],
            "skipped": totals["skipped"]}  # fmt: skip


def run_pytest(args: list[str], cwd: Path, env: dict | None = None, timeout: float = TEST_TIMEOUT_S) -> dict:
    """Run pytest in a fresh process; {"exit_code", "passed", "failed", "errors", "skipped", "seconds"}."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *args]
        try:
            done = subprocess.run(command, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True,
                                  text=True, timeout=timeout)  # fmt: skip
        except subprocess.TimeoutExpired:
            return {"exit_code": None, "error": f"timed out after {timeout:.0f} s", "seconds": timeout}
        result = {"exit_code": done.returncode, "seconds": time.perf_counter() - start}
        if report.is_file():
            result.update(junit_counts(report))
        if done.returncode != 0:  # 5: nothing was collected
            result["output_tail"] = (done.stdout + done.stderr)[-4000:]
    return result


def run_tests(tests_dir: Path, device: str) -> dict:
    """The tests marked gpu, and tests/test_devices.py on `device`, each in its own pytest process."""
    cwd = tests_dir.parent  # where pyproject.toml declares the markers
    return {
        "gpu_marked": run_pytest(["-m", "gpu", str(tests_dir)], cwd),
        "devices": run_pytest([str(tests_dir / "test_devices.py")], cwd, env={DEVICE_VARIABLE: device}),
    }


# ---- benchmarks --------------------------------------------------------------------------------------------------
def _has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def layer_bench(device: str) -> dict:
    """`hippos bench layer` at two lengths, every implementation, and 100K streamed tokens."""
    from .layer import LayerBenchConfig, run_layer_bench

    cfg = LayerBenchConfig(lengths=(1024, 8192), repeats=5, stream_tokens=100_000, stream_marks=(100_000,),
                           device=device)  # fmt: skip
    return run_layer_bench(cfg)


def generate_bench(device: str) -> dict:
    """`hippos bench generate` at batch 1 and 16, one 512-token prompt, 64 new tokens."""
    from .generate import MODELS, GenerateBenchConfig, run_generate_bench

    models = MODELS if _has_transformers() else tuple(m for m in MODELS if m != "gpt2")
    cfg = GenerateBenchConfig(models=models, batches=(1, 16), prompts=(512,), new_tokens=64, device=device)
    return run_generate_bench(cfg)


def train_bench(device: str) -> dict:
    """`hippos bench train` at lengths 1024 and 4096, median of 3 steps."""
    from .train_speed import MODELS, TrainBenchConfig, run_train_bench

    models = MODELS if _has_transformers() else tuple(m for m in MODELS if m != "gpt2")
    return run_train_bench(TrainBenchConfig(models=models, lengths=(1024, 4096), repeats=3, device=device))


BENCHMARKS: dict[str, Callable[[str], dict]] = {"layer": layer_bench, "generate": generate_bench, "train": train_bench}


def run_benchmarks(benchmarks: dict[str, Callable[[str], dict]], device: str, deadline: float) -> dict:
    """{name: record} of each benchmark run on `device`; one that fails records {"error"}, and those that would
    start after `deadline` (time.monotonic()) {"skipped"}."""
    records = {}
    for name, bench in benchmarks.items():
        if time.monotonic() >= deadline:
            records[name] = {"skipped": "the time budget was spent"}
            continue
        start = time.perf_counter()
        try:
            records[name] = {**bench(device), "seconds": time.perf_counter() - start}
        except Exception as err:  # one broken benchmark must not cost the others' figures
            records[name] = {"error": repr(err), "seconds": time.perf_counter() - start}
    return records


# ---- the record --------------------------------------------------------------------------------------------------
def assemble_record(machine: dict, gpu: dict, tests: dict, benchmarks: dict, seconds: float) -> dict:
    """The JSON record; "ok" when every test run passed without failures and every benchmark ran."""
    tests_ok = all(t.get("exit_code") == 0 and not t.get("failed") and not t.get("errors") for t in tests.values())
    benches_ok = all("error" not in b and "skipped" not in b and not _failed_rows(b) for b in benchmarks.values())
    return {
        "check": "gpu-check",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "torch": torch.__version__,
        "gpu": gpu,
        "tests": tests,
        "benchmarks": benchmarks,
        "seconds": seconds,
        "ok": bool(tests_ok and benches_ok),
    }


def _failed_rows(record: dict) -> list:
    """Rows of a benchmark record that hold an error instead of figures (a job that crashed)."""
    return [row for row in record.get("rows", []) if isinstance(row, dict) and "error" in row]


def gpu_check(device: str = "cuda", tests_dir: Path | None = None, benchmarks=None, budget_s=TIME_BUDGET_S) -> dict:
    """Run the tests and benchmarks on a CUDA device; returns the record (see the module docstring)."""
    start = time.monotonic()
    tests_dir = tests_dir or default_tests_dir()
    tests = run_tests(tests_dir, device) if tests_dir else {"tests": {"error": "no tests folder: give --tests"}}
    deadline = start + budget_s - BENCH_RESERVE_S
    records = run_benchmarks(BENCHMARKS if benchmarks is None else benchmarks, device, deadline)
    return assemble_record(machine_info(device), gpu_info(device), tests, records, time.monotonic() - start)


def main(argv: list[str] | None = None) -> int:
    """Command line: exit status 0 when everything passed, 1 when something failed, 2 without a CUDA GPU."""
    parser = argparse.ArgumentParser(prog="python -m hippos.benchmarks.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--json", default="gpu-check.json", help="where to write the record")
    parser.add_argument("--device", default="cuda", help="the CUDA device (cuda, cuda:1, ...)")
    parser.add_argument("--tests", type=Path, default=None, help="the tests folder (default: this checkout's)")
    args = parser.parse_args(argv)
    why = cuda_missing()
    if why:
        print(why, file=sys.stderr)
        return 2
    record = gpu_check(args.device, args.tests)
    Path(args.json).write_text(json.dumps(record, indent=1, default=str))
    print(summary_line(record, args.json))
    return 0 if record["ok"] else 1


def summary_line(record: dict, path: str) -> str:
    """One line for the terminal: test counts, benchmarks that did not run cleanly, where the record went."""
    tests = record["tests"].values()
    passed = sum(t.get("passed", 0) for t in tests)
    failed = sum(t.get("failed", 0) + t.get("errors", 0) for t in tests)
    broken = [k for k, b in record["benchmarks"].items() if "error" in b or "skipped" in b or _failed_rows(b)]
    benches = f"benchmarks not all run: {', '.join(broken)}" if broken else "every benchmark ran"
    verdict = "ok" if record["ok"] else "FAILED"
    return f"gpu-check {verdict} on {record['gpu']['name']}: {passed} tests passed, {failed} failed; {benches}; {path}"


if __name__ == "__main__":
    sys.exit(main())
