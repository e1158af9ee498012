"""The assistant's tools: a calculator, a sandboxed Python, and search over the world's encyclopedia.

The model calls a tool by writing `<|tool_start|>NAME ARGS<|tool_end|>`; the engine passes the text between
the two tokens to `run_tool` and forces the result in as `<|output_start|>RESULT<|output_end|>`.

A tool never raises on what the model wrote: a bad call is an answer too ("error: ..."), one the model can
read and correct. Every result is cut to `MAX_OUTPUT_CHARS` so that no call can flood the context.

    calculator 123456*789          exact arithmetic (llmlab.tools.calculator)
    python print(sum(range(10)))   a program run in a sandboxed child process (llmlab.tools.sandbox)
    search Zorbaton                BM25 over the world's encyclopedia entries (llmlab.tools.search)
"""

from __future__ import annotations

import textwrap
from typing import Callable

from llmlab.chat import split_call
from llmlab.errors import LLMLabError
from llmlab.tools.calculator import calculate
from llmlab.tools.result import MAX_OUTPUT_CHARS, TRUNCATION_MARKER, ToolResult, truncate
from llmlab.tools.sandbox import run_python
from llmlab.tools.search import load_index

__all__ = ["MAX_OUTPUT_CHARS", "TOOL_NAMES", "TRUNCATION_MARKER", "ToolResult", "run_tool", "tool_runner", "truncate"]

TOOL_NAMES = ("calculator", "python", "search")


def run_tool(call: str, *, world_dir: str | None = None) -> ToolResult:
    """Run one call, "NAME ARGS", and return its result. `world_dir` is the world that `search` reads."""
    name, args = split_call(call)
    result = _dispatch(name, args, world_dir)
    return ToolResult(truncate(result.text), result.ok)


def tool_runner(world_dir: str | None) -> Callable[[str], str]:
    """`run_tool` over one world as the engine takes it: call text in, result text out."""
    return lambda call: run_tool(call, world_dir=world_dir).text


def _dispatch(name: str, args: str, world_dir: str | None) -> ToolResult:
    if name == "calculator":
        text = calculate(args.strip())
        return ToolResult(text, not text.startswith("error: "))
    if name == "python":
        return run_python(textwrap.dedent(args).strip("\n"))  # a program may start on the line after the name
    if name == "search":
        if world_dir is None:
            return ToolResult("error: search has no world to read: pass world_dir (a directory written by "
                              "`llmlab world`)", ok=False)
        try:
            text = load_index(world_dir).search(args.strip())
        except LLMLabError as e:
            return ToolResult(f"error: {e}", ok=False)
        return ToolResult(text, not text.startswith("error: "))
    return ToolResult(f"error: unknown tool {name!r} (tools: {', '.join(TOOL_NAMES)})", ok=False)
