"""Request bodies of the API, as pydantic models: the OpenAI chat and completions requests (the fields llmlab
honours; unknown fields are accepted and ignored, as OpenAI-compatible servers do) and the web UI's requests.

A wrong type or a value out of range is a 422 naming the field: ranges of sampling settings are those of
`llmlab.engine.SamplingParams` (checked when `SamplingFields.sampling` builds them), the others are checked
here. Limits set by `ServerConfig` (max_tokens, n, message counts) are checked by the routes (400/413). The
docstring under each field is its description in the OpenAPI schema (/docs).

Every string is `Text`: valid Unicode. JSON can carry a lone surrogate (`"\\ud800"`), which Python decodes into
a str that no UTF-8 encoder (the tokenizer, SQLite, the response) accepts: it is refused here, as a 422.
Ids of stored things are `StoreId`: SQLite integers, below 2**63 (a larger one would overflow SQLite).
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import Annotated, Literal, Union

import annotated_types
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from llmlab.engine import SEED_LIMIT, InvalidSampling, SamplingParams
from llmlab.server.http import APIError

_CONFIG = ConfigDict(extra="ignore", use_attribute_docstrings=True, allow_inf_nan=False)


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"the text is not valid Unicode: a lone surrogate (U+{ord(text[e.start]):04X}) at "
                         f"character {e.start}; send UTF-8 text") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]
"""a string of valid Unicode (no lone surrogate)"""
StoreId = Annotated[int, annotated_types.Ge(1), annotated_types.Lt(2**63)]
"""the id of a conversation, message or comparison in the feedback store (a path parameter or a field)"""


class TextPart(BaseModel):
    model_config = _CONFIG
    type: Literal["text"]
    text: Text


class FunctionCall(BaseModel):
    model_config = _CONFIG
    name: Text
    """the tool's name, e.g. calculator"""
    arguments: Text = ""
    """the call's arguments as one string, e.g. 123456*789"""


class ToolCall(BaseModel):
    model_config = _CONFIG
    type: Literal["function"] = "function"
    id: Text | None = None
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = _CONFIG
    role: Literal["system", "developer", "user", "assistant", "tool"]
    """who speaks ("developer" is OpenAI's newer name for "system")"""
    content: Union[Text, list[TextPart], None] = None
    """the text, or a list of text parts (joined); null for an assistant message that only calls tools"""
    tool_calls: list[ToolCall] | None = None
    """an assistant message's calls, each answered by one tool message after it"""
    tool_call_id: Text | None = None
    """accepted and ignored: a tool message answers the calls in order"""

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def to_llmlab(self) -> dict:
        """The message in llmlab's format (llmlab.chat): "developer" is OpenAI's newer name for "system"."""
        message = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [{"type": "function", "function": {"name": c.function.name,
                                                                        "arguments": c.function.arguments}}
                                     for c in self.tool_calls]
        return message


Stop = Union[Text, list[Text], None]


class StreamOptions(BaseModel):
    model_config = _CONFIG
    include_usage: bool = False
    """end the stream with a chunk that carries the token counts"""


class SamplingFields(BaseModel):
    """The sampling settings a request may set (llmlab.engine.SamplingParams). A field left out takes the
    default of the surface: OpenAI's in the API (`llmlab.server.openai_api.DEFAULTS`), the web UI's in its
    replies (`llmlab.server.ui_api.DEFAULTS`)."""

    model_config = _CONFIG
    temperature: float | None = Field(None, le=2.0)
    """softmax temperature, 0 to 2 as in OpenAI's API; 0 is greedy decoding"""
    top_p: float | None = None
    """nucleus sampling: sample among the most likely tokens whose probabilities first reach top_p, in (0, 1]"""
    top_k: int | None = None
    """an extension (as in vLLM): sample among the k most likely tokens only (0 = all tokens)"""

    def sampling(self, defaults: SamplingParams, max_new_tokens: int, n: int,
                 seed: int | None) -> list[SamplingParams]:
        """One SamplingParams per choice: the fields this request sets over the surface's `defaults`. Choice i
        samples with seed + i (a fresh random seed when `seed` is None). An APIError 422 naming the field for a
        value out of range."""
        if seed is None:
            seed = secrets.randbelow(2**31)
        if seed + n - 1 >= SEED_LIMIT:
            raise APIError(422, f"seed: choice i samples with seed + i, which must stay below 2**63: seed {seed} "
                                f"with n={n} is too large", param="seed", code="invalid_value")
        given = {k: v for k in ("temperature", "top_p", "top_k") if (v := getattr(self, k)) is not None}
        try:
            return [dataclasses.replace(defaults, **given, max_new_tokens=max_new_tokens, seed=seed + i)
                    for i in range(n)]
        except InvalidSampling as e:
            raise APIError(422, str(e), param=e.field, code="invalid_value") from None


class OpenAIFields(SamplingFields):
    """What the chat and the completions requests of OpenAI's API share."""

    model: Text
    """the model's id, as /v1/models lists it"""
    seed: int | None = None
    """seed of the sampling, in [0, 2**63): the same request with the same seed gives the same answer; choice i
    samples with seed + i (default: a random seed)"""
    n: int = Field(1, ge=1)
    """how many choices to generate"""
    stop: Stop = None
    """up to 4 sequences: the text ends before the first of them"""
    stream: bool = False
    """send the answer as server-sent events while it is generated"""
    stream_options: StreamOptions | None = None
    """with stream: what else the stream carries"""
    min_tokens: int = Field(0, ge=0)
    """an extension (as in vLLM): the end token is masked until this many tokens are generated"""

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: Stop) -> Stop:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return v

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatCompletionRequest(OpenAIFields):
    messages: list[ChatMessage] = Field(min_length=1)
    """the conversation so far, ending with a user message (or a tool message: the turn goes on)"""
    max_tokens: int | None = Field(None, ge=1)
    """most tokens in the answer (default: the server's default_max_tokens; always cut to the context)"""
    max_completion_tokens: int | None = Field(None, ge=1)
    """OpenAI's newer name for max_tokens; wins when both are given"""
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    """think before answering (llmlab.server.reasoning): low, medium, high = a budget of 4, 16, 64 samples (or
    recall probes, at most 12, for a question about a person); n must be 1"""

    def budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(OpenAIFields):
    prompt: Union[Text, list[Text], list[int], list[list[int]]]
    """text to complete (a `<|bos|>` is put before it), token ids (as they are), or a list of either"""
    max_tokens: int = Field(16, ge=0)
    """most tokens per completion; 0 scores the prompt only (with echo and logprobs)"""
    logprobs: int | None = Field(None, ge=0, le=5)
    """return each token's log-probability and those of the `logprobs` most likely tokens"""
    echo: bool = False
    """put the prompt before the completion (with logprobs: the prompt's tokens are scored too)"""

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts, each text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            return []
        if isinstance(p[0], int):
            return [list(p)]
        return list(p)


# ---- the web UI's requests ---------------------------------------------------------------------------------


class NewConversation(BaseModel):
    model_config = _CONFIG
    title: Text = ""
    """shown in the list of conversations"""
    system: Text = ""
    """the conversation's system prompt ("" for none)"""


class ReplyRequest(SamplingFields):
    content: Text | None = None
    """the user's new message (or, with edit_message_id, the new text of that message)"""
    edit_message_id: StoreId | None = None
    """replace this user message with `content` and answer again from there"""
    regenerate: bool = False
    """answer the last user message again, in place of the last answer"""
    compare: bool = False
    """two answers side by side, sampled with different seeds; the user picks one"""
    max_tokens: int | None = Field(None, ge=1)
    """most tokens per answer (default: the server's default_max_tokens)"""
    assistant: Text = ""
    """the custom assistant that answers (`llmlab assistant`; "" = the model itself): recorded as each answer's
    model"""


class AssistantFile(BaseModel):
    model_config = _CONFIG
    name: Text = Field(min_length=1)
    """the file's name (its extension says its format: .txt, .md, .jsonl, .pdf)"""
    content: str
    """its bytes, base64-encoded"""


class NewAssistant(BaseModel):
    model_config = _CONFIG
    name: Text
    """lowercase letters, digits, '-' and '_'"""
    instructions: Text = ""
    tools: list[Text] = []
    """of calculator, search, python"""
    files: list[AssistantFile] = []


class Rating(BaseModel):
    model_config = _CONFIG
    rating: Literal[-1, 0, 1]
    """-1 bad, 0 no rating, +1 good"""


class Flag(BaseModel):
    model_config = _CONFIG
    reason: Text = Field(min_length=1)
    """what is wrong with the answer"""
    correction: Text | None = None
    """the answer it should have given (optional)"""


class Choice(BaseModel):
    model_config = _CONFIG
    message_id: StoreId
    """the preferred answer of the comparison"""
