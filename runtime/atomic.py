"""Write a file so that readers (and a process killed mid-write) see the old version or the new
one, never half: a temp file in the same directory, optionally fsynced, then renamed."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def fsync(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(dest: Path, write: Callable[[str], None], *, durable: bool = False) -> None:
    """`write(tmp_path)` fills the temp file; `durable` fsyncs it before the rename."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes the file owner-only; outputs are shared with other readers
        if durable:
            fsync(tmp)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_text(dest: Path, text: str, *, durable: bool = False) -> None:
    atomic_write(dest, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), durable=durable)
