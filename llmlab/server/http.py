"""HTTP plumbing shared by the routes of `llmlab serve`: OpenAI-shaped errors, server-sent events, and the guard
in front of every route (the API key, the body limit and the security headers).

Every error is JSON of OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: a 4xx status for what
the client sent (a route raises `APIError`; FastAPI's validation errors and llmlab's `LLMLabError` are mapped
here), a 503 while the scheduler is down (`SchedulerDown`), a 500 only for a fault of the server.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmlab.errors import LLMLabError
from llmlab.scheduler import SchedulerDown

CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                           "form-action 'self'; frame-ancestors 'none'")
"""the web UI's page and every other response: scripts and styles from this server only, no inline script, no
framing (a route may send its own, as /docs does)"""
SECURITY_HEADERS = [(b"content-security-policy", CONTENT_SECURITY_POLICY.encode()), (b"x-frame-options", b"DENY"),
                    (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]


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


def sse(obj: Any) -> str:
    """One server-sent event carrying `obj` as JSON."""
    return f"data: {json.dumps(obj)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
"""the last event of every stream, as in OpenAI's API"""


def add_error_handlers(app: FastAPI) -> None:
    """Answer every error OpenAI-shaped: 4xx for what the client sent, 500 for the rest."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        first = _main_error(exc.errors())
        where = ".".join(str(p) for p in first.get("loc", ()) if isinstance(p, int) or p.isidentifier() and
                         p not in ("body", "str", "int"))  # not the names pydantic gives a union's members
        if first.get("type") == "json_invalid":
            return error_response(400, f"the body is not valid JSON: {first.get('msg', '')}", code="invalid_json")
        what = first.get("msg", "invalid value").removeprefix("Value error, ")
        return error_response(422, f"{where}: {what}" if where else what, param=where or None, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(LLMLabError)
    async def _llmlab(request: Request, exc: LLMLabError):
        return error_response(400, str(exc))

    @app.exception_handler(SchedulerDown)
    async def _down(request: Request, exc: SchedulerDown):
        return error_response(503, f"the server cannot generate now: {exc}; retry shortly", type_="server_error",
                              code="unavailable")

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error")


def _main_error(errors: list[dict]) -> dict:
    """The validation error to report: a message of our own validators (a `value_error`) before pydantic's type
    errors, else the error that got deepest (in a union, the member the value was meant to be)."""
    return max(errors, key=lambda e: (e.get("type") == "value_error", len(e.get("loc", ()))), default={})


class Guard:
    """ASGI middleware in front of every route: the API key, 413 for a body over `limit` bytes, and the security
    headers (`SECURITY_HEADERS`) on every response that does not set its own. Plain ASGI rather than an
    `@app.middleware` function, which would wrap every streamed chunk of every response in extra tasks and queues.

    A body with a Content-Length is judged by it. A chunked body (no Content-Length) is read here, up to the
    limit, before the route sees it: a limit enforced while the route reads would surface as FastAPI's 400 for
    a body it could not read."""

    PUBLIC = ("/", "/health", "/favicon.ico")

    def __init__(self, app, limit: int, key: str):
        self.app, self.limit, self.key = app, limit, key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_secured(message):
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(name, value) for name, value in SECURITY_HEADERS if name not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        headers = dict(scope.get("headers") or [])
        path = scope.get("path", "")
        if self.key and path not in self.PUBLIC and not path.startswith("/static/"):
            given = headers.get(b"authorization", b"")
            if not secrets.compare_digest(given, f"Bearer {self.key}".encode()):
                denied = error_response(401, "missing or wrong API key: send `Authorization: Bearer KEY`",
                                        type_="authentication_error", code="invalid_api_key")
                return await denied(scope, receive, send_secured)
        too_big = error_response(413, f"request body over {self.limit} bytes", code="body_too_large")
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.limit:
                return await too_big(scope, receive, send_secured)
            return await self.app(scope, receive, send_secured)
        chunks, size = [], 0
        while True:  # a chunked body (or none): read it whole, up to the limit
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await too_big(scope, receive, send_secured)
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay():
            nonlocal body
            if body is None:
                return await receive()  # after the body: what comes next (a disconnect)
            message, body = body, None
            return message

        return await self.app(scope, replay, send_secured)
