"""`llmlab serve`: an OpenAI-compatible API and a web chat UI for a checkpoint, with a feedback store.

    llmlab serve --checkpoint runs/cpu/sft          # http://127.0.0.1:8000 (the UI), /v1 (the API), /docs
    OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_API_KEY=none python my_openai_client.py

Concurrent requests share decode steps (continuous batching, llmlab.scheduler). What users rate, flag and
compare in the UI is kept in `--db` (SQLite); `llmlab feedback export` turns it into training data.
Binding to anything but loopback requires `--api_key`. The endpoints are described in llmlab.server.app.

Shutdown is bounded: after SIGTERM (or Ctrl-C) requests in flight get `--shutdown_timeout` seconds to finish,
then they are cut, the scheduler gets 5 seconds to end its step, and the process exits (tool calls still
running do not hold it: llmlab.scheduler). If the scheduler's loop dies, the server stops and the process exits
non-zero, with the loop's error, for a supervisor (systemd's Restart=on-failure, Kubernetes) to restart it.
"""

from __future__ import annotations

import uvicorn

from llmlab.server.app import create_app
from llmlab.server.service import ServerConfig as Config

__all__ = ["Config", "main"]


def main(cfg: Config) -> dict:
    app = create_app(cfg)
    service = app.state.service
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="info",
                                           timeout_graceful_shutdown=cfg.shutdown_timeout))
    # a dead scheduler loop: stop serving, then exit non-zero (below) so that a supervisor starts a fresh process
    service.scheduler.on_death = lambda failure: setattr(server, "should_exit", True)
    print(f"llmlab serve: {service.name} ({cfg.checkpoint}) on http://{cfg.host}:{cfg.port}  "
          f"(web UI at /, API at /v1, OpenAPI at /docs, metrics at /metrics; feedback in {cfg.db})")
    server.run()  # until SIGTERM, Ctrl-C or the scheduler's death; the app's lifespan closes the service
    if service.scheduler.failure is not None:
        raise RuntimeError("llmlab serve: the scheduler's loop died (its error is above); exiting non-zero so "
                           "that a supervisor restarts the server") from service.scheduler.failure
    return {"model": service.name}
