"""lm-evaluation-harness through the Hugging Face wrapper, on a local task (no download)."""

from __future__ import annotations

import json

import pytest
import torch

from hippos import H3LM, H3Config
from hippos.cli import main
from hippos.data import ByteTokenizer
from tolerances import assert_close

TASK = """task: hippo_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
DOCS = [("the hippo eats", " melons"), ("a river horse", " swims"), ("H3 remembers", " tokens")]


@pytest.fixture
def local_task(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"context": c, "target": t}) + "\n" for c, t in DOCS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "hippo_local.yaml").write_text(TASK.format(docs=docs))
    return tmp_path / "tasks"


@torch.no_grad()
def own_loglikelihood(model: H3LM, context: str, target: str) -> float:
    """log p(target | context) from the native model (lm-eval's softmax covers the tokenizer's 257 ids)."""
    ids = torch.tensor([list((context + target).encode())])
    n = len(target.encode())
    logprobs = model(ids[:, :-1]).logits[..., :257].log_softmax(-1)[0, -n:]
    return float(logprobs.gather(-1, ids[0, -n:, None]).sum())


@pytest.mark.slow  # lm-eval's whole pipeline: about a minute on 2 cores
def test_harness_scores_a_local_task_as_the_native_model_does(local_task, tmp_path):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    from hippos.evaluation.harness import run_harness

    torch.manual_seed(0)
    model = H3LM(H3Config.preset("tiny", attn_layer_idx=(1,))).eval()
    model.save_pretrained(tmp_path / "model")
    ByteTokenizer().save_pretrained(tmp_path / "model")
    out = run_harness(str(tmp_path / "model"), ["hippo_local"], "bytes", include_path=str(local_task))
    assert out["results"]["hippo_local"]["acc,none"] in (0.0, 1 / 3, 2 / 3, 1.0)
    samples = sorted(out["samples"]["hippo_local"], key=lambda s: s["doc_id"])
    for sample, (context, target) in zip(samples, DOCS):
        ll = sample["resps"][0][0][0]
        # strict: the same float32 log-softmax, summed over a handful of tokens (|ll| ~ 40, so ~4e-5 apart at most)
        assert_close(torch.tensor(ll), torch.tensor(own_loglikelihood(model, context, target)), strict=True)
    # The command line: the same numbers, and a clear error for a folder without tokenizer files.
    args = ["eval", "harness", "--model", str(tmp_path / "model"), "--tasks", "hippo_local", "--include-path",
            str(local_task), "--json", str(tmp_path / "h.json")]  # fmt: skip
    assert main(args) == 0
    # a fraction of three answers, computed the same way twice: equal, not close
    assert (
        json.loads((tmp_path / "h.json").read_text())["results"]["hippo_local"]["acc,none"]
        == (out["results"]["hippo_local"]["acc,none"])
    )
    # A folder without tokenizer files: 257 ids are bytes by the one default rule, so the same numbers again.
    model.save_pretrained(tmp_path / "bare")
    args[3], args[-1] = str(tmp_path / "bare"), str(tmp_path / "bare.json")
    assert main(args) == 0
    assert (
        json.loads((tmp_path / "bare.json").read_text())["results"]
        == json.loads((tmp_path / "h.json").read_text())["results"]
    )
    H3LM(H3Config.preset("tiny", vocab_size=11)).save_pretrained(tmp_path / "eleven")
    assert main(["eval", "harness", "--model", str(tmp_path / "eleven"), "--tasks", "hippo_local"]) == 2
    # The tokenizer as an object: the same numbers as its name.
    again = run_harness(str(tmp_path / "model"), ["hippo_local"], ByteTokenizer(), include_path=str(local_task))
    assert again["results"] == out["results"]


def test_byte_tokenizer_saved_for_hugging_face_gives_the_same_ids(tmp_path):
    transformers = pytest.importorskip("transformers")
    ByteTokenizer().save_pretrained(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "héllo\n\tworld 🦛 <|endoftext|>"
    ours = ByteTokenizer()
    assert hf.encode(text, add_special_tokens=False) == ours.encode(text.replace("<|endoftext|>", "")) + [256]
    assert hf.eos_token_id == ours.eos_token_id == 256 and len(hf) == 257
    assert hf.decode(ours.encode("héllo 🦛")) == "héllo 🦛"
