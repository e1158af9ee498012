"""Stage configs: plain dataclasses with a docstring under each field, turned into JSON and back.

Each stage module exposes `Config` (a dataclass, validated in `__post_init__`) and `main(cfg) -> dict`.
The CLI builds its flags from these dataclasses (`llmlab.cli`), so a field's docstring is its `--help`.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from functools import cache
from typing import Any, get_type_hints

from llmlab.errors import LLMLabError


def to_dict(cfg: Any) -> dict:
    """A (nested) config dataclass as a JSON-ready dict."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict) -> Any:
    """Build a config dataclass (nested ones too) from a dict; unknown keys are an error."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise LLMLabError(f"unknown {cls.__module__}.{cls.__name__} field(s) {sorted(unknown)}; known: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        typ = hints[key]
        kwargs[key] = from_dict(typ, value) if dataclasses.is_dataclass(typ) and isinstance(value, dict) else value
    return cls(**kwargs)


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (the string literal after the annotation)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs
