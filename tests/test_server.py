"""`llmlab serve` with real clients: the official `openai` package, raw HTTP for the bad-input suite, streaming
disconnects, API keys, concurrency through the continuous-batching scheduler, and the web UI's reply API."""

import json
import threading

import httpx
import openai
import pytest
import torch

from llmlab.data.feedback import IDENTICAL, preference_pairs
from llmlab.engine import Engine, SamplingParams
from llmlab.errors import LLMLabError
from llmlab.server.app import ServerConfig
from llmlab.server.ui_api import COMPARE_RETRIES, DEFAULTS as UI_DEFAULTS
from serving import LiveServer, ServerProcess, make_app, make_checkpoint, make_tokenizer, script_the_model

CONTEXT = 96


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    make_tokenizer(root / "tok")
    ckpt = make_checkpoint(root / "tok", root / "ckpt", context_len=CONTEXT)
    return root, ckpt


def _start(files, name: str, **overrides):
    root, ckpt = files
    app = make_app(ckpt, root / f"{name}.db", **overrides)
    return app, LiveServer(app)


@pytest.fixture(scope="module")
def server(files):
    app, live = _start(files, "main")
    yield app.state.service, live
    live.stop()


@pytest.fixture(scope="module")
def scripted(files):
    """A server whose model is the calculator script (tool calls, known text)."""
    app, live = _start(files, "scripted")
    service = app.state.service
    script_the_model(service)
    yield service, live
    live.stop()


def _client(live, key="unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key=key, max_retries=0, timeout=60)


def _chat_prompt(service, text):
    from llmlab.chat import render_prompt

    return render_prompt(service.tokenizer, [{"role": "user", "content": text}])


# ---- the OpenAI API -------------------------------------------------------------------------------------------


def test_chat_streaming_and_not_agree_with_the_engine(server):
    service, live = server
    client = _client(live)
    assert [m.id for m in client.models.list().data] == ["test-model"]
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hello!"}]}]
    full = client.chat.completions.create(model="test-model", messages=messages, temperature=0, max_tokens=12)
    chunks = list(client.chat.completions.create(model="test-model", messages=messages, temperature=0,
                                                 max_tokens=12, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full.choices[0].message.content
    assert full.choices[0].finish_reason == chunks[-2].choices[0].finish_reason == "length"  # random weights
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens == 12
    # the same tokens as the engine's greedy decode of the same prompt
    prompt = service.chat_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}])
    assert full.usage.prompt_tokens == len(prompt)
    ids = Engine(service.model).generate([prompt], SamplingParams(max_new_tokens=12, temperature=0.0))[0]
    from llmlab.server.generation import ChoiceText
    from llmlab.scheduler import Event

    text = ChoiceText(service.tokenizer)
    for t in ids:
        text.push(Event(t))
    text.push(Event(None, finish="length"))
    assert text.content.strip() == full.choices[0].message.content


def test_seeded_choices_are_reproducible(server):
    _, live = server
    client = _client(live)
    kw = dict(model="test-model", messages=[{"role": "user", "content": "Tell me"}], temperature=1.0, max_tokens=10)
    both = client.chat.completions.create(n=2, seed=7, **kw)
    first = client.chat.completions.create(seed=7, **kw)
    second = client.chat.completions.create(seed=8, **kw)
    assert [c.message.content for c in both.choices] == [first.choices[0].message.content,
                                                         second.choices[0].message.content]


def test_completions_logprobs_and_echo_match_the_model(server):
    service, live = server
    client = _client(live)
    tok = service.tokenizer
    text = "Ada Lovelace was born in London."
    scored = client.completions.create(model="test-model", prompt=text, max_tokens=0, echo=True, logprobs=3)
    lp = scored.choices[0].logprobs
    ids = [tok.bos_id] + tok.encode(text)
    assert scored.choices[0].text == text and len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None
    with torch.no_grad():
        ref = torch.log_softmax(service.model(torch.tensor([ids]))[0], -1)
    expected = [float(ref[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert all(len(top) == 3 and max(top.values()) >= v - 1e-6 for top, v in zip(lp.top_logprobs[1:], lp.token_logprobs[1:]))
    # token-id prompts (what log-likelihood harnesses send) score the same
    by_ids = client.completions.create(model="test-model", prompt=ids, max_tokens=0, echo=True, logprobs=0)
    assert by_ids.choices[0].logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    # greedy generation with logprobs: each generated token is the argmax and carries its logprob
    gen = client.completions.create(model="test-model", prompt=text, max_tokens=5, temperature=0, logprobs=1)
    lps = gen.choices[0].logprobs
    assert len(lps.tokens) == 5 and all(max(top.values()) == pytest.approx(v) for top, v in zip(lps.top_logprobs, lps.token_logprobs))
    streamed = list(client.completions.create(model="test-model", prompt=text, max_tokens=5, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == gen.choices[0].text


def test_tool_calls_run_in_the_engine_and_stop_sequences_cut(scripted):
    _, live = scripted
    client = _client(live)
    a, b = 48213, 907
    r = client.chat.completions.create(model="test-model", messages=[{"role": "user", "content": f"What is {a} * {b}?"}],
                                       temperature=0)
    message = r.choices[0].message
    call = message.executed_tool_calls[0]
    assert call["function"] == {"name": "calculator", "arguments": f"{a} * {b}"} and call["output"] == str(a * b)
    assert message.content == f"It is {a * b}." and r.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model="test-model", temperature=0, stream=True,
                                                 messages=[{"role": "user", "content": f"What is {a} * {b}?"}]))
    tools = [c.choices[0].delta.executed_tool_calls for c in chunks if c.choices and getattr(c.choices[0].delta, "executed_tool_calls", None)]
    assert tools == [[{**call, "id": "call_0"}]]
    # a stop sequence ends the answer before it, streaming or not
    kw = dict(model="test-model", messages=[{"role": "user", "content": "Hi"}], temperature=0, stop=["re. F"])
    assert client.chat.completions.create(**kw).choices[0].message.content == "Hello the"
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello the"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_concurrent_requests_share_decode_steps(scripted):
    service, live = scripted
    client = _client(live)
    results, errors = [None] * 8, []

    def ask(i):
        try:
            r = client.chat.completions.create(model="test-model", temperature=0,
                                               messages=[{"role": "user", "content": f"What is {i} + {1000 * i}?"}])
            results[i] = r.choices[0].message.content
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    before = (service.scheduler.steps, service.scheduler.batch_sizes_total)
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and results == [f"It is {1001 * i}." for i in range(8)]
    steps = service.scheduler.steps - before[0]
    rows = service.scheduler.batch_sizes_total - before[1]
    assert rows / steps > 1.5  # rows decoded per step: requests were batched, not served one at a time


def test_client_disconnect_frees_its_row(server):
    service, live = server
    body = {"model": "test-model", "messages": [{"role": "user", "content": "Go"}], "stream": True,
            "max_tokens": 80, "temperature": 1.0}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", live.url + "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            next(response.iter_lines())
    import time

    deadline = time.monotonic() + 20
    while service.scheduler.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert service.scheduler.active == 0
    assert httpx.get(live.url + "/health").json()["status"] == "ok"


def test_api_key(files):
    with pytest.raises(LLMLabError, match="api_key"):
        ServerConfig(host="0.0.0.0", api_key="")
    app, live = _start(files, "keyed", api_key="s3cret")
    try:
        assert httpx.get(live.url + "/health").status_code == 200  # liveness stays public
        assert httpx.get(live.url + "/").status_code in (200, 404)  # the page itself carries no data
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.get(live.url + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(live.url + "/api/conversations").status_code == 401
        with pytest.raises(openai.AuthenticationError):
            _client(live, key="wrong").models.list()
        assert _client(live, key="s3cret").models.list().data[0].id == "test-model"
    finally:
        live.stop()


# ---- bad input: every case a 4xx with a message, never a 5xx, the server healthy after ----------------------

LONG = "word " * 400  # far beyond a 96-token context
CHAT = "/v1/chat/completions"


def _chat(**kw):
    return {"model": "test-model", "messages": [{"role": "user", "content": "Hi"}], **kw}


BAD_REQUESTS = [
    ("malformed JSON", "POST", CHAT, b'{"model": "test-model", "messages": [', 400),
    ("not an object", "POST", CHAT, b'[1, 2, 3]', 422),
    ("missing messages", "POST", CHAT, {"model": "test-model"}, 422),
    ("empty messages", "POST", CHAT, _chat(messages=[]), 422),
    ("messages not a list", "POST", CHAT, _chat(messages="Hi"), 422),
    ("unknown role", "POST", CHAT, _chat(messages=[{"role": "wizard", "content": "Hi"}]), 422),
    ("content of a wrong type", "POST", CHAT, _chat(messages=[{"role": "user", "content": 42}]), 422),
    ("roles out of order", "POST", CHAT, _chat(messages=[{"role": "tool", "content": "5"}, {"role": "user", "content": "Hi"}]), 400),
    ("ends with the assistant", "POST", CHAT, _chat(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]), 400),
    ("unknown model", "POST", CHAT, _chat(model="gpt-9"), 404),
    ("temperature a string", "POST", CHAT, _chat(temperature="hot"), 422),
    ("temperature too high", "POST", CHAT, _chat(temperature=9), 422),
    ("top_p zero", "POST", CHAT, _chat(top_p=0), 422),
    ("negative max_tokens", "POST", CHAT, _chat(max_tokens=-5), 422),
    ("huge max_tokens", "POST", CHAT, _chat(max_tokens=10**9), 400),
    ("n zero", "POST", CHAT, _chat(n=0), 422),
    ("huge n", "POST", CHAT, _chat(n=10**6), 400),
    ("five stop sequences", "POST", CHAT, _chat(stop=["a", "b", "c", "d", "e"]), 422),
    ("prompt beyond the context", "POST", CHAT, _chat(messages=[{"role": "user", "content": LONG}]), 400),
    ("too many messages", "POST", CHAT, _chat(messages=[{"role": "user", "content": "Hi"}] * 300), 413),
    ("too many characters", "POST", CHAT, _chat(messages=[{"role": "user", "content": "x" * 40_000}]), 413),
    ("huge body", "POST", CHAT, b"{" + b" " * 2_000_000 + b"}", 413),
    ("negative temperature", "POST", CHAT, _chat(temperature=-1), 422),
    ("NaN temperature", "POST", CHAT, b'{"model": "test-model", "messages": [{"role": "user", "content": "Hi"}], '
                                      b'"temperature": NaN}', 422),
    ("top_p over 1", "POST", CHAT, _chat(top_p=1.5), 422),
    ("negative top_k", "POST", CHAT, _chat(top_k=-1), 422),
    ("seed 2**64", "POST", CHAT, _chat(seed=2**64), 422),
    ("seed + n - 1 beyond 2**63", "POST", CHAT, _chat(seed=2**63 - 1, n=2), 422),
    ("completion top_p over 1", "POST", "/v1/completions", {"model": "test-model", "prompt": "a", "top_p": 2}, 422),
    ("completion seed 2**64", "POST", "/v1/completions", {"model": "test-model", "prompt": "a", "seed": 2**64}, 422),
    ("completion prompt beyond the context", "POST", "/v1/completions", {"model": "test-model", "prompt": LONG}, 400),
    ("completion token ids out of range", "POST", "/v1/completions", {"model": "test-model", "prompt": [1, 10**7]}, 400),
    ("completion empty prompt list", "POST", "/v1/completions", {"model": "test-model", "prompt": []}, 400),
    ("too many logprobs", "POST", "/v1/completions", {"model": "test-model", "prompt": "a", "logprobs": 50}, 422),
    ("unknown path", "POST", "/v1/engines", {}, 404),
    ("wrong method", "GET", CHAT, None, 405),
    ("unknown model card", "GET", "/v1/models/gpt-9", None, 404),
    ("unknown conversation", "GET", "/api/conversations/999999", None, 404),
    ("rating out of range", "POST", "/api/messages/1/rating", {"rating": 5}, 422),
    ("flag without reason", "POST", "/api/messages/1/flag", {"reason": ""}, 422),
]


@pytest.mark.parametrize("name,method,path,body,status", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_a_clear_4xx(server, name, method, path, body, status):
    _, live = server
    kwargs = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else (
        {"json": body} if body is not None else {})
    r = httpx.request(method, live.url + path, timeout=30, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"]
    assert httpx.get(live.url + "/health").json()["status"] == "ok"


def test_sampling_errors_name_their_field_and_defaults_are_each_surfaces(server):
    service, live = server
    http = httpx.Client(base_url=live.url, timeout=60)
    for body, param in ((_chat(temperature=-1), "temperature"), (_chat(seed=2**64), "seed"),
                        (_chat(seed=2**63 - 2, n=3), "seed"), (_chat(top_k=-3), "top_k")):
        error = http.post(CHAT, json=body).json()["error"]
        assert error["param"] == param and error["code"] == "invalid_value" and param in error["message"]
    # the API: OpenAI's temperature 1 when none is given; top_k 1 is greedy decoding whatever the temperature
    ask = dict(model="test-model", messages=[{"role": "user", "content": "Tell me"}], max_tokens=10)
    client = _client(live)

    def text(**kw) -> str:
        return client.chat.completions.create(**ask, **kw).choices[0].message.content

    assert text(seed=5) == text(seed=5, temperature=1.0)
    assert text(seed=5, temperature=1.5, extra_body={"top_k": 1}) == text(temperature=0)
    assert http.post(CHAT, json=_chat(seed=2**63 - 2, n=2, max_tokens=2)).status_code == 200  # the last seed fits
    # the web UI: its own defaults, served to the page; a bad value is a 422 that stores nothing
    defaults = http.get("/api/defaults").json()
    assert defaults == {"temperature": 0.7, "top_p": 0.95, "top_k": 0, "max_tokens": service.cfg.default_max_tokens}
    cid = http.post("/api/conversations", json={}).json()["id"]
    for body in ({"temperature": -1}, {"top_p": 1.5}, {"top_k": -1}):
        r = http.post(f"/api/conversations/{cid}/reply", json={"content": "Hi", **body})
        assert r.status_code == 422 and r.json()["error"]["param"] == next(iter(body)), r.text
    r = http.post(f"/api/conversations/{cid}/reply", content=b'{"content": "Hi", "temperature": NaN}',
                  headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and http.get(f"/api/conversations/{cid}").json()["messages"] == []
    settings = _events(live, cid, {"content": "Hi", "max_tokens": 3})[-1]["messages"][0]["settings"]
    assert (settings["temperature"], settings["top_p"], settings["top_k"]) == (0.7, 0.95, 0)
    assert 0 <= settings["seed"] < 2**31 and settings["max_tokens"] == 3


def test_busy_server_answers_429(files):
    app, live = _start(files, "busy", max_waiting=1)
    try:
        r = httpx.post(live.url + CHAT, json=_chat(n=2, max_tokens=2))
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        assert httpx.post(live.url + CHAT, json=_chat(max_tokens=2)).status_code == 200
    finally:
        live.stop()


# ---- the web UI's API ------------------------------------------------------------------------------------------


def _events(live, cid, body) -> list[dict]:
    """The server-sent events of one web UI reply (`live`: a LiveServer or a base URL)."""
    url = live if isinstance(live, str) else live.url
    with httpx.Client(timeout=60) as http:
        r = http.post(f"{url}/api/conversations/{cid}/reply", json=body)
        assert r.status_code == 200, r.text
        lines = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_ui_reply_edit_regenerate_compare_and_feedback(scripted):
    service, live = scripted
    http = httpx.Client(base_url=live.url, timeout=60)
    cid = http.post("/api/conversations", json={"title": "math"}).json()["id"]
    events = _events(live, cid, {"content": "What is 12 * 12?", "temperature": 0})
    assert events[0]["type"] == "user" and events[0]["message"]["content"] == "What is 12 * 12?"
    assert {"type": "tool", "choice": 0, "call": "calculator 12 * 12", "result": "144"} in events
    done = events[-1]
    assert done["type"] == "done" and done["comparison_id"] is None
    answer = done["messages"][0]
    assert answer["content"] == "It is 144." and answer["settings"]["temperature"] == 0
    assert answer["model"] == "test-model" and answer["tool_calls"] == [{"call": "calculator 12 * 12", "result": "144"}]
    assert "".join(e["text"] for e in events if e["type"] == "delta") == "It is 144."

    assert http.post(f"/api/messages/{answer['id']}/rating", json={"rating": -1}).json()["rating"] == -1
    flagged = http.post(f"/api/messages/{answer['id']}/flag", json={"reason": "wrong", "correction": "144."}).json()
    assert flagged["flags"][0]["correction"] == "144."
    # edit the question: the old answer is dropped, a new one is stored
    user_id = events[0]["message"]["id"]
    events = _events(live, cid, {"content": "What is 2 * 3?", "edit_message_id": user_id, "temperature": 0})
    assert events[-1]["messages"][0]["content"] == "It is 6."
    messages = http.get(f"/api/conversations/{cid}").json()["messages"]
    assert [m["content"] for m in messages] == ["What is 2 * 3?", "It is 6."]
    # regenerate, then compare two answers and choose one
    events = _events(live, cid, {"regenerate": True, "temperature": 0})
    assert events[-1]["messages"][0]["content"] == "It is 6."
    assert len(http.get(f"/api/conversations/{cid}").json()["messages"]) == 2
    events = _events(live, cid, {"content": "How are you?", "compare": True, "temperature": 0})
    a, b = events[-1]["messages"]
    comparison = events[-1]["comparison_id"]
    assert {e["choice"] for e in events if e["type"] == "delta"} == {0, 1}
    chosen = http.post(f"/api/comparisons/{comparison}/choose", json={"message_id": b["id"]}).json()
    assert chosen["chosen"] == b["id"]
    messages = http.get(f"/api/conversations/{cid}").json()["messages"]
    assert [m["id"] for m in messages][-1] == b["id"] and a["id"] not in [m["id"] for m in messages]
    pairs, skipped = preference_pairs(service.store.snapshot())
    assert not any(p["source"] == "comparison" for p in pairs)  # the script answers alike: no preference in it
    assert (comparison, IDENTICAL) in {(s.id, s.reason) for s in skipped if s.kind == "comparison"}
    assert any(p["source"] == "correction" and p["chosen"][0]["content"] == "144." for p in pairs)
    # bad UI requests
    assert http.post(f"/api/conversations/{cid}/reply", json={"content": ""}).status_code == 400
    assert http.post(f"/api/comparisons/{comparison}/choose", json={"message_id": 10**6}).status_code == 400
    assert http.post(f"/api/messages/{user_id}/rating", json={"rating": 1}).status_code in (400, 404)
    assert http.delete(f"/api/conversations/{cid}").json() == {"deleted": True}
    assert http.get(f"/api/conversations/{cid}").status_code == 404


def _deltas(events: list[dict], choice: int) -> str:
    return "".join(e["text"] for e in events if e["type"] == "delta" and e["choice"] == choice)


def test_ui_compare_at_temperature_0_samples_answer_b_again_until_it_differs(server):
    """Greedy decoding gives A and B the same answer: B is sampled again (a retry event, then its deltas anew) at
    the web UI's default temperature with the next seed, and stored with the settings that reproduce it."""
    service, live = server
    http = httpx.Client(base_url=live.url, timeout=60)
    cid = http.post("/api/conversations", json={}).json()["id"]
    events = _events(live, cid, {"content": "Tell me", "compare": True, "temperature": 0, "max_tokens": 8})
    done = events[-1]
    a, b = done["messages"]
    retries = [e for e in events if e["type"] == "retry"]
    assert [(e["choice"], e["attempt"]) for e in retries] == [(1, 1)]  # random weights: one new try differs
    assert a["content"] != b["content"]
    at = events.index(retries[0])
    assert _deltas(events[:at], 1) == _deltas(events, 0) == a["content"]  # B's first try: A's greedy answer
    assert _deltas(events[at:], 1) == b["content"]  # what streams after the retry event is the stored B
    assert a["settings"]["temperature"] == 0 and b["settings"]["temperature"] == UI_DEFAULTS.temperature
    assert b["settings"]["seed"] == a["settings"]["seed"] + 2 and b["settings"]["resampled"] == 1
    assert "sampled again (once" in done["note"] and "temperature 0.7" in done["note"]
    # the stored settings are what produced B: the same prompt, settings and seed give it again
    replay = _client(live).chat.completions.create(
        model="test-model", messages=[{"role": "user", "content": "Tell me"}], max_tokens=8,
        temperature=b["settings"]["temperature"], top_p=b["settings"]["top_p"], seed=b["settings"]["seed"],
        extra_body={"top_k": b["settings"]["top_k"]})
    assert replay.choices[0].message.content == b["content"]
    # reloaded, the undecided comparison carries the same note
    messages = http.get(f"/api/conversations/{cid}").json()["messages"]
    assert [m["compare_note"] for m in messages] == [None, done["note"], done["note"]]


def test_ui_compare_says_plainly_when_the_answers_stay_the_same(scripted):
    """A model sure of its answer (the script) gives it with every seed: after COMPARE_RETRIES new tries both
    answers are stored as they are, and the done event says they are the same."""
    service, live = scripted
    cid = httpx.post(f"{live.url}/api/conversations", json={}, timeout=60).json()["id"]
    events = _events(live, cid, {"content": "Hi", "compare": True, "temperature": 1})
    done = events[-1]
    a, b = done["messages"]
    assert [e["attempt"] for e in events if e["type"] == "retry"] == list(range(1, COMPARE_RETRIES + 1))
    assert a["content"] == b["content"] == "Hello there. Fine."
    assert b["settings"]["temperature"] == 1 and b["settings"]["resampled"] == COMPARE_RETRIES  # T > 0: kept
    assert b["settings"]["seed"] == a["settings"]["seed"] + 1 + COMPARE_RETRIES
    assert done["note"].startswith("The two answers are the same") and f"{COMPARE_RETRIES + 1} tries" in done["note"]
    chosen = httpx.post(f"{live.url}/api/comparisons/{done['comparison_id']}/choose", json={"message_id": b["id"]})
    assert chosen.status_code == 200
    _, skipped = preference_pairs(service.store.snapshot())
    assert (done["comparison_id"], IDENTICAL) in {(s.id, s.reason) for s in skipped if s.kind == "comparison"}


def test_completions_end_at_the_end_token_and_keep_tool_text(scripted):
    service, live = scripted
    client = _client(live)
    prompt = _chat_prompt(service, "Hi")  # token ids of a chat prompt: the script answers and ends its turn
    r = client.completions.create(model="test-model", prompt=prompt, max_tokens=40, temperature=0, logprobs=0)
    choice = r.choices[0]
    assert choice.text == " Hello there. Fine." and choice.finish_reason == "stop"
    assert "".join(choice.logprobs.tokens) == choice.text  # the end token is not part of the answer
    # raw completions show everything the model wrote, tool calls included (they are not run here)
    r = client.completions.create(model="test-model", prompt=_chat_prompt(service, "What is 2 * 3?"), max_tokens=40,
                                  temperature=0)
    assert r.choices[0].text == "calculator 2 * 3" and r.choices[0].finish_reason == "stop"


def test_ui_refused_replies_change_nothing_and_undecided_comparisons_are_marked(scripted):
    _, live = scripted
    http = httpx.Client(base_url=live.url, timeout=60)
    cid = http.post("/api/conversations", json={}).json()["id"]
    _events(live, cid, {"content": "Hi", "temperature": 0})
    before = http.get(f"/api/conversations/{cid}").json()["messages"]
    for body in ({"content": "Hi again", "max_tokens": 10**6}, {"regenerate": True, "max_tokens": 10**6},
                 {"content": LONG}, {"content": "Hi", "edit_message_id": before[0]["id"], "max_tokens": 10**6}):
        r = http.post(f"/api/conversations/{cid}/reply", json=body)
        assert r.status_code == 400, r.text
        assert http.get(f"/api/conversations/{cid}").json()["messages"] == before
    events = _events(live, cid, {"content": "Again?", "compare": True, "temperature": 0})
    messages = http.get(f"/api/conversations/{cid}").json()["messages"]
    assert [m["comparison_id"] for m in messages[-2:]] == [events[-1]["comparison_id"]] * 2
    assert all(m["comparison_id"] is None for m in messages[:-2])


def test_openapi_spec_lists_the_routes(server):
    _, live = server
    spec = httpx.get(live.url + "/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/api/conversations/{cid}/reply"):
        assert path in spec["paths"]


def test_committed_feedback_survives_a_kill_9_of_the_server(files, tmp_path):
    import os
    import signal

    from llmlab.server.store import FeedbackStore

    _, ckpt = files
    db = tmp_path / "feedback.db"
    server = ServerProcess(["--checkpoint", str(ckpt), "--db", str(db), "--model_name", "test-model"],
                           tmp_path / "server.log")
    proc, url = server.proc, server.url
    try:
        http = httpx.Client(base_url=url, timeout=60)
        cid = http.post("/api/conversations", json={"title": "kill"}).json()["id"]
        acked = {}
        for i in range(5):
            answer = _events(url, cid, {"content": f"Question {i}", "max_tokens": 3})[-1]
            mid = answer["messages"][0]["id"]
            acked[mid] = http.post(f"/api/messages/{mid}/rating", json={"rating": 1 if i % 2 else -1}).json()["rating"]
        with http.stream("POST", f"/api/conversations/{cid}/reply", json={"content": "Last", "max_tokens": 60}) as r:
            next(r.iter_lines())  # a reply is streaming when the server dies
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
    finally:
        server.stop()
    with FeedbackStore(db) as store:
        messages = store.get_conversation(cid)["messages"]
        ratings = {m["id"]: m["rating"] for m in messages if m["role"] == "assistant"}
        assert all(ratings.get(mid) == rating for mid, rating in acked.items())
        assert [m["content"] for m in messages if m["role"] == "user"][:5] == [f"Question {i}" for i in range(5)]
    import sqlite3

    assert sqlite3.connect(db).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_a_request_that_fails_inside_the_batch_fails_alone(scripted, monkeypatch):
    service, live = scripted
    client = _client(live)

    def exploding_tool(call: str) -> str:
        raise RuntimeError("the tool exploded")

    monkeypatch.setattr(service, "run_tool", exploding_tool)
    with pytest.raises(openai.InternalServerError, match="tool exploded"):
        client.chat.completions.create(model="test-model", messages=[{"role": "user", "content": "What is 1 + 1?"}])
    with httpx.stream("POST", live.url + CHAT, timeout=30, json=_chat(messages=[{"role": "user", "content": "What is 2 + 2?"}],
                                                                        stream=True)) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert "tool exploded" in json.loads(lines[-1][len("data: "):])["error"]["message"]
    monkeypatch.undo()
    r = client.chat.completions.create(model="test-model", messages=[{"role": "user", "content": "What is 3 + 4?"}])
    assert r.choices[0].message.content == "It is 7."
    assert httpx.get(live.url + "/health").json()["status"] == "ok"


def test_a_stored_empty_answer_leaves_its_exchange_out_of_the_next_prompt():
    """A model may end its turn at once; the next reply's prompt must still be a valid conversation (the chat
    format has no empty turn), keeping every other exchange and the first of two compared answers."""
    from llmlab.chat import validate
    from llmlab.server.ui_api import history

    def msg(role, content):
        return {"role": role, "content": content}

    conversation = {"system": "Be brief.", "messages": [
        msg("user", "a"), msg("assistant", ""), msg("user", "b"), msg("assistant", "B1"), msg("assistant", "B2"),
        msg("user", "c"), msg("assistant", ""), msg("assistant", "C2"), msg("user", "d")]}
    messages = history(conversation)
    validate(messages)
    assert messages == [msg("system", "Be brief."), msg("user", "b"), msg("assistant", "B1"), msg("user", "d")]


def test_a_tool_call_the_model_never_closes_is_reported_not_hidden(files):
    """The model writes `<|tool_start|>calculator 1 +` and ends its turn: no tool runs, the content is empty,
    and the reply says what the model began instead of looking empty for no reason."""
    from llmlab.scheduler import Scheduler
    from serving import ScriptModel

    app, live = _start(files, "unclosed")
    service = app.state.service
    tok = service.tokenizer
    sp = tok.special_id
    plan = [sp("<|tool_start|>")] + tok.encode("calculator 1 +") + [sp("<|assistant_end|>")]

    def script(seq):
        start = len(seq) - 1 - seq[::-1].index(sp("<|assistant_start|>")) if sp("<|assistant_start|>") in seq else None
        if start is None:
            return tok.bos_id
        written = seq[start + 1:]
        return plan[len(written)] if len(written) < len(plan) else sp("<|assistant_end|>")

    service.scheduler.shutdown()
    service.scheduler = Scheduler(ScriptModel(tok.vocab_size, script, context_len=service.context_len), tok, max_batch=4)
    try:
        body = {"model": "test-model", "messages": [{"role": "user", "content": "Hi"}]}
        message = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["message"]
        assert message["content"] == "" and message["unfinished_tool_call"] == "calculator 1 +"
        assert "executed_tool_calls" not in message
        stream = httpx.post(live.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60).text
        deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in stream.splitlines()
                  if line.startswith("data: {")]
        assert {"unfinished_tool_call": "calculator 1 +"} in deltas
    finally:
        live.stop()
