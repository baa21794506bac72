"""Synthetic-task runs: data order, a tiny run that learns, resume, the run record, the CLI around them."""

import json

import pytest
import torch

from hippos import H3LM, H3Config
from hippos.cli import main
from hippos.data import SyntheticTask, make_splits, save_examples
from hippos.evaluation import evaluate_examples
from hippos.training import TrainConfig
from hippos.training.synthetic import EpochBatches, SyntheticDataConfig, data_config_of_run, run_synthetic

# A short induction head (8 tokens, 10 long) that a tiny hybrid learns in about 200 steps.
EASY = SyntheticDataConfig(task="induction_head", vocab_size=8, seq_len=10, n_train=2000, n_test=200, seed=1,
                           loss_on="graded")  # fmt: skip
TINY = H3Config(d_model=32, n_layer=2, n_head=2, d_state=16, vocab_size=9, attn_layer_idx=(1,))


def read_log(run_dir):
    return [json.loads(line) for line in open(run_dir / "log.jsonl")]


def test_epoch_batches_visit_every_example_once_per_epoch_and_depend_on_the_step_only():
    train, _ = make_splits(SyntheticTask("induction_head", 20, 30), 100, 10, seed=0)
    batches = EpochBatches(train, batch_size=32, seed=3)
    assert batches.steps_per_epoch == 3
    seen = torch.cat([batches(s)[0] for s in range(3)])
    rows = {tuple(r) for r in seen.tolist()}
    assert len(seen) == 96 and rows <= {tuple(r) for r in train.inputs.tolist()} and len(rows) >= 90
    again = EpochBatches(train, batch_size=32, seed=3)
    for step in (5, 0, 4):  # any order: a resumed run asks for a later step first
        assert torch.equal(again(step)[0], batches(step)[0])
    assert not torch.equal(batches(0)[0], batches(3)[0])  # a new permutation every epoch
    assert not torch.equal(EpochBatches(train, 32, seed=4)(0)[0], batches(0)[0])


def test_graded_loss_masks_everything_but_the_answers():
    train, _ = make_splits(SyntheticTask("associative_recall", 10, 20), 64, 8, seed=0)
    inputs, targets = EpochBatches(train, 16, seed=0, loss_on="graded")(0)
    assert ((targets != -100).sum(1) == 1).all() and (targets[:, -1] != -100).all()
    assert (EpochBatches(train, 16, seed=0, loss_on="all")(0)[1] != -100).all()


@pytest.mark.slow  # several training runs or worker processes: `make test` runs it
def test_a_tiny_synthetic_run_learns_and_records_its_task(tmp_path):
    cfg = TrainConfig(steps=600, batch_size=32, lr=5e-3, warmup_steps=50, eval_every=25, checkpoint_every=0,
                      target_accuracy=0.98)  # fmt: skip
    result = run_synthetic(TINY, EASY, cfg, tmp_path, progress=False)
    assert result["accuracy"] >= 0.98 and result["step"] < 600  # learned and stopped early
    assert data_config_of_run(tmp_path) == EASY
    model = H3LM.from_pretrained(tmp_path)
    test = make_splits(EASY.spec(), EASY.n_train, EASY.n_test, EASY.seed)[1]
    assert evaluate_examples(model, test)["accuracy"] == pytest.approx(result["accuracy"])


@pytest.mark.slow  # several training runs or worker processes: `make test` runs it
def test_synthetic_run_resumes_to_the_same_losses(tmp_path):
    cfg = TrainConfig(steps=30, batch_size=16, lr=2e-3, log_every=1, eval_every=10, checkpoint_every=10)
    run_synthetic(TINY, EASY, cfg, tmp_path / "straight", progress=False)
    run_synthetic(TINY, EASY, cfg, tmp_path / "cut", progress=False)
    # Go back to the checkpoint of step 20, as if a hard kill had come before the last one, then resume.
    (tmp_path / "cut" / "checkpoint.prev.pt").replace(tmp_path / "cut" / "checkpoint.pt")
    lines = [r for r in read_log(tmp_path / "cut") if r["step"] <= 20]
    (tmp_path / "cut" / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    run_synthetic(TINY, EASY, cfg, tmp_path / "cut", resume=True, progress=False)
    losses = lambda d: [r["loss"] for r in read_log(d) if "loss" in r]  # noqa: E731
    assert losses(tmp_path / "cut") == losses(tmp_path / "straight")


def test_a_vocabulary_too_small_for_the_task_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="vocab_size 5 is smaller than the 9 ids"):
        run_synthetic(H3Config(**{**vars(TINY), "vocab_size": 5}), EASY, TrainConfig(steps=1), tmp_path)
    assert not (tmp_path / "log.jsonl").exists()


@pytest.mark.parametrize("bad", [{"task": "copying"}, {"loss_on": "some"}, {"n_test": 0},
                                 {"task": "associative_recall", "vocab_size": 7}])  # fmt: skip
def test_bad_data_settings_are_refused(bad):
    with pytest.raises(ValueError):
        SyntheticDataConfig(**bad)


# ---- the command line --------------------------------------------------------------------------------

RUN_FILE = """
[model]
d_model = 32
n_layer = 2
n_head = 2
d_state = 16
attn_layer_idx = [1]

[task]
task = "induction_head"
vocab_size = 8
seq_len = 10
n_train = 2000
n_test = 200
seed = 1
loss_on = "graded"

[train]
steps = 600
batch_size = 32
lr = 5e-3
warmup_steps = 50
eval_every = 25
checkpoint_every = 100
target_accuracy = 0.98
"""


def test_cli_train_then_eval(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(RUN_FILE)
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(out), "--quiet", "--train.seed", "2"]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["train"]["seed"] == 2 and record["model"]["vocab_size"] == 9  # vocabulary from the task
    capsys.readouterr()
    assert main(["eval", "synthetic", "--model", str(out), "--json", str(tmp_path / "e.json")]) == 0
    printed = capsys.readouterr().out
    accuracy = json.loads((tmp_path / "e.json").read_text())["accuracy"]
    assert accuracy >= 0.98 and f"{100 * accuracy:.2f}%" in printed and "test split of seed 1" in printed
    # Examples made elsewhere, in the documented file format, score the same.
    test = make_splits(EASY.spec(), EASY.n_train, EASY.n_test, EASY.seed)[1]
    save_examples(tmp_path / "ex.npz", test)
    assert main(["eval", "synthetic", "--model", str(out), "--examples", str(tmp_path / "ex.npz"),
                 "--json", str(tmp_path / "f.json")]) == 0  # fmt: skip
    assert json.loads((tmp_path / "f.json").read_text())["accuracy"] == accuracy


@pytest.mark.slow  # several training runs or worker processes: `make test` runs it
def test_cli_resume_without_config_reads_the_run_record(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(RUN_FILE.replace("target_accuracy = 0.98", "log_every = 1"))
    out = tmp_path / "run"
    args = ["--out", str(out), "--quiet", "--train.steps", "20", "--train.checkpoint_every", "10"]
    assert main(["train", "--config", str(config), *args]) == 0
    losses = [r["loss"] for r in read_log(out) if "loss" in r]
    (out / "checkpoint.prev.pt").replace(out / "checkpoint.pt")  # back to step 10
    (out / "log.jsonl").write_text("")
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 0
    assert [r["loss"] for r in read_log(out) if "loss" in r] == losses[10:]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--train.stepz", "5"], "unknown key train.stepz"),
        (["--train.steps", "many"], "train.steps takes int"),
        (["--task.task", "copying"], "unknown task 'copying'"),
        (["--model.ssm_mixer", "lstm"], "ssm_mixer must be"),
        (["--optim.lr", "1"], "unknown option --optim.lr"),
        (["--train.steps"], "argument --train.steps: expected one argument"),
        (["--model.vocab_size", "3"], "smaller than the 9 ids"),
    ],
)
def test_cli_train_refuses_bad_settings_before_training(tmp_path, capsys, extra, message):
    config = tmp_path / "run.toml"
    config.write_text(RUN_FILE)
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "o"), "--quiet", *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o" / "log.jsonl").exists()


def test_cli_train_refuses_unknown_toml_keys(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(RUN_FILE.replace("[train]", "[train]\nlearning_rate = 1.0"))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "o")]) == 2
    assert "unknown key train.learning_rate" in capsys.readouterr().err


def test_the_shipped_run_files_load(tmp_path):
    from pathlib import Path

    from hippos.training.run import train_sections

    files = sorted(Path(__file__).parents[2].joinpath("configs").glob("*.toml"))
    assert files
    for path in files:
        run = train_sections(str(path), str(tmp_path), False)
        if "task" in run:
            assert run["model"].vocab_size >= run["task"].spec().model_vocab_size, path
        else:  # a language-modeling run: the vocabulary comes from its tokenizer
            assert run["model"].vocab_size >= 257 and run["data"].train, path
