"""Durable file writes: what a process killed at any instant (even by SIGKILL or a power cut) leaves behind is
either the old file or the new one, never half of either.

A write goes to a temporary sibling, is fsynced, then renamed over the target (rename is atomic on POSIX), and
the directory is fsynced so that the rename itself survives a crash.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    """Make a directory's entries (files created, renamed or removed in it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_durably(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` and fsync it (not atomic: for files inside a directory that is renamed later)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data` atomically: a reader sees the old contents or the new, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write_durably(tmp, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)
