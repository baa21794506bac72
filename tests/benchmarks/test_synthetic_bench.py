"""The Table 1 benchmark: runs in worker processes, reuse of finished runs, the table and the plot."""

import dataclasses
import json

import pytest

from hippos.benchmarks.synthetic import (
    SyntheticBenchConfig,
    format_table,
    job_configs,
    plot,
    quick_config,
    run_name,
    run_synthetic_bench,
)


def small(tmp_path, **kw):
    fields = dict(tasks=("associative_recall",), models=("H3", "attention"), d_models=(16,), seeds=(0,), n_head=2,
                  d_state=8, steps=12, eval_every=6, n_train=200, n_test=50, jobs=2, out=str(tmp_path))  # fmt: skip
    return SyntheticBenchConfig(**{**fields, **kw})


@pytest.mark.slow  # several training runs or worker processes: `make test` runs it
def test_runs_train_in_workers_and_finished_ones_are_reused(tmp_path):
    cfg = small(tmp_path)
    result = run_synthetic_bench(cfg, progress=False)
    assert [(r["model"], r["steps"]) for r in result["runs"]] == [("H3", 12), ("attention", 12)]
    for run in result["runs"]:
        assert 0 <= run["accuracy"] <= 1 and [s for s, _ in run["curve"]] == [6, 12]
        assert (tmp_path / run_name("associative_recall", run["model"], 16, 0) / "model.safetensors").is_file()
    again = run_synthetic_bench(cfg, progress=False)  # nothing left to train: the same records come back
    assert [r["seconds"] for r in again["runs"]] == [r["seconds"] for r in result["runs"]]
    changed = run_synthetic_bench(dataclasses.replace(cfg, models=("H3",), lr=2e-3), progress=False)
    assert changed["runs"][0]["seconds"] != result["runs"][0]["seconds"]  # other settings: trained afresh
    assert json.loads((tmp_path / run_name("associative_recall", "H3", 16, 0) / "result.json").read_text())[
        "settings"]["train"]["lr"] == 2e-3  # fmt: skip

    table = format_table(result)
    assert "associative_recall %" in table and "99.8" in table and "random" in table
    plot(result, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_the_models_are_the_papers_rows():
    cfg = quick_config()
    kinds = {}
    for job in cfg.runs():
        model, data, train = job_configs(cfg, **job)
        kinds[job["model"]] = [model.mixer(i) for i in range(model.n_layer)]
        assert model.n_layer == 2 and train.batch_size == 32 and data.n_train == 5000 and data.n_test == 500
        assert model.rotary_dim == (16 if job["model"] == "attention" else 0)
    assert kinds == {"H3": ["h3", "h3"], "S4D": ["s4d", "s4d"], "attention": ["attention"] * 2,
                     "hybrid": ["h3", "attention"]}  # fmt: skip


@pytest.mark.parametrize("bad", [{"tasks": ("copying",)}, {"models": ("mamba",)}, {"loss_on": "x"}, {"jobs": 0},
                                 {"steps": 0}])  # fmt: skip
def test_bad_settings_are_refused_before_any_run(tmp_path, bad):
    with pytest.raises(ValueError):
        run_synthetic_bench(small(tmp_path, **bad), progress=False)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow  # several training runs or worker processes: `make test` runs it
def test_cli_bench_synthetic_writes_table_json_and_plot(tmp_path, capsys):
    from hippos.cli import main

    args = ["bench", "synthetic", "--bench.tasks", "induction_head", "--bench.models", "hybrid", "--bench.d_models",
            "16", "--bench.seeds", "0", "--bench.n_head", "2", "--bench.d_state", "8", "--bench.steps", "6",
            "--bench.eval_every", "3", "--bench.n_train", "100", "--bench.n_test", "20", "--bench.jobs", "1",
            "--bench.out", str(tmp_path / "runs"), "--json", str(tmp_path / "r.json"),
            "--plot", str(tmp_path / "c.png")]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "induction_head %" in printed and "hybrid" in printed
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["runs"][0]["steps"] == 6 and (tmp_path / "c.png").is_file()
