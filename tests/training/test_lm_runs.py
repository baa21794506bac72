"""Language-model runs on text: learning, exact resume, Ctrl-C, activation checkpointing, two processes."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from hippos import H3LM, H3Config
from hippos.benchmarks.measure import matmul_tflops
from hippos.cli import main
from hippos.data import load_tokenizer
from hippos.data.packing import PackedBatches
from hippos.training import TrainConfig
from hippos.training.distributed import Distributed, Parallel
from hippos.training.lm import LMDataConfig, run_lm
from hippos.training.optim import param_groups
from tolerances import assert_close

TINY = H3Config(d_model=32, n_layer=2, n_head=2, d_state=16, vocab_size=257, attn_layer_idx=(1,))


def read_log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def losses(run_dir):
    return [r["loss"] for r in read_log(run_dir) if "loss" in r]


@pytest.fixture
def text_file(tmp_path):
    # Verse with a rhythm: learnable in a few dozen steps, yet not a single repeated string.
    lines = [f"line {i % 7}: the {'red' if i % 3 else 'blue'} hippo eats {i % 5} melons.\n" for i in range(300)]
    path = tmp_path / "verse.txt"
    path.write_text("".join(lines))
    return path


def data_config(text_file, tmp_path, **kw):
    return LMDataConfig(train=(str(text_file),), seq_len=32, cache_dir=str(tmp_path / "cache"), **kw)


@pytest.mark.slow  # several training runs or worker processes: `make test` runs it
def test_a_tiny_language_model_learns_and_logs_throughput(text_file, tmp_path):
    # The peak is measured by the caller (`hippos train` does so on a CPU): training counts, it does not measure.
    cfg = TrainConfig(steps=80, batch_size=16, lr=5e-3, warmup_steps=10, eval_every=40, log_every=10,
                      peak_tflops=matmul_tflops(size=512))  # fmt: skip
    result = run_lm(TINY, data_config(text_file, tmp_path), cfg, tmp_path / "run", progress=False)
    log = read_log(tmp_path / "run")
    # Uniform guessing is perplexity 257, the text's byte frequencies alone about 20: context was learned.
    assert result["perplexity"] < 3 and result["bits_per_byte"] < 1.6
    step = next(r for r in log if "tokens_per_s" in r)
    assert step["tokens_per_s"] > 0 and 0 < step["mfu"] < 1 and step["tflops"] > 0
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["data"]["seq_len"] == 32 and record["valid_tokens"] > 0 and record["train"]["peak_tflops"] > 0
    model = H3LM.from_pretrained(tmp_path / "run")
    assert model.config == TINY


@pytest.mark.slow  # several training runs or worker processes: `make test` runs it
def test_resume_after_a_hard_kill_gives_the_same_losses(text_file, tmp_path):
    cfg = TrainConfig(steps=30, batch_size=8, lr=2e-3, log_every=1, eval_every=10, checkpoint_every=10)
    data = data_config(text_file, tmp_path)
    run_lm(TINY, data, cfg, tmp_path / "straight", progress=False)
    run_lm(TINY, data, cfg, tmp_path / "cut", progress=False)
    # Back to the checkpoint of step 20, as if the process had been killed before the last one, then resume.
    (tmp_path / "cut" / "checkpoint.prev.pt").replace(tmp_path / "cut" / "checkpoint.pt")
    kept = [r for r in read_log(tmp_path / "cut") if r["step"] <= 20]
    (tmp_path / "cut" / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    run_lm(TINY, data, cfg, tmp_path / "cut", resume=True, progress=False)
    assert losses(tmp_path / "cut") == losses(tmp_path / "straight")


def test_ctrl_c_writes_a_checkpoint_and_the_run_resumes_where_it_stopped(text_file, tmp_path, monkeypatch):
    cfg = TrainConfig(steps=12, batch_size=8, lr=2e-3, log_every=1, eval_every=0, checkpoint_every=100)
    data = data_config(text_file, tmp_path)
    run_lm(TINY, data, cfg, tmp_path / "straight", progress=False)
    real = PackedBatches.__call__
    monkeypatch.setattr(PackedBatches, "__call__", lambda self, step: _interrupt_at(7, real, self, step))
    with pytest.raises(KeyboardInterrupt):
        run_lm(TINY, data, cfg, tmp_path / "cut", progress=False)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 7  # every finished step
    monkeypatch.undo()
    run_lm(TINY, data, cfg, tmp_path / "cut", resume=True, progress=False)
    assert losses(tmp_path / "cut") == losses(tmp_path / "straight")


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = H3LM(TINY).double().train()
    ids = torch.randint(0, 257, (2, 12))
    plain = torch.autograd.grad(model.loss(ids, ids.roll(-1, 1)), model.parameters())
    model.gradient_checkpointing = True
    recomputed = torch.autograd.grad(model.loss(ids, ids.roll(-1, 1)), model.parameters())
    for a, b in zip(plain, recomputed):
        assert_close(a, b, strict=True)  # the same operations again


def test_bad_data_settings_are_refused_before_any_work(text_file, tmp_path):
    with pytest.raises(ValueError, match="data.train is empty"):
        LMDataConfig()
    with pytest.raises(ValueError, match="valid_fraction"):
        LMDataConfig(train=("x",), valid_fraction=1.5)
    small = H3Config(**{**vars(TINY), "vocab_size": 100})
    with pytest.raises(ValueError, match="vocab_size 100 is smaller than the 257 ids"):
        run_lm(small, data_config(text_file, tmp_path), TrainConfig(steps=1), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


# ---- several processes -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, args: tuple, resume: bool = False) -> None:
    """What torchrun would start: the environment names the rank, then the ordinary entry point runs."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))  # fmt: skip
    torch.set_num_threads(1)
    try:
        run_lm(*args, resume=resume, progress=False)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # several training runs or worker processes: `make test` runs it
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_train_the_same_model_as_one_with_the_same_global_batch(text_file, tmp_path, parallel):
    cfg = TrainConfig(steps=6, batch_size=8, micro_batch_size=2, lr=3e-3, log_every=1, eval_every=3,
                      checkpoint_every=3, parallel=parallel)  # fmt: skip
    data = data_config(text_file, tmp_path)
    run_lm(TINY, data, cfg, tmp_path / "one", progress=False)
    mp.spawn(_rank_main, args=(2, _free_port(), (TINY, data, cfg, tmp_path / "two")), nprocs=2, join=True)
    one, two = H3LM.from_pretrained(tmp_path / "one"), H3LM.from_pretrained(tmp_path / "two")
    for (name, a), b in zip(one.state_dict().items(), two.state_dict().values()):
        assert_close(a, b, msg=name)  # fp32 reduction order
    # Losses as logged (fp32 means of the same batch, reduced across ranks): ten times the strict row.
    assert_close(torch.tensor(losses(tmp_path / "two")), torch.tensor(losses(tmp_path / "one")), strict=True, scale=10)
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2
    # The checkpoint holds whole tensors (gathered under FSDP): a later run, on any number of ranks, resumes it.
    state = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    assert_close(state["model"]["lm_head.weight"], two.lm_head.weight, strict=True)


@pytest.mark.slow  # several training runs or worker processes: `make test` runs it
def test_cli_tokenizer_train_then_lm_train_then_eval_ppl(text_file, tmp_path, capsys):
    pytest.importorskip("tokenizers")
    pytest.importorskip("transformers")
    cache = str(tmp_path / "cache")
    assert main(["tokenizer", "train", "--data", str(text_file), "--vocab-size", "300", "--out",
                 str(tmp_path / "tok"), "--quiet"]) == 0  # fmt: skip
    run_file = tmp_path / "lm.toml"
    run_file.write_text(
        f'[model]\nd_model = 32\nn_layer = 2\nn_head = 2\nd_state = 16\n\n[data]\ntrain = ["{text_file}"]\n'
        f'tokenizer = "{tmp_path / "tok"}"\nseq_len = 16\ncache_dir = "{cache}"\n\n'
        "[train]\nsteps = 20\nbatch_size = 8\nlr = 3e-3\neval_every = 10\n"
    )
    assert main(["train", "--config", str(run_file), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    vocab = load_tokenizer(str(tmp_path / "tok")).vocab_size  # up to 300: this little text runs out of merges
    assert (
        257 < vocab <= 300 and json.loads((tmp_path / "run" / "run.json").read_text())["model"]["vocab_size"] == vocab
    )
    capsys.readouterr()
    args = ["eval", "ppl", "--model", str(tmp_path / "run"), "--data", str(text_file), "--context", "16",
            "--cache-dir", cache, "--quiet", "--json", str(tmp_path / "ppl.json")]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "ppl.json").read_text())
    # The default tokenizer is the run's own copy of the one it trained with (one rule: data.tokenizers).
    assert result["tokenizer"] == str(tmp_path / "run") and f"perplexity {result['perplexity']:.3f}" in printed
    text = "the cat sat"
    assert load_tokenizer(result["tokenizer"]).encode(text) == load_tokenizer(str(tmp_path / "tok")).encode(text)
    assert main(["eval", "ppl", "--model", str(tmp_path / "run"), "--data", str(tmp_path / "none.txt")]) == 2


def test_cli_ctrl_c_exits_cleanly_with_a_checkpoint(text_file, tmp_path, monkeypatch, capsys):
    run_file = tmp_path / "lm.toml"
    run_file.write_text(
        f'[model]\nd_model = 32\nn_layer = 2\nd_state = 16\n\n[data]\ntrain = ["{text_file}"]\nseq_len = 16\n'
        f'cache_dir = "{tmp_path / "cache"}"\n\n[train]\nsteps = 20\nbatch_size = 4\n'
    )
    real = PackedBatches.__call__
    monkeypatch.setattr(PackedBatches, "__call__", lambda self, step: _interrupt_at(3, real, self, step))
    assert main(["train", "--config", str(run_file), "--out", str(tmp_path / "run"), "--quiet"]) == 130
    assert "interrupted (continue with --resume)" in capsys.readouterr().err
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 3


def _sharded_ssm_group(rank: int, port: int, out: str) -> None:
    """In a one-rank process group: the SSM group's parameter names before and after FSDP sharding."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    torch.distributed.init_process_group("gloo")
    try:
        model = H3LM(TINY)
        names = {id(p): n for n, p in model.named_parameters()}
        before = sorted(names[id(p)] for p in param_groups(model, 5e-3, 0.1)[1]["params"])
        Parallel(model, Distributed(0, 2, 0), "fsdp")  # "two ranks" so that it shards; the mesh is this one
        names = {id(p): n for n, p in model.named_parameters()}
        after = param_groups(model, 5e-3, 0.1)[1]["params"]
        sharded = all(type(p).__name__ == "DTensor" or hasattr(p, "full_tensor") for p in after)
        with open(out, "w") as f:
            json.dump({"before": before, "after": sorted(names[id(p)] for p in after), "sharded": sharded}, f)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # several training runs or worker processes: `make test` runs it
def test_fsdp_keeps_the_ssm_parameters_names_so_the_optimiser_groups_need_no_marks(tmp_path):
    out = tmp_path / "groups.json"
    mp.spawn(_sharded_ssm_group, args=(_free_port(), str(out)), nprocs=1, join=True)
    groups = json.loads(out.read_text())
    assert groups["sharded"] and groups["after"] == groups["before"]
    assert {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in groups["after"]} == {
        "diag.log_dt", "diag.inv_A_real", "diag.A_imag", "diag.B", "shift.B"}  # fmt: skip


def _interrupt_at(stop: int, real, batches, step: int):
    if step == stop:
        raise KeyboardInterrupt
    return real(batches, step)


@pytest.mark.slow  # several training runs or worker processes: `make test` runs it
def test_a_sharded_run_resumes_from_its_whole_tensor_checkpoint(text_file, tmp_path):
    cfg = TrainConfig(steps=6, batch_size=8, lr=3e-3, log_every=1, eval_every=0, checkpoint_every=3, parallel="fsdp")
    data = data_config(text_file, tmp_path)
    for name in ("straight", "cut"):
        mp.spawn(_rank_main, args=(2, _free_port(), (TINY, data, cfg, tmp_path / name)), nprocs=2, join=True)
    # Back to the step-3 checkpoint, as after a hard kill, then resume on two ranks again.
    (tmp_path / "cut" / "checkpoint.prev.pt").replace(tmp_path / "cut" / "checkpoint.pt")
    kept = [r for r in read_log(tmp_path / "cut") if r["step"] <= 3]
    (tmp_path / "cut" / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    mp.spawn(_rank_main, args=(2, _free_port(), (TINY, data, cfg, tmp_path / "cut"), True), nprocs=2, join=True)
    assert_close(torch.tensor(losses(tmp_path / "cut")), torch.tensor(losses(tmp_path / "straight")), strict=True)
