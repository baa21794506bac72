"""`python -m hippos.benchmarks.gpu_check`: its parts that need no GPU (the record, test counting, the refusal)."""

import json
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import hippos.benchmarks.gpu_check as gpu_check

PASSING_TESTS = {"gpu_marked": {"exit_code": 0, "passed": 3, "failed": 0, "errors": 0, "skipped": 0}}


def test_without_cuda_it_stops_at_once_with_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_check, "gpu_check", lambda *a, **k: pytest.fail("ran without a GPU"))
    assert gpu_check.main(["--json", str(tmp_path / "out.json")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "needs a CUDA GPU" in err
    assert not (tmp_path / "out.json").exists()


@pytest.mark.slow  # a fresh process
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_the_command_refuses_a_machine_without_cuda(tmp_path):
    done = subprocess.run([sys.executable, "-m", "hippos.benchmarks.gpu_check", "--json", str(tmp_path / "x.json")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and done.stdout == "" and len(done.stderr.strip().splitlines()) == 1
    assert "needs a CUDA GPU" in done.stderr and not (tmp_path / "x.json").exists()


@pytest.mark.slow  # a pytest run in a fresh process
def test_pytest_runs_are_counted(tmp_path):
    (tmp_path / "test_sample.py").write_text(
        textwrap.dedent("""
            import pytest

            def test_passes(): pass
            def test_passes_too(): pass
            def test_fails(): assert False
            def test_skips(): pytest.skip("no reason")
        """)
    )
    result = gpu_check.run_pytest(["test_sample.py"], cwd=tmp_path)
    assert result["exit_code"] == 1 and "test_fails" in result["output_tail"]
    assert (result["passed"], result["failed"], result["errors"], result["skipped"]) == (2, 1, 0, 1)


def test_benchmarks_run_fail_and_skip_into_the_record():
    def fake(device):
        return {"rows": [{"model": "h3", "tokens_per_s": 1e5, "device": device}]}

    def broken(device):
        raise RuntimeError("CUDA out of memory")

    records = gpu_check.run_benchmarks({"fake": fake, "broken": broken}, "cuda", deadline=time.monotonic() + 60)
    assert records["fake"]["rows"][0] == {"model": "h3", "tokens_per_s": 1e5, "device": "cuda"}
    assert records["fake"]["seconds"] >= 0 and "CUDA out of memory" in records["broken"]["error"]
    late = gpu_check.run_benchmarks({"fake": fake}, "cuda", deadline=time.monotonic() - 1)
    assert "skipped" in late["fake"]

    gpu = {"name": "NVIDIA H200", "memory_gib": 139.8}
    record = gpu_check.assemble_record({"cpu": "x86"}, gpu, PASSING_TESTS, records, seconds=12.5)
    assert not record["ok"] and record["gpu"]["name"] == "NVIDIA H200" and record["torch"] == torch.__version__
    assert json.loads(json.dumps(record)) == record  # a plain JSON record
    good = gpu_check.assemble_record({}, gpu, PASSING_TESTS, {"fake": records["fake"]}, seconds=1.0)
    assert good["ok"]
    crashed_job = {"fake": {"rows": [{"model": "h3", "error": "worker died (out of memory?)"}]}}
    assert not gpu_check.assemble_record({}, gpu, PASSING_TESTS, crashed_job, seconds=1.0)["ok"]
    failing = {"devices": {"exit_code": 1, "passed": 5, "failed": 1, "errors": 0, "skipped": 0}}
    assert not gpu_check.assemble_record({}, gpu, failing, {}, seconds=1.0)["ok"]
    assert "FAILED on NVIDIA H200: 3 tests passed, 0 failed; benchmarks not all run: broken" in gpu_check.summary_line(
        record, "gpu-check.json"
    )


def test_the_whole_check_with_stand_ins(monkeypatch, tmp_path):
    """gpu_check() wired end to end, with the GPU, the pytest runs and the benchmarks stood in for."""
    monkeypatch.setattr(gpu_check, "gpu_info", lambda device: {"name": "stand-in", "device": device})
    monkeypatch.setattr(gpu_check, "run_tests", lambda tests_dir, device: PASSING_TESTS)
    monkeypatch.setattr(gpu_check, "machine_info", lambda device: {"device": device})
    record = gpu_check.gpu_check("cuda:1", tmp_path, benchmarks={"fake": lambda d: {"rows": [{"ms": 1.0}]}})
    assert record["ok"] and record["gpu"] == {"name": "stand-in", "device": "cuda:1"}
    assert record["benchmarks"]["fake"]["rows"] == [{"ms": 1.0}] and record["tests"] == PASSING_TESTS


def test_the_default_tests_are_this_checkouts():
    tests = gpu_check.default_tests_dir()
    assert tests is not None and (tests / "test_devices.py").is_file() and (tests / "layers" / "test_gpu.py").is_file()
