"""The conversation format: OpenAI-style messages -> token ids and a loss mask, and back.

A conversation is a list of messages, the JSON of the OpenAI chat API:

    {"role": "system" | "user" | "assistant" | "tool", "content": str}

and an assistant message may carry calls, each answered by one tool message that follows it, in order:

    "tool_calls": [{"type": "function", "function": {"name": "calculator", "arguments": "123456*789"}}]

Rendering works on ids, never on strings that contain special tokens: content is encoded on its own (special-token
text typed by a user stays plain text) and the structure is made of special ids. The conversation

    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "What is 123456*789?"},
     {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
         "function": {"name": "calculator", "arguments": "123456*789"}}]},
     {"role": "tool", "content": "97406784"},
     {"role": "assistant", "content": "123456*789 = 97406784."}]

renders as (trained tokens, loss mask 1, between [ ]):

    <|bos|><|system_start|>Be brief.<|system_end|><|user_start|>What is 123456*789?<|user_end|>
    <|assistant_start|>[<|tool_start|>calculator 123456*789<|tool_end|>]<|output_start|>97406784<|output_end|>
    [123456*789 = 97406784.<|assistant_end|>]

An assistant *turn* is the run of assistant and tool messages between two user messages: one
`<|assistant_start|>`, then each assistant message's content and its calls, each call followed at once by the
output of the tool message that answers it, then `<|assistant_end|>` when a user message follows or the
conversation ends with an assistant message. Outputs come right after their call because that is what the engine
produces (it forces the output as soon as `<|tool_end|>` is sampled), so training and generation see one format.
A conversation that ends with a tool message leaves its turn open: the model continues after the output.

Trained (mask 1): what the assistant writes, i.e. its content, its calls (`<|tool_start|>`, name, one space,
arguments, `<|tool_end|>`) and `<|assistant_end|>` (so that it learns to stop; `<|pad|>` is never an end
token and never appears here). Masked (0): `<|bos|>`, system and user messages, `<|assistant_start|>` (the
prompt supplies it) and every `<|output_start|>...<|output_end|>` span (the engine forces tool outputs).

Generation reads the format back: it stops at `reply_stop_ids`; `ToolSpans` tells, token by token, the
assistant's words from its calls and their outputs (what the server streams); `final_answer` is the text after
the last tool output (what is scored and remembered); `parse_turn` turns a generated turn into messages.

`CHAT_TEMPLATE` renders the same conversation as text for Hugging Face `transformers`; `write_tokenizer_config`
puts it into a checkpoint folder next to `tokenizer.json`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from llmlab.errors import LLMLabError
from llmlab.tokenizer import SPECIAL_TOKENS, Tokenizer

ROLES = ("system", "user", "assistant", "tool")

# Jinja for `transformers` (`tokenizer.apply_chat_template`). Tool outputs are read from the tool messages that
# follow the assistant message (messages[i + k]), so outputs sit right after their calls, as in render_conversation.
# One difference by design: `transformers` recognises special-token text in the rendered string (its default,
# split_special_tokens=False), so a user typing "<|assistant_end|>" gets the special id there, while llmlab's
# renderer keeps it plain text. Content without special-token text gives identical ids (tests/test_chat_format.py).
CHAT_TEMPLATE = (
    "{{- '<|bos|>' -}}"
    "{%- for message in messages -%}"
    "{%- set i = loop.index0 -%}"
    "{%- if message.role == 'system' -%}"
    "{{- '<|system_start|>' + message.content + '<|system_end|>' -}}"
    "{%- elif message.role == 'user' -%}"
    "{{- '<|user_start|>' + message.content + '<|user_end|>' -}}"
    "{%- elif message.role == 'assistant' -%}"
    "{%- if i > 0 and messages[i - 1].role == 'user' -%}{{- '<|assistant_start|>' -}}{%- endif -%}"
    "{%- if message.content -%}{{- message.content -}}{%- endif -%}"
    "{%- for call in message.tool_calls or [] -%}"
    "{{- '<|tool_start|>' + call.function.name -}}"
    "{%- if call.function.arguments -%}{{- ' ' + call.function.arguments -}}{%- endif -%}"
    "{{- '<|tool_end|><|output_start|>' + messages[i + loop.index].content + '<|output_end|>' -}}"
    "{%- endfor -%}"
    "{%- elif message.role != 'tool' -%}"
    "{{- raise_exception('unknown role ' + message.role + ': use system, user, assistant or tool') -}}"
    "{%- endif -%}"
    "{%- if (loop.last and message.role == 'assistant')"
    " or (not loop.last and message.role in ['assistant', 'tool'] and messages[i + 1].role == 'user') -%}"
    "{{- '<|assistant_end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt and messages[-1].role == 'assistant' -%}"
    "{{- raise_exception('the conversation ends with an assistant message: nothing to generate') -}}"
    "{%- elif add_generation_prompt and messages[-1].role == 'user' -%}"
    "{{- '<|assistant_start|>' -}}"
    "{%- endif -%}"
)


# ---------------------------------------------------------------------------------------------------- validation


def _tool_calls(message: dict, where: str) -> list[tuple[str, str]]:
    """(name, arguments) of a message's tool calls, checked."""
    calls = message.get("tool_calls") or []
    if calls and message["role"] != "assistant":
        raise LLMLabError(f"{where}: only assistant messages carry tool_calls: move the calls to an assistant message")
    if not isinstance(calls, list):
        raise LLMLabError(f"{where}: tool_calls must be a list of {{'type': 'function', 'function': {{...}}}}")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or call.get("type", "function") != "function":
            raise LLMLabError(f"{where}, tool call {j}: expected {{'type': 'function', 'function': "
                              f"{{'name': ..., 'arguments': ...}}}}, got {call!r}")
        name, args = fn.get("name"), fn.get("arguments", "")
        if not isinstance(name, str) or not name or any(ch.isspace() for ch in name):
            raise LLMLabError(f"{where}, tool call {j}: the name must be a non-empty string without spaces "
                              f"(e.g. 'calculator'), got {name!r}")
        if not isinstance(args, str):
            raise LLMLabError(f"{where}, tool call {j}: arguments must be a string (e.g. '123456*789'), "
                              f"got {type(args).__name__}: pass json.dumps(arguments) for structured ones")
        out.append((name, args))
    return out


def _content(message: dict, where: str, has_calls: bool) -> str:
    content = message.get("content")
    if content is None and has_calls:  # OpenAI sends null content with tool calls
        return ""
    if not isinstance(content, str):
        raise LLMLabError(f"{where}: content must be a string, got {type(content).__name__}: "
                          f"join text parts into one string")
    if not content and not has_calls and message["role"] != "tool":  # a tool may legitimately print nothing
        raise LLMLabError(f"{where}: empty content: give the message some text or drop it "
                          f"(only an assistant message with tool_calls, or a tool's output, may be empty)")
    return content


def validate(messages: list[dict]) -> None:
    """Raise LLMLabError naming the first malformed message and the fix; see the module docstring for the rules."""
    if not isinstance(messages, list):
        raise LLMLabError(f"a conversation is a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    if not messages:
        raise LLMLabError("the conversation has no messages: pass a non-empty list of {'role', 'content'} dicts")
    prev, owed = None, 0  # owed: tool messages still due to the last assistant message's calls
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise LLMLabError(f"message {i}: expected a dict {{'role': ..., 'content': ...}}, "
                              f"got {type(message).__name__}")
        role = message.get("role")
        where = f"message {i} ({role})"
        if role not in ROLES:
            raise LLMLabError(f"message {i}: unknown role {role!r}: use one of {', '.join(ROLES)}")
        calls = _tool_calls(message, where)
        _content(message, where, bool(calls))
        if role == "system" and i != 0:
            raise LLMLabError(f"{where}: a system message may only come first: move it to the start or merge it "
                              f"into the first one")
        if prev in (None, "system") and role != "user" and role != "system":
            raise LLMLabError(f"{where}: the conversation must start with a user message (after an optional "
                              f"system message)")
        if role == "tool":
            if owed == 0:
                raise LLMLabError(f"{where}: a tool message must answer a tool call: put it right after the "
                                  f"assistant message whose tool_calls it answers, one tool message per call")
            owed -= 1
        elif owed:
            raise LLMLabError(f"{where}: the assistant message before it has {owed} unanswered tool call(s): "
                              f"add one tool message per call right after it")
        elif role == "user" and prev == "user":
            raise LLMLabError(f"{where}: two user messages in a row: merge them or put an assistant reply between")
        elif role == "assistant" and prev == "assistant":
            raise LLMLabError(f"{where}: two assistant messages in a row: merge them into one")
        if role == "assistant":
            owed = len(calls)
        prev = role
    if prev == "system":
        raise LLMLabError("the conversation has only a system message: add a user message after it")
    if owed:
        raise LLMLabError(f"message {len(messages) - 1} (assistant): its {owed} tool call(s) have no tool message: "
                          f"add one tool message per call (their outputs) or drop the calls")


# ----------------------------------------------------------------------------------------------------- rendering


def _closes_turn(messages: list[dict], i: int) -> bool:
    """Whether `<|assistant_end|>` follows message i: an assistant turn ends before a user message or at the end."""
    role = messages[i]["role"]
    if i == len(messages) - 1:
        return role == "assistant"
    return role in ("assistant", "tool") and messages[i + 1]["role"] == "user"


def _render(tok: Tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """ids and loss mask of a validated conversation."""
    sp = tok.special_id
    ids: list[int] = []
    mask: list[int] = []

    def add(tokens: list[int], trained: bool) -> None:
        ids.extend(tokens)
        mask.extend([int(trained)] * len(tokens))

    add([tok.bos_id], False)
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "system":
            add([sp("<|system_start|>"), *tok.encode(message["content"]), sp("<|system_end|>")], False)
        elif role == "user":
            add([sp("<|user_start|>"), *tok.encode(message["content"]), sp("<|user_end|>")], False)
        elif role == "assistant":
            if messages[i - 1]["role"] == "user":
                add([sp("<|assistant_start|>")], False)
            add(tok.encode(message.get("content") or ""), True)
            calls = _tool_calls(message, f"message {i}")
            for k, (name, args) in enumerate(calls, start=1):
                call = f"{name} {args}" if args else name
                add([sp("<|tool_start|>"), *tok.encode(call), sp("<|tool_end|>")], True)
                add([sp("<|output_start|>"), *tok.encode(messages[i + k]["content"]), sp("<|output_end|>")], False)
        # a tool message was rendered right after the call it answers
        if _closes_turn(messages, i):
            add([sp("<|assistant_end|>")], True)
    return ids, mask


def render_conversation(tokenizer: Tokenizer, messages: list[dict],
                        max_len: int | None = None) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of a conversation; loss_mask[t] = 1 where token t is the assistant's to predict.

    Raises LLMLabError for a malformed conversation, or one longer than max_len tokens (message says "too long")."""
    validate(messages)
    ids, mask = _render(tokenizer, messages)
    if max_len is not None and len(ids) > max_len:
        raise LLMLabError(f"the conversation is too long: {len(ids)} tokens, the limit is {max_len}: "
                          f"shorten it or raise the context length")
    return ids, mask


def render_prompt(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    """The ids to generate from: a conversation ending with a user message, then `<|assistant_start|>`; or one
    ending with a tool message, whose turn is still open (the model continues after the tool's output)."""
    validate(messages)
    last = messages[-1]["role"]
    if last not in ("user", "tool"):
        raise LLMLabError(f"a prompt must end with a user or tool message, not {last}: add the user's next "
                          f"message (the assistant has already answered)")
    ids, _ = _render(tokenizer, messages)
    if last == "user":
        ids.append(tokenizer.special_id("<|assistant_start|>"))
    return ids


# ------------------------------------------------------------------------------------------------------- parsing


def fit_context(tokenizer: Tokenizer, messages: list[dict], context_len: int, room: int,
                system: list[dict] = ()) -> tuple[list[dict], int]:
    """(messages, exchanges dropped): the conversation without as few of its oldest exchanges (a user message
    and what follows it) as leave `room` tokens of the context after `system` + messages; the last user message
    always stays."""
    dropped = 0
    while len(messages) > 1 and len(render_prompt(tokenizer, [*system, *messages])) + room > context_len:
        first_reply = next(i for i, m in enumerate(messages) if i > 0 and m["role"] == "user")
        messages, dropped = messages[first_reply:], dropped + 1
    return messages, dropped


def split_call(call: str) -> tuple[str, str]:
    """A tool call's text, "NAME ARGS", as (name, arguments): the name ends at the first whitespace of any kind
    (`python` is often followed by a newline and the program)."""
    name, *rest = re.split(r"\s", call.strip(), maxsplit=1)
    return name, rest[0] if rest else ""


def reply_stop_ids(tokenizer: Tokenizer) -> list[int]:
    """The tokens generation stops at: `<|assistant_end|>` (the assistant's turn is over; the eos of exports) and
    `<|bos|>` (a new document: how a base model ends a text)."""
    return [tokenizer.special_id("<|assistant_end|>"), tokenizer.bos_id]


class ToolSpans:
    """Reads the tool spans of a generated assistant turn, one token at a time.

    `push(token)` says what the token is: "text" (the assistant's own words); "call" or "output" (inside
    `<|tool_start|>...<|tool_end|>`, a call the assistant writes, or `<|output_start|>...<|output_end|>`, the
    result the engine forced in); one of the marks "call_start", "call_end", "output_start", "output_end"; or
    "special" (any other special token, or a mark out of place: nothing an assistant turn holds there).
    `call` and `output` hold the tokens of the current (or last) call and output; at each "output_end",
    `calls` gains `{"call": "calculator 2*3", "result": "6"}`.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        sp = tokenizer.special_id
        self._marks = {sp("<|tool_start|>"): "call_start", sp("<|tool_end|>"): "call_end",
                       sp("<|output_start|>"): "output_start", sp("<|output_end|>"): "output_end"}
        self.span: str | None = None  # "call" or "output" while inside one
        self.call: list[int] = []
        self.output: list[int] = []
        self.calls: list[dict] = []

    def push(self, token: int) -> str:
        mark = self._marks.get(token)
        if mark == "call_start":
            self.span, self.call, self.output = "call", [], []
        elif mark == "output_start":  # the output of the call just written: `call` stays
            self.span, self.output = "output", []
        elif (mark, self.span) in (("call_end", "call"), ("output_end", "output")):
            self.span = None
            if mark == "output_end":
                self.calls.append({"call": self.tokenizer.decode(self.call).strip(),
                                   "result": self.tokenizer.decode(self.output)})
        elif token < len(SPECIAL_TOKENS):
            return "special"
        elif self.span is not None:
            (self.call if self.span == "call" else self.output).append(token)
            return self.span
        else:
            return "text"
        return mark


def final_answer(tokenizer: Tokenizer, ids: list[int]) -> str:
    """What the assistant finally says in generated ids (its turn, without the stop token): the text after its
    last tool output, special tokens left out. Scores and remembered replies read this, never a tool's output."""
    out_end = tokenizer.special_id("<|output_end|>")
    last = max((i for i, t in enumerate(ids) if t == out_end), default=-1)
    return tokenizer.decode([t for t in ids[last + 1:] if t >= len(SPECIAL_TOKENS)])


def _read_turn(tokenizer: Tokenizer, ids: list[int]) -> list[dict]:
    """The assistant message before each tool output (possibly empty) and the tool message of the output, then
    the assistant message after the last output. Reading stops at `<|assistant_end|>`; a special token that has
    no place in an assistant turn ends the assistant's message (until the next output)."""
    stop = tokenizer.special_id("<|assistant_end|>")
    spans = ToolSpans(tokenizer)
    messages: list[dict] = []
    words: list[int] = []
    calls: list[dict] = []
    reading = True

    def assistant() -> dict:
        message = {"role": "assistant", "content": tokenizer.decode(words)}
        if calls:
            message["tool_calls"] = calls
        return message

    for t in ids:
        if t == stop:
            break
        kind = spans.push(t)
        if kind == "output_start":
            messages.append(assistant())
            words, calls, reading = [], [], True
        elif kind == "output_end":
            messages.append({"role": "tool", "content": tokenizer.decode(spans.output)})
        elif not reading:
            continue
        elif kind == "text":
            words.append(t)
        elif kind == "call_end":
            name, args = split_call(tokenizer.decode(spans.call))
            calls.append({"type": "function", "function": {"name": name, "arguments": args}})
        elif kind == "special":
            reading = False
    if spans.span == "output":  # cut short inside an output
        messages.append({"role": "tool", "content": tokenizer.decode(spans.output)})
    else:
        messages.append(assistant())
    return messages


def parse_assistant(tokenizer: Tokenizer, ids: list[int]) -> dict:
    """The assistant message written by generated ids (the tokens after `<|assistant_start|>`, no tool outputs):
    {"role": "assistant", "content": text, "tool_calls": [...]}. Content is the text outside calls; a call is
    split into name and arguments at its first space; an unfinished call (generation cut short) is dropped.
    Reading stops at `<|assistant_end|>` or any token that cannot occur in an assistant turn."""
    if tokenizer.special_id("<|output_start|>") in ids:
        raise LLMLabError("these ids hold tool outputs: use parse_turn, which splits them into assistant and "
                          "tool messages")
    return _read_turn(tokenizer, ids)[0]


def parse_turn(tokenizer: Tokenizer, ids: list[int]) -> list[dict]:
    """The messages of a generated turn whose tool outputs the engine forced in: assistant and tool messages, so
    that `render_prompt(prompt) + ids` and `render_conversation(prompt + parse_turn(ids))` agree (canonical
    tokenization assumed). Reading stops at `<|assistant_end|>`."""
    return [m for m in _read_turn(tokenizer, ids) if m["role"] == "tool" or m["content"] or m.get("tool_calls")]


# --------------------------------------------------------------------------------------------- Hugging Face files


def write_tokenizer_config(out_dir: str | Path, model_max_length: int | None = None) -> Path:
    """Write out_dir/tokenizer_config.json for `transformers.AutoTokenizer.from_pretrained(out_dir)` (next to
    tokenizer.json, which holds the vocabulary and the special tokens) atomically. eos is `<|assistant_end|>`,
    the token generation stops at; pad is `<|pad|>`, never an end token."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>",
        "eos_token": "<|assistant_end|>",
        "pad_token": "<|pad|>",
        "clean_up_tokenization_spaces": False,  # decode exactly, as llmlab does
        "chat_template": CHAT_TEMPLATE,
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / "tokenizer_config.json"
    tmp = out_dir / f".tokenizer_config.json.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final
