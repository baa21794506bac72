"""The language-modeling comparison: matched models, runs in workers, the table, the ordering check, the plot."""

import urllib.error
import urllib.request

import pytest

import hippos.benchmarks.lm as lm_bench
from hippos.benchmarks.lm import (
    ARCHITECTURES,
    DATASETS,
    LMBenchConfig,
    format_table,
    job_configs,
    paper_ordering_holds,
    plot,
    run_dir,
    run_lm_bench,
)
from hippos.models import H3LM


@pytest.fixture
def local_data(tmp_path, monkeypatch):
    """The datasets as small local files (the workers train with the configs the parent makes from them)."""
    folder = tmp_path / "data"
    folder.mkdir()
    for name in DATASETS:
        (folder / f"{name}.txt").write_text("".join(f"{name} line {i}: the hippo eats {i % 4} melons.\n"
                                                    for i in range(120)))  # fmt: skip
        monkeypatch.setitem(lm_bench.DATASETS, name, str(folder / f"{name}.txt"))


@pytest.fixture
def offline(monkeypatch):
    """No network: a download attempt fails as it would on a machine without one."""

    def refuse(url, *args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def small(tmp_path, **kw):
    fields = dict(datasets=("tinyshakespeare",), d_model=16, n_head=2, d_state=8, seq_len=16, batch_size=4, steps=6,
                  warmup_steps=2, eval_every=3, eval_tokens=256, jobs=2, out=str(tmp_path / "runs"))  # fmt: skip
    return LMBenchConfig(**{**fields, **kw})


@pytest.mark.slow  # several training runs or worker processes: `make test` runs it
def test_runs_train_in_workers_and_the_table_reports_them(local_data, tmp_path):
    cfg = small(tmp_path)
    result = run_lm_bench(cfg, progress=False)
    assert [r["model"] for r in result["runs"]] == list(ARCHITECTURES)
    for run in result["runs"]:
        assert 1 < run["perplexity"] < 257 and run["train_tokens"] == 6 * 4 * 16
        assert [s for s, _ in run["curve"]] == [3, 6] and run["bits_per_byte"] > 0
        assert H3LM.from_pretrained(run_dir(cfg, run)).num_parameters() == run["parameters"]
        assert (run_dir(cfg, run) / "tokenizer.json").is_file()  # the run directory is a complete model
    # The paper's order, stated here on its own: the models ranked by perplexity, best first.
    ppl = {run["model"]: run["perplexity"] for run in result["runs"]}
    assert result["ordering"]["tinyshakespeare"] is (sorted(ppl, key=ppl.get) == ["hybrid", "transformer", "H3", "S4D"])
    again = run_lm_bench(cfg, progress=False)
    assert again["reused"] == 4 and [r["seconds"] for r in again["runs"]] == [r["seconds"] for r in result["runs"]]
    table = format_table(result, markdown=True)
    assert "| transformer |" in table and "tinyshakespeare ppl (bpb)" in table and "paper ordering" in table
    plot(result, tmp_path / "lm.png")
    assert (tmp_path / "lm.png").stat().st_size > 1000


def test_the_rows_have_matched_parameter_counts_at_the_default_width():
    cfg = LMBenchConfig()
    counts, mixers = {}, {}
    for model in cfg.models:
        config = job_configs(cfg, "wikitext2", model)[0]
        counts[model] = H3LM(config).num_parameters()
        mixers[model] = [config.mixer(i) for i in range(config.n_layer)]
    assert min(counts.values()) > 5e6 and max(counts.values()) < 1.05 * min(counts.values()) < 10e6
    assert mixers["hybrid"].count("attention") == 2 and set(mixers["transformer"]) == {"attention"}
    assert set(mixers["H3"]) == {"h3"} and set(mixers["S4D"]) == {"s4d"}


@pytest.mark.parametrize(
    ("perplexities", "holds"),
    [
        ({"hybrid": 3.0, "transformer": 3.1, "H3": 3.2, "S4D": 4.0}, True),  # the paper's order
        ({"hybrid": 3.1, "transformer": 3.1, "H3": 3.2, "S4D": 4.0}, True),  # hybrid <= transformer: a tie is fine
        ({"hybrid": 3.15, "transformer": 3.1, "H3": 3.2, "S4D": 4.0}, False),  # hybrid worse than transformer
        ({"hybrid": 3.0, "transformer": 3.2, "H3": 3.2, "S4D": 4.0}, False),  # transformer must beat H3
        ({"hybrid": 3.0, "transformer": 3.1, "H3": 4.1, "S4D": 4.0}, False),  # S4D last
        ({"hybrid": 3.0, "transformer": 3.1}, None),  # a model missing: no verdict
    ],
)
def test_ordering_check_on_known_perplexities(perplexities, holds):
    runs = [{"dataset": "d", "model": m, "perplexity": p} for m, p in perplexities.items()]
    other = [{"dataset": "e", "model": m, "perplexity": 10 - p} for m, p in perplexities.items()]  # not counted
    assert paper_ordering_holds({"runs": runs + other}, "d") is holds


@pytest.mark.parametrize("bad", [{"datasets": ("pile",)}, {"models": ("mamba",)}, {"jobs": 0}, {"steps": 0}])
def test_bad_settings_are_refused_before_any_run(tmp_path, bad):
    with pytest.raises(ValueError):
        small(tmp_path, **bad)


def test_validation_checks_the_dataset_names_without_any_download(tmp_path, monkeypatch, offline):
    monkeypatch.setenv("HIPPOS_CACHE", str(tmp_path / "empty-cache"))
    LMBenchConfig()  # the example files are neither cached nor reachable: validation does not care
    assert not (tmp_path / "empty-cache").exists()
    monkeypatch.setitem(lm_bench.DATASETS, "wikitext2", "example:wikitext103")
    with pytest.raises(ValueError, match="unknown example 'wikitext103'"):
        LMBenchConfig()


def test_the_text_is_fetched_before_any_run_starts(tmp_path, monkeypatch, offline):
    monkeypatch.setenv("HIPPOS_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(OSError, match=r"could not download example:tinyshakespeare \(no network in tests\)"):
        run_lm_bench(small(tmp_path), progress=False)
    assert not (tmp_path / "runs").exists()
