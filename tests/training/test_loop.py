"""The training loop: convergence, exact resume, atomic checkpoints, parameter groups, bad settings."""

import json
import math

import pytest
import torch

from hippos import H3LM, H3Config
from hippos.training import TrainConfig, latest_checkpoint, lr_factor, param_groups, train


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    config = H3Config(d_model=32, n_layer=2, n_head=2, vocab_size=16, d_state=8, attn_layer_idx=(1,), **kw)
    return H3LM(config)


def copy_task(step, batch=8, length=12, seed=0):
    """Second half repeats the first: predictable only by looking back. Depends on the step alone."""
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    half = torch.randint(0, 16, (batch, length // 2), generator=g)
    seq = torch.cat([half, half], 1)
    targets = seq.roll(-1, 1)
    targets[:, : length // 2 - 1] = -100  # only the copied half is graded
    targets[:, -1] = -100
    return seq, targets


def copy_accuracy(model):
    seq, targets = copy_task(10_000, batch=64)
    pred = model(seq).logits[..., :16].argmax(-1)
    graded = targets != -100
    return {"accuracy": (pred[graded] == targets[graded]).float().mean().item()}


def read_log(path):
    return [json.loads(line) for line in open(path)]


@pytest.mark.slow  # several training runs or worker processes: `make test` runs it
def test_a_tiny_run_learns_an_easy_task(tmp_path):
    cfg = TrainConfig(steps=150, batch_size=16, lr=3e-3, eval_every=50, log_every=10, checkpoint_every=0,
                      target_accuracy=0.99, warmup_steps=10)  # fmt: skip
    model = make_model()
    before = copy_accuracy(model.eval())["accuracy"]
    result = train(model, lambda s: copy_task(s, batch=16), cfg, tmp_path, copy_accuracy, progress=False)
    assert before < 0.2 and result["accuracy"] > 0.9
    loaded = H3LM.from_pretrained(tmp_path)  # the trained model is saved where from_pretrained finds it
    assert copy_accuracy(loaded)["accuracy"] == pytest.approx(result["accuracy"])


def test_resume_after_interruption_gives_the_same_losses(tmp_path):
    cfg = TrainConfig(steps=12, batch_size=8, micro_batch_size=4, lr=2e-3, log_every=1, checkpoint_every=5,
                      eval_every=0, warmup_steps=3)  # fmt: skip
    train(make_model(resid_dropout=0.1), copy_task, cfg, tmp_path / "straight", progress=False)

    calls = []

    def interrupted(step):
        calls.append(step)
        if step == 8 and len(calls) == 9:  # the first time step 8 is reached: Ctrl-C mid-run
            raise KeyboardInterrupt
        return copy_task(step)

    with pytest.raises(KeyboardInterrupt):
        train(make_model(resid_dropout=0.1), interrupted, cfg, tmp_path / "resumed", progress=False)
    assert latest_checkpoint(tmp_path / "resumed")["step"] == 8
    # A fresh process would build a fresh model: resume must restore everything from the checkpoint.
    train(make_model(seed=123, resid_dropout=0.1), interrupted, cfg, tmp_path / "resumed", resume=True,
          progress=False)  # fmt: skip
    straight = {r["step"]: r["loss"] for r in read_log(tmp_path / "straight" / "log.jsonl")}
    resumed = {r["step"]: r["loss"] for r in read_log(tmp_path / "resumed" / "log.jsonl")}
    assert sorted(resumed) == list(range(1, 13))
    for step in range(1, 13):
        assert resumed[step] == straight[step], step


def test_resume_after_a_hard_kill_continues_from_the_last_checkpoint(tmp_path):
    cfg = TrainConfig(steps=10, batch_size=8, lr=2e-3, log_every=1, checkpoint_every=4, eval_every=0)
    train(make_model(), copy_task, cfg, tmp_path / "a", progress=False)

    class Killed(Exception):
        """Not an interrupt: the loop gets no chance to save anything (like SIGKILL)."""

    seen = []

    def dies_at_step_9(step):
        seen.append(step)
        if step == 9 and seen.count(9) == 1:
            raise Killed
        return copy_task(step)

    with pytest.raises(Killed):
        train(make_model(), dies_at_step_9, cfg, tmp_path / "b", progress=False)
    assert latest_checkpoint(tmp_path / "b")["step"] == 8  # steps 9's work is lost, 8's is on disk
    train(make_model(seed=5), dies_at_step_9, cfg, tmp_path / "b", resume=True, progress=False)
    a = {r["step"]: r["loss"] for r in read_log(tmp_path / "a" / "log.jsonl")}
    b = {r["step"]: r["loss"] for r in read_log(tmp_path / "b" / "log.jsonl")}
    assert b[9] == a[9] and b[10] == a[10]


def test_a_truncated_checkpoint_is_refused_and_the_previous_one_still_loads(tmp_path):
    cfg = TrainConfig(steps=6, batch_size=4, log_every=1, checkpoint_every=2, eval_every=0)
    train(make_model(), copy_task, cfg, tmp_path, progress=False)
    latest = tmp_path / "checkpoint.pt"
    latest.write_bytes(latest.read_bytes()[:500])
    from hippos.training import load_checkpoint

    with pytest.raises(ValueError, match="damaged or truncated"):
        load_checkpoint(latest)
    with pytest.warns(UserWarning, match="trying the previous checkpoint"):
        previous = latest_checkpoint(tmp_path)
    assert previous["step"] == 4
    assert not list(tmp_path.glob(".checkpoint.*"))  # no temporary file left behind


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("micro_batch_size", 3, "must divide"),
        ("schedule", "step", "unknown schedule"),
        ("precision", "fp8", "unknown precision"),
        ("steps", 0, "steps must be > 0"),
        ("log_every", 0, "log_every must be > 0"),
        ("lr", float("inf"), "lr must be a finite number"),
        ("lr", float("nan"), "lr must be a finite number"),
        ("weight_decay", -0.1, "weight_decay must be >= 0"),
        ("seed", 2**64, "seed is too large"),
        ("batch_size", 4.0, "batch_size must be an integer"),
        ("target_accuracy", 2.0, "target_accuracy"),
        ("beta2", 1.0, "beta2 must be below 1"),
        ("device", "gpu", "unknown device"),
    ],
)
def test_bad_settings_are_refused_when_the_config_is_made(field, value, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{"steps": 5, "batch_size": 8, field: value})


def test_a_diverging_run_stops_with_an_error_and_keeps_its_checkpoint(tmp_path):
    cfg = TrainConfig(steps=6, batch_size=8, lr=1e30, grad_clip=0.0, log_every=3, checkpoint_every=1)
    with pytest.raises(ValueError, match="training diverged at step"):
        train(make_model(), copy_task, cfg, tmp_path, progress=False)
    assert not (tmp_path / "config.json").exists(), "no final model is saved from a diverged run"


def test_ssm_parameters_get_no_weight_decay_and_a_capped_lr():
    model = make_model()
    groups = param_groups(model, lr=5e-3, weight_decay=0.1)
    default, ssm = groups
    assert default["weight_decay"] == 0.1 and default["lr"] == 5e-3
    assert ssm["weight_decay"] == 0.0 and ssm["lr"] == 1e-3
    names = {id(p): n for n, p in model.named_parameters()}
    ssm_names = {names[id(p)].rsplit(".", 2)[-2] + "." + names[id(p)].rsplit(".", 1)[-1] for p in ssm["params"]}
    assert ssm_names == {"diag.log_dt", "diag.inv_A_real", "diag.A_imag", "diag.B", "shift.B"}
    total = sum(p.numel() for g in groups for p in g["params"])
    assert total == model.num_parameters()  # every parameter once, the tied head included once
    assert param_groups(model, lr=2e-4, weight_decay=0.1)[1]["lr"] == 2e-4  # min(1e-3, base lr)


def test_ssm_groups_come_from_the_modules_and_survive_replaced_parameters():
    model = make_model()
    before = param_groups(model, lr=5e-3, weight_decay=0.1)[1]["params"]  # held: ids stay unique
    ssm_ids = {id(p) for p in before}
    # FSDP and from_pretrained put new Parameter objects under the same module and name: the group follows.
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, torch.nn.Parameter(p.detach().clone()))
    replaced = param_groups(model, lr=5e-3, weight_decay=0.1)[1]["params"]
    assert len(replaced) == len(ssm_ids) and not ssm_ids & {id(p) for p in replaced}
    # Any module class can join the SSM group by naming its parameters; a mark on a tensor counts for nothing.

    class Gate(torch.nn.Module):
        ssm_parameter_names = ("a",)

        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
            self.b._optim = {"weight_decay": 0.0, "lr_max": 1e-3}

    gate = Gate()
    default, ssm = param_groups(torch.nn.Sequential(gate, torch.nn.Linear(2, 2)), lr=5e-3, weight_decay=0.1)
    assert [id(p) for p in ssm["params"]] == [id(gate.a)] and ssm["weight_decay"] == 0.0
    assert any(p is gate.b for p in default["params"])


def test_schedule_warms_up_then_decays_to_the_floor():
    f = [lr_factor(s, 100, 10, "cosine", 0.1) for s in range(101)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert lr_factor(55, 100, 10, "cosine", 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(55, 100, 10, "linear", 0.0) == pytest.approx(0.5)
