"""Request bodies of the API, as pydantic models: the OpenAI chat and completions requests (the fields llmlab
honours; unknown fields are accepted and ignored, as OpenAI-compatible servers do) and the web UI's requests.

Ranges that do not depend on the server's settings are checked here (a wrong type or range is a 422 naming
the field); limits set by `ServerConfig` (max_tokens, n, message counts) are checked by the app (400/413).
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str = ""


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"] = "function"
    id: str | None = None
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

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


Stop = Union[str, list[str], None]


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    seed: int | None = None
    stop: Stop = None
    stream: bool = False
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


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(SamplingFields):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream_options: StreamOptions | None = None

    def budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingFields):
    model: str
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    stream_options: StreamOptions | None = None

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
    model_config = ConfigDict(extra="ignore")
    title: str = ""
    system: str = ""


class ReplyRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    content: str | None = None
    edit_message_id: int | None = None
    regenerate: bool = False
    compare: bool = False
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)


class Rating(BaseModel):
    rating: Literal[-1, 0, 1]


class Flag(BaseModel):
    reason: str = Field(min_length=1)
    correction: str | None = None


class Choice(BaseModel):
    message_id: int
