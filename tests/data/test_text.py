"""Text sources, tokenization into cached memory-mapped shards, and packed training batches."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import hippos.data.text as text_module
from hippos.data import ByteTokenizer
from hippos.data.packing import PackedBatches
from hippos.data.text import TokenCorpus, find_sources, iter_documents, tokenize_corpus

BYTES = ByteTokenizer()


def tokens_of(corpus: TokenCorpus) -> list[int]:
    return [int(t) for t in corpus.concatenated()]


def test_files_folders_globs_and_json_lines(tmp_path):
    (tmp_path / "a.txt").write_text("first file\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("second")
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "doc one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert [s.location for s in find_sources(str(tmp_path / "*.txt"))] == [str(tmp_path / "a.txt")]
    folder = find_sources(str(tmp_path))
    assert [os.path.basename(s.location) for s in folder] == ["a.txt", "docs.jsonl", "b.txt"]
    assert [s.kind for s in folder] == ["text", "jsonl", "text"]
    corpus = tokenize_corpus(str(tmp_path), BYTES, tmp_path / "cache", progress=False)
    eos = BYTES.eos_token_id
    expected = [*b"first file\n", eos, *b"doc one", eos, *b"two", eos, *b"second", eos]
    assert tokens_of(corpus) == expected
    assert corpus.num_bytes == len("first file\ndoc onetwosecond") and corpus.segments[0].dtype == np.uint16


def test_tokenized_once_then_cached_and_rebuilt_when_the_text_changes(tmp_path, monkeypatch):
    path = tmp_path / "t.txt"
    path.write_text("hello")
    first = tokenize_corpus(str(path), BYTES, tmp_path / "cache", progress=False)
    calls = []
    monkeypatch.setattr(text_module, "_write_shards", lambda *a: calls.append(a))
    again = tokenize_corpus(str(path), BYTES, tmp_path / "cache", progress=False)
    assert again.path == first.path and not calls  # found in the cache, nothing tokenized
    monkeypatch.undo()
    path.write_text("hello, world")
    changed = tokenize_corpus(str(path), BYTES, tmp_path / "cache", progress=False)
    assert changed.path != first.path and tokens_of(changed)[:-1] == list(b"hello, world")


def test_invalid_utf8_is_replaced_with_a_warning_not_a_crash(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"ok \xff\xfe then fine \xef\xbf\xbd")  # two bad bytes; a real U+FFFD is not counted
    with pytest.warns(UserWarning, match=r"bad.txt: 2 invalid UTF-8"):
        corpus = tokenize_corpus(str(path), BYTES, tmp_path / "cache", progress=False)
    assert BYTES.decode(tokens_of(corpus)) == "ok \ufffd\ufffd then fine \ufffd"


@pytest.mark.parametrize(
    ("content", "error", "match"),
    [
        ("", ValueError, "the corpus is empty"),
        ('{"text": "a"}\nnot json\n', ValueError, r"line 2: not valid JSON"),
        ('{"body": "a"}\n', ValueError, r"line 1: expected an object with a string field 'text'"),
    ],
)
def test_bad_input_is_refused_with_the_place_named(tmp_path, content, error, match):
    path = tmp_path / ("c.jsonl" if content else "c.txt")
    path.write_text(content)
    with pytest.raises(error, match=match):
        tokenize_corpus(str(path), BYTES, tmp_path / "cache", progress=False)
    assert not list((tmp_path / "cache" / "corpora").iterdir())  # no half-written corpus left behind


def test_missing_and_unreadable_sources(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such file"):
        find_sources(str(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match="no data sources"):
        find_sources([])
    (tmp_path / "locked.txt").write_text("secret")
    # chmod cannot lock out root (the CI user here), so the permission check itself is made to say no.
    monkeypatch.setattr(text_module.os, "access", lambda path, mode: False)
    with pytest.raises(PermissionError, match="locked.txt: the file is not readable"):
        find_sources(str(tmp_path))


def test_interrupted_tokenization_leaves_nothing_behind(tmp_path, monkeypatch):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(f"text {i}")
    real = text_module.iter_documents

    def interrupted(source, field):
        if source.location.endswith("2.txt"):
            raise KeyboardInterrupt
        return real(source, field)

    monkeypatch.setattr(text_module, "iter_documents", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tokenize_corpus(str(tmp_path / "*.txt"), BYTES, tmp_path / "cache", progress=False)
    assert not list((tmp_path / "cache" / "corpora").iterdir())
    monkeypatch.undo()
    assert len(tokens_of(tokenize_corpus(str(tmp_path / "*.txt"), BYTES, tmp_path / "cache", progress=False))) == 21


def test_a_corpus_finished_meanwhile_by_another_process_is_used(tmp_path, monkeypatch):
    """Two runs tokenizing the same text at once: the one that renames second keeps the first one's corpus."""
    (tmp_path / "a.txt").write_text("same text")
    cache = tmp_path / "cache"
    first = tokenize_corpus(str(tmp_path / "a.txt"), BYTES, cache, progress=False)
    final = first.path
    aside = tmp_path / "aside"
    os.replace(final, aside)
    real_replace = os.replace

    def racing(src, dst):
        if dst == final and src != aside:  # the other process's rename lands just before this one's
            real_replace(aside, final)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", racing)
    again = tokenize_corpus(str(tmp_path / "a.txt"), BYTES, cache, progress=False)
    assert len(tokens_of(again)) == len(tokens_of(first)) == 10
    assert [p.name for p in (cache / "corpora").iterdir()] == [final.name]  # no temporary directory left


def test_shards_roll_over_and_large_vocabularies_use_uint32(tmp_path, monkeypatch):
    monkeypatch.setattr(text_module, "SHARD_TOKENS", 8)
    monkeypatch.setattr(text_module, "FLUSH_TOKENS", 3)
    for i in range(4):
        (tmp_path / f"{i}.txt").write_text("abcde"[: i + 2])

    class Wide(ByteTokenizer):
        name, vocab_size = "wide", 70_000

    corpus = tokenize_corpus(str(tmp_path / "*.txt"), Wide(), tmp_path / "cache", progress=False)
    assert [len(s) for s in corpus.segments] == [
        3 + 4 + 5,
        6,
    ]  # a shard closes once it holds 8 or more and corpus.segments[0].dtype == np.uint32
    assert tokens_of(corpus) == [*b"ab", 256, *b"abc", 256, *b"abcd", 256, *b"abcde", 256]
    (corpus.path / "tokens-00001.bin").write_bytes(b"\0" * 6)  # truncated on disk
    with pytest.raises(ValueError, match="expected 24"):
        TokenCorpus.open(corpus.path)


def test_split_by_position(tmp_path, monkeypatch):
    monkeypatch.setattr(text_module, "SHARD_TOKENS", 4)
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text("xyz")
    corpus = tokenize_corpus(str(tmp_path / "*.txt"), BYTES, tmp_path / "cache", progress=False)
    head, tail = corpus.split(0.5)
    assert tokens_of(head) + tokens_of(tail) == tokens_of(corpus) and head.num_tokens == 6
    assert head.num_bytes + tail.num_bytes == corpus.num_bytes
    with pytest.raises(ValueError, match="fraction"):
        corpus.split(1.0)


def test_hugging_face_dataset_saved_on_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["one", "", "two"]})})
    ds.save_to_disk(str(tmp_path / "ds"))
    corpus = tokenize_corpus(f"hf:{tmp_path / 'ds'}:train", BYTES, tmp_path / "cache", progress=False)
    assert tokens_of(corpus) == [*b"one", 256, *b"two", 256]
    with pytest.raises(ValueError, match="no column 'body'"):
        list(iter_documents(find_sources(f"hf:{tmp_path / 'ds'}:train")[0], "body"))
    with pytest.raises(ValueError, match="hf:NAME"):
        find_sources("hf:")


def test_large_files_are_encoded_in_line_aligned_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(text_module, "TEXT_BLOCK", 10)
    text = "line one\nline two is longer than a block\nend"
    (tmp_path / "t.txt").write_text(text)
    (blocks,) = iter_documents(find_sources(str(tmp_path / "t.txt"))[0])
    assert "".join(blocks) == text and blocks[0] == "line one\n"


# ---- packed batches ------------------------------------------------------------------------------------------


def stream(n: int, start: int = 0) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.uint16)


def test_windows_are_contiguous_and_targets_are_shifted_inputs():
    batches = PackedBatches([stream(41), stream(20, 1000)], seq_len=5, batch_size=4, seed=0)
    assert batches.num_windows == 8 + 3 and batches.steps_per_epoch == 2
    inputs, targets = batches(0)
    assert inputs.shape == (4, 5) and inputs.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert ((inputs[:, 1:] - inputs[:, :-1]) == 1).all()  # never across the boundary between segments
    assert torch.equal(batches(0)[0], inputs)  # the step alone decides the batch


def test_an_epoch_visits_every_window_once():
    batches = PackedBatches([stream(61)], seq_len=3, batch_size=4, seed=3)
    starts = torch.cat([batches(step)[0][:, 0] for step in range(batches.steps_per_epoch)])
    assert sorted(starts.tolist()) == list(range(0, 60, 3))
    assert not torch.equal(batches(0)[0], batches(batches.steps_per_epoch)[0])  # a new order next epoch


def test_ranks_split_each_global_batch():
    segments = [stream(200)]
    whole = PackedBatches(segments, seq_len=4, batch_size=6, seed=1)
    for step in (0, 7):
        parts = [PackedBatches(segments, 4, 6, seed=1, rank=r, world_size=3)(step)[0] for r in range(3)]
        assert torch.equal(torch.cat(parts), whole(step)[0])
    with pytest.raises(ValueError, match="must divide among 4 ranks"):
        PackedBatches(segments, 4, 6, rank=0, world_size=4)


def test_too_little_text_for_one_batch():
    with pytest.raises(ValueError, match="fewer than one batch of 8"):
        PackedBatches([stream(30)], seq_len=8, batch_size=8)
