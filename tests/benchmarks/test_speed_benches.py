"""`hippos bench train` and `hippos bench generate` at the tiny shape: records, tables, errors."""

import pytest

from hippos.benchmarks.generate import GenerateBenchConfig, build_model, run_generate_bench
from hippos.benchmarks.generate import format_table as generate_table
from hippos.benchmarks.train_speed import TrainBenchConfig, format_table, measure_train, run_train_bench
from hippos.models import H3Config


def test_train_bench_measures_every_model_in_fresh_processes():
    pytest.importorskip("transformers")
    cfg = TrainBenchConfig(preset="tiny", lengths=(32,), repeats=1)
    result = run_train_bench(cfg)
    rows = {r["model"]: r for r in result["rows"]}
    assert set(rows) == {"h3", "hybrid", "gpt2", "ceiling"} and all("error" not in r for r in rows.values())
    for r in rows.values():
        assert r["tokens_per_s"] == pytest.approx(32 / r["seconds_per_step"]) and r["parameters"] > 0
    table = format_table(result)
    assert "Hugging Face GPT-2 (SDPA attention)" in table and "x GPT-2" in table and "GFLOP/s" in table


def test_gpt2_baseline_has_the_shape_of_the_preset():
    pytest.importorskip("transformers")
    gpt = build_model("gpt2", "tiny", n_positions=64)
    ours = H3Config.preset("tiny")
    assert (gpt.config.n_embd, gpt.config.n_layer, gpt.config.n_head) == (ours.d_model, ours.n_layer, ours.n_head)
    assert gpt.config.n_positions == 64
    # Dropout-free like our models (dropout would also slow GPT-2's attention down in training).
    assert gpt.config.attn_pdrop == gpt.config.resid_pdrop == gpt.config.embd_pdrop == 0.0


def test_train_step_of_our_model_predicts_the_same_tokens_as_gpt2s():
    record = measure_train("h3", 16, TrainBenchConfig(preset="tiny", repeats=1))
    assert record["length"] == 16 and record["seconds_per_step"] > 0


def test_ceiling_keeps_every_projection_of_pure_h3_and_drops_only_the_ssms():
    h3 = measure_train("h3", 16, TrainBenchConfig(preset="tiny", repeats=1))
    ceiling = measure_train("ceiling", 16, TrainBenchConfig(preset="tiny", repeats=1))
    model = build_model("h3", "tiny", 16)
    ssm = sum(p.numel() for b in model.backbone.layers for n, p in b.mixer.named_parameters() if "proj" not in n
              and "output_linear" not in n)  # fmt: skip
    assert ceiling["parameters"] == h3["parameters"] - ssm and ssm > 0


def test_generate_bench_records_prefill_and_decode():
    pytest.importorskip("transformers")
    cfg = GenerateBenchConfig(preset="tiny", batches=(1,), prompts=(16,), new_tokens=4, models=("h3", "gpt2"))
    result = run_generate_bench(cfg)
    assert [r["model"] for r in result["rows"]] == ["h3", "gpt2"]
    assert all(r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0 for r in result["rows"])
    assert all(r["bandwidth_gbs"] > 0 for r in result["rows"])  # batch 1: the floor's bandwidth, per process
    table = generate_table(result)
    assert "x GPT-2 decode" in table and "measured in each row's process" in table


@pytest.mark.parametrize("bad", [{"models": ("mamba",)}, {"batch": 0}, {"lengths": ()}])
def test_train_bench_refuses_bad_settings(bad):
    with pytest.raises(ValueError):
        run_train_bench(TrainBenchConfig(preset="tiny", **bad))
