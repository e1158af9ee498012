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
    GET    /                                     the page itself (static files in static/, no build step)

A reply streams `{"type": "user", "message"}` (the stored user message), `{"type": "delta", "choice", "text"}`,
`{"type": "tool", "choice", "call", "result"}`, then `{"type": "done", "messages", "comparison_id"}` with the
stored answers, or `{"type": "error", "message"}`; then `[DONE]`. Every answer is stored with the model and
the sampling settings that produced it, so what users rate, flag and compare becomes training data
(`llmlab feedback export`). The page shows the server's defaults (`DEFAULTS`, from /api/defaults) until the
user changes a setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import FileResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from llmlab.engine import SamplingParams
from llmlab.server import schemas
from llmlab.server.generation import ChoiceText, Generation
from llmlab.server.schemas import StoreId
from llmlab.server.http import SSE_DONE, APIError, sse
from llmlab.server.service import Service

STATIC = Path(__file__).parent / "static"
REPLY = "/api/conversations/{cid}/reply"
DEFAULTS = SamplingParams(temperature=0.7, top_k=0, top_p=0.95)
"""the web UI's sampling when a reply sets none: a little less random than the API's, for a chat"""


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
        """The conversation; each answer of a comparison not yet decided carries its `comparison_id`."""
        conversation = conversation_or_404(cid)
        pending = {}
        for c in store.list_comparisons(cid):
            if c["chosen"] is None:
                pending[c["message_a"]] = pending[c["message_b"]] = c["id"]
        for m in conversation["messages"]:
            m["comparison_id"] = pending.get(m["id"])
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
        prompt = service.chat_prompt(history({**conversation, "messages": planned}))
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
        gen = service.generate(REPLY, prompt, params, tools=True)
        return StreamingResponse(_reply_stream(service, cid, gen, params, user_event),
                                 media_type="text/event-stream")


def sampling(body: schemas.ReplyRequest, max_new_tokens: int, n: int) -> list[SamplingParams]:
    """The SamplingParams of a reply's n answers: the settings it sets over `DEFAULTS`, a fresh random seed
    (answer i samples with seed + i); a 422 for a bad value."""
    return body.sampling(DEFAULTS, max_new_tokens, n, seed=None)


def _settings(params: SamplingParams, finish: str | None) -> dict:
    """What is stored with an answer: the settings that produced it, and why it ended."""
    return {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
            "max_tokens": params.max_new_tokens, "seed": params.seed, "finish_reason": finish}


async def _reply_stream(service: Service, cid: int, gen: Generation, params: list[SamplingParams],
                        user_message: dict | None) -> AsyncIterator[str]:
    store = service.store
    if user_message is not None:
        yield sse({"type": "user", "message": user_message})
    texts = [ChoiceText(service.tokenizer, lstrip=True) for _ in params]
    try:
        async for update in gen.updates(texts):
            out = []
            for i, kind, value in update:
                if kind == "text":
                    out.append(sse({"type": "delta", "choice": i, "text": value}))
                elif kind == "tool":
                    out.append(sse({"type": "tool", "choice": i, **value}))
            if out:
                yield "".join(out)
        if any(t.finish is not None and t.finish.startswith("error") for t in texts):
            yield sse({"type": "error", "message": next(t.finish for t in texts if t.finish.startswith("error"))})
        else:
            stored = [store.add_message(cid, "assistant", t.content, tool_calls=t.tool_calls, model=service.name,
                                        settings=_settings(p, t.finish)) for t, p in zip(texts, params)]
            comparison = store.create_comparison(cid, stored[0]["id"], stored[1]["id"]) if len(stored) == 2 else None
            yield sse({"type": "done", "messages": stored,
                        "comparison_id": comparison["id"] if comparison else None})
    except Exception as e:  # the stream has started: the error goes in the stream
        yield sse({"type": "error", "message": f"{type(e).__name__}: {e}"})
    yield SSE_DONE
