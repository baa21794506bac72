"""Typed configs: comments become help, overrides are type-checked before any work."""

import argparse
from dataclasses import dataclass

import pytest

from hippos.config import add_arguments, field_docs, from_overrides, parse_value


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
    add_arguments(parser, Example)
    args = parser.parse_args(["--width", "3", "--sizes", "4,5,6", "--flag", "true", "--rate", "1e-3"])
    cfg = from_overrides(Example, args)
    assert cfg == Example(width=3, rate=1e-3, name="x", sizes=(4, 5, 6), flag=True)
    assert "how wide (default: 8)" in parser.format_help()


def test_unset_options_keep_the_base():
    base = Example(width=99)
    assert from_overrides(Example, {"name": "y"}, base=base) == Example(width=99, name="y")


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
    from hippos.config import load_run

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
    from hippos.config import load_run

    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_run(str(path), {"example": Example, "other": Other}, overrides)
