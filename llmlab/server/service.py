"""What the routes of `llmlab serve` share: the server's settings (`ServerConfig`, the flags of `llmlab serve`)
and the `Service` (the model's scheduler, the tokenizer, the feedback store, the metrics, and the checks of a
request against the server's limits)."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from llmlab import checkpoint
from llmlab.assistants.reader import PASSAGES, Reading, read_many
from llmlab.assistants.embedder import index_maker
from llmlab.assistants.retrieval import Retriever
from llmlab.assistants.store import Assistant, AssistantStore
from llmlab.chat import render_prompt, reply_stop_ids
from llmlab.engine import Engine, SamplingParams
from llmlab.errors import LLMLabError
from llmlab.lora import AdapterBank
from llmlab.model import GPT
from llmlab.scheduler import Scheduler
from llmlab.server.generation import Generation
from llmlab.server.http import APIError
from llmlab.server.metrics import Metrics
from llmlab.server.reasoning import Reasoner
from llmlab.server.store import FeedbackStore
from llmlab.tools import TOOL_NAMES, run_tool

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServerConfig:
    checkpoint: str = "runs/cpu/sft"
    """checkpoint to serve (a directory with `latest`, a step directory, or a Hugging Face folder)"""
    host: str = "127.0.0.1"
    """address to bind; anything but loopback requires --api_key"""
    port: int = 8000
    """port to listen on"""
    api_key: str = ""
    """require `Authorization: Bearer KEY` on the API (default: the LLMLAB_API_KEY environment variable)"""
    db: str = "runs/cpu/feedback.db"
    """the feedback store (SQLite): the web UI's conversations, ratings, flags and comparisons"""
    assistants: str = "runs/cpu/assistants"
    """the custom assistants (`llmlab assistant create`), each served by its name: the passages of its files
    that best match the user's last message are read one at a time, and the answer of one that holds it is the
    reply, cited; else its instructions lead the conversation; only its tools run"""
    passages: int = PASSAGES
    """passages of an assistant's files read for each question (paged into the context one at a time, in one
    batch)"""
    embedder: str = ""
    """a dense retriever (`llmlab embed`'s checkpoint) fused with BM25 to find an assistant's passages (other
    words for the same thing meet); empty: BM25 alone"""
    model_name: str = ""
    """the model's id in the API (default: the checkpoint's run and stage, e.g. cpu-sft)"""
    world: str = "runs/cpu/world"
    """world directory for the search tool"""
    tools: bool = True
    """run the assistant's tool calls (calculator, python, search) in chat completions"""
    recall: str = ""
    """the model whose recall `reasoning_effort` probes before answering about a person (same tokenizer; the
    assistant's pretrained base separates strangers best; "" = the served model)"""
    max_batch: int = 32
    """rows decoded together (concurrent requests beyond it wait)"""
    max_waiting: int = 256
    """requests allowed to wait for a row; more are answered 429"""
    max_tokens: int = 512
    """largest max_tokens a request may ask for"""
    default_max_tokens: int = 256
    """max_tokens of a chat request or web UI reply that sets none (always cut to the room left in the context)"""
    max_n: int = 8
    """most choices per request"""
    max_messages: int = 128
    """most messages in a chat request"""
    max_chars: int = 32_000
    """most characters of message content (or prompt text) in one request"""
    max_body_bytes: int = 1_000_000
    """largest request body"""
    shutdown_timeout: float = 10.0
    """seconds that requests in flight get to finish after SIGTERM (or Ctrl-C) before they are cut; the process
    then ends within a few seconds more"""

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise LLMLabError(f"--port must be in 1..65535 (got {self.port})")
        if not 0 <= self.shutdown_timeout < float("inf"):
            raise LLMLabError(f"--shutdown_timeout must be a number of seconds >= 0 (got {self.shutdown_timeout})")
        if self.host not in LOOPBACK and not self.resolved_key():
            raise LLMLabError(f"binding to {self.host} exposes the model beyond this machine: set --api_key (or "
                              f"LLMLAB_API_KEY) so that clients must send `Authorization: Bearer KEY`")
        for name in ("max_batch", "max_tokens", "default_max_tokens", "max_n", "max_messages", "max_chars",
                     "max_body_bytes"):
            if getattr(self, name) < 1:
                raise LLMLabError(f"{name} must be >= 1 (got {getattr(self, name)})")

    def resolved_key(self) -> str:
        return self.api_key or os.environ.get("LLMLAB_API_KEY", "")


class Service:
    """What the routes share: the model's scheduler, the tokenizer, the store and the limits."""

    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        ckpt = checkpoint.load(cfg.checkpoint)
        if ckpt.tokenizer is None:
            raise LLMLabError(f"{ckpt.path} has no tokenizer.json: serve a checkpoint saved with its tokenizer")
        self.tokenizer, self.model = ckpt.tokenizer, ckpt.model
        self.context_len = self.model.config.context_len
        self.name = cfg.model_name or "-".join(Path(cfg.checkpoint).resolve().parts[-2:])
        self.stop_ids = reply_stop_ids(self.tokenizer)  # chats and completions alike
        self.adapters = AdapterBank(self.model)  # custom assistants' LoRA adapters, loaded when first asked for
        self.weights_sha256 = checkpoint.weights_sha256(ckpt.path)  # what an adapter must fit
        self._adapter_ids: dict[tuple[str, float], int] = {}
        self.scheduler = Scheduler(self.model, self.tokenizer, max_batch=cfg.max_batch, adapters=self.adapters)
        self.reasoner = Reasoner(self.tokenizer, cfg.world, cfg.recall, self.run_tool if cfg.tools else None,
                                 max_new_tokens=cfg.default_max_tokens)
        self.store = FeedbackStore(cfg.db)
        self.assistants = AssistantStore(cfg.assistants)
        self._index = index_maker(cfg.embedder)
        self._indexes: dict[tuple[str, float], tuple[list, Retriever | None]] = {}
        self.metrics = Metrics(lambda: self.scheduler)
        self.created = int(time.time())

    def close(self) -> None:
        self.scheduler.shutdown(timeout=5)
        self.store.close()

    def run_tool(self, call: str) -> str:
        """Run one of the assistant's tool calls (in the scheduler's tool threads), counted in the metrics."""
        tool = call.split(maxsplit=1)[0] if call.strip() else ""
        tool = tool if tool in TOOL_NAMES else "unknown"  # the model writes the name: keep the label set fixed
        self.metrics.tool_calls.labels(tool).inc()
        try:
            result = run_tool(call, world_dir=self.cfg.world)
        except BaseException:
            self.metrics.tool_failures.labels(tool).inc()
            raise
        if not result.ok:
            self.metrics.tool_failures.labels(tool).inc()
        return result.text

    def generate(self, route: str, prompt: Sequence[int], params: list[SamplingParams], *, tools: bool,
                 logprobs: bool = False, min_new_tokens: int = 0, assistant: Assistant | None = None,
                 adapter: int = 0) -> Generation:
        """Start the choices of one request in the scheduler (in the event loop), observed for `route`'s
        metrics; with `tools`, the assistant's tool calls run (when the server allows them; a custom
        assistant's, only its own); `adapter`: the assistant's (`adapter_of`)."""
        run = self.run_tool if assistant is None else self.assistant_tool(assistant)
        return Generation(self.scheduler, prompt, params, stop_ids=self.stop_ids,
                          run_tool=run if tools and self.cfg.tools else None, logprobs=logprobs,
                          min_new_tokens=min_new_tokens, observer=self.metrics.observer(route), adapter=adapter)

    def model_card(self, assistant: Assistant | None = None) -> dict:
        if assistant is None:
            return {"id": self.name, "object": "model", "created": self.created, "owned_by": "llmlab",
                    "context_length": self.context_len}
        return {"id": assistant.name, "object": "model", "created": int(assistant.created), "owned_by": "llmlab",
                "context_length": self.context_len, "parent": self.name, "tools": assistant.tools,
                "files": [f["name"] for f in assistant.files], "adapter": assistant.adapter}

    def model_cards(self) -> list[dict]:
        return [self.model_card()] + [self.model_card(a) for a in self.assistants.list() if a.name != self.name]

    # ---- custom assistants ---------------------------------------------------------------------------

    def assistant(self, model: str) -> Assistant | None:
        """The custom assistant a request names (None: the model itself); a 404 for neither."""
        if model == self.name:
            return None
        try:
            return self.assistants.get(model)
        except LLMLabError:
            served = ", ".join(c["id"] for c in self.model_cards())
            raise APIError(404, f"the model {model!r} does not exist: this server serves {served}",
                           param="model", code="model_not_found") from None

    def passages(self, assistant: Assistant, query: str, k: int) -> list:
        """The k passages of the assistant's files that best match `query` (BM25, or its fusion with
        --embedder), best first."""
        key = (assistant.name, assistant.created)
        if key not in self._indexes:
            try:
                chunks = self.assistants.chunks(assistant.name)
            except LLMLabError:  # deleted since the request named it: answered without its files
                chunks = []
            self._indexes[key] = (chunks, self._index([c.text for c in chunks]) if chunks else None)
        chunks, index = self._indexes[key]
        return [chunks[i] for i in index.rank(query, k)] if index and query.strip() else []

    def as_assistant(self, assistant: Assistant, messages: list[dict]) -> list[dict]:
        """The conversation as the assistant answers it without its files: a system message of its
        instructions, then the request's messages (a system message of its own follows the assistant's)."""
        if not assistant.instructions:
            return messages
        return [{"role": "system", "content": assistant.instructions}] + messages

    async def adapter_of(self, assistant: Assistant) -> int:
        """The assistant's LoRA adapter in the bank, loaded in the scheduler's thread the first time it is asked
        for (0: it has none). An adapter that does not fit the served model is a 400 naming why; the server
        and every other assistant go on."""
        if not assistant.adapter:
            return 0
        key = (assistant.name, assistant.created)
        path = self.assistants.adapter_dir(assistant.name)

        def load(_model: GPT) -> int:  # in the scheduler's thread, between steps: one load, however many ask
            if key not in self._adapter_ids:
                self._adapter_ids[key] = self.adapters.add(path, assistant.name, self.weights_sha256)
            return self._adapter_ids[key]
        try:
            return await asyncio.wrap_future(self.scheduler.call(load))
        except LLMLabError as e:
            raise APIError(400, f"the assistant {assistant.name!r} cannot be served by this model: {e}",
                           param="model", code="adapter_mismatch") from None

    def read_files(self, assistant: Assistant, messages: list[dict], adapter: int = 0) -> Callable[[GPT], Reading | None]:
        """The reading of the assistant's files for the user's last message, to run in the scheduler's thread:
        the --passages passages that best match it (`passages`) paged in one at a time (llmlab.assistants.reader),
        through its adapter; the Reading of the best-ranked one that answers, or None (no files, or none holds
        the answer)."""
        query = next((m.get("content") or "" for m in reversed(messages) if m["role"] == "user"), "")
        found = self.passages(assistant, query, self.cfg.passages)

        def read(model: GPT) -> Reading | None:
            if not found:
                return None
            with self.adapters.use(adapter):
                reading = read_many(Engine(model), self.tokenizer, [(query, found)], batch_size=len(found))[0]
            return reading if reading.chunk is not None else None
        return read

    def assistant_tool(self, assistant: Assistant):
        """run_tool for the assistant: its own tools run, any other call is answered with an error."""
        def run(call: str) -> str:
            name = call.split(maxsplit=1)[0] if call.strip() else ""
            if name not in assistant.tools:
                return f"error: the {name or 'unnamed'} tool is not enabled for {assistant.name}"
            return self.run_tool(call)
        return run

    # ---- checks shared by the routes ---------------------------------------------------------------

    def check_model(self, model: str) -> None:
        if model != self.name:
            raise APIError(404, f"the model {model!r} does not exist: this server serves {self.name!r}",
                           param="model", code="model_not_found")

    def check_room(self, n: int) -> None:
        """Room for n more choices: within the limit of choices, the queue not full, the scheduler up."""
        self.scheduler.check_alive()
        if n > self.cfg.max_n:
            raise APIError(400, f"n={n} is over this server's limit of {self.cfg.max_n}", param="n")
        if self.scheduler.waiting + n > self.cfg.max_waiting:
            raise APIError(429, "the server is busy: too many requests waiting; retry shortly",
                           type_="rate_limit_error", code="rate_limit_exceeded")

    def budget(self, asked: int | None, prompt_len: int, default: int | None = None) -> int:
        """The tokens a request may generate: what it asked for (else `default`, else the server's default),
        cut to the room left in the context."""
        if asked is not None and asked > self.cfg.max_tokens:
            raise APIError(400, f"max_tokens={asked} is over this server's limit of {self.cfg.max_tokens}",
                           param="max_tokens")
        room = self.context_len - prompt_len
        if room <= 0:
            raise APIError(400, f"the prompt has {prompt_len} tokens, which fills the model's context of "
                                f"{self.context_len}: shorten it", param="messages", code="context_length_exceeded")
        wanted = asked if asked is not None else (default or self.cfg.default_max_tokens)
        return min(wanted, room)

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        if len(messages) > self.cfg.max_messages:
            raise APIError(413, f"{len(messages)} messages is over this server's limit of {self.cfg.max_messages}",
                           param="messages", code="too_many_messages")
        chars = sum(len(m.get("content") or "") for m in messages)
        if chars > self.cfg.max_chars:
            raise APIError(413, f"{chars} characters of content is over this server's limit of "
                                f"{self.cfg.max_chars}", param="messages", code="too_many_characters")
        try:
            return render_prompt(self.tokenizer, messages)
        except LLMLabError as e:
            raise APIError(400, str(e), param="messages") from None
