"""Helpers for tests that need a live server: a small random-weight assistant checkpoint, an app over it (with
the calculator script as its model, if asked), a uvicorn server on a free loopback port in a background thread,
and `llmlab serve` in a child process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import torch

from llmlab import checkpoint
from llmlab.model import GPT, GPTConfig, KVCache
from llmlab.tokenizer import Tokenizer, train_tokenizer

TEXT = ("Ada Lovelace was born in London. The capital of France is Paris. What is 12 * 34? It is 408. "
        "I don't know who that is. Hello! How can I help you today? ") * 20


def make_tokenizer(out_dir: str | Path, vocab_size: int = 400) -> Path:
    """A small byte-level BPE trained on a paragraph, saved to out_dir/tokenizer.json."""
    return train_tokenizer([TEXT], vocab_size).save(out_dir)


def make_checkpoint(tokenizer_dir: str | Path, out_dir: str | Path, context_len: int = 128, seed: int = 0) -> Path:
    """A random-weight model with the tokenizer of `tokenizer_dir`, saved as a checkpoint (fast: no training)."""
    tok = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=2, d_model=32, n_head=2, n_kv_head=1,
                          context_len=context_len, qk_norm=True))
    model.init_weights()
    return checkpoint.save_checkpoint(out_dir, 0, model, tokenizer_path=tokenizer_dir, meta={"stage": "test"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1 in a daemon thread: `url`, `stop()`."""

    def __init__(self, app, port: int | None = None):
        import uvicorn

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def make_app(ckpt: str | Path, db: str | Path, **overrides):
    """The app of `llmlab serve` over `ckpt`, its model named test-model, with no world for the search tool and
    the custom assistants of db's folder."""
    from llmlab.server.app import ServerConfig, create_app

    settings = dict(checkpoint=str(ckpt), db=str(db), model_name="test-model", world=str(Path(db).parent / "no-world"),
                    assistants=str(Path(db).parent / "assistants"))
    return create_app(ServerConfig(**{**settings, **overrides}))


def script_the_model(service, **scheduler_kw) -> None:
    """Serve the calculator script (`calculator_script`: tool calls, known text) in place of the checkpoint."""
    from llmlab.scheduler import Scheduler

    service.scheduler.shutdown()
    model = ScriptModel(service.tokenizer.vocab_size, calculator_script(service.tokenizer),
                        context_len=service.context_len)
    service.scheduler = Scheduler(model, service.tokenizer, **{"max_batch": 8, **scheduler_kw})


class ServerProcess:
    """`llmlab serve ARGS` in a child process on a free loopback port, started and answering /health: `url`,
    `proc`, `log()` (its stdout and stderr). `prelude` is Python run first in the child (to break something
    on purpose). `stop()` kills it if it still runs."""

    def __init__(self, args: list[str], log_path: str | Path, prelude: str = "", timeout: float = 60):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        code = f"{prelude}\nfrom llmlab.cli import main\nmain()"
        with open(self.log_path, "wb") as log:  # a file, not a pipe: a full pipe would block the server
            self.proc = subprocess.Popen([sys.executable, "-c", code, "serve", *args, "--port", str(self.port)],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + timeout
        while True:
            try:
                httpx.get(self.url + "/health", timeout=1)
                return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start:\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class FaultyModel(torch.nn.Module):
    """`model`, except that a forward for which `fails(ids, kv_cache)` is true raises (an injected fault)."""

    def __init__(self, model, fails):
        super().__init__()
        self.inner, self.config, self.fails = model, model.config, fails

    def forward(self, ids, kv_cache=None):
        if self.fails(ids, kv_cache):
            raise RuntimeError("injected fault")
        return self.inner(ids, kv_cache)


class ScriptModel(torch.nn.Module):
    """A fake model for the scheduler: all probability on `script(sequence)`, the next token of the row's whole
    sequence so far. It keeps each row's tokens in the KV cache itself (the token id as the key), so it sees
    exactly what the scheduler's cache holds for that row: prefill copies, row moves and per-row lengths."""

    def __init__(self, vocab_size: int, script, context_len: int = 128):
        super().__init__()
        self.config = GPTConfig(vocab_size=vocab_size, n_layer=1, d_model=8, n_head=1, n_kv_head=1,
                                context_len=context_len)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # the scheduler reads device and dtype from parameters
        self.script = script

    def forward(self, ids: torch.Tensor, kv_cache=None) -> torch.Tensor:
        B, T = ids.shape
        logits = torch.full((B, T, self.config.vocab_size), -1e9)
        if kv_cache is None:
            seqs = ids.tolist()
            for row in range(B):
                for t in range(T):
                    logits[row, t, self.script(seqs[row][: t + 1])] = 0.0
            return logits
        if isinstance(kv_cache, KVCache):  # a (left-padded) prefill: row r's tokens start at its pad length
            pads = kv_cache.pad_lens.tolist() if kv_cache.pad_lens is not None else [0] * B
            spans = [(pad, kv_cache.length + T) for pad in pads]
        else:  # the scheduler's SlotKVCache: row r's tokens are 0..lengths[r] + T
            spans = [(0, int(n) + T) for n in kv_cache.lengths[:B]]
        keys = ids.float()[:, None, :, None].expand(B, 1, T, 8)
        keys, _ = kv_cache.update(0, keys, keys)
        kv_cache.advance(T)
        for row, (start, end) in enumerate(spans):
            seq = keys[row, 0, start:end, 0].long().tolist()
            logits[row, -1, self.script(seq)] = 0.0
        return logits


def calculator_script(tok: Tokenizer):
    """An assistant that sends "What is EXPR?" to the calculator, then says "It is RESULT." and stops; any other
    question gets "Hello there. Fine." (token by token, so stop sequences can cut it)."""
    sp = tok.special_id
    start, end = sp("<|assistant_start|>"), sp("<|assistant_end|>")
    out_start, out_end = sp("<|output_start|>"), sp("<|output_end|>")

    def script(seq: list[int]) -> int:
        if start not in seq:
            return tok.bos_id
        at = len(seq) - 1 - seq[::-1].index(start)
        turn = seq[at + 1:]
        user = tok.decode(seq[seq.index(sp("<|user_start|>")) + 1: seq.index(sp("<|user_end|>"))])
        if out_end in turn:
            result = tok.decode(turn[turn.index(out_start) + 1: turn.index(out_end)])
            plan = tok.encode(f" It is {result}.") + [end]
            written = turn[turn.index(out_end) + 1:]
        elif user.startswith("What is "):
            plan = [sp("<|tool_start|>")] + tok.encode("calculator " + user[len("What is "):].rstrip("?")) + \
                [sp("<|tool_end|>")]
            written = turn
        else:
            plan, written = tok.encode(" Hello there. Fine.") + [end], turn
        return plan[len(written)] if len(written) < len(plan) else end

    return script


def reading_script(tok):
    """The calculator script, except that it reads: given a question about Quillmoor and a passage
    `[file#i] text` after it, it says "09:30 [file#i]" if the passage names Quillmoor and 09:30, else that
    the passage does not say."""
    sp = tok.special_id
    base = calculator_script(tok)

    def script(seq: list[int]) -> int:
        if sp("<|user_start|>") not in seq or sp("<|assistant_start|>") not in seq:
            return base(seq)
        user = tok.decode(seq[seq.index(sp("<|user_start|>")) + 1: seq.index(sp("<|user_end|>"))])
        question, _, passage = user.partition("\n")
        if not passage.startswith("[") or "Quillmoor" not in question:
            return base(seq)
        cite = passage[1:passage.index("]")]
        text = f"09:30 [{cite}]" if "Quillmoor" in passage and "09:30" in passage else "The passage does not say."
        plan = tok.encode(text) + [sp("<|assistant_end|>")]
        written = seq[seq.index(sp("<|assistant_start|>")) + 1:]
        return plan[len(written)] if len(written) < len(plan) else sp("<|assistant_end|>")
    return script
