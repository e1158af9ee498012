"""Writing an export folder all at once: built in a hidden sibling, synced to disk, then renamed into place.

A process killed mid-export never leaves half a folder at `out_dir`: the new folder appears whole by a rename
(replacing an old one is two renames; a kill between them leaves the old folder as `.NAME.old-PID`). An
existing `out_dir` is replaced only when it is empty, when it is an earlier llmlab export (it holds
`llmlab_export.json`), or when the caller passes force=True; and never when it holds the checkpoint being
exported.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from llmlab.errors import LLMLabError

MARKER = "llmlab_export.json"


def check_replaceable(out_dir: Path, force: bool, source: Path | None = None) -> None:
    """Raise LLMLabError unless writing `out_dir` is safe (see the module docstring)."""
    out = out_dir.resolve()
    if source is not None:
        src = Path(source).resolve()
        if src == out or out in src.parents:
            raise LLMLabError(f"out_dir {out_dir} contains the checkpoint being exported ({source}): "
                              f"choose another out_dir")
    if out_dir.is_file():
        raise LLMLabError(f"out_dir {out_dir} is a file: give a directory path (an export is a folder)")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MARKER).is_file() and not force:
        raise LLMLabError(f"out_dir {out_dir} is not empty and is not an earlier llmlab export: choose another "
                          f"out_dir or pass --force to replace it")


@contextmanager
def atomic_dir(out_dir: str | Path, *, force: bool, info: dict, source: str | Path | None = None) -> Iterator[Path]:
    """Yield an empty temporary directory to write into; on a clean exit, publish it as `out_dir`.

    `info` (format, source...) is saved as `llmlab_export.json` in the folder, which marks it as replaceable
    by the next export. On an exception the temporary directory is removed and `out_dir` is left untouched.
    """
    out = Path(out_dir)
    check_replaceable(out, force, Path(source) if source is not None else None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        (tmp / MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        os.sync()  # every file on disk before the folder gets its name (an export is rare: a global sync is fine)
        if out.exists():  # swap: the old folder moves aside, the new one takes its name, the old one goes
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except OSError:
                os.rename(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
        os.sync()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
