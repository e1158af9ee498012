"""The web UI's API: conversations kept in the feedback store, streamed replies, ratings, flags, comparisons.

    GET    /api/conversations                    newest first
    POST   /api/conversations                    {"title"?, "system"?}
    GET    /api/conversations/{cid}              with its active messages
    DELETE /api/conversations/{cid}
    POST   /api/conversations/{cid}/reply        {"content"?, "edit_message_id"?, "regenerate"?, "compare"?,
                                                  "temperature"?, "top_p"?, "max_tokens"?} -> server-sent events
    POST   /api/messages/{mid}/rating            {"rating": -1 | 0 | 1}
    POST   /api/messages/{mid}/flag              {"reason", "correction"?}
    POST   /api/comparisons/{id}/choose          {"message_id"}

A reply streams `{"type": "user", "message"}` (the stored user message), `{"type": "delta", "choice", "text"}`,
`{"type": "tool", "choice", "call", "result"}`, then `{"type": "done", "messages", "comparison_id"}` with the
stored answers, or `{"type": "error", "message"}`; then `[DONE]`. Every answer is stored with the model and
the sampling settings that produced it, so what users rate, flag and compare becomes training data
(`llmlab feedback export`).
"""

from __future__ import annotations

import json
import secrets
from typing import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from llmlab.engine import SamplingParams
from llmlab.server import schemas
from llmlab.server.generation import ChoiceText, Generation


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def history(conversation: dict) -> list[dict]:
    """The conversation as chat messages for the model: its system prompt, then the active messages, keeping
    the first of two answers in a row (a comparison not yet decided)."""
    messages = [{"role": "system", "content": conversation["system"]}] if conversation.get("system") else []
    for m in conversation["messages"]:
        if m["role"] == "assistant" and messages and messages[-1]["role"] == "assistant":
            continue
        messages.append({"role": m["role"], "content": m["content"]})
    return messages


def add_routes(app: FastAPI, service) -> None:
    from llmlab.server.app import APIError

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

    @app.get("/api/conversations")
    def list_conversations() -> list[dict]:
        return store.list_conversations()

    @app.post("/api/conversations")
    def create_conversation(body: schemas.NewConversation) -> dict:
        if len(body.title) + len(body.system) > service.cfg.max_chars:
            raise APIError(413, "title and system prompt are too long", code="too_many_characters")
        return store.create_conversation(title=body.title, system=body.system)

    @app.get("/api/conversations/{cid}")
    def get_conversation(cid: int) -> dict:
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
    def delete_conversation(cid: int) -> dict:
        if not store.delete_conversation(cid):
            raise APIError(404, f"no conversation {cid}", code="not_found")
        return {"deleted": True}

    @app.post("/api/messages/{mid}/rating")
    def rate(mid: int, body: schemas.Rating) -> dict:
        message = message_or_404(mid)
        if message["role"] != "assistant":
            raise APIError(400, "only the assistant's answers can be rated", param="rating")
        return store.rate(mid, body.rating)

    @app.post("/api/messages/{mid}/flag")
    def flag(mid: int, body: schemas.Flag) -> dict:
        message = message_or_404(mid)
        if message["role"] != "assistant":
            raise APIError(400, "only the assistant's answers can be flagged", param="reason")
        if len(body.reason) + len(body.correction or "") > service.cfg.max_chars:
            raise APIError(413, "reason and correction are too long", code="too_many_characters")
        return store.flag(mid, body.reason, body.correction)

    @app.post("/api/comparisons/{comparison_id}/choose")
    def choose(comparison_id: int, body: schemas.Choice) -> dict:
        comparison = store.get_comparison(comparison_id)
        if comparison is None:
            raise APIError(404, f"no comparison {comparison_id}", code="not_found")
        if body.message_id not in (comparison["message_a"], comparison["message_b"]):
            raise APIError(400, f"message {body.message_id} is not one of the compared answers", param="message_id")
        return store.choose(comparison_id, body.message_id)

    @app.post("/api/conversations/{cid}/reply")
    async def reply(cid: int, body: schemas.ReplyRequest):
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
        max_new = service.budget(body.max_tokens, len(prompt), default=service.cfg.default_max_tokens)
        service.check_room(n)

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
        seed = secrets.randbelow(2**31)
        params = [SamplingParams(max_new_tokens=max_new, temperature=body.temperature, top_p=body.top_p,
                                 seed=seed + i) for i in range(n)]
        settings = {"temperature": body.temperature, "top_p": body.top_p, "max_tokens": max_new, "seed": seed}
        gen = Generation(service.scheduler, prompt, params, stop_ids=service.chat_stops,
                         run_tool=service.run_tool if service.cfg.tools else None)
        return StreamingResponse(_reply_stream(service, cid, gen, n, settings, user_event),
                                 media_type="text/event-stream")


async def _reply_stream(service, cid: int, gen: Generation, n: int, settings: dict,
                        user_message: dict | None) -> AsyncIterator[str]:
    store = service.store
    if user_message is not None:
        yield _sse({"type": "user", "message": user_message})
    texts = [ChoiceText(service.tokenizer, lstrip=True) for _ in range(n)]
    try:
        async for update in gen.updates(texts):
            out = []
            for i, kind, value in update:
                if kind == "text":
                    out.append(_sse({"type": "delta", "choice": i, "text": value}))
                elif kind == "tool":
                    out.append(_sse({"type": "tool", "choice": i, **value}))
            if out:
                yield "".join(out)
        if any(t.finish is not None and t.finish.startswith("error") for t in texts):
            yield _sse({"type": "error", "message": next(t.finish for t in texts if t.finish.startswith("error"))})
        else:
            stored = [store.add_message(cid, "assistant", t.content, tool_calls=t.tool_calls,
                                        model=service.name, settings={**settings, "seed": settings["seed"] + i,
                                                                      "finish_reason": t.finish})
                      for i, t in enumerate(texts)]
            comparison = store.create_comparison(cid, stored[0]["id"], stored[1]["id"]) if n == 2 else None
            yield _sse({"type": "done", "messages": stored,
                        "comparison_id": comparison["id"] if comparison else None})
    except Exception as e:  # the stream has started: the error goes in the stream
        yield _sse({"type": "error", "message": f"{type(e).__name__}: {e}"})
    yield "data: [DONE]\n\n"
