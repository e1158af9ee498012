"""A property-based fuzz run of the API of `llmlab serve` (schemathesis): cases drawn from the app's own OpenAPI
schema, valid ones (positive) and ones that break it (negative), against a live server over a tiny model; no
case may get a 5xx, and afterwards the server still answers /health and a chat completion.

Cases are steered where the schema cannot say what is real: most name the served model (a random model name
only ever meets the 404 at the door) and the ids of things that exist in the store (conversations, messages,
a comparison), so that generation, tool calls, edits and feedback run too. The default run draws a fixed set
(`derandomize`: the same cases every run, none flaky); the slow one draws fresh cases, many more.

Schemathesis' pytest plugin (`schemathesis.pytest.from_fixture`) is not used: with the pytest of this
project it fails at collection; its strategies are driven with Hypothesis directly instead.
"""

from __future__ import annotations

import collections
import json

import httpx
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from serving import LiveServer, make_app, make_checkpoint, make_tokenizer

MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    # conftest flushes denormals to zero for speed; Hypothesis' float strategies refuse to run without them
    torch.set_flush_denormal(False)
    root = tmp_path_factory.mktemp("fuzz")
    make_tokenizer(root / "tok")
    ckpt = make_checkpoint(root / "tok", root / "ckpt", context_len=96)
    live = LiveServer(make_app(ckpt, root / "fuzz.db", max_tokens=64, max_n=4))
    yield live
    live.stop()
    torch.set_flush_denormal(True)


def _stored_ids(live) -> dict[str, list[int]]:
    """A conversation with a question, its answer and an undecided comparison: ids the cases may name."""
    http = httpx.Client(base_url=live.url, timeout=60)
    cid = http.post("/api/conversations", json={"title": "fuzz"}).json()["id"]
    events = http.post(f"/api/conversations/{cid}/reply", json={"content": "Hi", "compare": True, "max_tokens": 4})
    done = json.loads([line for line in events.text.splitlines() if line.startswith("data: {")][-1][6:])
    user = http.get(f"/api/conversations/{cid}").json()["messages"][0]["id"]
    return {"cid": [cid], "mid": [user] + [m["id"] for m in done["messages"]],
            "comparison_id": [done["comparison_id"]]}


def _aimed(strategy, ids: dict[str, list[int]], model: str):
    """Cases from `strategy`, most of them naming the served model and ids that exist."""

    def aim(drawn):
        case, real_model, real_ids = drawn
        if real_model and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = model
        for name, value in (case.path_parameters or {}).items():
            if name in ids and real_ids is not None:
                case.path_parameters[name] = ids[name][real_ids % len(ids[name])]
        if isinstance(case.body, dict) and real_ids is not None:
            for name in ("message_id", "edit_message_id"):
                if name in case.body:
                    case.body[name] = ids["mid"][real_ids % len(ids["mid"])]
        return case

    return st.tuples(strategy, st.integers(0, 3).map(bool), st.none() | st.integers(0, 10)).map(aim)


def fuzz(live, per_operation: int, derandomize: bool) -> collections.Counter:
    """Run `per_operation` cases of each mode against each operation; the count of cases by (mode, status
    class). A 5xx fails at once, with the case to reproduce it."""
    schema = schemathesis.openapi.from_url(live.url + "/openapi.json")
    model = httpx.get(live.url + "/v1/models").json()["data"][0]["id"]
    ids = _stored_ids(live)
    counts: collections.Counter = collections.Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in MODES:
            @given(case=_aimed(operation.as_strategy(generation_mode=mode), ids, model))
            @settings(max_examples=per_operation, deadline=None, database=None, derandomize=derandomize,
                      phases=[Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))
            def run(case):
                response = case.call(base_url=live.url, timeout=120)
                counts[mode.value, f"{response.status_code // 100}xx"] += 1
                case.validate_response(response, checks=[not_a_server_error])

            try:
                run()
            except Unsatisfiable:  # no input to break (GET /health, /v1/models): nothing negative to send
                assert mode is GenerationMode.NEGATIVE, operation.label
    return counts


def _still_serves(live) -> None:
    assert httpx.get(live.url + "/health").json()["status"] == "ok"
    r = httpx.post(live.url + "/v1/chat/completions", timeout=60,
                   json={"model": "test-model", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5,
                         "seed": 0})  # (unseeded, the random test model sometimes samples an end token early)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5


def test_fuzzed_requests_never_get_a_5xx(live):
    counts = fuzz(live, per_operation=8, derandomize=True)
    total = sum(counts.values())
    print(f"fuzz: {total} cases, by (mode, status): {dict(sorted(counts.items()))}")
    assert total >= 150 and counts["positive", "2xx"] >= 20  # the cases reach the routes' work, not just the door
    assert not any(status == "5xx" for _, status in counts)
    _still_serves(live)


@pytest.mark.slow
def test_many_fresh_fuzzed_requests_never_get_a_5xx(live):
    counts = fuzz(live, per_operation=100, derandomize=False)
    print(f"fuzz: {sum(counts.values())} cases, by (mode, status): {dict(sorted(counts.items()))}")
    _still_serves(live)
