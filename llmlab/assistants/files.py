"""A user's knowledge files as text.

Formats, by extension: .txt (UTF-8 text), .md/.markdown (Markdown, its markup stripped: headings, emphasis,
links, code fences), .jsonl (one JSON object a line; its "text" or "content" field), .pdf (the text layer,
through `pypdf`). Anything else, a file over `max_bytes`, an empty file, a file that is not what its extension
says (bytes that are not UTF-8, a broken JSON line, a corrupt PDF) and a PDF without a text layer (a scan) are
refused with an LLMLabError that names the file and what to do; nothing is read half.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from llmlab.errors import LLMLabError

FORMATS = {".txt": "text", ".md": "markdown", ".markdown": "markdown", ".jsonl": "jsonl", ".pdf": "pdf"}
MAX_BYTES = 50 * 2**20


def _markdown(text: str) -> str:
    text = re.sub(r"^```.*$", "", text, flags=re.M)  # fences (their code is kept)
    text = re.sub(r"^\s{0,3}#{1,6}\s*", "", text, flags=re.M)  # headings
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links and images: their words
    text = re.sub(r"(\*\*|__|\*|_|`)(\S(?:.*?\S)?)\1", r"\2", text)  # emphasis, inline code
    return re.sub(r"^\s*(?:[-*+]|\d+\.)\s+", "", text, flags=re.M)  # list markers


def _jsonl(path: Path, raw: str) -> str:
    texts = []
    for i, line in enumerate(raw.split("\n"), 1):  # not splitlines(): it also splits at U+2028 inside a string
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LLMLabError(f"{path}, line {i}, is not JSON ({e.msg}): fix or remove that line") from None
        text = row.get("text", row.get("content")) if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise LLMLabError(f"{path}, line {i}: each row needs a \"text\" (or \"content\") string field")
        texts.append(text)
    return "\n".join(texts)


def _pdf(path: Path) -> str:
    import pypdf  # deferred: only PDFs need it, and it is slow to import
    from pypdf.errors import PdfReadError  # deferred: as above

    try:
        reader = pypdf.PdfReader(path)
        return "\n".join(page.extract_text() or "" for page in reader.pages)
    except (PdfReadError, ValueError, KeyError, TypeError) as e:
        raise LLMLabError(f"{path} is not a readable PDF ({e}): open it and save it again, or export it as text") from None


def read_text(path: str | Path, max_bytes: int = MAX_BYTES) -> str:
    """The text of a knowledge file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise LLMLabError(f"no file at {path}")
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise LLMLabError(f"{path}: {path.suffix or 'a file without an extension'} is not a supported format; "
                          f"use one of {', '.join(FORMATS)} (convert others to text or PDF first)")
    size = path.stat().st_size
    if size > max_bytes:
        raise LLMLabError(f"{path} is {size / 2**20:.0f} MB, over the limit of {max_bytes / 2**20:.0f} MB: split it "
                          f"into smaller files")
    if size == 0:
        raise LLMLabError(f"{path} is empty")
    if kind == "pdf":
        text = _pdf(path)
    else:
        try:
            raw = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise LLMLabError(f"{path} is not UTF-8 text: save it as UTF-8 (or convert it to PDF)") from None
        text = {"text": lambda: raw, "markdown": lambda: _markdown(raw), "jsonl": lambda: _jsonl(path, raw)}[kind]()
    if not text.strip():
        raise LLMLabError(f"{path} holds no text" + (": a PDF of scanned pages has no text layer; run OCR on it first"
                                                      if kind == "pdf" else ""))
    return text
