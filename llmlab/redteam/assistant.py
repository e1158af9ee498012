"""The assistant under attack: one function from conversations to replies, whatever answers them.

`Local` answers with a checkpoint through the engine (tools run, as in chat and the server); `Served` answers
through a running `llmlab serve`'s OpenAI-compatible API; either may sit behind a `PerplexityFilter`, which
answers a flagged message with the policy's refusal before the model sees it. A conversation too long for the
model's context gets None (the card counts it out, not as a miss).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Callable

from llmlab.chat import final_answer, render_prompt, reply_stop_ids
from llmlab.engine import Engine, SamplingParams, generate_with_tools
from llmlab.errors import LLMLabError
from llmlab.redteam.defenses import PerplexityFilter
from llmlab.tokenizer import Tokenizer
from llmlab.world.conversations import REFUSAL

Replies = Callable[[list[list[dict]]], list["str | None"]]


class Local:
    """Greedy replies of a checkpoint through the engine, tools run by `run_tool`."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, run_tool: Callable[[str], str] | None,
                 max_new_tokens: int = 40, batch_size: int = 32):
        self.engine, self.tok, self.run_tool = engine, tokenizer, run_tool
        self.params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
        self.batch_size, self.stop = batch_size, reply_stop_ids(tokenizer)

    def __call__(self, conversations: list[list[dict]]) -> list[str | None]:
        prompts = [render_prompt(self.tok, c) for c in conversations]
        room = self.engine.model.config.context_len - 8  # a reply needs a few tokens at least
        fits = [i for i, p in enumerate(prompts) if len(p) <= room]
        out: list[str | None] = [None] * len(prompts)
        for s in range(0, len(fits), self.batch_size):
            rows = fits[s:s + self.batch_size]
            ids, _ = generate_with_tools(self.engine, self.tok, [prompts[i] for i in rows], self.params, self.stop,
                                         self.run_tool)
            for i, reply in zip(rows, ids):
                out[i] = final_answer(self.tok, reply)
        return out


class Served:
    """Replies of a running `llmlab serve` (or any OpenAI-compatible server) at `url`, one request each."""

    def __init__(self, url: str, max_new_tokens: int = 40, model: str = "llmlab", timeout: float = 120.0):
        self.url, self.max_new_tokens, self.model, self.timeout = url.rstrip("/"), max_new_tokens, model, timeout
        try:
            with urllib.request.urlopen(f"{self.url}/v1/models", timeout=10) as r:
                models = json.load(r).get("data", [])
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise LLMLabError(f"no OpenAI-compatible server answers at {self.url} ({e}): start one with "
                              f"`llmlab serve --checkpoint runs/cpu/sft` or check --url") from None
        if models:
            self.model = models[0]["id"]

    def __call__(self, conversations: list[list[dict]]) -> list[str | None]:
        return [self._one(c) for c in conversations]

    def _one(self, messages: list[dict]) -> str | None:
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": self.max_new_tokens,
                           "temperature": 0.0}).encode()
        request = urllib.request.Request(f"{self.url}/v1/chat/completions", body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as r:
                return json.load(r)["choices"][0]["message"]["content"] or ""
        except urllib.error.HTTPError as e:
            if e.code == 400:  # the server refuses a prompt longer than its context
                return None
            raise LLMLabError(f"the server at {self.url} answered {e.code}: {e.read()[:200]!r}") from None
        except (urllib.error.URLError, OSError) as e:
            raise LLMLabError(f"the server at {self.url} stopped answering ({e})") from None


def filtered(replies: Replies, flt: PerplexityFilter) -> Replies:
    """`replies` behind the filter: a conversation whose last user message is flagged gets the refusal."""

    def answer(conversations: list[list[dict]]) -> list[str | None]:
        flags = flt.flags([c[-1]["content"] for c in conversations])
        passed = [c for c, f in zip(conversations, flags) if not f]
        it = iter(replies(passed) if passed else [])
        return [REFUSAL if f else next(it) for f in flags]

    return answer
