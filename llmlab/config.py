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
from typing import Any


def to_dict(cfg: Any) -> dict:
    """A (nested) config dataclass as a JSON-ready dict."""
    return dataclasses.asdict(cfg)


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (the string literal after the annotation), the
    fields it inherits included."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
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
