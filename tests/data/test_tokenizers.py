"""Tokenizers: the byte-level one round-trips any text; a Hugging Face one fails clearly when unavailable."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hippos.data import ByteTokenizer, load_tokenizer


@settings(max_examples=50, deadline=None)
@given(st.text())
def test_bytes_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text


def test_bytes_eos_is_outside_the_bytes_and_dropped_when_decoding():
    tok = load_tokenizer("bytes")
    assert tok.vocab_size == 257 and tok.eos_token_id == 256
    assert tok.decode([104, 105, 256]) == "hi"


def test_missing_hf_tokenizer_gives_a_clear_error(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(OSError, match="could not load tokenizer"):
        load_tokenizer(str(tmp_path / "no-such-tokenizer"))
