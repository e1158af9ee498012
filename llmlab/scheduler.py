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

Requests may name LoRA adapters of the scheduler's `AdapterBank` (llmlab.lora): rows of different adapters
decode in the same batch, each through its own low-rank update over the shared base.

Rows have different lengths, so `SlotKVCache` keeps a length per row and masks each row's keys beyond it;
every row computes what it would alone (tests/test_scheduler.py checks greedy tokens and logits against
`Engine.generate`).

Faults. A request never takes the loop down with it: what raises while one request is set up (its seed, its
generator), prefilled (a batch that fails is prefilled again one request at a time), sampled or advanced by its
tool calls ends that request alone, with a final event whose `finish` is "error: ...". A fault of the whole
batch (the decode forward itself raised) ends every request in the batch; the loop then goes on with a clean
batch, as a restarted loop would. A fault that outlives the requests it ended, `max_failures` iterations in a
row that raise, is the process's, not a request's (a broken device, a bug in the loop): the loop stops,
`alive` turns False and `failure` holds the exception, every request it held or that waits gets its final
"error: ..." event, `submit` and `call` raise `SchedulerDown` at once, and `on_death` is called. Nothing waits
on a dead loop. `llmlab serve` then reports 503 on /health and exits non-zero, so that its supervisor
(systemd, Kubernetes, a shell loop) starts a fresh process: restarting the loop in-process would keep a device
or model that just failed three times in a row.

Tool calls run on daemon threads (`_ToolPool`), so a call still running at shutdown never holds the process
up; a sandboxed program dies with the server (bwrap's --die-with-parent). `shutdown(timeout)` waits at most
`timeout` seconds for the loop to finish its step.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from llmlab import threads as cpu_threads
from llmlab.engine import SamplingParams, ToolCalls, _check_prompts, _generator, sample_with_uniform
from llmlab.errors import LLMLabError
from llmlab.lora import AdapterBank
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
        """The longest active row."""
        return int(self.lengths[: self.n].max()) if self.n else 0

    @property
    def reach(self) -> int:
        """The longest active row (what `GPT.forward` checks against the context)."""
        return self.length

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


@dataclass(eq=False)  # requests compare by identity
class _Request:
    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    on_event: Callable[[Event], None]
    run_tool: Callable[[str], str] | None
    logprobs: bool
    min_new_tokens: int = 0  # stop tokens are masked until this many tokens are out
    adapter: int = 0  # its LoRA adapter in the scheduler's bank (0: the base model)
    tools: ToolCalls | None = None
    generator: torch.Generator | None = None
    budget: int = 0  # tokens it may still produce
    produced: int = 0
    next_token: int = 0  # the token to feed at the next step
    finished: bool = False  # its final event is out (`Scheduler._finish`): nothing more is sent
    cancelled: threading.Event = field(default_factory=threading.Event)


class SchedulerDown(RuntimeError):
    """`submit` or `call` on a scheduler that is shut down or whose loop has died (`Scheduler.failure`)."""


class Handle:
    """A submitted request: `cancel()` frees its row at the next step (a client that went away)."""

    def __init__(self, request: _Request):
        self._request = request

    def cancel(self) -> None:
        self._request.cancelled.set()


class _ToolPool:
    """At most `workers` tool calls at once, on daemon threads: unlike a ThreadPoolExecutor's workers, which
    the interpreter joins at exit, a call still running at shutdown never holds the process up."""

    def __init__(self, workers: int):
        self._jobs: queue.Queue = queue.Queue()
        self._workers = workers
        for i in range(workers):
            threading.Thread(target=self._work, name=f"llmlab-tool-{i}", daemon=True).start()

    def submit(self, fn: Callable[[str], str], call: str) -> Future:
        future: Future = Future()
        self._jobs.put((fn, call, future))
        return future

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, call, future = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(call))
                except BaseException as e:  # the request's own failure (`_resume` reports it)
                    future.set_exception(e)

    def shutdown(self) -> None:
        """Cancel the calls not started; the running ones end with the process (or return to no one)."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job[2].cancel()
        for _ in range(self._workers):  # one stop sign per worker
            self._jobs.put(None)


class Scheduler:
    """Continuous batching of generation requests over one model in a background thread.

    `submit` returns at once; the request's `on_event` is called from the scheduler's thread with every
    token and then a final event, so it must be quick (put the event on a queue). `call(fn)` runs
    `fn(model)` in that thread between steps (for work that must not race the batch, such as scoring
    prompts) and returns a Future. `alive` is False once the loop has stopped (shut down, or died: see the
    module docstring); `on_death(exc)`, if set, is called from the loop's thread when it dies.
    """

    def __init__(self, model: GPT, tokenizer, max_batch: int = 32, tool_workers: int = 4, max_failures: int = 3,
                 adapters: AdapterBank | None = None):
        if max_batch < 1:
            raise LLMLabError(f"max_batch must be >= 1 (got {max_batch})")
        if max_failures < 1:
            raise LLMLabError(f"max_failures must be >= 1 (got {max_failures})")
        self.model = model.eval()
        self.adapters = adapters
        """LoRA adapters over the model (llmlab.lora.AdapterBank): requests of different adapters share a batch"""
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_failures = max_failures
        device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
        self.device = device
        self.cache = SlotKVCache(model.config, max_batch, dtype=dtype, device=device)
        self.rows: list[_Request] = []  # active requests, row i = rows[i]
        self._admitting: list[_Request] = []  # taken from the queues, not yet in `rows` (see `_fail_held`)
        self._waiting: queue.Queue = queue.Queue()
        self._tools = _ToolPool(tool_workers)
        # id(request) -> (request, keys, values, tool Future) while its call runs (scheduler thread only)
        self._parked: dict[int, tuple[_Request, torch.Tensor, torch.Tensor, Future]] = {}
        self._resumed: queue.Queue = queue.Queue()  # ids of parked requests whose tool call is done
        self._wake = threading.Event()
        self._stop = threading.Event()  # shutdown() was called
        self._closed = threading.Event()  # the loop has ended: nothing submitted from now on is served
        self.failure: BaseException | None = None
        """what killed the loop (None while it runs, and after a clean shutdown)"""
        self.on_death: Callable[[BaseException], None] | None = None
        self.steps = 0  # decode steps run (for monitoring)
        self.batch_sizes_total = 0  # sum of rows over steps: mean batch = batch_sizes_total / steps
        self.tokens_generated = 0  # tokens sampled (not those a tool call forced in)
        self.prompt_tokens = 0  # prompt tokens prefilled
        self._thread = threading.Thread(target=self._loop, name="llmlab-scheduler", daemon=True)
        self._thread.start()

    # ---- public ----------------------------------------------------------------------------------------

    def submit(self, prompt: Sequence[int], params: SamplingParams, on_event: Callable[[Event], None], *,
               stop_ids: Sequence[int] = (), run_tool: Callable[[str], str] | None = None,
               logprobs: bool = False, min_new_tokens: int = 0, adapter: int = 0) -> Handle:
        """Queue a prompt for generation. Raises LLMLabError at once for a prompt that cannot run, SchedulerDown
        when the loop has stopped. `min_new_tokens` masks the stop tokens until that many tokens are out
        (fixed-length benchmarks); `adapter`: the row's adapter in `adapters` (0: the base)."""
        self.check_alive()
        _check_prompts([prompt], self.model.config.context_len)
        if adapter and not (self.adapters is not None and 0 < adapter < len(self.adapters)):
            raise LLMLabError(f"no adapter {adapter}: the scheduler has "
                              f"{len(self.adapters) - 1 if self.adapters is not None else 0}")
        request = _Request(list(prompt), params, frozenset(stop_ids), on_event, run_tool, logprobs, min_new_tokens,
                           adapter)
        self._enqueue(request)
        return Handle(request)

    def call(self, fn: Callable[[GPT], object]) -> Future:
        """Run fn(model) in the scheduler thread between steps; the Future holds its result or exception."""
        self.check_alive()
        future: Future = Future()
        self._enqueue((fn, future))
        return future

    @property
    def alive(self) -> bool:
        """The loop runs and serves requests."""
        return not self._closed.is_set() and self._thread.is_alive()

    def check_alive(self) -> None:
        """Raise SchedulerDown, saying why, unless the loop runs (and is not shutting down)."""
        if not self.alive or self._stop.is_set():
            raise SchedulerDown(self._down_reason())

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

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop: it finishes its step (waited for `timeout` seconds at most), then every request it
        held or that waits ends "cancelled"."""
        self._stop.set()
        self._wake.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=timeout)
        self._tools.shutdown()

    # ---- the loop --------------------------------------------------------------------------------------

    def _down_reason(self) -> str:
        if self.failure is None:
            return "the scheduler is shut down"
        return f"the scheduler stopped after an internal error ({type(self.failure).__name__}: {self.failure})"

    def _enqueue(self, item) -> None:
        self._waiting.put(item)
        self._wake.set()
        if self._closed.is_set():  # the loop ended between the check and the put: answer it here
            self._drain_waiting()

    def _loop(self) -> None:
        failures = 0
        try:
            with torch.inference_mode():
                while not self._stop.is_set():
                    cpu_threads.adapt()
                    try:
                        if self._iterate():
                            failures = 0
                    except Exception as e:  # not one request's fault: every request held ends, the loop goes on
                        failures += 1
                        self._fail_held(f"error: {type(e).__name__}: {e}")
                        if failures >= self.max_failures:
                            raise
        except BaseException as e:  # the loop dies: say why, answer everyone, tell the owner
            self.failure = e
        finally:
            self._closed.set()
            reason = "cancelled" if self.failure is None else f"error: {self._down_reason()}"
            self._fail_held(reason)
            for request, _, _, future in self._parked.values():
                future.cancel()
                self._finish(request, reason)
            self._parked.clear()
            self._drain_waiting()
            if self.failure is not None and self.on_death is not None:
                try:
                    self.on_death(self.failure)
                except Exception:  # the owner's hook: the loop has already answered everyone
                    pass

    def _iterate(self) -> bool:
        """One turn of the loop: admit, then decode one step. True when a step ran (the batch is healthy)."""
        self._admit()
        if not self.rows:  # idle, or every request waits for its tool
            self._wake.wait(timeout=0.5)
            self._wake.clear()
            return False
        self._step()
        return True

    def _fail_held(self, reason: str) -> None:
        """End every request in the batch or being admitted with `reason`; the batch starts empty again."""
        for request in self.rows + self._admitting:
            self._finish(request, reason)
        self.rows, self._admitting, self.cache.n = [], [], 0

    def _drain_waiting(self) -> None:
        """Answer everything queued once the loop has ended (safe from any thread: each item is taken once)."""
        reason = "cancelled" if self.failure is None else f"error: {self._down_reason()}"
        while True:
            try:
                item = self._waiting.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, tuple):
                item[1].set_exception(SchedulerDown(self._down_reason()))
            else:
                self._finish(item, reason)

    def _admit(self) -> None:
        """Run queued calls; bring back requests whose tool call is done, then start waiting requests while rows
        are free, prefilled together in one forward."""
        while len(self.rows) < self.max_batch and not self._resumed.empty():
            self._resume(self._resumed.get_nowait())
        starting = self._admitting = []
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
                continue
            starting.append(item)
            try:
                ready = self._ready(item)
            except Exception as e:  # its settings cannot run (e.g. a seed its generator refuses): it alone fails
                self._finish(item, f"error: {type(e).__name__}: {e}")
                ready = False
            if not ready:
                starting.pop()
        if not starting:
            return
        try:
            self._start(starting)
        except Exception:  # the batched prefill failed: again one at a time, so that only the culprit fails
            for request in starting:
                if request.finished or any(request is r for r in self.rows):
                    continue
                try:
                    self._start([request])
                except Exception as e:
                    self._finish(request, f"error: {type(e).__name__}: {e}")
        self._admitting = []

    def _ready(self, request: _Request) -> bool:
        """Set a request up to start; False (and its final event sent) when it has nothing to do."""
        if request.cancelled.is_set():
            self._finish(request, "cancelled")
            return False
        request.budget = min(request.params.max_new_tokens, self.model.config.context_len - len(request.prompt))
        if request.budget <= 0:
            self._finish(request, "length")
            return False
        request.generator = _generator(request.params, self.device)
        if request.run_tool is not None:
            request.tools = ToolCalls(self.tokenizer, 1, request.run_tool, defer=True)
        return True

    def _start(self, requests: list[_Request]) -> None:
        """Prefill the prompts in one left-padded batch, move each into a free row, sample first tokens. Raises
        before any row changes when the prefill fails.

        A left-padded row's keys sit at the end of its prefill cache with RoPE positions counted from its
        first real token (KVCache), so copying them to the start of a row gives exactly a lone prefill."""
        longest = max(len(r.prompt) for r in requests)
        pads = [longest - len(r.prompt) for r in requests]
        prefill = KVCache(self.model.config, len(requests), longest, pad_lens=torch.tensor(pads, device=self.device),
                          dtype=self.cache.k.dtype, device=self.device)
        ids = torch.tensor([[0] * pad + r.prompt for pad, r in zip(pads, requests)], device=self.device)
        with self._adapted(requests):
            logits = self.model(ids, prefill)[:, -1]
        first = len(self.rows)
        for i, (pad, request) in enumerate(zip(pads, requests)):
            self.cache.insert(first + i, prefill, i, pad)
            self.rows.append(request)
            self.prompt_tokens += len(request.prompt)
        self.cache.n = len(self.rows)
        self._sample_rows(range(first, len(self.rows)), logits)

    def _adapted(self, requests: list[_Request]):
        """The context in which a forward over `requests`' rows runs each through its own adapter."""
        if self.adapters is None:
            return contextlib.nullcontext()
        return self.adapters.use([r.adapter for r in requests])

    def _step(self) -> None:
        """Decode one token for every active row, then drop the rows that finished."""
        tokens = torch.tensor([r.next_token for r in self.rows], device=self.device)
        with self._adapted(self.rows):
            logits = self.model(tokens[:, None], self.cache)[:, -1]  # (n, V)
        self.steps += 1
        self.batch_sizes_total += len(self.rows)
        self._sample_rows(range(len(self.rows)), logits)

    def _draw(self, requests: list[_Request], logits: torch.Tensor) -> tuple[list[int | None], dict[int, str]]:
        """Each row's sampled token (None for a row that failed) and the failures, by index.

        Sampling is batched: greedy rows take one argmax, rows with the same settings one inverse-CDF draw
        with a uniform number from each row's own generator (so a seeded request samples the same tokens
        whatever else shares its batch). A group whose draw raises is drawn again row by row, with the same
        uniform numbers, so that only the row at fault fails."""
        tokens: list[int | None] = [None] * len(requests)
        failed: dict[int, str] = {}
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            p = r.params
            groups.setdefault((p.temperature, p.top_k, p.top_p) if p.temperature > 0 else (0.0,), []).append(i)

        def draw(members: list[int], u: dict[int, torch.Tensor]) -> None:
            index = torch.tensor(members, device=logits.device)
            if members[0] not in u:  # greedy
                picked = logits[index].argmax(dim=-1)
            else:
                picked = sample_with_uniform(logits[index], requests[members[0]].params,
                                             torch.cat([u[i] for i in members]))
            for i, t in zip(members, picked.tolist()):
                tokens[i] = t

        for key, members in groups.items():
            u: dict[int, torch.Tensor] = {}
            if key != (0.0,):
                for i in members:
                    try:
                        u[i] = torch.rand(1, 1, generator=requests[i].generator, device=logits.device)
                    except Exception as e:
                        failed[i] = f"error: {type(e).__name__}: {e}"
                members = [i for i in members if i not in failed]
            if not members:
                continue
            try:
                draw(members, u)
            except Exception:
                for i in members:
                    try:
                        draw([i], u)
                    except Exception as e:
                        failed[i] = f"error: {type(e).__name__}: {e}"
        return tokens, failed

    def _sample_rows(self, rows, logits: torch.Tensor) -> None:
        """Sample (or force) each row's next token from its logits (`_draw`), emit it, and retire finished
        rows; a row whose sampling, logprobs or tool call raised ends alone."""
        rows = list(rows)
        requests = [self.rows[row] for row in rows]
        masked = [i for i, r in enumerate(requests) if r.produced < r.min_new_tokens and r.stop_ids]
        if masked:
            logits = logits.clone()
            for i in masked:
                logits[i, list(requests[i].stop_ids)] = float("-inf")
        tokens, failed = self._draw(requests, logits)
        finished = []  # (row, finish reason; None: parked for its tool call)
        for i, (row, request, t) in enumerate(zip(rows, requests, tokens)):
            if request.cancelled.is_set():
                finished.append((row, "cancelled"))
                continue
            if i in failed:
                finished.append((row, failed[i]))
                continue
            forced = False
            try:  # a broken call (the state machine raised) ends this request alone
                logprobs = torch.log_softmax(logits[i].float(), dim=-1) if request.logprobs else None
                if request.tools is not None:
                    t = int(request.tools(torch.tensor([t]))[0])
                    forced = request.tools.forced[0][-1]
            except Exception as e:
                finished.append((row, f"error: {type(e).__name__}: {e}"))
                continue
            self._emit(request, Event(t, forced=forced, logprobs=logprobs))
            request.next_token = t
            request.budget -= 1
            request.produced += 1
            if not forced:
                self.tokens_generated += 1
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
                self._finish(self._remove(row), reason)

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
        self._admitting = [request]
        if request.cancelled.is_set():
            self._finish(request, "cancelled")
            return
        try:
            request.tools.deliver(0, future.result())
        except Exception as e:  # a tool that raised ends this request alone
            self._finish(request, f"error: {type(e).__name__}: {e}")
            return
        row = len(self.rows)
        self.cache.put(row, k, v)
        self.rows.append(request)
        self.cache.n = len(self.rows)
        self._admitting = []

    def _finish(self, request: _Request, reason: str) -> None:
        """The request's final event (once: a request that already ended is left alone)."""
        if not request.finished:
            request.finished = True
            self._emit(request, Event(None, finish=reason))

    @staticmethod
    def _emit(request: _Request, event: Event) -> None:
        try:
            request.on_event(event)
        except Exception:  # a broken consumer loses its own events, nothing else
            request.cancelled.set()
