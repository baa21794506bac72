"""Typed configs: comments become help, overrides are type-checked before any work, H3Config checks itself."""

import argparse
from dataclasses import dataclass

import pytest

from hippos.config import add_section, dotted_flags, field_docs, load_run, parse_value, section_overrides


@dataclass
class Example:
    """A config for the tests."""

    width: int = 8  # how wide
    rate: float = 0.5  # how fast
    name: str = "x"  # what to call it
    sizes: tuple[int, ...] = (1, 2)  # which sizes
    flag: bool = False  # whether to


def test_field_comments_become_docs():
    assert field_docs(Example) == {
        "width": "how wide",
        "rate": "how fast",
        "name": "what to call it",
        "sizes": "which sizes",
        "flag": "whether to",
    }


def test_overrides_are_parsed_by_type():
    parser = argparse.ArgumentParser()
    add_section(parser, "example", Example)
    given = ["--example.width", "3", "--example.sizes", "4,5,6", "--example.flag", "true", "--example.rate", "1e-3"]
    args = parser.parse_args(given)
    cfg = load_run(None, {"example": Example}, section_overrides(args))["example"]
    assert cfg == Example(width=3, rate=1e-3, name="x", sizes=(4, 5, 6), flag=True)
    assert "how wide (default: 8)" in parser.format_help()


def test_dashes_and_underscores_are_one_spelling():
    assert dotted_flags(["--train.micro-batch-size", "2", "--model.d_model=8", "-x"]) == [
        "--train.micro_batch_size",
        "2",
        "--model.d_model=8",
        "-x",
    ]


def test_unset_options_keep_the_base():
    base = Example(width=99)
    run = load_run(None, {"example": Example}, ["--example.name", "y"], base={"example": base})
    assert run["example"] == Example(width=99, name="y")


@pytest.mark.parametrize(
    ("text", "annotation", "message"),
    [("3.5", int, "--f takes int"), ("abc", float, "--f takes float"), ("maybe", bool, "true or false")],
)
def test_bad_values_are_refused(text, annotation, message):
    with pytest.raises(ValueError, match=message):
        parse_value(text, annotation, "f")


@dataclass
class Other:
    """A second section."""

    steps: int = 10  # how many


def test_run_file_with_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[example]\nwidth = 3\nrate = 1\nsizes = [4, 5]\n\n[other]\nsteps = 7\n")
    run = load_run(str(path), {"example": Example, "other": Other}, ["--other.steps", "9", "--example.name", "y"])
    assert run["example"] == Example(width=3, rate=1.0, name="y", sizes=(4, 5))
    assert run["other"] == Other(steps=9)


@pytest.mark.parametrize(
    ("text", "overrides", "match"),
    [
        ("[exampel]\nwidth = 3\n", [], r"unknown section\(s\) \['exampel'\]"),
        ("[example]\nwidht = 3\n", [], "unknown key example.widht"),
        ('[example]\nwidth = "3"\n', [], "example.width takes int"),
        ("[example]\nsizes = 3\n", [], "example.sizes takes a list"),
        ("", ["--example.width", "x"], "takes int"),
        ("", ["--width", "3"], "unknown option --width"),
        ("", ["--example.width"], "pairs"),
        ("[example\n", [], "not valid TOML"),
    ],
)
def test_bad_run_files_are_refused(tmp_path, text, overrides, match):
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_run(str(path), {"example": Example, "other": Other}, overrides)


# ---- H3Config: every check in __post_init__ ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"ssm_mixer": "mamba"}, "ssm_mixer must be one of h3, s4d"),
        ({"ssm_init": "random"}, "ssm_init must be one of"),
        ({"discretization": "euler"}, "discretization must be one of"),
        ({"ssm_mode": "scan"}, "ssm_mode must be one of"),
        ({"n_layer": 2, "attn_layer_idx": (5,)}, r"attn_layer_idx \[5\] must name distinct blocks 0 .. 1"),
        ({"n_layer": 2, "attn_layer_idx": (1, 1)}, "distinct blocks"),
        ({"d_model": 64, "n_head": 5, "attn_layer_idx": (0,)}, "n_head 5 must divide d_model 64"),
        ({"d_model": 64, "n_head": 4, "rotary_dim": 3}, "rotary_dim 3 must be even"),
        ({"d_model": 64, "n_head": 4, "rotary_dim": 18}, "at most the head size"),
        ({"d_model": 64, "head_dim": 3}, "head_dim 3 must divide d_model 64"),
        ({"d_state": 7}, "d_state must be even"),
        ({"dt_min": 0.5, "dt_max": 0.1}, "dt_min 0.5 must not exceed dt_max 0.1"),
        ({"resid_dropout": 1.0}, "below 1"),
        ({"d_model": 0}, "d_model"),
        ({"d_model": 64.0}, "d_model"),
    ],
)
def test_h3config_refuses_bad_fields_when_built(fields, match):
    from hippos.models import H3Config

    with pytest.raises(ValueError, match=match):
        H3Config(**fields)


def test_h3config_checks_replace_and_from_dict_too():
    """Every way to make a config goes through __post_init__: there is no validate() to forget."""
    import dataclasses

    from hippos.models import H3Config

    assert not hasattr(H3Config, "validate")
    tiny = H3Config.preset("tiny")
    with pytest.raises(ValueError, match="d_state must be even"):
        dataclasses.replace(tiny, d_state=5)
    with pytest.raises(ValueError, match="ssm_mode must be one of"):
        H3Config.from_dict({**tiny.to_dict(), "ssm_mode": "scan"})
    assert H3Config.from_dict({**tiny.to_dict(), "attn_layer_idx": [0, 1]}).attn_layer_idx == (0, 1)


def test_h3config_fields_each_carry_a_comment():
    """H3Config's field comments are its help text, and H3HFConfig derives its fields from them."""
    import dataclasses

    from hippos.models import H3Config

    docs = field_docs(H3Config)
    assert set(docs) == {f.name for f in dataclasses.fields(H3Config)}
    assert all(docs.values())
