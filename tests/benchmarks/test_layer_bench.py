"""The layer benchmark's pieces run and report what they claim, at tiny sizes (speed is never asserted)."""

import json

import pytest
import torch

from hippos.benchmarks.baselines import OfficialH3Port
from hippos.benchmarks.layer import (
    LayerBenchConfig,
    format_table,
    measure_layer,
    plot,
    run_layer_bench,
    stream,
    summarize,
)
from hippos.benchmarks.measure import PeakMemory, run_isolated
from hippos.layers import H3
from tolerances import assert_close

TINY = LayerBenchConfig(
    lengths=(16,), d_model=32, n_head=4, repeats=1, stream_tokens=300, stream_segment=64, stream_marks=(128, 300)
)


def test_official_port_computes_the_same_layer():
    torch.manual_seed(0)
    layer = H3(16, 8).double()
    x = torch.randn(2, 37, 16, dtype=torch.float64)
    assert_close(OfficialH3Port(layer)(x), layer(x)[0], strict=True)  # the same math, written the official way


def test_official_port_refuses_multihead():
    with pytest.raises(ValueError, match="head_dim 1"):
        OfficialH3Port(H3(16, 8, head_dim=4))


@pytest.mark.parametrize("impl", ["hippos", "official", "attention"])
@pytest.mark.parametrize("backward", [False, True])
def test_measure_layer_record(impl, backward):
    record = measure_layer(impl, 16, backward, TINY)
    assert record["impl"] == impl and record["L"] == 16
    assert record["pass"] == ("fwd+bwd" if backward else "fwd")
    assert record["ms"] > 0
    assert record["mode"] == ("fft" if impl == "hippos" else None)


def test_peak_memory_sees_a_large_allocation():
    with PeakMemory() as mem:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    if mem.mib is None:
        pytest.skip("peak RSS is not readable on this platform")
    assert mem.mib >= 48


def test_stream_reports_each_mark():
    records = stream(TINY)
    assert [r["tokens"] for r in records] == [128, 300]
    assert all(r["tokens_per_s"] > 0 for r in records)


def _square(x):
    return x * x


@pytest.mark.slow  # a fresh process
def test_run_isolated_returns_the_result():
    assert run_isolated(_square, 7) == 49


@pytest.mark.slow  # fresh processes per measurement
def test_summary_table_json_and_plot(tmp_path, monkeypatch):
    # Run the measurements in-process: the isolation is tested above and costs seconds per call.
    for where in ("hippos.benchmarks.layer", "hippos.benchmarks.measure"):
        monkeypatch.setattr(f"{where}.run_isolated", lambda fn, *a: fn(*a))
    result = run_layer_bench(TINY)
    json.dumps(result)  # the record must be JSON-serialisable as written by --json
    (line_fwd, line_bwd) = summarize(result)
    assert line_fwd["pass"] == "fwd" and line_bwd["pass"] == "fwd+bwd"
    for line in (line_fwd, line_bwd):
        assert line["x_vs_official"] == pytest.approx(line["official_ms"] / line["hippos_ms"])
        assert line["x_vs_attention"] == pytest.approx(line["attention_ms"] / line["hippos_ms"])
        assert line["floor_ms"] > 0
    text = format_table(result)
    assert "x official" in text and "stream:" in text
    assert format_table(result, markdown=True).splitlines()[1].startswith("|---")
    pytest.importorskip("matplotlib")
    plot(result, str(tmp_path / "layer.png"))
    assert (tmp_path / "layer.png").stat().st_size > 1000


def test_a_failed_measurement_becomes_an_error_row(monkeypatch):
    def boom(fn, *args):
        raise RuntimeError("no memory")

    monkeypatch.setattr("hippos.benchmarks.measure.run_isolated", boom)
    cfg = LayerBenchConfig(lengths=(16,), d_model=32, n_head=4, impls=("hippos",), stream_tokens=0)
    monkeypatch.setattr("hippos.benchmarks.layer.matmul_gflops", lambda device: 100.0)
    result = run_layer_bench(cfg)
    assert all("error" in r for r in result["rows"])
    assert "failed: hippos L=16 fwd" in format_table(result)
