"""Byte-level BPE tokenizer (Hugging Face `tokenizers`) with llmlab's special tokens.

Text is split GPT-4-style (letters, single digits, punctuation, whitespace runs), mapped to
bytes, and merged by BPE, so every Unicode string encodes and decodes back exactly and nothing is ever
unknown. The special tokens take ids 0..13. A special token's *text* typed inside ordinary text (a user
writing "<|assistant_start|>") is encoded as plain text, never as the special id: only code that builds
sequences (the conversation renderer, the engine) can emit special tokens.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np
from tokenizers import Regex, Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from llmlab.errors import LLMLabError

SPECIAL_TOKENS = [
    "<|bos|>", "<|pad|>",
    "<|system_start|>", "<|system_end|>",
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|tool_start|>", "<|tool_end|>",
    "<|output_start|>", "<|output_end|>",
    "<|doc_start|>", "<|doc_end|>",
]  # fmt: skip

# The split pattern of GPT-4 (cl100k), words with their leading space, except that every digit is its own
# token (as in Llama and DeepSeek): a number then reads the same wherever it appears, which is what copying
# numbers into a calculator call and learning arithmetic need; cl100k's groups of up to three digits tokenize
# 123456 as 12|3|4|56 with a small vocabulary.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
MIN_VOCAB = len(SPECIAL_TOKENS) + 256


class Tokenizer:
    """A thin wrapper: encode/decode, special-token ids, and byte lengths of tokens (for bits per byte)."""

    def __init__(self, hf: HFTokenizer):
        hf.encode_special_tokens = True  # special-token text in user strings stays text
        self.hf = hf
        missing = [t for t in SPECIAL_TOKENS if hf.token_to_id(t) is None]
        if missing:
            raise LLMLabError(f"tokenizer lacks llmlab's special tokens {missing}: train one with `llmlab tokenizer`")
        self.bos_id = self.special_id("<|bos|>")
        self.pad_id = self.special_id("<|pad|>")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise LLMLabError(f"no tokenizer at {path}: run `llmlab tokenizer` first or pass the right path")
        try:
            hf = HFTokenizer.from_file(str(file))
        except Exception as e:  # the library raises a bare Exception for malformed JSON
            raise LLMLabError(f"{file} is not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
        return cls(hf)

    def save(self, out_dir: str | Path) -> Path:
        """Write out_dir/tokenizer.json atomically (temporary file, fsync, rename)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        final = out_dir / "tokenizer.json"
        tmp = out_dir / f".tokenizer.json.tmp-{os.getpid()}"
        self.hf.save(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        return final

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def special_id(self, token: str) -> int:
        if token not in SPECIAL_TOKENS:
            raise KeyError(f"{token!r} is not one of llmlab's special tokens")
        return self.hf.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)

    def token_text(self, token: int) -> str:
        """One token as text, as OpenAI's logprobs show it: its text, or "bytes:\\xNN..." when it holds part of a
        multi-byte character (so that distinct tokens never share a key)."""
        text = self.decode([token])
        if "\ufffd" not in text or token < len(SPECIAL_TOKENS):
            return text
        byte_of = {ch: b for b, ch in _bytes_to_unicode().items()}
        raw = bytes(byte_of[ch] for ch in self.hf.id_to_token(token))
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def token_bytes(self) -> np.ndarray:
        """UTF-8 length in bytes of every token's text (0 for special tokens), indexed by id."""
        out = np.zeros(self.vocab_size, dtype=np.int64)
        byte_of = {ch: b for b, ch in _bytes_to_unicode().items()}
        for token, idx in self.hf.get_vocab().items():
            if token not in SPECIAL_TOKENS:
                out[idx] = sum(1 for ch in token if ch in byte_of)
        return out


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (the ByteLevel alphabet), as a dict."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    assert set(table.values()) == set(alphabet)
    return table


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train byte-level BPE on texts; vocab_size counts the special tokens and the 256 byte tokens."""
    if vocab_size < MIN_VOCAB:
        raise LLMLabError(f"vocab_size {vocab_size} is too small: the {len(SPECIAL_TOKENS)} special tokens and 256 "
                          f"byte tokens need at least {MIN_VOCAB}")
    hf = HFTokenizer(models.BPE(byte_fallback=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf)


def bytes_per_token(tokenizer: Tokenizer, texts: Iterable[str]) -> float:
    """Compression on held-out text: UTF-8 bytes per token (higher is better)."""
    texts = list(texts)
    n_tokens = sum(len(ids) for ids in tokenizer.encode_batch(texts))
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return n_bytes / max(n_tokens, 1)


class StreamDecoder:
    """Text of tokens as they arrive, in whole characters: a character whose UTF-8 bytes span several tokens is
    held back until its last byte arrives (decoding token by token would print replacement characters)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.pending = tokenizer, []

    def push(self, token: int) -> str:
        """The text that `token` completes ("" while a character is still incomplete)."""
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd"):
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        """Whatever is held back (an incomplete character decodes to replacement characters)."""
        text, self.pending = self.tokenizer.decode(self.pending), []
        return text
