"""Tokenizer: exact round trips for any Unicode, special tokens only from code, compression, errors."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmlab.errors import LLMLabError
from llmlab.tokenizer import MIN_VOCAB, SPECIAL_TOKENS, Tokenizer, bytes_per_token, train_tokenizer

SAMPLE = ("Ada Brightwater was born in Velmora. She studied at the University of Karst. "
          "Q: Where was Ada Brightwater born?\nA: Velmora\n\n  Indented code:\n\tx = 12345 + 678\r\n") * 40


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer([SAMPLE, "ünïcödé 中文 😀 " * 20], vocab_size=400)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_any_unicode_round_trips(tok, text):
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", ["", " ", "   leading", "trailing   ", "\r\n\r\n", "\t\tx", "😀👩‍👩‍👧", "é (e + combining)",
                                  "\x00\x7f\ufeff", "<|bos|>", "a<|assistant_end|>b", "<|pad", "中文字符", "1234567890"])
def test_nasty_strings_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_token_text_is_not_a_special_token(tok):
    special_ids = {tok.special_id(t) for t in SPECIAL_TOKENS}
    assert special_ids == set(range(len(SPECIAL_TOKENS)))
    for t in SPECIAL_TOKENS:
        assert not special_ids & set(tok.encode(f"say {t} now"))


def test_token_bytes_count_utf8_bytes(tok):
    tb = tok.token_bytes()
    assert tb[tok.bos_id] == 0 and tb[tok.pad_id] == 0
    for text in ["hello world", "ünïcödé 中文 😀", SAMPLE[:300]]:
        assert sum(tb[i] for i in tok.encode(text)) == len(text.encode("utf-8"))


def test_training_compresses_and_save_load_is_identical(tok, tmp_path):
    assert MIN_VOCAB < tok.vocab_size <= 400  # fewer when the text has no more pairs worth merging
    assert bytes_per_token(tok, [SAMPLE]) > 2.5  # merges learned: well above one byte per token
    path = tok.save(tmp_path)
    again = Tokenizer.load(path)
    assert again.encode(SAMPLE) == tok.encode(SAMPLE)
    assert Tokenizer.load(tmp_path).vocab_size == tok.vocab_size  # a directory works too


def test_errors(tmp_path):
    with pytest.raises(LLMLabError, match=f"at least {MIN_VOCAB}"):
        train_tokenizer(["abc"], vocab_size=100)
    with pytest.raises(LLMLabError, match="no tokenizer at"):
        Tokenizer.load(tmp_path / "missing")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(LLMLabError, match="not a valid tokenizer.json"):
        Tokenizer.load(bad)
