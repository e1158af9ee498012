"""What a tool call returns, and the cut that keeps any result from flooding the model's context.

Its own module so that the tools (sandbox, search) and the package that dispatches to them can all import it
without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

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
