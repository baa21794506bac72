"""The command line parses and reports errors without tracebacks (the work itself is tested elsewhere)."""

import json

import pytest

from hippos.cli import build_parser, main
from tolerances import assert_close


def test_bench_layer_help_lists_the_config_fields(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "layer", "--help"])
    out = capsys.readouterr().out
    for option in ("--bench.lengths", "--bench.d_model", "--bench.stream_tokens", "--quick", "--config", "--json",
                   "--plot"):  # fmt: skip
        assert option in out
    assert "layer width (default: 768)" in out  # the field's comment, then its default


def test_train_help_lists_every_section(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    out = capsys.readouterr().out
    for option in ("--model.d_model", "--model.preset", "--task.seq_len", "--data.tokenizer", "--train.steps"):
        assert option in out
    assert "%%" not in out  # field comments holding a % are shown as written (argparse would expand them)


def test_bad_override_is_a_clean_error(capsys):
    assert main(["bench", "layer", "--bench.d_model", "wide"]) == 2
    assert "--bench.d_model takes int" in capsys.readouterr().err


def test_unknown_implementation_is_refused(capsys):
    assert main(["bench", "layer", "--bench.impls", "hippos,mamba"]) == 2
    assert "impls must name one or more of hippos, official, attention" in capsys.readouterr().err


def test_a_setting_without_its_section_names_the_spelling(capsys):
    assert main(["bench", "layer", "--d-model", "64"]) == 2
    err = capsys.readouterr().err
    assert "settings are spelled --bench.d_model" in err and "see hippos bench layer --help" in err
    assert main(["bench", "layer", "--bench.d_modle", "64"]) == 2
    assert "unknown key bench.d_modle; known: batch, d_model," in capsys.readouterr().err
    assert main(["bench", "layer", "--optim.lr", "1"]) == 2
    assert "unknown option --optim.lr; this command's settings: --bench.FIELD" in capsys.readouterr().err


def test_bench_settings_from_a_file_then_the_command_line(tmp_path, monkeypatch):
    from hippos.benchmarks import layer

    seen = []
    monkeypatch.setattr(layer, "run_layer_bench", lambda cfg, progress: seen.append(cfg) or 0 / 0)
    path = tmp_path / "layer.toml"
    path.write_text("[bench]\nd_model = 64\nn_head = 2\nlengths = [16, 32]\n")
    with pytest.raises(ZeroDivisionError):  # stopped where the work would begin
        main(["bench", "layer", "--quick", "--config", str(path), "--bench.n-head", "4", "--bench.stream_tokens=0"])
    cfg = seen[0]
    assert (cfg.d_model, cfg.n_head, cfg.lengths, cfg.stream_tokens) == (64, 4, (16, 32), 0)
    assert cfg.stream_segment == layer.quick_config().stream_segment  # the rest: --quick's base


def test_bench_file_errors_are_clean(tmp_path, capsys):
    path = tmp_path / "layer.toml"
    path.write_text("[bench]\nd_modle = 64\n")
    assert main(["bench", "layer", "--config", str(path)]) == 2
    assert "unknown key bench.d_modle" in capsys.readouterr().err
    path.write_text("[layer]\nd_model = 64\n")
    assert main(["bench", "layer", "--config", str(path)]) == 2
    assert "unknown section(s) ['layer']" in capsys.readouterr().err


def test_train_refuses_the_other_kind_of_runs_section(tmp_path, capsys):
    from pathlib import Path

    config = Path(__file__).parents[1] / "configs" / "tiny-induction.toml"
    argv = ["train", "--config", str(config), "--out", str(tmp_path / "o"), "--data.seq_len", "8"]
    assert main(argv) == 2
    assert "--data.* options do not apply" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


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

    from hippos import H3LM, generate
    from hippos.data import ByteTokenizer

    assert main(["generate", "--model", str(tiny_dir), "--prompt", "abc", "--max-new-tokens", "8",
                 "--temperature", "0"]) == 0  # fmt: skip
    model, tok = H3LM.from_pretrained(tiny_dir), ByteTokenizer()
    ids = generate(model, torch.tensor([tok.encode("abc")]), 8, temperature=0, eos_token_id=tok.eos_token_id)
    assert capsys.readouterr().out == tok.decode(ids[0].tolist()) + "\n"


def test_generate_errors_are_clean(tiny_dir, capsys):
    assert main(["generate", "--model", str(tiny_dir / "nope"), "--prompt", "x"]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_dir), "--prompt", ""]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "x", "--top-p", "2"]) == 2
    assert "argument --top-p: expected a finite number above 0 and at most 1, got '2'" in capsys.readouterr().err


def test_generate_with_int8_weights_matches_the_quantized_library_model(tiny_dir, capsys):
    import torch

    from hippos import H3LM, generate, quantize
    from hippos.data import ByteTokenizer

    assert main(["generate", "--model", str(tiny_dir), "--prompt", "abc", "--max-new-tokens", "8",
                 "--temperature", "0", "--quantize", "int8"]) == 0  # fmt: skip
    model, tok = quantize(H3LM.from_pretrained(tiny_dir)), ByteTokenizer()
    ids = generate(model, torch.tensor([tok.encode("abc")]), 8, temperature=0, eos_token_id=tok.eos_token_id)
    assert capsys.readouterr().out == tok.decode(ids[0].tolist()) + "\n"


def test_eval_ppl_with_int8_weights_is_close_to_fp32(tiny_dir, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("The hippo swims in the river and eats the grass on the bank. " * 8)
    common = ["eval", "ppl", "--model", str(tiny_dir), "--data", str(text), "--context", "32", "--quiet",
              "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    assert main([*common, "--json", str(tmp_path / "fp32.json")]) == 0
    assert main([*common, "--json", str(tmp_path / "int8.json"), "--quantize", "int8"]) == 0
    assert "(int8 weights) on" in capsys.readouterr().out
    fp32, int8 = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("fp32", "int8"))
    assert (fp32["quantize"], int8["quantize"]) == ("none", "int8") and int8["tokens"] == fp32["tokens"]
    assert int8["perplexity"] != fp32["perplexity"]  # the int8 model did run
    assert abs(int8["loss"] / fp32["loss"] - 1) < 0.02  # a random tiny model: near-uniform, barely moved


def test_quantize_option_errors_are_clean(tiny_dir, tmp_path, capsys):
    from hippos import H3LM, quantize

    assert main(["generate", "--model", str(tiny_dir), "--prompt", "x", "--quantize", "int4"]) == 2
    assert "argument --quantize: invalid choice: 'int4'" in capsys.readouterr().err
    quantize(H3LM.from_pretrained(tiny_dir)).save_pretrained(tmp_path / "q")
    assert main(["generate", "--model", str(tmp_path / "q"), "--prompt", "x", "--quantize", "int8"]) == 2
    assert "already quantized (int8)" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "q"), "--prompt", "x", "--max-new-tokens", "3"]) == 0


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
    assert_close(converted(ids).logits, model(ids).logits, strict=True)  # the same weights under other names


# ---- the one tokenizer-default rule (hippos.training.run.default_tokenizer) ----------------------------------
def test_default_tokenizer_by_vocabulary(tmp_path):
    from hippos.training.run import default_tokenizer

    assert default_tokenizer(tmp_path / "not-a-folder", 257) == "bytes"
    assert default_tokenizer("some/hub-id", 50257) == "gpt2"
    with pytest.raises(ValueError, match="no default tokenizer for a model of 11 ids"):
        default_tokenizer(tmp_path, 11)


def test_default_tokenizer_prefers_the_run_then_the_folder(tmp_path):
    from hippos.training.run import default_tokenizer

    (tmp_path / "tokenizer.json").write_text("{}")
    assert default_tokenizer(tmp_path, 11) == str(tmp_path)  # the folder's own files
    (tmp_path / "run.json").write_text(json.dumps({"data": {"tokenizer": "bytes"}}))
    assert default_tokenizer(tmp_path, 50257) == "bytes"  # what the run trained with, first
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "run.json").write_text(json.dumps({"data": {"tokenizer": "gpt2"}}))
    assert default_tokenizer(tmp_path, 11) == "gpt2"  # then its recorded name, before the vocabulary


def test_default_tokenizer_reads_the_vocabulary_from_the_folder(tiny_dir, tmp_path):
    from hippos.training.run import default_tokenizer

    assert default_tokenizer(tiny_dir) == "bytes"  # the tiny preset has 257 ids
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        default_tokenizer(tmp_path)


# ---- hippos serve: options, settings and the model it hands the server (the server itself: tests/serving/) ----
def test_serve_help_lists_its_options_and_limits(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    out = capsys.readouterr().out
    for option in ("--model", "--quantize", "--host", "--port", "--api-key", "--tokenizer", "--served-model-name",
                   "--config", "--serve.max_queue", "--serve.max_body_bytes", "--serve.cache_bytes"):  # fmt: skip
        assert option in out
    assert "--serve.api_key" not in out and "--serve.port" not in out  # plain options, not settings


@pytest.fixture
def served(monkeypatch):
    """hippos.serving.server.serve replaced: records what `hippos serve` would serve, and returns 0."""
    import hippos.serving.server

    seen = {}

    def fake_serve(model, tokenizer, name, config):
        seen.update(model=model, tokenizer=tokenizer, name=name, config=config)
        return 0

    monkeypatch.setattr(hippos.serving.server, "serve", fake_serve)
    monkeypatch.delenv("HIPPOS_API_KEY", raising=False)
    return seen


def test_serve_builds_its_settings_and_model(tiny_dir, served, tmp_path, monkeypatch):
    from hippos.models.quantize import quantization_of

    (tmp_path / "serve.toml").write_text("[serve]\nmax_queue = 3\nmax_tokens = 99\n")
    argv = ["serve", "--model", str(tiny_dir), "--port", "0", "--config", str(tmp_path / "serve.toml")]
    assert main([*argv, "--serve.max-queue", "5", "--api-key", "k"]) == 0
    c = served["config"]
    assert (c.host, c.port, c.api_key, c.max_queue, c.max_tokens) == ("127.0.0.1", 0, "k", 5, 99)
    assert served["name"] == tiny_dir.name and served["tokenizer"].name == "bytes"
    assert quantization_of(served["model"]) == "none"
    monkeypatch.setenv("HIPPOS_API_KEY", "from-env")
    assert main(["serve", "--model", str(tiny_dir), "--quantize", "int8", "--served-model-name", "h3-int8"]) == 0
    assert quantization_of(served["model"]) == "int8" and served["name"] == "h3-int8"
    assert served["config"].api_key == "from-env" and served["config"].port == 8000


def test_serve_errors_are_clean(tiny_dir, served, capsys, monkeypatch):
    import importlib.util

    for extra, words in ((["--serve.max_queue", "0"], "max_queue must be > 0"),
                         (["--serve.bogus", "1"], "unknown key serve.bogus"),
                         (["--port", "70000"], "port must be from 0 to 65535"),
                         (["--api-key", "a b"], "api_key must be a non-empty string")):  # fmt: skip
        assert main(["serve", "--model", str(tiny_dir), *extra]) == 2
        assert words in capsys.readouterr().err
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    assert main(["serve", "--model", str(tiny_dir)]) == 2
    assert 'needs fastapi: pip install "hungry-hippos[serve]"' in capsys.readouterr().err
    assert not served  # nothing reached the server
