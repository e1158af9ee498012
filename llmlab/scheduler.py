"""Continuous batching: requests join and leave one running batch between decode steps.

A server cannot wait for a batch to finish before it starts the next request, and decoding rows one request
at a time leaves most of the machine idle (a decode step of 32 rows costs a few times one row's, not 32
times). `Scheduler` runs one background thread that owns the model. Each step it admits waiting requests
(prefilled one at a time into a free row of a `SlotKVCache`), decodes one token for every active row at once,
samples each row with its own settings and generator, and hands each row's token to its request's callback.
A row leaves the batch when it stops (a stop token, its token budget, a full context, or `cancel()`); the
last row moves into the freed one, so the active rows are always rows 0..n-1 and every step works on views,
never copies, of the cache.

Tool calls (llmlab.engine.ToolCalls, one per row) run in a thread pool, not in the scheduler's thread: a row
whose call is complete is parked (its keys and values copied out, its row freed) while the tool runs, and
rejoins the batch with its cache restored when the result is in, ahead of new requests. A sandboxed `python`
call may take seconds; the other rows keep decoding meanwhile.

Rows have different lengths, so `SlotKVCache` keeps a length per row and masks each row's keys beyond it;
every row computes what it would alone (tests/test_scheduler.py checks greedy tokens and logits against
`Engine.generate`).
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from llmlab.engine import SamplingParams, ToolCalls, _check_prompts, _generator, sample_with_uniform
from llmlab.errors import LLMLabError
from llmlab.model import GPT, GPTConfig, KVCache


class SlotKVCache:
    """Keys and values for up to `slots` sequences of different lengths; the model sees the first `n` rows.

    The same interface as `KVCache` (`length`, `positions`, `attn_mask`, `update`, `advance`) so that
    `GPT.forward` runs on it unchanged, with a length per row: row r's next token is written at
    `lengths[r]`, takes RoPE position `lengths[r]`, and attends to keys 0..lengths[r].
    """

    def __init__(self, cfg: GPTConfig, slots: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        shape = (cfg.n_layer, slots, cfg.n_kv_head, cfg.context_len, cfg.hdim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)
        self.n = 0  # active rows: 0..n-1

    @property
    def slots(self) -> int:
        return self.k.size(1)

    @property
    def length(self) -> int:
        """The longest active row (what `GPT.forward` checks against the context)."""
        return int(self.lengths[: self.n].max()) if self.n else 0

    def positions(self, T: int) -> torch.Tensor:
        """(n, T): each row continues from its own length."""
        return self.lengths[: self.n, None] + torch.arange(T, device=self.k.device)

    def attn_mask(self, T: int) -> torch.Tensor:
        """(n, 1, T, L) boolean, True = attend: each query sees its row's keys up to its own position."""
        q_pos = self.positions(T)  # (n, T)
        k_pos = torch.arange(self.length + T, device=self.k.device)
        return (k_pos[None, None, :] <= q_pos[:, :, None])[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (n, Hkv, T, D) at each row's length; return keys/values (n, Hkv, longest + T, D)."""
        rows = torch.arange(self.n, device=self.k.device)
        for t in range(k.size(2)):
            pos = self.lengths[: self.n] + t
            self.k[layer, rows, :, pos] = k[:, :, t]  # advanced indices around a slice: (n, Hkv, D)
            self.v[layer, rows, :, pos] = v[:, :, t]
        end = self.length + k.size(2)
        return self.k[layer, : self.n, :, :end], self.v[layer, : self.n, :, :end]

    def advance(self, T: int) -> None:
        self.lengths[: self.n] += T

    def insert(self, row: int, cache: KVCache, source_row: int = 0, pad: int = 0) -> None:
        """Put row `source_row` of a prefilled cache, without its `pad` leading pad positions, into `row`."""
        L = cache.length - pad
        self.k[:, row, :, :L] = cache.k[:, source_row, :, pad:pad + L]
        self.v[:, row, :, :L] = cache.v[:, source_row, :, pad:pad + L]
        self.lengths[row] = L

    def take(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of the row's keys and values, (n_layer, Hkv, length, D) each, for `put` later."""
        L = int(self.lengths[row])
        return self.k[:, row, :, :L].clone(), self.v[:, row, :, :L].clone()

    def put(self, row: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Restore keys and values taken from a row (`take`) into `row`."""
        L = k.size(2)
        self.k[:, row, :, :L], self.v[:, row, :, :L] = k, v
        self.lengths[row] = L

    def move(self, src: int, dst: int) -> None:
        """Copy row src into row dst (to fill a hole left by a finished row)."""
        L = int(self.lengths[src])
        self.k[:, dst, :, :L] = self.k[:, src, :, :L]
        self.v[:, dst, :, :L] = self.v[:, src, :, :L]
        self.lengths[dst] = L


@dataclass
class Event:
    """What a request's callback receives: one token, or the end."""

    token: int | None
    """the new token (None in the final event)"""
    forced: bool = False
    """the token was forced in by a tool call (its output), not sampled"""
    logprobs: torch.Tensor | None = None
    """log-softmax of the logits the token was sampled from, (V,), when the request asked for them"""
    finish: str | None = None
    """in the final event: "stop" (a stop token), "length" (budget or context), "cancelled", or "error: ..." """


@dataclass
class _Request:
    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    on_event: Callable[[Event], None]
    run_tool: Callable[[str], str] | None
    logprobs: bool
    min_new_tokens: int = 0  # stop tokens are masked until this many tokens are out
    tools: ToolCalls | None = None
    generator: torch.Generator | None = None
    budget: int = 0  # tokens it may still produce
    produced: int = 0
    next_token: int = 0  # the token to feed at the next step
    cancelled: threading.Event = field(default_factory=threading.Event)


class Handle:
    """A submitted request: `cancel()` frees its row at the next step (a client that went away)."""

    def __init__(self, request: _Request):
        self._request = request

    def cancel(self) -> None:
        self._request.cancelled.set()


class Scheduler:
    """Continuous batching of generation requests over one model in a background thread.

    `submit` returns at once; the request's `on_event` is called from the scheduler's thread with every
    token and then a final event, so it must be quick (put the event on a queue). `call(fn)` runs
    `fn(model)` in that thread between steps (for work that must not race the batch, such as scoring
    prompts) and returns a Future.
    """

    def __init__(self, model: GPT, tokenizer, max_batch: int = 32, tool_workers: int = 4):
        if max_batch < 1:
            raise LLMLabError(f"max_batch must be >= 1 (got {max_batch})")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
        self.device = device
        self.cache = SlotKVCache(model.config, max_batch, dtype=dtype, device=device)
        self.rows: list[_Request] = []  # active requests, row i = rows[i]
        self._waiting: queue.Queue = queue.Queue()
        self._tools = ThreadPoolExecutor(max_workers=tool_workers, thread_name_prefix="llmlab-tool")
        # id(request) -> (request, keys, values, tool Future) while its call runs (scheduler thread only)
        self._parked: dict[int, tuple[_Request, torch.Tensor, torch.Tensor, Future]] = {}
        self._resumed: queue.Queue = queue.Queue()  # ids of parked requests whose tool call is done
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.steps = 0  # decode steps run (for monitoring)
        self.batch_sizes_total = 0  # sum of rows over steps: mean batch = batch_sizes_total / steps
        self._thread = threading.Thread(target=self._loop, name="llmlab-scheduler", daemon=True)
        self._thread.start()

    # ---- public ----------------------------------------------------------------------------------------

    def submit(self, prompt: Sequence[int], params: SamplingParams, on_event: Callable[[Event], None], *,
               stop_ids: Sequence[int] = (), run_tool: Callable[[str], str] | None = None,
               logprobs: bool = False, min_new_tokens: int = 0) -> Handle:
        """Queue a prompt for generation. Raises LLMLabError at once for a prompt that cannot run.
        `min_new_tokens` masks the stop tokens until that many tokens are out (fixed-length benchmarks)."""
        if self._stop.is_set():
            raise LLMLabError("the scheduler is shut down")
        _check_prompts([prompt], self.model.config.context_len)
        request = _Request(list(prompt), params, frozenset(stop_ids), on_event, run_tool, logprobs, min_new_tokens)
        self._waiting.put(request)
        self._wake.set()
        return Handle(request)

    def call(self, fn: Callable[[GPT], object]) -> Future:
        """Run fn(model) in the scheduler thread between steps; the Future holds its result or exception."""
        future: Future = Future()
        self._waiting.put((fn, future))
        self._wake.set()
        return future

    @property
    def active(self) -> int:
        return len(self.rows)

    @property
    def waiting(self) -> int:
        return self._waiting.qsize()

    @property
    def parked(self) -> int:
        """Requests waiting for a tool call, out of the batch."""
        return len(self._parked)

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)
        self._tools.shutdown(wait=False, cancel_futures=True)

    # ---- the loop --------------------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while not self._stop.is_set():
                self._admit()
                if not self.rows:  # idle, or every request waits for its tool
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                try:
                    self._step()
                except Exception as e:  # a failing step ends its requests, never the thread
                    for request in self.rows:
                        self._emit(request, Event(None, finish=f"error: {e}"))
                    self.rows, self.cache.n = [], 0
            for request in self.rows + [parked[0] for parked in self._parked.values()]:
                self._emit(request, Event(None, finish="cancelled"))
            while not self._waiting.empty():  # requests that never started
                item = self._waiting.get_nowait()
                if isinstance(item, tuple):
                    item[1].set_exception(LLMLabError("the scheduler is shut down"))
                else:
                    self._emit(item, Event(None, finish="cancelled"))

    def _admit(self) -> None:
        """Run queued calls; bring back requests whose tool call is done, then start waiting requests while rows
        are free, prefilled together in one forward."""
        while len(self.rows) < self.max_batch and not self._resumed.empty():
            self._resume(self._resumed.get_nowait())
        starting: list[_Request] = []
        while len(self.rows) + len(starting) < self.max_batch:
            try:
                item = self._waiting.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, tuple):
                fn, future = item
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(self.model))
                    except Exception as e:
                        future.set_exception(e)
            elif self._ready(item):
                starting.append(item)
        if starting:
            try:
                self._start(starting)
            except Exception as e:
                for request in starting:
                    if request not in self.rows:
                        self._emit(request, Event(None, finish=f"error: {e}"))

    def _ready(self, request: _Request) -> bool:
        """Set a request up to start; False (and its final event sent) when it has nothing to do."""
        if request.cancelled.is_set():
            self._emit(request, Event(None, finish="cancelled"))
            return False
        request.budget = min(request.params.max_new_tokens, self.model.config.context_len - len(request.prompt))
        if request.budget <= 0:
            self._emit(request, Event(None, finish="length"))
            return False
        request.generator = _generator(request.params, self.device)
        if request.run_tool is not None:
            request.tools = ToolCalls(self.tokenizer, 1, request.run_tool, defer=True)
        return True

    def _start(self, requests: list[_Request]) -> None:
        """Prefill the prompts in one left-padded batch, move each into a free row, sample first tokens.

        A left-padded row's keys sit at the end of its prefill cache with RoPE positions counted from its
        first real token (KVCache), so copying them to the start of a row gives exactly a lone prefill."""
        longest = max(len(r.prompt) for r in requests)
        pads = [longest - len(r.prompt) for r in requests]
        prefill = KVCache(self.model.config, len(requests), longest, pad_lens=torch.tensor(pads, device=self.device),
                          dtype=self.cache.k.dtype, device=self.device)
        ids = torch.tensor([[0] * pad + r.prompt for pad, r in zip(pads, requests)], device=self.device)
        logits = self.model(ids, prefill)[:, -1]
        first = len(self.rows)
        for i, (pad, request) in enumerate(zip(pads, requests)):
            self.cache.insert(first + i, prefill, i, pad)
            self.rows.append(request)
        self.cache.n = len(self.rows)
        self._sample_rows(range(first, len(self.rows)), logits)

    def _step(self) -> None:
        """Decode one token for every active row, then drop the rows that finished."""
        tokens = torch.tensor([r.next_token for r in self.rows], device=self.device)
        logits = self.model(tokens[:, None], self.cache)[:, -1]  # (n, V)
        self.steps += 1
        self.batch_sizes_total += len(self.rows)
        self._sample_rows(range(len(self.rows)), logits)

    def _sample_rows(self, rows, logits: torch.Tensor) -> None:
        """Sample (or force) each row's next token from its logits, emit it, and retire finished rows.

        Sampling is batched: greedy rows take one argmax, rows with the same settings one inverse-CDF draw
        with a uniform number from each row's own generator (so a seeded request samples the same tokens
        whatever else shares its batch)."""
        rows = list(rows)
        requests = [self.rows[row] for row in rows]
        masked = [i for i, r in enumerate(requests) if r.produced < r.min_new_tokens and r.stop_ids]
        if masked:
            logits = logits.clone()
            for i in masked:
                logits[i, list(requests[i].stop_ids)] = float("-inf")
        tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            p = r.params
            groups.setdefault((p.temperature, p.top_k, p.top_p) if p.temperature > 0 else (0.0,), []).append(i)
        for key, members in groups.items():
            index = torch.tensor(members, device=logits.device)
            if key == (0.0,):
                tokens[index] = logits[index].argmax(dim=-1)
            else:
                u = torch.cat([torch.rand(1, 1, generator=requests[i].generator, device=logits.device)
                               for i in members])
                tokens[index] = sample_with_uniform(logits[index], requests[members[0]].params, u)
        want_logprobs = [i for i, r in enumerate(requests) if r.logprobs]
        logprobs = dict(zip(want_logprobs, torch.log_softmax(logits[want_logprobs].float(), dim=-1))) \
            if want_logprobs else {}
        finished = []  # (row, finish reason; None: parked for its tool call)
        for i, (row, request, t) in enumerate(zip(rows, requests, tokens.tolist())):
            if request.cancelled.is_set():
                finished.append((row, "cancelled"))
                continue
            forced = False
            if request.tools is not None:
                try:  # a broken call (the state machine raised) ends this request alone
                    t = int(request.tools(torch.tensor([t]))[0])
                    forced = request.tools.forced[0][-1]
                except Exception as e:
                    finished.append((row, f"error: {type(e).__name__}: {e}"))
                    continue
            self._emit(request, Event(t, forced=forced, logprobs=logprobs.get(i)))
            request.next_token = t
            request.budget -= 1
            request.produced += 1
            if t in request.stop_ids and not forced:
                finished.append((row, "stop"))
            elif request.budget <= 0:
                finished.append((row, "length"))
            elif request.tools is not None and request.tools.ready[0] is not None:
                finished.append((row, None))
        for row, reason in sorted(finished, reverse=True):  # highest row first: moves never touch a retired row
            if reason is None:
                self._park(row)
            else:
                self._retire(row, reason)

    def _remove(self, row: int) -> _Request:
        """Take a request out of the batch; the last row moves into its place."""
        request = self.rows[row]
        last = len(self.rows) - 1
        if row != last:
            self.cache.move(last, row)
            self.rows[row] = self.rows[last]
        self.rows.pop()
        self.cache.n = len(self.rows)
        return request

    def _retire(self, row: int, reason: str) -> None:
        self._emit(self._remove(row), Event(None, finish=reason))

    def _park(self, row: int) -> None:
        """Out of the batch while its tool call runs in the pool; `_resume` brings it back."""
        k, v = self.cache.take(row)
        request = self._remove(row)
        future = self._tools.submit(request.run_tool, request.tools.ready[0])
        self._parked[id(request)] = (request, k, v, future)

        def done(_):
            self._resumed.put(id(request))
            self._wake.set()

        future.add_done_callback(done)

    def _resume(self, key: int) -> None:
        """Back into a free row with its cache restored, the tool's output to be forced next."""
        request, k, v, future = self._parked.pop(key)
        if request.cancelled.is_set():
            self._emit(request, Event(None, finish="cancelled"))
            return
        try:
            request.tools.deliver(0, future.result())
        except Exception as e:  # a tool that raised ends this request alone
            self._emit(request, Event(None, finish=f"error: {type(e).__name__}: {e}"))
            return
        row = len(self.rows)
        self.cache.put(row, k, v)
        self.rows.append(request)
        self.cache.n = len(self.rows)

    @staticmethod
    def _emit(request: _Request, event: Event) -> None:
        try:
            request.on_event(event)
        except Exception:  # a broken consumer loses its own events, nothing else
            request.cancelled.set()
