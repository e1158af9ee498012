"""`llmlab serve` under faults and hostile input (issue 18): a scheduler that fails for one request or for
all, a loop that dies, SIGTERM with requests in flight, lone surrogates, ids SQLite cannot hold, chunked
bodies over the limit, bad flags; the security headers; and /metrics after a known series of requests."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmlab.scheduler import Scheduler
from serving import (FaultyModel, LiveServer, ServerProcess, make_app, make_checkpoint, make_tokenizer,
                     script_the_model)

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
BIG = 2**63  # the first integer SQLite cannot hold


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    make_tokenizer(root / "tok")
    return root, make_checkpoint(root / "tok", root / "ckpt", context_len=96)


@pytest.fixture(scope="module")
def server(files):
    """A live server whose model is the calculator script, with one stored conversation, its answer and a
    comparison, so that the ids of the bad-input suite below name real things where they should."""
    root, ckpt = files
    app = make_app(ckpt, root / "main.db")
    service = app.state.service
    script_the_model(service)
    live = LiveServer(app)
    yield service, live
    live.stop()


def _post(live, path, body: bytes | dict, **kw) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(live.url + path, content=body, headers={"Content-Type": "application/json"}, timeout=30, **kw)
    return httpx.post(live.url + path, json=body, timeout=30, **kw)


def _error(r: httpx.Response, *statuses: int) -> dict:
    assert r.status_code in statuses, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] and "Traceback" not in error["message"]
    return error


# ---- lone surrogates: JSON may carry them, UTF-8 cannot ---------------------------------------------------------

SURROGATE = b"x\\ud800x"  # the raw JSON escape, as a client would send it
SURROGATE_BODIES = [
    ("chat content", CHAT, b'{"model": "test-model", "messages": [{"role": "user", "content": "%s"}]}'),
    ("chat text part", CHAT, b'{"model": "test-model", "messages": [{"role": "user", "content": '
                             b'[{"type": "text", "text": "%s"}]}]}'),
    ("chat stop", CHAT, b'{"model": "test-model", "messages": [{"role": "user", "content": "Hi"}], "stop": "%s"}'),
    ("chat model", CHAT, b'{"model": "%s", "messages": [{"role": "user", "content": "Hi"}]}'),
    ("completion prompt", COMPLETIONS, b'{"model": "test-model", "prompt": "%s"}'),
    ("completion prompt list", COMPLETIONS, b'{"model": "test-model", "prompt": ["ok", "%s"]}'),
    ("conversation title", "/api/conversations", b'{"title": "%s"}'),
    ("conversation system prompt", "/api/conversations", b'{"system": "%s"}'),
]


@pytest.mark.parametrize("name,path,template", SURROGATE_BODIES, ids=[b[0] for b in SURROGATE_BODIES])
def test_lone_surrogates_are_a_422_that_names_them(server, name, path, template):
    _, live = server
    error = _error(_post(live, path, template % SURROGATE), 422)
    assert "surrogate" in error["message"] and "U+D800" in error["message"]
    assert httpx.get(live.url + "/health").json()["status"] == "ok"


def test_lone_surrogates_in_the_ui_reply_and_flag_store_nothing(server):
    _, live = server
    http = httpx.Client(base_url=live.url, timeout=30)
    cid = http.post("/api/conversations", json={}).json()["id"]
    _error(_post(live, f"/api/conversations/{cid}/reply", b'{"content": "%s"}' % SURROGATE), 422)
    assert http.get(f"/api/conversations/{cid}").json()["messages"] == []
    answer = _reply(live, cid, "Hi")
    _error(_post(live, f"/api/messages/{answer['id']}/flag", b'{"reason": "%s"}' % SURROGATE), 422)
    assert http.get(f"/api/conversations/{cid}").json()["messages"][-1]["flags"] == []


def _reply(live, cid: int, content: str, **body) -> dict:
    """The stored answer of a web UI reply (the first, with compare: the done event's messages)."""
    r = httpx.post(f"{live.url}/api/conversations/{cid}/reply", json={"content": content, "temperature": 0, **body},
                   timeout=60)
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert events[-1]["type"] == "done", events
    return events[-1] if body.get("compare") else events[-1]["messages"][0]


# ---- ids: SQLite holds integers below 2**63 ---------------------------------------------------------------------

BAD_IDS = [str(BIG), str(2**64), "-1", "0", "abc", "1.5", "1e3"]
ID_ROUTES = [("GET", "/api/conversations/{}", None), ("DELETE", "/api/conversations/{}", None),
             ("POST", "/api/conversations/{}/reply", {"content": "Hi"}),
             ("POST", "/api/messages/{}/rating", {"rating": 1}),
             ("POST", "/api/messages/{}/flag", {"reason": "wrong"}),
             ("POST", "/api/comparisons/{}/choose", {"message_id": 1})]


@pytest.mark.parametrize("method,route,body", ID_ROUTES, ids=[f"{m} {r}" for m, r, _ in ID_ROUTES])
def test_ids_out_of_range_or_not_numbers_are_404_or_422(server, method, route, body):
    _, live = server
    for bad in BAD_IDS:
        r = httpx.request(method, live.url + route.format(bad), json=body, timeout=30)
        _error(r, 404, 422)


def test_ids_in_bodies_out_of_range_are_422(server):
    _, live = server
    cid = httpx.post(live.url + "/api/conversations", json={}).json()["id"]
    comparison = _reply(live, cid, "Hi", compare=True)["comparison_id"]
    for bad in (BIG, 2**64, -1):
        _error(_post(live, f"/api/comparisons/{comparison}/choose", {"message_id": bad}), 422)
        _error(_post(live, f"/api/conversations/{cid}/reply", {"content": "Hi", "edit_message_id": bad}), 422)


# ---- seeds at the door: every surface ---------------------------------------------------------------------------


@pytest.mark.parametrize("path,body", [
    (CHAT, {"messages": [{"role": "user", "content": "Hi"}], "seed": 2**64}),
    (CHAT, {"messages": [{"role": "user", "content": "Hi"}], "seed": -1}),
    (CHAT, {"messages": [{"role": "user", "content": "Hi"}], "seed": BIG - 2, "n": 3}),
    (COMPLETIONS, {"prompt": "Hi", "seed": 2**64}),
    (COMPLETIONS, {"prompt": "Hi", "seed": BIG - 1, "n": 2}),
    (COMPLETIONS, {"prompt": ["a", "b"], "seed": BIG - 1, "n": 2}),
], ids=["chat 2**64", "chat -1", "chat n=3 past 2**63", "completion 2**64", "completion n=2 past 2**63",
        "completions of two prompts n=2"])
def test_seeds_out_of_range_are_a_422_on_every_route(server, path, body):
    _, live = server
    error = _error(_post(live, path, {"model": "test-model", "max_tokens": 2, **body}), 422)
    assert error["param"] == "seed"


# ---- bodies and flags ---------------------------------------------------------------------------------------------


def test_a_chunked_body_over_the_limit_is_a_413_and_one_within_it_is_served(files):
    root, ckpt = files
    live = LiveServer(make_app(ckpt, root / "chunked.db", max_body_bytes=2_000))
    try:
        def chunks(body: bytes):  # a generator: httpx sends it chunked, with no Content-Length
            for i in range(0, len(body), 500):
                yield body[i:i + 500]

        big = json.dumps({"model": "test-model", "prompt": "x" * 5_000}).encode()
        r = httpx.post(live.url + COMPLETIONS, content=chunks(big), headers={"Content-Type": "application/json"})
        assert _error(r, 413)["code"] == "body_too_large"
        # seeded: unseeded, the random-weight model sometimes samples a stop token first (0 completion tokens)
        small = json.dumps({"model": "test-model", "prompt": "Hello", "max_tokens": 2, "seed": 0}).encode()
        r = httpx.post(live.url + COMPLETIONS, content=chunks(small), headers={"Content-Type": "application/json"})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    finally:
        live.stop()


def test_bad_flags_are_one_line_and_exit_2(files, tmp_path):
    _, ckpt = files
    r = subprocess.run([sys.executable, "-m", "llmlab", "serve", "--port", "99999"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "error: --port must be in 1..65535 (got 99999)", r.stderr
    # `llmlab chat --prompt $'\xff'`: Python gets the byte as a lone surrogate (surrogateescape)
    r = subprocess.run([sys.executable.encode(), b"-m", b"llmlab", b"chat", b"--checkpoint", str(ckpt).encode(),
                        b"--prompt", b"caf\xe9?"], capture_output=True, timeout=120)
    lines = r.stderr.decode().strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr.decode()
    assert lines[0].startswith("error: the message is not valid UTF-8 (byte 0xe9 at character 3)")


# ---- security headers ---------------------------------------------------------------------------------------------


def test_every_response_carries_the_security_headers(files):
    root, ckpt = files
    live = LiveServer(make_app(ckpt, root / "headers.db", api_key="s3cret"))
    key = {"Authorization": "Bearer s3cret"}
    try:
        for method, path, headers in [("GET", "/", {}), ("GET", "/static/app.js", {}), ("GET", "/health", {}),
                                      ("GET", "/v1/models", key), ("GET", "/v1/models", {}),  # 401
                                      ("GET", "/nowhere", key), ("GET", "/api/conversations", key),
                                      ("POST", CHAT, key), ("GET", "/docs", key), ("GET", "/metrics", key)]:
            r = httpx.request(method, live.url + path, headers=headers, json={} if method == "POST" else None)
            assert r.headers["x-frame-options"] == "DENY", path
            assert r.headers["x-content-type-options"] == "nosniff" and r.headers["referrer-policy"] == "no-referrer"
            policy = r.headers["content-security-policy"]
            assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
            if path != "/docs":
                assert "unsafe" not in policy and "script-src" not in policy, path
        # /docs: its one inline script allowed by its hash; Swagger UI from this server, not a CDN
        docs = httpx.get(live.url + "/docs", headers=key)
        assert "'sha256-" in docs.headers["content-security-policy"] and "cdn" not in docs.text
        assert "docs-assets/swagger-ui-bundle.js" in docs.text
        asset = httpx.get(live.url + "/docs-assets/swagger-ui-bundle.js", headers=key)
        assert asset.status_code == 200 and "SwaggerUIBundle" in asset.text[:2000]
    finally:
        live.stop()


# ---- faults in the scheduler, through the server ----------------------------------------------------------------


def test_a_request_whose_sampling_fails_gets_an_error_and_the_others_are_served(server, monkeypatch):
    """The seed of issue 18 again, past the door's check: the request fails, OpenAI-shaped (a 500, or an error
    event in its stream), and the server goes on serving."""
    import llmlab.scheduler as scheduler_module

    service, live = server
    real = scheduler_module._generator

    def generator(params, device):
        if params.seed == 666:
            raise RuntimeError("Overflow when unpacking long")  # what torch.manual_seed(2**64) said
        return real(params, device)

    monkeypatch.setattr(scheduler_module, "_generator", generator)
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0, timeout=30)
    ask = dict(model="test-model", messages=[{"role": "user", "content": "What is 6 * 7?"}], temperature=1.0)
    with pytest.raises(openai.InternalServerError, match="Overflow"):
        client.chat.completions.create(seed=666, **ask)
    r = _post(live, CHAT, {**ask, "seed": 666, "stream": True})
    assert r.status_code == 200
    last = json.loads([line for line in r.text.splitlines() if line.startswith("data: {")][-1][6:])
    assert "Overflow" in last["error"]["message"] and last["error"]["type"] == "server_error"
    assert client.chat.completions.create(seed=7, **ask).choices[0].message.content == "It is 42."
    assert httpx.get(live.url + "/health").json()["status"] == "ok" and service.scheduler.alive


def test_a_dead_scheduler_answers_503_at_once_and_health_says_so(files):
    root, ckpt = files
    app = make_app(ckpt, root / "dead.db")
    service = app.state.service
    service.scheduler.shutdown()
    service.scheduler = Scheduler(FaultyModel(service.model, lambda ids, cache: ids.size(1) == 1),  # decode raises
                                  service.tokenizer, max_failures=1)
    live = LiveServer(app)
    try:
        # seeded: an unseeded first token may end the reply, and then no decode step runs to raise
        body = {"model": "test-model", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "seed": 0}
        assert "injected fault" in _error(_post(live, CHAT, body), 500)["message"]  # it killed the loop
        health = httpx.get(live.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "error"
        assert "injected fault" in health.json()["error"]
        for path, request in ((CHAT, body), (CHAT, {**body, "stream": True}),
                              (COMPLETIONS, {"model": "test-model", "prompt": "Hi"}),
                              (COMPLETIONS, {"model": "test-model", "prompt": "Hi", "max_tokens": 0, "echo": True,
                                             "logprobs": 1})):
            started = time.monotonic()
            error = _error(_post(live, path, request), 503)
            assert time.monotonic() - started < 5 and error["code"] == "unavailable"
        cid = httpx.post(live.url + "/api/conversations", json={}).json()["id"]
        _error(_post(live, f"/api/conversations/{cid}/reply", {"content": "Hi"}), 503)
        metrics = httpx.get(live.url + "/metrics").text
        assert "llmlab_scheduler_up 0.0" in metrics
    finally:
        live.stop()


def test_sigterm_ends_the_server_within_its_shutdown_timeout_even_with_requests_in_flight(files, tmp_path):
    """A client that never finishes its body, and a streaming answer, are in flight at SIGTERM: the server
    ends within --shutdown_timeout and a few seconds (uvicorn alone would wait for the body forever)."""
    _, ckpt = files
    server = ServerProcess(["--checkpoint", str(ckpt), "--db", str(tmp_path / "f.db"), "--model_name", "test-model",
                            "--shutdown_timeout", "2"], tmp_path / "server.log")
    try:
        stalled = socket.create_connection(("127.0.0.1", server.port))
        stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 1000\r\n\r\n{\"model\": ")  # and nothing more
        with httpx.stream("POST", server.url + CHAT, timeout=30,
                          json={"model": "test-model", "messages": [{"role": "user", "content": "Go"}],
                                "stream": True, "max_tokens": 80}) as streaming:
            next(streaming.iter_lines())
            time.sleep(0.3)  # the stalled request is in the app, awaiting its body
            started = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            code = server.proc.wait(timeout=30)
        took = time.monotonic() - started
        assert code in (0, -signal.SIGTERM), server.log()  # uvicorn ends by re-raising the signal it caught
        assert took < 2 + 6, f"SIGTERM took {took:.1f} s"
        stalled.close()
    finally:
        server.stop()


def test_a_server_whose_scheduler_dies_exits_non_zero(files, tmp_path):
    """For a supervisor to restart it: the loop's error in the log, exit code 1."""
    _, ckpt = files
    prelude = ("import llmlab.scheduler\n"
               "def _step(self):\n    raise RuntimeError('injected: the decode step is broken')\n"
               "llmlab.scheduler.Scheduler._step = _step")
    server = ServerProcess(["--checkpoint", str(ckpt), "--db", str(tmp_path / "f.db"), "--model_name", "test-model"],
                           tmp_path / "server.log", prelude=prelude)
    try:
        # seeded: unseeded, the random-weight model sometimes samples a stop token first and finishes at the
        # prefill, before any decode step could fail (200, 0 completion tokens)
        body = {"model": "test-model", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "seed": 0}
        for _ in range(3):  # max_failures failing steps in a row
            _error(httpx.post(server.url + CHAT, json=body, timeout=30), 500, 503)
        assert server.proc.wait(timeout=30) == 1
        log = server.log()
        assert "the scheduler's loop died" in log and "injected: the decode step is broken" in log
    finally:
        server.stop()


# ---- /metrics ------------------------------------------------------------------------------------------------------


def _scrape(live, key: str) -> dict[tuple, float]:
    r = httpx.get(live.url + "/metrics", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def _delta(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted((k, str(v)) for k, v in labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_metrics_count_requests_tokens_tools_and_feedback(files):
    root, ckpt = files
    app = make_app(ckpt, root / "metrics.db", api_key="k")
    service = app.state.service
    script_the_model(service, max_batch=4)
    live = LiveServer(app)
    auth = {"Authorization": "Bearer k"}
    http = httpx.Client(base_url=live.url, headers=auth, timeout=60)
    try:
        assert httpx.get(live.url + "/metrics").status_code == 401  # behind the key, as /v1
        m0 = _scrape(live, "k")
        ask = {"model": "test-model", "temperature": 0}
        assert http.post(CHAT, json={**ask, "messages": [{"role": "user", "content": "What is 6 * 7?"}]}).status_code == 200
        assert http.post(CHAT, json={**ask, "messages": [{"role": "user", "content": "What is 1 / 0?"}]}).status_code == 200
        assert http.post(CHAT, json={**ask, "messages": [{"role": "user", "content": "Hi"}], "stream": True}).status_code == 200
        assert http.post(CHAT, json={**ask, "messages": []}).status_code == 422
        assert http.post(CHAT, json={**ask, "model": "gpt-9", "messages": [{"role": "user", "content": "Hi"}]}).status_code == 404
        assert httpx.post(live.url + CHAT, json=ask).status_code == 401  # no key
        m1 = _scrape(live, "k")
        requests = "llmlab_requests_total"
        assert _delta(m0, m1, requests, method="POST", route=CHAT, status=200) == 3
        assert _delta(m0, m1, requests, method="POST", route=CHAT, status=422) == 1
        assert _delta(m0, m1, requests, method="POST", route=CHAT, status=404) == 1
        assert _delta(m0, m1, requests, method="POST", route=CHAT, status=401) == 1
        assert _delta(m0, m1, requests, method="GET", route="/metrics", status=200) == 1
        assert _delta(m0, m1, "llmlab_request_duration_seconds_count", route=CHAT) == 6
        assert _delta(m0, m1, "llmlab_time_to_first_token_seconds_count", route=CHAT) == 3
        assert _delta(m0, m1, "llmlab_tool_calls_total", tool="calculator") == 2
        assert _delta(m0, m1, "llmlab_tool_failures_total", tool="calculator") == 1  # 1 / 0
        assert _delta(m0, m1, "llmlab_generation_errors_total", route=CHAT) == 0

        # tokens: completions whose end token is masked sample exactly max_tokens each
        prompt = [service.tokenizer.bos_id] + service.tokenizer.encode("Hello")
        r = http.post(COMPLETIONS, json={**ask, "prompt": prompt, "max_tokens": 6, "min_tokens": 6, "n": 2})
        assert r.json()["usage"]["completion_tokens"] == 12
        m2 = _scrape(live, "k")
        assert _delta(m1, m2, "llmlab_generated_tokens_total") == 12
        assert _delta(m1, m2, "llmlab_prompt_tokens_total") == 2 * len(prompt)
        assert _delta(m1, m2, "llmlab_decode_steps_total") == 5  # the first token comes from the prefill
        assert _delta(m1, m2, "llmlab_decode_rows_total") == 10  # both choices in every step
        assert _delta(m1, m2, "llmlab_time_to_first_token_seconds_count", route=COMPLETIONS) == 1
        assert m2[("llmlab_batch_capacity", ())] == 4 and m2[("llmlab_batch_occupancy", ())] == 0
        assert m2[("llmlab_queue_depth", ())] == 0 and m2[("llmlab_scheduler_up", ())] == 1

        # feedback from the web UI
        cid = http.post("/api/conversations", json={}).json()["id"]
        events = http.post(f"/api/conversations/{cid}/reply", json={"content": "Hi", "compare": True}).text
        done = json.loads([line for line in events.splitlines() if line.startswith("data: {")][-1][6:])
        a, b = done["messages"]
        http.post(f"/api/messages/{a['id']}/rating", json={"rating": 1}).raise_for_status()
        http.post(f"/api/messages/{a['id']}/rating", json={"rating": -1}).raise_for_status()
        http.post(f"/api/messages/{b['id']}/flag", json={"reason": "dull"}).raise_for_status()
        http.post(f"/api/comparisons/{done['comparison_id']}/choose", json={"message_id": b["id"]}).raise_for_status()
        m3 = _scrape(live, "k")
        assert _delta(m2, m3, "llmlab_ratings_total", rating=1) == 1
        assert _delta(m2, m3, "llmlab_ratings_total", rating=-1) == 1
        assert _delta(m2, m3, "llmlab_flags_total") == 1 and _delta(m2, m3, "llmlab_comparison_choices_total") == 1
        route = "/api/conversations/{cid}/reply"
        assert _delta(m2, m3, requests, method="POST", route=route, status=200) == 1
        # one generation for both answers, and one more each time answer B is sampled again to differ from A
        resampled = b["settings"].get("resampled", 0)
        assert _delta(m2, m3, "llmlab_time_to_first_token_seconds_count", route=route) == 1 + resampled

        # a generation that fails: a 500, and a failed generation of its route
        service.run_tool = lambda call: 1 / 0
        assert http.post(CHAT, json={**ask, "messages": [{"role": "user", "content": "What is 2 + 2?"}]}).status_code == 500
        m4 = _scrape(live, "k")
        assert _delta(m3, m4, "llmlab_generation_errors_total", route=CHAT) == 1
        assert _delta(m3, m4, requests, method="POST", route=CHAT, status=500) == 1
    finally:
        live.stop()
