"""Checkpoints that cannot half-exist: written aside, fsynced, checksummed, renamed, `latest` last.

Layout (the one users know): <root>/global_step_<N>/ with manifest.json (size + sha256 of every
file) and <root>/latest_checkpointed_iteration.txt. A checkpoint whose manifest does not verify
is skipped with a warning naming it; the previous one is used.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable

from tasks.atomic import atomic_text, fsync

LATEST = "latest_checkpointed_iteration.txt"
MANIFEST = "manifest.json"
log = logging.getLogger(__name__)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(ckpt: Path) -> list[Path]:
    return sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST)


def step_dir(root: Path, step: int) -> Path:
    return root / f"global_step_{step}"


def step_of(ckpt: Path) -> int:
    """global_step_<N> -> N."""
    return int(ckpt.name.rsplit("_", 1)[1])


def write(root: Path, step: int, fill: Callable[[Path], None], keep: int | None = None) -> Path:
    """`fill(tmp_dir)` writes the checkpoint's files; the rest makes it appear all at once."""
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = step_dir(root, step), root / f".global_step_{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        fill(tmp)
        files = _files(tmp)
        for f in files:
            fsync(f)
        manifest = {"global_step": step,
                    "files": {str(f.relative_to(tmp)): {"size": f.stat().st_size, "sha256": _sha256(f)}
                              for f in files}}
        atomic_text(tmp / MANIFEST, json.dumps(manifest, indent=1), durable=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"writing checkpoint global_step_{step} under {root} failed ({e}); "
                      f"the previous checkpoint ({read_latest(root)}) is intact") from e
    if final.exists():  # a re-run of the same step: the old copy goes only once the new one is whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_text(root / LATEST, str(step), durable=True)
    if keep:
        steps = sorted(step_of(p) for p in root.glob("global_step_*"))
        for old in steps[:-keep]:
            shutil.rmtree(step_dir(root, old), ignore_errors=True)
    return final


def read_latest(root: Path) -> int | None:
    try:
        return int((root / LATEST).read_text().strip())
    except (OSError, ValueError):
        return None


def verify(ckpt: Path) -> str | None:
    """None if every file of the manifest is there with its size and checksum, else why not."""
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
    except (OSError, ValueError):
        return "manifest.json missing or unreadable"
    for rel, meta in manifest["files"].items():
        f = ckpt / rel
        if not f.is_file():
            return f"{rel} missing"
        if f.stat().st_size != meta["size"]:
            return f"{rel} has {f.stat().st_size} bytes, manifest says {meta['size']}"
        if _sha256(f) != meta["sha256"]:
            return f"{rel} checksum mismatch"
    return None


def newest_valid(root: Path) -> Path | None:
    """The newest checkpoint at or below `latest` that verifies; bad ones are named in a warning."""
    latest = read_latest(root)
    if latest is None:
        return None
    steps = sorted((step_of(p) for p in root.glob("global_step_*")), reverse=True)
    for step in (s for s in steps if s <= latest):
        reason = verify(step_dir(root, step))
        if reason is None:
            return step_dir(root, step)
        log.warning("checkpoint %s is damaged (%s): skipping it", step_dir(root, step), reason)
    return None
