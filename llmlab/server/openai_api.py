"""The OpenAI-compatible routes of `llmlab serve`: models, chat completions and completions.

    GET  /v1/models                 the model served, and the custom assistants over it (by name)
    POST /v1/chat/completions       chat, streaming (SSE) or not; the engine runs the assistant's tool calls
    POST /v1/completions            raw text completion with logprobs and echo (log-likelihood evaluators)

Sampling settings a request leaves out are OpenAI's defaults (`DEFAULTS`); `top_k` and `min_tokens` are
extensions, as in vLLM. Tool calls the engine ran are reported in an extension field, `executed_tool_calls`
(OpenAI's `tool_calls` asks the client to run them; these already ran): `[{"id", "type": "function",
"function": {"name", "arguments"}, "output"}]` on the message, and one per chunk in a stream's deltas. A call
the model began and never closed (its turn ended, or its tokens ran out, inside it) ran no tool; its text is
`unfinished_tool_call` on the message (in a stream: on the delta of the finishing chunk), so that an empty
reply says why.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from llmlab.assistants.reader import Reading
from llmlab.chat import split_call
from llmlab.engine import SamplingParams
from llmlab.server import schemas
from llmlab.server.generation import ChoiceText, Generation, prompt_logprobs
from llmlab.server.http import SSE_DONE, APIError, sse
from llmlab.server.service import Service
from llmlab.tokenizer import Tokenizer

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
DEFAULTS = SamplingParams(temperature=1.0, top_k=0, top_p=1.0)
"""the API's sampling when a request sets none: OpenAI's (temperature 1, every token a candidate)"""


def sampling(body: schemas.OpenAIFields, max_new_tokens: int) -> list[SamplingParams]:
    """The SamplingParams of a request's `n` choices (choice i samples with seed + i); a 422 for a bad value."""
    return body.sampling(DEFAULTS, max_new_tokens, body.n, body.seed)


def add_routes(app: FastAPI, service: Service) -> None:
    cfg = service.cfg

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": service.model_cards()}

    @app.get("/v1/models/{model_id:path}")
    def model(model_id: str) -> dict:
        return service.model_card(service.assistant(model_id))

    @app.post(CHAT)
    async def chat_completions(body: schemas.ChatCompletionRequest, request: Request):
        assistant = service.assistant(body.model)  # a custom assistant, or None for the model itself
        name = assistant.name if assistant else service.name
        messages = [m.to_llmlab() for m in body.messages]
        adapter = 0
        if assistant is not None:
            if body.reasoning_effort is not None:
                raise APIError(400, "reasoning_effort is not available for custom assistants yet",
                               param="reasoning_effort")
            service.chat_prompt(messages)  # (the request's own messages must fit, files or not)
            adapter = await service.adapter_of(assistant)
            reading = await asyncio.wrap_future(service.scheduler.call(service.read_files(assistant, messages, adapter)))
            if reading is not None:
                return _from_files(service, body, name, reading)
            messages = service.as_assistant(assistant, messages)
        prompt = service.chat_prompt(messages)
        max_new = service.budget(body.budget(), len(prompt))
        service.check_room(body.n)
        params = sampling(body, max_new)
        if body.reasoning_effort is not None:
            return await _reasoned(service, body, messages, len(prompt), params[0].seed)
        gen = service.generate(CHAT, prompt, params, tools=True, min_new_tokens=body.min_tokens, assistant=assistant,
                               adapter=adapter)
        texts = [ChoiceText(service.tokenizer, body.stops(), lstrip=True, stop_ids=frozenset(service.stop_ids))
                 for _ in range(body.n)]
        rid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_chat_stream(service, gen, texts, rid, created, len(prompt), include_usage,
                                                  name), media_type="text/event-stream")
        await _collect(gen, texts, request)
        choices = [{"index": i, "message": _chat_message(t), "logprobs": None, "finish_reason": t.finish}
                   for i, t in enumerate(texts)]
        return {"id": rid, "object": "chat.completion", "created": created, "model": name,
                "choices": choices, "usage": _usage(len(prompt), texts)}

    @app.post(COMPLETIONS)
    async def completions(body: schemas.CompletionRequest, request: Request):
        service.check_model(body.model)
        prompts = body.prompts()
        if not prompts:
            raise APIError(400, "prompt is empty", param="prompt")
        if body.stream and (len(prompts) > 1 or body.echo):
            raise APIError(400, "streaming takes one prompt and no echo", param="stream")
        if sum(len(p) for p in prompts if isinstance(p, str)) > cfg.max_chars:
            raise APIError(413, f"the prompt is over this server's limit of {cfg.max_chars} characters",
                           param="prompt", code="too_many_characters")
        service.check_room(body.n * len(prompts))
        tok = service.tokenizer
        encoded = [_completion_ids(service, p, body.max_tokens) for p in prompts]

        def start(ids: list[int]) -> tuple[Generation, list[ChoiceText]]:
            params = sampling(body, service.budget(body.max_tokens, len(ids), default=body.max_tokens))
            gen = service.generate(COMPLETIONS, ids, params, tools=False, logprobs=body.logprobs is not None,
                                   min_new_tokens=body.min_tokens)
            return gen, texts_for()

        def texts_for() -> list[ChoiceText]:
            return [ChoiceText(tok, body.stops(), top_logprobs=body.logprobs, tool_spans=False,
                               stop_ids=frozenset(service.stop_ids)) for _ in range(body.n)]

        rid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        if body.stream:
            gen, texts = start(encoded[0])
            return StreamingResponse(_completion_stream(service, gen, texts, rid, created),
                                     media_type="text/event-stream")
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for ids, original in zip(encoded, prompts):
            prompt_tokens += len(ids)
            scored = None
            if body.echo and body.logprobs is not None:
                top = body.logprobs
                scored = await asyncio.wrap_future(
                    service.scheduler.call(lambda m, ids=ids: prompt_logprobs(m, ids, top, tok)))
            if body.max_tokens > 0:
                gen, texts = start(ids)
                await _collect(gen, texts, request)
            else:
                texts = texts_for()
                for t in texts:
                    t.finish = "length"
            for t in texts:
                completion_tokens += len(t.tokens)
                echo_text = (original if isinstance(original, str) else tok.decode(ids)) if body.echo else ""
                choices.append({"index": len(choices), "text": echo_text + t.content, "finish_reason": t.finish,
                                "logprobs": _legacy_logprobs(tok, ids, scored, t, body.echo)
                                if body.logprobs is not None else None})
        return {"id": rid, "object": "text_completion", "created": created, "model": service.name,
                "choices": choices, "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                              "total_tokens": prompt_tokens + completion_tokens}}


# ---- helpers ---------------------------------------------------------------------------------------------


def _completion_ids(service: Service, prompt: str | list[int], max_tokens: int) -> list[int]:
    """A completion prompt's ids (`<|bos|>` before text; token ids as they are), checked against the model."""
    tok = service.tokenizer
    ids = [tok.bos_id] + tok.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise APIError(400, "a prompt has no tokens", param="prompt")
    if any(not 0 <= t < tok.vocab_size for t in ids):
        raise APIError(400, f"prompt token ids must be in [0, {tok.vocab_size})", param="prompt")
    if len(ids) > service.context_len or (max_tokens > 0 and len(ids) >= service.context_len):
        raise APIError(400, f"the prompt has {len(ids)} tokens; the model's context is {service.context_len}: "
                            f"shorten it", param="prompt", code="context_length_exceeded")
    return ids


def _failure(texts: list[ChoiceText]) -> str | None:
    """The error that ended a choice, if one did (the scheduler reports "error: ..." as its finish)."""
    return next((t.finish[len("error: "):] for t in texts if t.finish and t.finish.startswith("error: ")), None)


async def _collect(gen: Generation, texts: list[ChoiceText], request: Request) -> None:
    """Run a non-streaming generation to the end; stop early when the client has gone. A choice that failed
    fails the request (500): the other requests in the batch go on."""
    count = 0
    async for _ in gen.updates(texts):
        count += 1
        if count % 16 == 0 and await request.is_disconnected():
            gen.cancel()
            return
    if (failure := _failure(texts)) is not None:
        raise APIError(500, f"generation failed: {failure}", type_="server_error")


def _executed(calls: list[dict], start: int = 0) -> list[dict]:
    out = []
    for i, c in enumerate(calls, start=start):
        name, args = split_call(c["call"])
        out.append({"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": args},
                    "output": c["result"]})
    return out


def _chat_message(text: ChoiceText) -> dict:
    message = {"role": "assistant", "content": text.content}
    if text.tool_calls:
        message["executed_tool_calls"] = _executed(text.tool_calls)
    if text.unfinished_call is not None:  # a call the model never closed: shown, not silently dropped
        message["unfinished_tool_call"] = text.unfinished_call
    return message


async def _reasoned(service: Service, body: schemas.ChatCompletionRequest, messages: list[dict], prompt_len: int,
                    seed: int):
    """A chat completion by `reasoning_effort` (llmlab.server.reasoning): thought out in the scheduler's thread,
    the answer sent whole (one content chunk when streaming), the compute reported."""
    if body.n != 1:
        raise APIError(422, "reasoning_effort answers with one choice: n must be 1", param="n", code="invalid_value")
    effort = body.reasoning_effort
    a, strategy, budget = await asyncio.wrap_future(
        service.scheduler.call(lambda model: service.reasoner.answer(model, messages, effort, seed)))
    completion = len(service.tokenizer.encode(a.text))
    usage = {"prompt_tokens": prompt_len, "completion_tokens": completion, "total_tokens": prompt_len + completion,
             "completion_tokens_details": {"reasoning_tokens": a.compute.generated}}
    reasoning = {"effort": effort, "strategy": strategy, "budget": budget, "generated_tokens": a.compute.generated,
                 "processed_tokens": a.compute.processed, "flops": a.compute.flops(service.model.num_params(), 0),
                 "candidates": [{"text": t, "score": score} for t, score in a.candidates[:8]]}
    return _whole(body, service.name, a.text, usage, reasoning=reasoning)


def _from_files(service: Service, body: schemas.ChatCompletionRequest, name: str, reading: Reading):
    """A custom assistant's answer read from its files (Service.read_files): every choice is that answer,
    sent whole (one content chunk when streaming); `citations` names the passage."""
    completion = len(service.tokenizer.encode(reading.answer)) * body.n
    usage = {"prompt_tokens": reading.prompt_tokens, "completion_tokens": completion,
             "total_tokens": reading.prompt_tokens + completion}
    return _whole(body, name, reading.answer, usage, n=body.n, citations=[reading.citation])


def _whole(body: schemas.ChatCompletionRequest, name: str, text: str, usage: dict, n: int = 1, **extra):
    """A chat completion whose answer is known whole (thought out, or read from files): the response, `extra`
    fields beside the choices; streamed, a first chunk carrying `extra`, the answer in one content chunk, the
    stop."""
    head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": name}
    if not body.stream:
        return {**head, "object": "chat.completion", "usage": usage, **extra,
                "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": "stop"} for i in range(n)]}

    async def chunks() -> AsyncIterator[str]:
        def chunk(delta: dict, finish: str | None = None, **fields) -> str:
            return sse({**head, "object": "chat.completion.chunk", **fields, "choices": [
                {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish} for i in range(n)]})

        yield chunk({"role": "assistant", "content": ""}, **extra)
        yield chunk({"content": text})
        yield chunk({}, "stop")
        if body.stream_options and body.stream_options.include_usage:
            yield sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage})
        yield SSE_DONE

    return StreamingResponse(chunks(), media_type="text/event-stream")


def _usage(prompt_len: int, texts: list[ChoiceText]) -> dict:
    completion = sum(len(t.tokens) for t in texts)
    return {"prompt_tokens": prompt_len, "completion_tokens": completion, "total_tokens": prompt_len + completion}


def _error_chunk(reason: str) -> str:
    return sse({"error": {"message": f"generation failed: {reason[len('error: '):]}", "type": "server_error",
                          "param": None, "code": None}})


async def _chat_stream(service: Service, gen: Generation, texts: list[ChoiceText], rid: str, created: int,
                       prompt_len: int, include_usage: bool, name: str) -> AsyncIterator[str]:
    def chunk(i: int, delta: dict, finish: str | None = None) -> str:
        return sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                    "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}]})

    yield "".join(chunk(i, {"role": "assistant", "content": ""}) for i in range(len(texts)))
    tools_seen = [0] * len(texts)
    async for update in gen.updates(texts):
        out = []
        for i, kind, value in update:
            if kind == "text":
                out.append(chunk(i, {"content": value}))
            elif kind == "tool":
                out.append(chunk(i, {"executed_tool_calls": _executed([value], start=tools_seen[i])}))
                tools_seen[i] += 1
            elif value.startswith("error: "):
                yield "".join(out) + _error_chunk(value)
                return
            else:
                unfinished = texts[i].unfinished_call
                out.append(chunk(i, {} if unfinished is None else {"unfinished_tool_call": unfinished}, value))
        if out:
            yield "".join(out)
    if include_usage:
        yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                   "choices": [], "usage": _usage(prompt_len, texts)})
    yield SSE_DONE


async def _completion_stream(service: Service, gen: Generation, texts: list[ChoiceText], rid: str,
                             created: int) -> AsyncIterator[str]:
    def chunk(i: int, text: str, finish: str | None = None) -> str:
        return sse({"id": rid, "object": "text_completion", "created": created, "model": service.name,
                    "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": finish}]})

    async for update in gen.updates(texts):
        out = []
        for i, kind, value in update:
            if kind == "text":
                out.append(chunk(i, value))
            elif kind == "finish":
                if value.startswith("error: "):
                    yield "".join(out) + _error_chunk(value)
                    return
                out.append(chunk(i, "", value))
        if out:
            yield "".join(out)
    yield SSE_DONE


def _legacy_logprobs(tok: Tokenizer, ids: list[int], scored, text: ChoiceText, echo: bool) -> dict:
    """OpenAI's completions `logprobs` object: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, token_lps, tops = [], [], []
    if echo:
        for pos, t in enumerate(ids):
            tokens.append(tok.token_text(t))
            s = scored[pos] if scored is not None else None
            token_lps.append(None if s is None else s.logprob)
            tops.append(None if s is None else s.top)
    for lp in text.logprobs[: len(text.tokens)]:
        tokens.append(lp.token)
        token_lps.append(lp.logprob)
        tops.append(lp.top)
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}
