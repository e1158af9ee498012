"""From scheduler events to what a response shows: text, executed tool calls, stop sequences, logprobs.

`Generation` submits the n choices of one request to the `Scheduler` and yields their events in the asyncio
loop; leaving it (a client that disconnected, a stop sequence) cancels every choice, which frees their rows at
the next step. `ChoiceText` turns one choice's tokens into content: the assistant's words outside tool calls
and tool outputs, held back while they might be the start of a stop sequence.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Callable, Sequence

import torch

from llmlab.chat import ToolSpans
from llmlab.engine import SamplingParams
from llmlab.scheduler import Event, Handle, Scheduler
from llmlab.tokenizer import SPECIAL_TOKENS, Tokenizer

if TYPE_CHECKING:
    from llmlab.server.metrics import GenerationObserver


class _Waker:
    """Wakes the event loop for every Generation with new events, with one cross-thread call per batch of
    them: `call_soon_threadsafe` writes to the loop's self-pipe, a system call that, once per request per
    step, cost a tenth of the scheduler thread's time under load."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.dirty: set[Generation] = set()
        self.lock = threading.Lock()
        self.scheduled = False

    def mark(self, generation: Generation) -> None:  # the scheduler's thread
        with self.lock:
            self.dirty.add(generation)
            if self.scheduled:
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:  # the event loop
        with self.lock:
            dirty, self.dirty, self.scheduled = self.dirty, set(), False
        for generation in dirty:
            generation._signal.set()


_wakers: dict[asyncio.AbstractEventLoop, _Waker] = {}


def _waker(loop: asyncio.AbstractEventLoop) -> _Waker:
    if loop not in _wakers:
        _wakers.clear()  # one event loop at a time serves (a new one after a restart)
        _wakers[loop] = _Waker(loop)
    return _wakers[loop]


class Generation:
    """The choices of one request, running in the scheduler; iterate `updates()` in the event loop.

    The scheduler's thread appends events to a queue and marks the generation for the loop's `_Waker`, so that
    under load one wake-up serves many requests and one streamed chunk may carry several tokens. `observer`
    (llmlab.server.metrics) hears of the first token and of a failure.
    """

    def __init__(self, scheduler: Scheduler, prompt: Sequence[int], params: list[SamplingParams], *,
                 stop_ids: Sequence[int], run_tool: Callable[[str], str] | None = None, logprobs: bool = False,
                 min_new_tokens: int = 0, observer: GenerationObserver | None = None, adapter: int = 0):
        self._started = time.perf_counter()
        self._observer = observer
        self._waker = _waker(asyncio.get_running_loop())
        self._pending: collections.deque[tuple[int, Event]] = collections.deque()
        self._signal = asyncio.Event()
        self.handles: list[Handle] = []
        try:
            for i, p in enumerate(params):
                self.handles.append(scheduler.submit(prompt, p, self._callback(i), stop_ids=stop_ids,
                                                     run_tool=run_tool, logprobs=logprobs,
                                                     min_new_tokens=min_new_tokens, adapter=adapter))
        except Exception:
            self.cancel()
            raise

    def _callback(self, choice: int) -> Callable[[Event], None]:
        def on_event(event: Event) -> None:  # called in the scheduler's thread
            self._pending.append((choice, event))
            self._waker.mark(self)
        return on_event

    def cancel(self, choice: int | None = None) -> None:
        for i, handle in enumerate(self.handles):
            if choice is None or i == choice:
                handle.cancel()

    async def batches(self) -> AsyncIterator[list[tuple[int, Event]]]:
        """Lists of (choice, event), as they arrive, until every choice has sent its final event; leaving
        early (a client that disconnected) cancels every choice."""
        remaining = len(self.handles)
        first_token, failed = True, False
        try:
            while remaining:
                await self._signal.wait()
                self._signal.clear()
                batch = []
                while self._pending:
                    batch.append(self._pending.popleft())
                remaining -= sum(event.token is None for _, event in batch)
                if self._observer is not None:
                    if first_token and any(event.token is not None for _, event in batch):
                        first_token = False
                        self._observer.first_token(time.perf_counter() - self._started)
                    if not failed and any((event.finish or "").startswith("error") for _, event in batch):
                        failed = True
                        self._observer.failed()
                if batch:
                    yield batch
        finally:
            self.cancel()

    async def updates(self, texts: list[ChoiceText]) -> AsyncIterator[list[tuple[int, str, object]]]:
        """Per batch of events, what changed: (choice, "text", str) with consecutive text merged, (choice,
        "tool", {"call", "result"}) and (choice, "finish", reason). A choice that a stop sequence ended is
        cancelled here."""
        async for batch in self.batches():
            out: list[tuple[int, str, object]] = []
            for choice, event in batch:
                text = texts[choice]
                running = text.finish is None
                for kind, piece in text.push(event):
                    if kind == "text" and out and out[-1][:2] == (choice, "text"):
                        out[-1] = (choice, "text", out[-1][2] + piece)
                    else:
                        out.append((choice, kind, piece))
                if running and text.finish is not None:
                    if event.token is not None:
                        self.cancel(choice)  # a stop sequence: free the row now
                    out.append((choice, "finish", text.finish))
            if out:
                yield out


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: dict[str, float]


@dataclass
class ChoiceText:
    """One choice's visible text, built token by token.

    `push(event)` returns the new pieces: ("text", str) for content and ("tool", {"call", "result"}) for a
    tool call the engine ran. Text inside `<|tool_start|>...<|tool_end|>` and `<|output_start|>...<|output_end|>`
    is not content (the spans are read by `llmlab.chat.ToolSpans`). With stop sequences, text is held back while it could be the start of one; when one
    appears the content is cut before it and `finish` becomes "stop" (the caller cancels the choice).
    """

    tokenizer: Tokenizer
    stops: list[str] = field(default_factory=list)
    top_logprobs: int | None = None
    lstrip: bool = False
    """drop the whitespace the text starts with (a chat reply's leading space)"""
    tool_spans: bool = True
    """keep tool calls and outputs out of the content (chat); False: every token's text is content (completions)"""
    stop_ids: frozenset[int] = frozenset()
    """end tokens: not part of `tokens` or `logprobs` (as in OpenAI's responses)"""
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish: str | None = None
    _shown: int = 0  # characters of content already returned

    def __post_init__(self) -> None:
        self._decoder = self.tokenizer.stream_decoder()
        self._spans = ToolSpans(self.tokenizer)

    def push(self, event: Event) -> list[tuple[str, object]]:
        if self.finish is not None:
            return []
        if event.token is None:
            self._add(self._decoder.flush())
            self.finish = "stop" if event.finish in ("stop", "cancelled") else event.finish
            return self._release(final=True)
        t = event.token
        if t in self.stop_ids:
            return []
        self.tokens.append(t)
        if event.logprobs is not None and self.top_logprobs is not None:
            self.logprobs.append(token_logprob(self.tokenizer, t, event.logprobs, self.top_logprobs))
        pieces: list[tuple[str, object]] = []
        if self.tool_spans:
            kind = self._spans.push(t)
        else:
            kind = "special" if t < len(SPECIAL_TOKENS) else "text"
        if kind in ("call_start", "output_start"):
            self._add(self._decoder.flush())
        elif kind == "output_end":
            self.tool_calls.append(self._spans.calls[-1])
            pieces.append(("tool", self._spans.calls[-1]))
        elif kind == "text":
            self._add(self._decoder.push(t))
        # else: inside a call or an output, or an end token (the scheduler stops the row) or one without text
        return self._release(final=False) + pieces

    @property
    def unfinished_call(self) -> str | None:
        """The text of a tool call the model began and never closed (the turn ended, or ran out of tokens,
        inside `<|tool_start|>...`): no tool ran, and the reply would otherwise look empty for no reason."""
        if self.finish is None or self._spans.span != "call":
            return None
        return self.tokenizer.decode(self._spans.call).strip()

    def _add(self, text: str) -> None:
        self.content += text.lstrip() if self.lstrip and not self.content else text

    def _release(self, final: bool) -> list[tuple[str, object]]:
        """Content not yet shown, up to a stop sequence or to where one might begin."""
        end = len(self.content)
        for stop in self.stops:
            at = self.content.find(stop, max(0, self._shown - len(stop) + 1))
            if at != -1 and at < end:
                end = at
                self.finish = "stop"
        if self.finish is None and not final:
            for stop in self.stops:  # hold back a tail that is a prefix of a stop sequence
                for k in range(min(len(stop) - 1, end - self._shown), 0, -1):
                    if self.content.endswith(stop[:k]):
                        end = min(end, len(self.content) - k)
                        break
        if self.finish == "stop" and end < len(self.content):
            self.content = self.content[:end]
        piece = self.content[self._shown:end]
        self._shown = max(self._shown, end)
        return [("text", piece)] if piece else []


def token_logprob(tokenizer: Tokenizer, token: int, logprobs: torch.Tensor, top: int) -> TokenLogprob:
    """The logprob of `token` and the `top` most likely tokens, keyed by their text (OpenAI's format)."""
    values, ids = torch.topk(logprobs, top) if top > 0 else (logprobs[:0], logprobs[:0].long())
    return TokenLogprob(tokenizer.token_text(token), float(logprobs[token]),
                        {tokenizer.token_text(int(i)): float(v) for v, i in zip(values, ids)})


def prompt_logprobs(model, ids: list[int], top: int, tokenizer: Tokenizer) -> list[TokenLogprob | None]:
    """Log-probabilities of each prompt token given the ones before it (None for the first): what `echo` with
    `logprobs` returns, and what log-likelihood evaluators read. Runs in the scheduler thread."""
    with torch.inference_mode():
        logits = model(torch.tensor([ids], device=next(model.parameters()).device))[0]  # (T, V)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
    out: list[TokenLogprob | None] = [None]
    for pos in range(1, len(ids)):
        out.append(token_logprob(tokenizer, ids[pos], logprobs[pos - 1], top))
    return out
