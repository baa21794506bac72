"""The command line parses and reports errors without tracebacks (the work itself is tested elsewhere)."""

import pytest

from hippos.cli import build_parser, main


def test_bench_layer_help_lists_the_config_fields(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "layer", "--help"])
    out = capsys.readouterr().out
    for option in ("--lengths", "--d-model", "--stream-tokens", "--quick", "--json", "--plot"):
        assert option in out


def test_bad_override_is_a_clean_error(capsys):
    assert main(["bench", "layer", "--d-model", "wide"]) == 2
    assert "--d_model takes int" in capsys.readouterr().err


def test_unknown_implementation_is_refused():
    with pytest.raises(SystemExit, match="unknown implementation"):
        main(["bench", "layer", "--impls", "hippos,mamba"])


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert "hippos" in capsys.readouterr().out
