"""`hippos bench train` and `hippos bench generate` at the tiny shape: records, tables, errors."""

import time

import pytest
import torch

import hippos.benchmarks.generate as generate_bench
import hippos.layers.attention
import hippos.layers.h3
import hippos.models.lm
from hippos.benchmarks.generate import GenerateBenchConfig, build_model, matvec_ms, run_generate_bench
from hippos.benchmarks.generate import format_table as generate_table
from hippos.benchmarks.train_speed import TrainBenchConfig, format_table, measure_train, run_train_bench, train_loss
from hippos.models import H3Config
from tolerances import assert_close


@pytest.mark.slow  # several training runs or worker processes: `make test` runs it
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
    """Both timed losses are the mean over the same L - 1 next-token predictions of the same ids."""
    pytest.importorskip("transformers")
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    for kind in ("h3", "gpt2"):
        model = build_model(kind, "tiny", 16)  # fp32: transformers computes its loss in fp32 whatever the model
        logits = model(ids).logits if kind == "h3" else model(input_ids=ids).logits
        # Position t predicts token t + 1: every position but the last, every token but the first (over every
        # logit each model has: ours pads its vocabulary, and trains over the padded head as it always did).
        flat = logits[:, :-1].reshape(-1, logits.shape[-1])
        expected = torch.nn.functional.cross_entropy(flat, ids[:, 1:].reshape(-1))
        assert_close(train_loss(kind, model, ids), expected, msg=kind)
    record = measure_train("h3", 16, TrainBenchConfig(preset="tiny", repeats=1))
    assert record["length"] == 16 and record["seconds_per_step"] > 0


def test_ceiling_keeps_every_projection_of_pure_h3_and_drops_only_the_ssms():
    h3 = measure_train("h3", 16, TrainBenchConfig(preset="tiny", repeats=1))
    ceiling = measure_train("ceiling", 16, TrainBenchConfig(preset="tiny", repeats=1))
    model = build_model("h3", "tiny", 16)
    ssm = sum(p.numel() for b in model.backbone.layers for n, p in b.mixer.named_parameters() if "proj" not in n
              and "output_linear" not in n)  # fmt: skip
    assert ceiling["parameters"] == h3["parameters"] - ssm and ssm > 0


@pytest.mark.slow  # several training runs or worker processes: `make test` runs it
def test_generate_bench_records_prefill_and_decode():
    pytest.importorskip("transformers")
    cfg = GenerateBenchConfig(preset="tiny", batches=(1,), prompts=(16,), new_tokens=4, models=("h3", "gpt2"))
    result = run_generate_bench(cfg)
    assert [r["model"] for r in result["rows"]] == ["h3", "gpt2"]
    assert all(r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0 for r in result["rows"])
    assert all(r["bandwidth_gbs"] > 0 for r in result["rows"])  # batch 1: the floor's bandwidth, per process
    assert all(r["x_floor"] > 0 for r in result["rows"])
    assert result["rows"][0]["matvec_x_floor"] > 0 and result["rows"][1]["matvec_x_floor"] is None
    table = generate_table(result)
    assert "x GPT-2 decode" in table and "median of the rounds" in table and "matvec x floor" in table


def test_floor_ratio_pairs_each_rounds_steps_with_the_bandwidth_sampled_just_before(monkeypatch):
    model = build_model("h3", "tiny", n_positions=16)
    weight_bytes = generate_bench.weight_bytes(model)
    samples = iter([10.0, 20.0, 10.0])  # GB/s, drifting between rounds

    class FakeBandwidth:
        def __init__(self, device):
            pass

        def sample(self, repeats):
            return next(samples)

    monkeypatch.setattr(generate_bench, "ReadBandwidth", FakeBandwidth)
    with torch.inference_mode():
        got = generate_bench.floor_ratios(model, lambda: time.sleep(0.004), "cpu", rounds=3, steps=3)
    ratios = sorted(0.004e3 / (weight_bytes / (bw * 1e6)) for bw in (10.0, 20.0, 10.0))
    assert got["bandwidth_gbs"] == 10.0 and got["matvec_x_floor"] > 0
    assert ratios[1] <= got["x_floor"] < ratios[1] * 1.5  # the median round: sleep takes at least its time


def test_matvec_sweep_multiplies_exactly_the_weights_of_a_decode_step(monkeypatch):
    model = build_model("hybrid", "tiny", n_positions=16)
    seen = []

    def record(linear, x):
        seen.append(linear.weight)
        return torch.nn.functional.linear(x, linear.weight, linear.bias)

    # Every module that runs decode-time products imports the function by name.
    for module in (hippos.layers.h3, hippos.layers.attention, hippos.models.lm, generate_bench):
        monkeypatch.setattr(module, "decode_linear", record)
    with torch.inference_mode():
        state = model(torch.tensor([[1, 2, 3]]), return_state=True).state
        model.step(torch.tensor([4]), state)
        step_weights = {id(w) for w in seen}
        assert len(seen) == len(step_weights)  # a step reads every weight matrix once
        seen.clear()
        matvec_ms(model, repeats=1)
    assert [id(w) for w in seen[: len(seen) // 2]] == [id(w) for w in seen[len(seen) // 2 :]]  # warm-up + 1
    assert {id(w) for w in seen} == step_weights


def test_generate_bench_quantizes_our_models_and_keeps_the_fp32_floor(monkeypatch):
    from hippos.layers import Int8Linear
    from hippos.models.quantize import quantization_of

    cfg = GenerateBenchConfig(preset="tiny", batches=(2,), prompts=(8,), new_tokens=2, models=("h3",), quantize="int8")
    model, fp32_bytes = generate_bench._build("h3", cfg)
    assert quantization_of(model) == "int8" and fp32_bytes == generate_bench.weight_bytes(build_model("h3", "tiny", 8))
    record = generate_bench.measure_generate("h3", 2, 8, cfg)  # batch 2: no floor rounds, fast
    assert record["quantize"] == "int8" and record["weight_bytes"] == fp32_bytes
    assert 0 < record["model_bytes"] < fp32_bytes and record["decode_tokens_per_s"] > 0
    table = generate_table({"rows": [record]})
    assert "hippos pure H3, int8" in table and "floor is still the fp32 weight bytes" in table
    # The matvec sweep times the int8 layers, the head included.
    seen = []
    monkeypatch.setattr(generate_bench, "decode_linear", lambda linear, x: seen.append(linear))
    matvec_ms(model, repeats=1)
    assert set(map(id, seen)) == {id(m) for m in model.modules() if isinstance(m, Int8Linear)}
    # The floor of a quantized model's step: the fp32 bytes it was given, not the int8 model's parameters.
    monkeypatch.setattr(generate_bench, "ReadBandwidth", lambda device: type("B", (), {"sample": lambda s, r: 1.0})())
    monkeypatch.setattr(generate_bench, "median_time", lambda *args, **kwargs: 0.004)  # every timing 4 ms
    with torch.inference_mode():
        got = generate_bench.floor_ratios(model, lambda: None, "cpu", 1, 2, weights=fp32_bytes)
    assert got["x_floor"] == pytest.approx(4.0 / (fp32_bytes / 1e6))  # 1 GB/s: the floor is fp32_bytes / 1e6 ms
    assert generate_bench.weight_bytes(model) < fp32_bytes / 2  # the int8 model's own parameters: not its floor
    with pytest.raises(ValueError, match="quantize must name one or more of none, int8; got int4"):
        GenerateBenchConfig(quantize="int4")


@pytest.mark.parametrize("bad", [{"models": ("mamba",)}, {"batch": 0}, {"lengths": ()}, {"lengths": (1,)}])
def test_train_bench_refuses_bad_settings_when_the_config_is_made(bad):
    with pytest.raises(ValueError):
        TrainBenchConfig(preset="tiny", **bad)
