"""The FastAPI app of `llmlab serve`: an OpenAI-compatible API, the web chat UI and its feedback store.

    GET  /health                    liveness and load (active rows, waiting requests, tool calls running, mean
                                    batch); 503 once the scheduler's loop has died
    GET  /metrics                   Prometheus metrics (llmlab.server.metrics), behind the API key
    /v1/...                         the OpenAI-compatible API (llmlab.server.openai_api)
    GET  /, /api/...                the web chat UI and its conversations, replies, ratings, flags and comparisons
                                    (llmlab.server.ui_api)
    GET  /docs                      the OpenAPI schema as a page (Swagger UI), served from this server

Every request goes through one `Scheduler` (continuous batching), so concurrent requests share decode steps.

Safety: bound to anything but loopback the server requires an API key (`Authorization: Bearer KEY`); bodies,
messages, characters, max_tokens and n are limited (`ServerConfig`); every error is OpenAI-shaped JSON
(`{"error": {"message", "type", "param", "code"}}`) with a 4xx status (llmlab.server.http); a request that
fails is answered with an error and nothing else is affected; a client that disconnects cancels its rows.
Every response carries a Content-Security-Policy and the other security headers (llmlab.server.http.Guard).

Faults: a request whose generation fails gets a 500 (or an error event in its stream) and the others go on.
If the scheduler's loop dies (llmlab.scheduler: a fault that outlived the requests it failed), /health says so
with a 503, every request gets a 503 at once, and `llmlab serve` exits non-zero so that a supervisor starts a
fresh process (llmlab.stages.serve).
"""

from __future__ import annotations

import base64
import hashlib
import re
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from llmlab.server import openai_api, ui_api
from llmlab.server.http import Guard, add_error_handlers
from llmlab.server.metrics import Monitor
from llmlab.server.service import ServerConfig, Service

__all__ = ["ServerConfig", "create_app"]


def create_app(cfg: ServerConfig) -> FastAPI:
    """The app for one checkpoint. The model, scheduler and store live as long as the app's lifespan."""
    service = Service(cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.close()

    app = FastAPI(title="llmlab", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="An OpenAI-compatible API and a web chat UI for an llmlab checkpoint.")
    app.state.service = service
    add_error_handlers(app)
    app.add_middleware(Guard, limit=cfg.max_body_bytes, key=cfg.resolved_key())
    app.add_middleware(Monitor, metrics=service.metrics, router=app.router)  # outermost: sees the guard's answers

    @app.get("/health")
    def health():
        s = service.scheduler
        load = {"model": service.name, "active": s.active, "waiting": s.waiting, "in_tools": s.parked,
                "steps": s.steps, "mean_batch": round(s.batch_sizes_total / s.steps, 2) if s.steps else 0.0}
        if not s.alive:
            reason = repr(s.failure) if s.failure is not None else "shut down"
            return JSONResponse({"status": "error", "error": f"the scheduler is down: {reason}", **load},
                                status_code=503)
        return {"status": "ok", **load}

    service.metrics.add_route(app)
    add_docs(app)
    openai_api.add_routes(app, service)
    ui_api.add_routes(app, service)
    return app


def add_docs(app: FastAPI) -> None:
    """/docs (Swagger UI) from the copy of its scripts that the `fastapi-offline` package ships, not from a CDN:
    the page works on a machine without the internet, under a Content-Security-Policy that allows only this
    server, the page's own inline script (by its hash) and the inline styles it draws with. Links are relative,
    so the page works under a proxy's path prefix too. (No /redoc: ReDoc's bundle always loads its logo from
    its CDN.)"""
    app.mount("/docs-assets", StaticFiles(directory=str(resources.files("fastapi_offline") / "static")),
              name="docs-assets")
    swagger = get_swagger_ui_html(openapi_url=app.openapi_url.lstrip("/"), title="llmlab - Swagger UI",
                                  swagger_js_url="docs-assets/swagger-ui-bundle.js",
                                  swagger_css_url="docs-assets/swagger-ui.css",
                                  swagger_favicon_url="docs-assets/favicon.png").body
    app.add_api_route("/docs", _docs_page(swagger), include_in_schema=False)


def _docs_page(body: bytes):
    headers = {"Content-Security-Policy": _page_policy(body)}

    def page() -> HTMLResponse:
        return HTMLResponse(body, headers=headers)

    return page


def _page_policy(page: bytes) -> str:
    """The CSP of a docs page: scripts from this server and the page's inline scripts, by their hashes."""
    hashes = [base64.b64encode(hashlib.sha256(script).digest()).decode()
              for script in re.findall(rb"<script>(.*?)</script>", page, flags=re.DOTALL)]
    scripts = " ".join(["'self'", *(f"'sha256-{h}'" for h in hashes)])
    return (f"default-src 'self'; script-src {scripts}; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
            f"worker-src 'self' blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
