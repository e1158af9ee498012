"""The web UI's API: conversations kept in the feedback store, streamed replies, ratings, flags, comparisons.

    GET    /api/conversations                    newest first
    POST   /api/conversations                    {"title"?, "system"?}
    GET    /api/conversations/{cid}              with its active messages
    DELETE /api/conversations/{cid}
    POST   /api/conversations/{cid}/reply        {"content"?, "edit_message_id"?, "regenerate"?, "compare"?,
                                                  "temperature"?, "top_p"?, "top_k"?, "max_tokens"?} -> server-sent events
    POST   /api/messages/{mid}/rating            {"rating": -1 | 0 | 1}
    POST   /api/messages/{mid}/flag              {"reason", "correction"?}
    POST   /api/comparisons/{id}/choose          {"message_id"}
    GET    /api/defaults                         the sampling settings of a reply that sets none
    GET    /api/assistants                       the custom assistants a reply may name ({"assistant": NAME})
    POST   /api/assistants                       {"name", "instructions"?, "tools"?, "files"?: [{"name", "content" (base64)}]}
    GET    /                                     the page itself (static files in static/, no build step)

A reply streams `{"type": "user", "message"}` (the stored user message), `{"type": "delta", "choice", "text"}`,
`{"type": "tool", "choice", "call", "result"}`, then `{"type": "done", "messages", "comparison_id", "note"}` with
the stored answers, or `{"type": "error", "message"}`; then `[DONE]`. Every answer is stored with the model and
the sampling settings that produced it, so what users rate, flag and compare becomes training data
(`llmlab feedback export`). The page shows the server's defaults (`DEFAULTS`, from /api/defaults) until the
user changes a setting.

Compare mode (`"compare": true`) samples two answers, A with seed s and B with seed s + 1. Two equal answers
teach nothing (the export skips such a comparison), so when B's text comes out the same as A's the server
samples B again, up to `COMPARE_RETRIES` times, with seeds s + 2, s + 3, ...: the stream says
`{"type": "retry", "choice": 1, "attempt", "message"}` and B's deltas start over. At temperature 0 every seed
gives the same greedy answer, so B's new tries sample at the web UI's default temperature
(`DEFAULTS.temperature`) instead: A stays the greedy answer the user asked for. B is stored with the settings
of the try that produced it (its seed, its temperature) and `resampled`, the number of new tries. When the
answers are still the same after every try (a model that is sure of its answer), both are stored as they are
and `note` (also on the messages of an undecided comparison in GET /api/conversations/{cid}, as
`compare_note`) says so plainly; `note` also says when B was sampled again, and is null otherwise.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import tempfile
from pathlib import Path
from typing import AsyncIterator, Sequence

from fastapi import FastAPI
from fastapi.responses import FileResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from llmlab.assistants.reader import Reading
from llmlab.assistants.store import Assistant
from llmlab.engine import SamplingParams
from llmlab.errors import LLMLabError
from llmlab.scheduler import SchedulerDown
from llmlab.server import schemas
from llmlab.server.generation import ChoiceText, Generation
from llmlab.server.schemas import StoreId
from llmlab.server.http import SSE_DONE, APIError, sse
from llmlab.server.service import Service

STATIC = Path(__file__).parent / "static"
REPLY = "/api/conversations/{cid}/reply"
DEFAULTS = SamplingParams(temperature=0.7, top_k=0, top_p=0.95)
"""the web UI's sampling when a reply sets none: a little less random than the API's, for a chat"""
COMPARE_RETRIES = 4
"""how many more times compare mode samples answer B when it comes out the same as answer A"""


def history(conversation: dict) -> list[dict]:
    """The conversation as chat messages for the model: its system prompt, then the active messages, keeping
    the first of two answers in a row (a comparison not yet decided). An exchange whose answer is empty (the
    model ended its turn at once) is left out: the chat format has no empty turn."""
    messages = [{"role": "system", "content": conversation["system"]}] if conversation.get("system") else []
    after_answer = False
    for m in conversation["messages"]:
        if m["role"] == "assistant":
            if after_answer:  # the second of two answers in a row
                continue
            after_answer = True
            if not m["content"]:
                if messages and messages[-1]["role"] == "user":
                    messages.pop()
                continue
        else:
            after_answer = False
        messages.append({"role": m["role"], "content": m["content"]})
    return messages


def add_routes(app: FastAPI, service: Service) -> None:
    store = service.store

    def conversation_or_404(cid: int) -> dict:
        conversation = store.get_conversation(cid)
        if conversation is None:
            raise APIError(404, f"no conversation {cid}", code="not_found")
        return conversation

    def message_or_404(mid: int) -> dict:
        message = store.get_message(mid)
        if message is None:
            raise APIError(404, f"no message {mid}", code="not_found")
        return message

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def index():
        page = STATIC / "index.html"
        if not page.is_file():
            raise APIError(404, "the web UI is not installed (llmlab/server/static/index.html is missing)")
        return FileResponse(page)

    @app.get("/api/defaults")
    def defaults() -> dict:
        """The settings of a reply that sets none: the page shows them until the user changes one."""
        return {"temperature": DEFAULTS.temperature, "top_p": DEFAULTS.top_p, "top_k": DEFAULTS.top_k,
                "max_tokens": min(service.cfg.default_max_tokens, service.cfg.max_tokens)}

    @app.get("/api/assistants")
    def list_assistants() -> list[dict]:
        """The custom assistants the picker offers (the model itself is always offered too)."""
        return [_assistant_card(a) for a in service.assistants.list()]

    @app.post("/api/assistants")
    def create_assistant(body: schemas.NewAssistant) -> dict:
        """A new custom assistant from the form: its files arrive base64-encoded, are written to a temporary
        folder and checked by the store, which creates all of it or nothing (a 400 says what is wrong)."""
        with tempfile.TemporaryDirectory() as tmp:
            paths = []
            for f in body.files:
                name = Path(f.name).name
                if not name or name in (".", ".."):
                    raise APIError(400, f"bad file name {f.name!r}", param="files")
                try:
                    data = base64.b64decode(f.content, validate=True)
                except (binascii.Error, ValueError):
                    raise APIError(400, f"{name}: content is not base64", param="files") from None
                (Path(tmp) / name).write_bytes(data)
                paths.append(Path(tmp) / name)
            try:
                a = service.assistants.create(body.name, body.instructions, paths, body.tools)
            except LLMLabError as e:
                raise APIError(400, str(e), param="name") from None
        return _assistant_card(a)

    @app.get("/api/conversations")
    def list_conversations() -> list[dict]:
        return store.list_conversations()

    @app.post("/api/conversations")
    def create_conversation(body: schemas.NewConversation) -> dict:
        if len(body.title) + len(body.system) > service.cfg.max_chars:
            raise APIError(413, "title and system prompt are too long", code="too_many_characters")
        return store.create_conversation(title=body.title, system=body.system)

    @app.get("/api/conversations/{cid}")
    def get_conversation(cid: StoreId) -> dict:
        """The conversation; each answer of a comparison not yet decided carries its `comparison_id` and its
        `compare_note` (see `compare_note`)."""
        conversation = conversation_or_404(cid)
        pending, notes = {}, {}
        by_id = {m["id"]: m for m in conversation["messages"]}
        for c in store.list_comparisons(cid):
            if c["chosen"] is None:
                pending[c["message_a"]] = pending[c["message_b"]] = c["id"]
                if c["message_a"] in by_id and c["message_b"] in by_id:
                    notes[c["message_a"]] = notes[c["message_b"]] = compare_note(by_id[c["message_a"]],
                                                                                 by_id[c["message_b"]])
        for m in conversation["messages"]:
            m["comparison_id"] = pending.get(m["id"])
            m["compare_note"] = notes.get(m["id"])
        return conversation

    @app.delete("/api/conversations/{cid}")
    def delete_conversation(cid: StoreId) -> dict:
        if not store.delete_conversation(cid):
            raise APIError(404, f"no conversation {cid}", code="not_found")
        return {"deleted": True}

    @app.post("/api/messages/{mid}/rating")
    def rate(mid: StoreId, body: schemas.Rating) -> dict:
        message = message_or_404(mid)
        if message["role"] != "assistant":
            raise APIError(400, "only the assistant's answers can be rated", param="rating")
        rated = store.rate(mid, body.rating)
        service.metrics.ratings.labels(str(body.rating)).inc()
        return rated

    @app.post("/api/messages/{mid}/flag")
    def flag(mid: StoreId, body: schemas.Flag) -> dict:
        message = message_or_404(mid)
        if message["role"] != "assistant":
            raise APIError(400, "only the assistant's answers can be flagged", param="reason")
        if len(body.reason) + len(body.correction or "") > service.cfg.max_chars:
            raise APIError(413, "reason and correction are too long", code="too_many_characters")
        flagged = store.flag(mid, body.reason, body.correction)
        service.metrics.flags.inc()
        return flagged

    @app.post("/api/comparisons/{comparison_id}/choose")
    def choose(comparison_id: StoreId, body: schemas.Choice) -> dict:
        comparison = store.get_comparison(comparison_id)
        if comparison is None:
            raise APIError(404, f"no comparison {comparison_id}", code="not_found")
        if body.message_id not in (comparison["message_a"], comparison["message_b"]):
            raise APIError(400, f"message {body.message_id} is not one of the compared answers", param="message_id")
        chosen = store.choose(comparison_id, body.message_id)
        service.metrics.comparison_choices.inc()
        return chosen

    @app.post(REPLY)
    async def reply(cid: StoreId, body: schemas.ReplyRequest):
        conversation = conversation_or_404(cid)
        messages = conversation["messages"]
        # what the conversation will be: every check runs before anything is written, so a refused request
        # (400/413/429) leaves the stored conversation as it was
        if body.edit_message_id is not None:
            target = message_or_404(body.edit_message_id)
            if target["conversation_id"] != cid or target["role"] != "user" or not target["active"]:
                raise APIError(400, "edit_message_id must be an active user message of this conversation",
                               param="edit_message_id")
            if not body.content:
                raise APIError(400, "an edit needs the new content", param="content")
            keep = [m for m in messages if m["position"] < target["position"]]
            planned = keep + [{"role": "user", "content": body.content}]
        elif body.regenerate:
            if not messages or messages[-1]["role"] != "assistant":
                raise APIError(400, "nothing to regenerate: the conversation does not end with an answer",
                               param="regenerate")
            answers = []  # the last answer (both, if it was a comparison)
            for m in reversed(messages):
                if m["role"] != "assistant":
                    break
                answers.append(m)
            planned = messages[: len(messages) - len(answers)]
        else:
            if not body.content:
                raise APIError(400, "content is empty: send the user's message", param="content")
            unanswered = messages[-1] if messages and messages[-1]["role"] == "user" else None  # a reply that failed
            planned = messages[:-1] if unanswered else list(messages)
            planned = planned + [{"role": "user", "content": body.content}]
        if body.content is not None and len(body.content) > service.cfg.max_chars:
            raise APIError(413, "the message is too long", param="content", code="too_many_characters")
        assistant = service.assistant(body.assistant) if body.assistant else None
        chat = history({**conversation, "messages": planned})
        prompt = service.chat_prompt(chat)
        reading, adapter = None, await service.adapter_of(assistant) if assistant is not None else 0
        if assistant is not None and not body.compare:  # (a comparison's two answers are sampled, not read)
            reading = await asyncio.wrap_future(service.scheduler.call(service.read_files(assistant, chat, adapter)))
        if assistant is not None and reading is None:
            prompt = service.chat_prompt(service.as_assistant(assistant, chat))
        n = 2 if body.compare else 1
        max_new = service.budget(body.max_tokens, len(prompt))
        service.check_room(n)
        params = sampling(body, max_new, n)

        user_event = None
        if body.edit_message_id is not None:
            user_event = store.edit_message(body.edit_message_id, body.content)
        elif body.regenerate:
            for m in answers:
                store.deactivate_message(m["id"])
        else:
            if unanswered:
                store.deactivate_message(unanswered["id"])
            user_event = store.add_message(cid, "user", body.content)
        model = assistant.name if assistant else service.name
        if reading is not None:
            return StreamingResponse(_read_stream(service, cid, reading, model, params[0], user_event),
                                     media_type="text/event-stream")
        gen = service.generate(REPLY, prompt, params, tools=True, assistant=assistant, adapter=adapter)
        return StreamingResponse(_reply_stream(service, cid, prompt, gen, params, user_event, model, assistant),
                                 media_type="text/event-stream")


def _assistant_card(a: Assistant) -> dict:
    """What the picker shows of a custom assistant."""
    return {"name": a.name, "instructions": a.instructions, "tools": a.tools, "files": [f["name"] for f in a.files],
            "adapter": a.adapter}


def sampling(body: schemas.ReplyRequest, max_new_tokens: int, n: int) -> list[SamplingParams]:
    """The SamplingParams of a reply's n answers: the settings it sets over `DEFAULTS`, a fresh random seed
    (answer i samples with seed + i); a 422 for a bad value."""
    return body.sampling(DEFAULTS, max_new_tokens, n, seed=None)


def resample(params: SamplingParams, attempt: int) -> SamplingParams:
    """Answer B's settings for its `attempt`-th new try (1, 2, ...) after it came out the same as answer A: the
    next seed (B sampled with `params.seed`), and at temperature 0, where every seed gives the same greedy answer,
    the web UI's default temperature."""
    return dataclasses.replace(params, seed=params.seed + attempt,
                               temperature=params.temperature or DEFAULTS.temperature)


def compare_note(a: dict, b: dict) -> str | None:
    """What the compare view says about stored answers A and B (None: nothing to say): that they are the same
    and why, or that B was sampled again to differ from A (and at what temperature)."""
    tries = b["settings"].get("resampled", 0)
    raised = b["settings"].get("temperature") != a["settings"].get("temperature")
    at = f" at temperature {b['settings']['temperature']:g}" if raised else ""
    greedy = " (at temperature 0 every sample is the same greedy answer)" if raised else ""
    if a["content"] == b["content"]:
        if not tries:
            return "The two answers are the same: choosing one teaches the model nothing."
        return (f"The two answers are the same: answer B came out like answer A in {tries + 1} tries with other "
                f"seeds{at}{greedy}. The model is sure of this answer at these settings: raise the temperature or "
                f"rephrase to get different answers. Choosing one teaches the model nothing.")
    if tries:
        times = "once, with another seed" if tries == 1 else f"{tries} times, with other seeds"
        return f"Answer B came out the same as answer A, so it was sampled again ({times}){at}{greedy}."
    return None


def _settings(params: SamplingParams, finish: str | None) -> dict:
    """What is stored with an answer: the settings that produced it, and why it ended."""
    return {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
            "max_tokens": params.max_new_tokens, "seed": params.seed, "finish_reason": finish}


def _failure(texts: list[ChoiceText]) -> str | None:
    return next((t.finish for t in texts if t.finish is not None and t.finish.startswith("error")), None)


def _events(update: list[tuple[int, str, object]], first_choice: int = 0) -> str:
    """The delta and tool events of one batch of a generation's updates, whose choice i is the reply's
    choice first_choice + i."""
    out = []
    for i, kind, value in update:
        if kind == "text":
            out.append(sse({"type": "delta", "choice": first_choice + i, "text": value}))
        elif kind == "tool":
            out.append(sse({"type": "tool", "choice": first_choice + i, **value}))
    return "".join(out)


async def _read_stream(service: Service, cid: int, reading: Reading, model: str, params: SamplingParams,
                       user_message: dict | None) -> AsyncIterator[str]:
    """An answer read from an assistant's files (Service.read_files), sent whole and stored with its model and
    the passage it cites."""
    if user_message is not None:
        yield sse({"type": "user", "message": user_message})
    yield sse({"type": "delta", "choice": 0, "text": reading.answer})
    settings = {**_settings(dataclasses.replace(params, temperature=0.0), "stop"), "citation": reading.citation}
    stored = service.store.add_message(cid, "assistant", reading.answer, model=model, settings=settings)
    yield sse({"type": "done", "messages": [stored], "comparison_id": None, "note": None})
    yield SSE_DONE


async def _reply_stream(service: Service, cid: int, prompt: Sequence[int], gen: Generation,
                        params: list[SamplingParams], user_message: dict | None, model: str,
                        assistant: Assistant | None = None) -> AsyncIterator[str]:
    store = service.store
    if user_message is not None:
        yield sse({"type": "user", "message": user_message})
    texts = [ChoiceText(service.tokenizer, lstrip=True) for _ in params]
    used = list(params)  # the settings that produced each answer (B's change when it is sampled again)
    try:
        async for update in gen.updates(texts):
            if events := _events(update):
                yield events
        resampled = 0
        # compare mode: sample B again while it says the same as A (see the module docstring)
        while (len(texts) == 2 and _failure(texts) is None and texts[1].content == texts[0].content
               and resampled < COMPARE_RETRIES):
            retry = resample(params[1], resampled + 1)
            try:
                again = service.generate(REPLY, prompt, [retry], tools=True, assistant=assistant)
            except SchedulerDown:
                break  # shutting down: keep the answers there are (the note says they are the same)
            resampled += 1
            yield sse({"type": "retry", "choice": 1, "attempt": resampled,
                       "message": f"Answer B came out the same as answer A: sampling it again (try {resampled + 1} "
                                  f"of {COMPARE_RETRIES + 1}, seed {retry.seed}, temperature {retry.temperature:g})."})
            texts[1], used[1] = ChoiceText(service.tokenizer, lstrip=True), retry
            async for update in again.updates(texts[1:]):
                if events := _events(update, first_choice=1):
                    yield events
        if (failure := _failure(texts)) is not None:
            yield sse({"type": "error", "message": failure})
        else:
            settings = [_settings(p, t.finish) for t, p in zip(texts, used)]
            if len(settings) == 2:
                settings[1]["resampled"] = resampled
            stored = [store.add_message(cid, "assistant", t.content, tool_calls=t.tool_calls, model=model,
                                        settings=s) for t, s in zip(texts, settings)]
            comparison = store.create_comparison(cid, stored[0]["id"], stored[1]["id"]) if len(stored) == 2 else None
            yield sse({"type": "done", "messages": stored,
                       "comparison_id": comparison["id"] if comparison else None,
                       "note": compare_note(*stored) if comparison else None})
    except Exception as e:  # the stream has started: the error goes in the stream
        yield sse({"type": "error", "message": f"{type(e).__name__}: {e}"})
    yield SSE_DONE
