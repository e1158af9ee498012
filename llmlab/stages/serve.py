"""`llmlab serve`: an OpenAI-compatible API and a web chat UI for a checkpoint, with a feedback store.

    llmlab serve --checkpoint runs/cpu/sft          # http://127.0.0.1:8000 (the UI), /v1 (the API), /docs
    OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_API_KEY=none python my_openai_client.py

Concurrent requests share decode steps (continuous batching, llmlab.scheduler). What users rate, flag and
compare in the UI is kept in `--db` (SQLite); `llmlab feedback export` turns it into training data.
Binding to anything but loopback requires `--api_key`. The endpoints are described in llmlab.server.app.
"""

from __future__ import annotations

from llmlab.server.app import ServerConfig as Config

__all__ = ["Config", "main"]


def main(cfg: Config) -> dict:
    import uvicorn

    from llmlab.server.app import create_app

    app = create_app(cfg)
    service = app.state.service
    print(f"llmlab serve: {service.name} ({cfg.checkpoint}) on http://{cfg.host}:{cfg.port}  "
          f"(web UI at /, API at /v1, OpenAPI at /docs; feedback in {cfg.db})")
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")
    return {"model": service.name}
