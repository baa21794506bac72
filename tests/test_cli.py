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


def test_unknown_implementation_is_refused(capsys):
    assert main(["bench", "layer", "--impls", "hippos,mamba"]) == 2
    assert "impls must name one or more of hippos, official, attention" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert "hippos" in capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    import torch

    from hippos import H3LM, H3Config

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny")
    H3LM(H3Config.preset("tiny")).save_pretrained(path)
    return path


def test_generate_streams_text_and_is_reproducible(tiny_dir, capsys):
    argv = ["generate", "--model", str(tiny_dir), "--prompt", "Hippos ", "--max-new-tokens", "12", "--seed", "3"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first and first.startswith("Hippos ")


def test_generate_greedy_matches_the_library(tiny_dir, capsys):
    import torch

    from hippos import H3LM
    from hippos.data import ByteTokenizer

    assert main(["generate", "--model", str(tiny_dir), "--prompt", "abc", "--max-new-tokens", "8",
                 "--temperature", "0"]) == 0  # fmt: skip
    model, tok = H3LM.from_pretrained(tiny_dir), ByteTokenizer()
    ids = model.generate(torch.tensor([tok.encode("abc")]), 8, temperature=0, eos_token_id=tok.eos_token_id)
    assert capsys.readouterr().out == tok.decode(ids[0].tolist()) + "\n"


def test_generate_errors_are_clean(tiny_dir, capsys):
    assert main(["generate", "--model", str(tiny_dir / "nope"), "--prompt", "x"]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_dir), "--prompt", ""]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):
        main(["generate", "--model", str(tiny_dir), "--prompt", "x", "--top-p", "2"])
    assert "argument --top-p: expected a finite number above 0 and at most 1, got '2'" in capsys.readouterr().err


def test_convert_an_official_file(tmp_path, capsys):
    import torch

    from hippos import H3LM, H3Config

    # An all-attention model's state dict has exactly the official key names, so it is an official file.
    torch.manual_seed(0)
    model = H3LM(H3Config.preset("tiny", attn_layer_idx=(0, 1))).eval()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    assert main(["convert", str(tmp_path / "model.pt"), str(tmp_path / "out")]) == 2
    assert "n_head" in capsys.readouterr().err  # d_model 64 is not a published width
    assert main(["convert", str(tmp_path / "model.pt"), str(tmp_path / "out"), "--n-head", "4"]) == 0
    assert "2 layers" in capsys.readouterr().out
    converted = H3LM.from_pretrained(tmp_path / "out")
    ids = torch.randint(0, 257, (1, 9))
    torch.testing.assert_close(converted(ids).logits, model(ids).logits)
