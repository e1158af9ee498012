"""The FastAPI app of `llmlab serve`: an OpenAI-compatible API, the web chat UI and its feedback store.

    GET  /health                    liveness and load (active rows, waiting requests, tool calls running, mean batch)
    GET  /v1/models                 the one model served
    POST /v1/chat/completions       chat, streaming (SSE) or not; the engine runs the assistant's tool calls
    POST /v1/completions            raw text completion with logprobs and echo (log-likelihood evaluators)
    GET  /                          the web chat UI (static files, no build step)
    /api/...                        the UI's conversations, replies, ratings, flags and comparisons

Every request goes through one `Scheduler` (continuous batching), so concurrent requests share decode steps.
Tool calls the engine ran are reported in an extension field, `executed_tool_calls` (OpenAI's `tool_calls`
asks the client to run them; these already ran): `[{"id", "type": "function", "function": {"name",
"arguments"}, "output"}]` on the message, and one per chunk in a stream's deltas.

Safety: bound to anything but loopback the server requires an API key (`Authorization: Bearer KEY`); bodies,
messages, characters, max_tokens and n are limited (`ServerConfig`); every error is OpenAI-shaped JSON
(`{"error": {"message", "type", "param", "code"}}`) with a 4xx status; a request that fails is answered with
an error and nothing else is affected; a client that disconnects cancels its rows.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmlab import checkpoint
from llmlab.chat import render_prompt
from llmlab.engine import SamplingParams
from llmlab.errors import LLMLabError
from llmlab.scheduler import Scheduler
from llmlab.server import schemas
from llmlab.server.generation import ChoiceText, Generation, prompt_logprobs
from llmlab.tokenizer import Tokenizer

STATIC = Path(__file__).parent / "static"
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
    model_name: str = ""
    """the model's id in the API (default: the checkpoint's run and stage, e.g. cpu-sft)"""
    world: str = "runs/cpu/world"
    """world directory for the search tool"""
    tools: bool = True
    """run the assistant's tool calls (calculator, python, search) in chat completions"""
    max_batch: int = 32
    """rows decoded together (concurrent requests beyond it wait)"""
    max_waiting: int = 256
    """requests allowed to wait for a row; more are answered 429"""
    max_tokens: int = 512
    """largest max_tokens a request may ask for"""
    default_max_tokens: int = 256
    """max_tokens of a chat request that sets none (always cut to the room left in the context)"""
    max_n: int = 8
    """most choices per request"""
    max_messages: int = 128
    """most messages in a chat request"""
    max_chars: int = 32_000
    """most characters of message content (or prompt text) in one request"""
    max_body_bytes: int = 1_000_000
    """largest request body"""

    def __post_init__(self) -> None:
        if self.host not in LOOPBACK and not self.resolved_key():
            raise LLMLabError(f"binding to {self.host} exposes the model beyond this machine: set --api_key (or "
                              f"LLMLAB_API_KEY) so that clients must send `Authorization: Bearer KEY`")
        for name in ("max_batch", "max_tokens", "default_max_tokens", "max_n", "max_messages", "max_chars",
                     "max_body_bytes"):
            if getattr(self, name) < 1:
                raise LLMLabError(f"{name} must be >= 1 (got {getattr(self, name)})")

    def resolved_key(self) -> str:
        import os

        return self.api_key or os.environ.get("LLMLAB_API_KEY", "")


class APIError(Exception):
    """An error answered as OpenAI-shaped JSON with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code)


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class _Guard:
    """ASGI middleware in front of every route: the API key, and 413 for a body over `limit` bytes (by its
    Content-Length, or counted as it streams in). Plain ASGI rather than an `@app.middleware` function, which
    would wrap every streamed chunk of every response in extra tasks and queues."""

    PUBLIC = ("/", "/health", "/favicon.ico")

    def __init__(self, app, limit: int, key: str):
        self.app, self.limit, self.key = app, limit, key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        path = scope.get("path", "")
        if self.key and path not in self.PUBLIC and not path.startswith("/static/"):
            given = headers.get(b"authorization", b"")
            if not secrets.compare_digest(given, f"Bearer {self.key}".encode()):
                denied = error_response(401, "missing or wrong API key: send `Authorization: Bearer KEY`",
                                        type_="authentication_error", code="invalid_api_key")
                return await denied(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            too_big = error_response(413, f"request body over {self.limit} bytes", code="body_too_large")
            return await too_big(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # a chunked body: the route reading it gets a 413 (APIError handler)
                    raise APIError(413, f"request body over {self.limit} bytes", code="body_too_large")
            return message

        return await self.app(scope, limited_receive, send)


class Service:
    """What the routes share: the model's scheduler, the tokenizer, the store and the limits."""

    def __init__(self, cfg: ServerConfig):
        from llmlab.server.store import FeedbackStore

        self.cfg = cfg
        ckpt = checkpoint.resolve(cfg.checkpoint)
        self.tokenizer = Tokenizer.load(ckpt)
        self.model = checkpoint.load_model(ckpt)
        self.context_len = self.model.config.context_len
        self.name = cfg.model_name or "-".join(Path(cfg.checkpoint).resolve().parts[-2:])
        self.scheduler = Scheduler(self.model, self.tokenizer, max_batch=cfg.max_batch)
        self.store = FeedbackStore(cfg.db)
        self.created = int(time.time())
        sp = self.tokenizer.special_id
        self.chat_stops = [sp("<|assistant_end|>"), self.tokenizer.bos_id]
        self.completion_stops = self.chat_stops  # a new document, or the end of an assistant's answer (eos)

    def close(self) -> None:
        self.scheduler.shutdown()
        self.store.close()

    def run_tool(self, call: str) -> str:
        from llmlab.tools import run_tool

        return run_tool(call, world_dir=self.cfg.world).text

    # ---- checks shared by the routes ---------------------------------------------------------------

    def check_model(self, model: str) -> None:
        if model != self.name:
            raise APIError(404, f"the model {model!r} does not exist: this server serves {self.name!r}",
                           param="model", code="model_not_found")

    def check_room(self, n: int) -> None:
        if n > self.cfg.max_n:
            raise APIError(400, f"n={n} is over this server's limit of {self.cfg.max_n}", param="n")
        if self.scheduler.waiting + n > self.cfg.max_waiting:
            raise APIError(429, "the server is busy: too many requests waiting; retry shortly",
                           type_="rate_limit_error", code="rate_limit_exceeded")

    def budget(self, asked: int | None, prompt_len: int, default: int | None = None) -> int:
        if asked is not None and asked > self.cfg.max_tokens:
            raise APIError(400, f"max_tokens={asked} is over this server's limit of {self.cfg.max_tokens}",
                           param="max_tokens")
        room = self.context_len - prompt_len
        if room <= 0:
            raise APIError(400, f"the prompt has {prompt_len} tokens, which fills the model's context of "
                                f"{self.context_len}: shorten it", param="messages", code="context_length_exceeded")
        wanted = asked if asked is not None else (default or self.cfg.default_max_tokens)
        return min(wanted, room)

    def params(self, body, max_new: int, n: int) -> list[SamplingParams]:
        """One SamplingParams per choice; with a seed, choice i samples with seed + i."""
        return [SamplingParams(max_new_tokens=max_new, temperature=body.temperature, top_p=body.top_p,
                               seed=None if body.seed is None else body.seed + i) for i in range(n)]

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


def create_app(cfg: ServerConfig) -> FastAPI:
    """The app for one checkpoint. The model, scheduler and store live as long as the app's lifespan."""
    from contextlib import asynccontextmanager

    service = Service(cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.close()

    app = FastAPI(title="llmlab", version="1", lifespan=lifespan,
                  description="An OpenAI-compatible API and a web chat UI for an llmlab checkpoint.")
    app.state.service = service
    key = cfg.resolved_key()

    # ---- errors: OpenAI-shaped, 4xx for what the client sent, 500 for the rest ----------------------

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            return error_response(400, f"the body is not valid JSON: {first.get('msg', '')}", code="invalid_json")
        msg = f"{where}: {first.get('msg', 'invalid value')}" if where else first.get("msg", "invalid request")
        return error_response(422, msg, param=where or None, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(LLMLabError)
    async def _llmlab(request: Request, exc: LLMLabError):
        return error_response(400, str(exc))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error")

    app.add_middleware(_Guard, limit=cfg.max_body_bytes, key=key)

    # ---- service ----------------------------------------------------------------------------------------

    @app.get("/health")
    def health() -> dict:
        s = service.scheduler
        return {"status": "ok", "model": service.name, "active": s.active, "waiting": s.waiting,
                "in_tools": s.parked, "steps": s.steps, "mean_batch": round(s.batch_sizes_total / s.steps, 2) if s.steps else 0.0}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [_model_card(service)]}

    @app.get("/v1/models/{model_id:path}")
    def model(model_id: str) -> dict:
        service.check_model(model_id)
        return _model_card(service)

    # ---- chat completions -------------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(body: schemas.ChatCompletionRequest, request: Request):
        service.check_model(body.model)
        messages = [m.to_llmlab() for m in body.messages]
        prompt = service.chat_prompt(messages)
        max_new = service.budget(body.budget(), len(prompt))
        service.check_room(body.n)
        gen = Generation(service.scheduler, prompt, service.params(body, max_new, body.n),
                         stop_ids=service.chat_stops, run_tool=service.run_tool if cfg.tools else None,
                         min_new_tokens=body.min_tokens)
        texts = [ChoiceText(service.tokenizer, body.stops(), lstrip=True, stop_ids=frozenset(service.chat_stops))
                 for _ in range(body.n)]
        rid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_chat_stream(service, gen, texts, rid, created, len(prompt), include_usage),
                                     media_type="text/event-stream")
        await _collect(gen, texts, request)
        choices = [{"index": i, "message": _chat_message(t), "logprobs": None, "finish_reason": t.finish}
                   for i, t in enumerate(texts)]
        return {"id": rid, "object": "chat.completion", "created": created, "model": service.name,
                "choices": choices, "usage": _usage(len(prompt), texts)}

    # ---- completions ------------------------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(body: schemas.CompletionRequest, request: Request):
        service.check_model(body.model)
        prompts = body.prompts()
        if not prompts:
            raise APIError(400, "prompt is empty", param="prompt")
        if body.stream and (len(prompts) > 1 or body.echo):
            raise APIError(400, "streaming takes one prompt and no echo", param="stream")
        if sum(len(p) for p in prompts if isinstance(p, str)) > cfg.max_chars:
            raise APIError(413, f"the prompt is over this server's limit of {cfg.max_chars} characters",
                           param="prompt", code="too_many_characters")
        service.check_room(body.n * len(prompts))
        tok = service.tokenizer
        encoded = []
        for p in prompts:
            ids = [tok.bos_id] + tok.encode(p) if isinstance(p, str) else list(p)
            if not ids:
                raise APIError(400, "a prompt has no tokens", param="prompt")
            if any(not 0 <= t < tok.vocab_size for t in ids):
                raise APIError(400, f"prompt token ids must be in [0, {tok.vocab_size})", param="prompt")
            if len(ids) > service.context_len or (body.max_tokens > 0 and len(ids) >= service.context_len):
                raise APIError(400, f"the prompt has {len(ids)} tokens; the model's context is "
                                    f"{service.context_len}: shorten it", param="prompt", code="context_length_exceeded")
            encoded.append(ids)
        rid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        if body.stream:
            max_new = service.budget(body.max_tokens, len(encoded[0]), default=body.max_tokens)
            gen = Generation(service.scheduler, encoded[0], service.params(body, max_new, body.n),
                             stop_ids=service.completion_stops, logprobs=body.logprobs is not None,
                             min_new_tokens=body.min_tokens)
            texts = [ChoiceText(tok, body.stops(), top_logprobs=body.logprobs, tool_spans=False,
                                stop_ids=frozenset(service.completion_stops)) for _ in range(body.n)]
            return StreamingResponse(_completion_stream(service, gen, texts, rid, created),
                                     media_type="text/event-stream")
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for ids, original in zip(encoded, prompts):
            prompt_tokens += len(ids)
            scored = None
            if body.echo and body.logprobs is not None:
                top = body.logprobs
                scored = await _wrap(service.scheduler.call(lambda m, ids=ids: prompt_logprobs(m, ids, top, tok)))
            texts = [ChoiceText(tok, body.stops(), top_logprobs=body.logprobs, tool_spans=False,
                                stop_ids=frozenset(service.completion_stops)) for _ in range(body.n)]
            if body.max_tokens > 0:
                max_new = service.budget(body.max_tokens, len(ids), default=body.max_tokens)
                gen = Generation(service.scheduler, ids, service.params(body, max_new, body.n),
                                 stop_ids=service.completion_stops, logprobs=body.logprobs is not None,
                                 min_new_tokens=body.min_tokens)
                await _collect(gen, texts, request)
            else:
                for t in texts:
                    t.finish = "length"
            for t in texts:
                completion_tokens += len(t.tokens)
                echo_text = (original if isinstance(original, str) else tok.decode(ids)) if body.echo else ""
                choices.append({"index": len(choices), "text": echo_text + t.content, "finish_reason": t.finish,
                                "logprobs": _legacy_logprobs(tok, ids, scored, t, body.echo)
                                if body.logprobs is not None else None})
        return {"id": rid, "object": "text_completion", "created": created, "model": service.name,
                "choices": choices, "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                              "total_tokens": prompt_tokens + completion_tokens}}

    # ---- the web UI and its feedback API ------------------------------------------------------------

    from llmlab.server import ui_api

    ui_api.add_routes(app, service)
    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def index():
        page = STATIC / "index.html"
        if not page.is_file():
            raise APIError(404, "the web UI is not installed (llmlab/server/static/index.html is missing)")
        return FileResponse(page)

    return app


# ---- helpers ---------------------------------------------------------------------------------------------


def _model_card(service: Service) -> dict:
    return {"id": service.name, "object": "model", "created": service.created, "owned_by": "llmlab",
            "context_length": service.context_len}


async def _wrap(future):
    import asyncio

    return await asyncio.wrap_future(future)


def _failure(texts: list[ChoiceText]) -> str | None:
    """The error that ended a choice, if one did (the scheduler reports "error: ..." as its finish)."""
    return next((t.finish[len("error: "):] for t in texts if t.finish and t.finish.startswith("error: ")), None)


async def _collect(gen: Generation, texts: list[ChoiceText], request: Request) -> None:
    """Run a non-streaming generation to the end; stop early when the client has gone. A choice that failed
    fails the request (500): the other requests in the batch go on."""
    count = 0
    async for _ in gen.updates(texts):
        count += 1
        if count % 16 == 0 and await request.is_disconnected():
            gen.cancel()
            return
    if (failure := _failure(texts)) is not None:
        raise APIError(500, f"generation failed: {failure}", type_="server_error")


def _executed(calls: list[dict], start: int = 0) -> list[dict]:
    out = []
    for i, c in enumerate(calls, start=start):
        name, _, args = c["call"].partition(" ")
        out.append({"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": args},
                    "output": c["result"]})
    return out


def _chat_message(text: ChoiceText) -> dict:
    message = {"role": "assistant", "content": text.content}
    if text.tool_calls:
        message["executed_tool_calls"] = _executed(text.tool_calls)
    return message


def _usage(prompt_len: int, texts: list[ChoiceText]) -> dict:
    completion = sum(len(t.tokens) for t in texts)
    return {"prompt_tokens": prompt_len, "completion_tokens": completion, "total_tokens": prompt_len + completion}


def _error_chunk(reason: str) -> str:
    return _sse({"error": {"message": f"generation failed: {reason[len('error: '):]}", "type": "server_error",
                           "param": None, "code": None}})


async def _chat_stream(service: Service, gen: Generation, texts: list[ChoiceText], rid: str, created: int,
                       prompt_len: int, include_usage: bool) -> AsyncIterator[str]:
    def chunk(i: int, delta: dict, finish: str | None = None) -> str:
        return _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": service.name,
                     "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}]})

    yield "".join(chunk(i, {"role": "assistant", "content": ""}) for i in range(len(texts)))
    tools_seen = [0] * len(texts)
    async for update in gen.updates(texts):
        out = []
        for i, kind, value in update:
            if kind == "text":
                out.append(chunk(i, {"content": value}))
            elif kind == "tool":
                out.append(chunk(i, {"executed_tool_calls": _executed([value], start=tools_seen[i])}))
                tools_seen[i] += 1
            elif value.startswith("error: "):
                yield "".join(out) + _error_chunk(value)
                return
            else:
                out.append(chunk(i, {}, value))
        if out:
            if out:
                yield "".join(out)
    if include_usage:
        yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": service.name,
                    "choices": [], "usage": _usage(prompt_len, texts)})
    yield "data: [DONE]\n\n"


async def _completion_stream(service: Service, gen: Generation, texts: list[ChoiceText], rid: str,
                             created: int) -> AsyncIterator[str]:
    def chunk(i: int, text: str, finish: str | None = None) -> str:
        return _sse({"id": rid, "object": "text_completion", "created": created, "model": service.name,
                     "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": finish}]})

    async for update in gen.updates(texts):
        out = []
        for i, kind, value in update:
            if kind == "text":
                out.append(chunk(i, value))
            elif kind == "finish":
                if value.startswith("error: "):
                    yield "".join(out) + _error_chunk(value)
                    return
                out.append(chunk(i, "", value))
        if out:
            if out:
                yield "".join(out)
    yield "data: [DONE]\n\n"


def _legacy_logprobs(tok: Tokenizer, ids: list[int], scored, text: ChoiceText, echo: bool) -> dict:
    """OpenAI's completions `logprobs` object: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, token_lps, tops = [], [], []
    if echo:
        for pos, t in enumerate(ids):
            tokens.append(tok.token_text(t))
            s = scored[pos] if scored is not None else None
            token_lps.append(None if s is None else s.logprob)
            tops.append(None if s is None else s.top)
    for lp in text.logprobs[: len(text.tokens)]:
        tokens.append(lp.token)
        token_lps.append(lp.logprob)
        tops.append(lp.top)
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}
