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

import re
import textwrap
from dataclasses import dataclass

from llmlab.errors import LLMLabError

__all__ = ["MAX_OUTPUT_CHARS", "TOOL_NAMES", "TRUNCATION_MARKER", "ToolResult", "run_tool", "truncate"]

TOOL_NAMES = ("calculator", "python", "search")
MAX_OUTPUT_CHARS = 2000
TRUNCATION_MARKER = "... [truncated]"


@dataclass
class ToolResult:
    """What one tool call returned."""

    text: str
    """what the engine forces into the sequence: the answer, or a line starting with "error: " """
    ok: bool
    """False when the call failed (bad input, a program that crashed or timed out, an unknown tool)"""


def truncate(text: str, limit: int = MAX_OUTPUT_CHARS) -> str:
    """`text` cut to at most `limit` characters, the marker included, when it is longer."""
    if limit < len(TRUNCATION_MARKER):
        raise ValueError(f"limit must be at least {len(TRUNCATION_MARKER)} characters (the marker), got {limit}")
    if len(text) <= limit:
        return text
    return text[: limit - len(TRUNCATION_MARKER)] + TRUNCATION_MARKER


def run_tool(call: str, *, world_dir: str | None = None) -> ToolResult:
    """Run one call, "NAME ARGS", and return its result. `world_dir` is the world that `search` reads."""
    name, *rest = re.split(r"\s", call.strip(), maxsplit=1)
    result = _dispatch(name, rest[0] if rest else "", world_dir)
    return ToolResult(truncate(result.text), result.ok)


def _dispatch(name: str, args: str, world_dir: str | None) -> ToolResult:
    # imported on use: search pulls in numpy and bm25s, and most calls never need it
    if name == "calculator":
        from llmlab.tools.calculator import calculate

        text = calculate(args.strip())
        return ToolResult(text, not text.startswith("error: "))
    if name == "python":
        from llmlab.tools.sandbox import run_python

        return run_python(textwrap.dedent(args).strip("\n"))  # a program may start on the line after the name
    if name == "search":
        from llmlab.tools.search import load_index

        if world_dir is None:
            return ToolResult("error: search has no world to read: pass world_dir (a directory written by "
                              "`llmlab world`)", ok=False)
        try:
            text = load_index(world_dir).search(args.strip())
        except LLMLabError as e:
            return ToolResult(f"error: {e}", ok=False)
        return ToolResult(text, not text.startswith("error: "))
    return ToolResult(f"error: unknown tool {name!r} (tools: {', '.join(TOOL_NAMES)})", ok=False)
