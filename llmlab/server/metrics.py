"""Monitoring: GET /metrics in Prometheus' text format, behind the API key like /v1.

    llmlab_requests_total{method,route,status}          HTTP responses (errors: status 4xx and 5xx)
    llmlab_request_duration_seconds{route}              request latency, to the last byte (a stream: its end)
    llmlab_time_to_first_token_seconds{route}           from a generation's start to its first token (queueing included)
    llmlab_generation_errors_total{route}               generations that ended in an error (a 500, or an error event
                                                        in a stream whose status was already 200)
    llmlab_generated_tokens_total                       tokens sampled (a tool's output forced in is not counted)
    llmlab_prompt_tokens_total                          prompt tokens prefilled
    llmlab_decode_steps_total, llmlab_decode_rows_total rows / steps = the mean batch
    llmlab_queue_depth                                  requests waiting for a row
    llmlab_requests_in_tools                            requests out of the batch while their tool call runs
    llmlab_batch_rows, llmlab_batch_capacity            rows in use, rows in all (`--max_batch`)
    llmlab_batch_occupancy                              rows in use / capacity, now
    llmlab_scheduler_up                                 1 while the scheduler's loop runs (0: /health is 503)
    llmlab_tool_calls_total{tool}, llmlab_tool_failures_total{tool}
    llmlab_ratings_total{rating}, llmlab_flags_total, llmlab_comparison_choices_total   feedback recorded

Each app has its own registry (`Metrics.registry`, not prometheus_client's global one), so that a process (a
test) can make many apps. The scheduler's figures are read when /metrics is scraped, from the counters the
scheduler keeps anyway; nothing is added to its loop. The `route` label is the route's template
(`/api/conversations/{cid}`), or "unmatched" for a path no route serves, so a client cannot grow the label set.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.routing import Match

if TYPE_CHECKING:
    from llmlab.scheduler import Scheduler

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
"""seconds: from a 404 (milliseconds) to a long answer streamed on a CPU (minutes)"""


class Metrics:
    """The app's metrics: what routes and the middleware count, and the scheduler's figures at scrape time."""

    def __init__(self, scheduler: Callable[[], Scheduler]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("llmlab_requests", "HTTP responses by route and status", ["method", "route", "status"],
                                registry=r)
        self.latency = Histogram("llmlab_request_duration_seconds", "request latency to the response's last byte",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.first_token = Histogram("llmlab_time_to_first_token_seconds", "from a generation's start (queueing "
                                     "included) to its first token", ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.generation_errors = Counter("llmlab_generation_errors", "generations that ended in an error", ["route"],
                                         registry=r)
        self.tool_calls = Counter("llmlab_tool_calls", "tool calls run", ["tool"], registry=r)
        self.tool_failures = Counter("llmlab_tool_failures", "tool calls that failed (an error answer, or raised)",
                                     ["tool"], registry=r)
        self.ratings = Counter("llmlab_ratings", "ratings recorded (-1, 0 to clear, +1)", ["rating"], registry=r)
        self.flags = Counter("llmlab_flags", "flags recorded", registry=r)
        self.comparison_choices = Counter("llmlab_comparison_choices", "comparisons decided", registry=r)
        r.register(_SchedulerCollector(scheduler))

    def observer(self, route: str) -> GenerationObserver:
        return GenerationObserver(self, route)

    def add_route(self, app: FastAPI) -> None:
        @app.get("/metrics", include_in_schema=False)
        def metrics() -> Response:
            return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class GenerationObserver:
    """What a `Generation` reports for its route: its first token's time and whether it failed."""

    def __init__(self, metrics: Metrics, route: str):
        self.metrics, self.route = metrics, route

    def first_token(self, seconds: float) -> None:
        self.metrics.first_token.labels(self.route).observe(seconds)

    def failed(self) -> None:
        self.metrics.generation_errors.labels(self.route).inc()


class _SchedulerCollector:
    """The scheduler's counters and gauges, read at scrape time (`scheduler()`: the one serving now)."""

    def __init__(self, scheduler: Callable[[], Scheduler]):
        self.scheduler = scheduler

    def collect(self):
        s = self.scheduler()
        yield CounterMetricFamily("llmlab_generated_tokens", "tokens sampled", value=s.tokens_generated)
        yield CounterMetricFamily("llmlab_prompt_tokens", "prompt tokens prefilled", value=s.prompt_tokens)
        yield CounterMetricFamily("llmlab_decode_steps", "decode steps run", value=s.steps)
        yield CounterMetricFamily("llmlab_decode_rows", "rows decoded, summed over steps (/ steps: the mean batch)",
                                  value=s.batch_sizes_total)
        yield GaugeMetricFamily("llmlab_queue_depth", "requests waiting for a row", value=s.waiting)
        yield GaugeMetricFamily("llmlab_requests_in_tools", "requests out of the batch while their tool call runs",
                                value=s.parked)
        active = s.active
        yield GaugeMetricFamily("llmlab_batch_rows", "rows in use", value=active)
        yield GaugeMetricFamily("llmlab_batch_capacity", "rows in all", value=s.max_batch)
        yield GaugeMetricFamily("llmlab_batch_occupancy", "rows in use / capacity", value=active / s.max_batch)
        yield GaugeMetricFamily("llmlab_scheduler_up", "1 while the scheduler's loop runs", value=int(s.alive))


class Monitor:
    """ASGI middleware, outermost: counts every response by route and status and times it to its last byte
    (401 and 413 from the guard included; an exception that escapes every handler counts as a 500)."""

    def __init__(self, app, metrics: Metrics, router):
        self.app, self.metrics, self.router = app, metrics, router

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def send_counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            route = self._route(scope)
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)

    def _route(self, scope) -> str:
        route = scope.get("route")
        if route is None:  # answered before routing (the guard's 401 and 413): find the route it was for
            route = next((r for r in self.router.routes if r.matches(scope)[0] is not Match.NONE), None)
        return getattr(route, "path", None) or "unmatched"
