"""The files a trainer checkpoint is made of: DCP shards (whose names each rank records, so that
it can checksum what it wrote) and HF safetensors written as a stream."""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Iterable

import torch
from torch.distributed.checkpoint import FileSystemWriter


class RecordingWriter(FileSystemWriter):
    """torch.distributed.checkpoint's file writer (it fsyncs its files) that keeps the names of the
    files this rank wrote, relative to the checkpoint dir, in `written` (rank 0's .metadata is
    written later, in finish(), and is not among them)."""

    written: list[str] = []

    def write_data(self, plan, planner):
        fut = super().write_data(plan, planner)
        self.written = sorted({r.storage_data.relative_path for r in fut.wait()})
        return fut


def write_safetensors(out: Path, tensors: Iterable[tuple[str, torch.Tensor]], write: bool,
                      shard_bytes: int) -> None:
    """Stream tensors to model.safetensors, or to shard_bytes-sized files + the HF index: host
    memory holds one file's worth, never the whole model. write=False only drains the stream
    (the other ranks' side of each gather)."""
    from safetensors.torch import save_file

    if not write:
        for _ in tensors:
            pass
        return
    out.mkdir(parents=True, exist_ok=True)
    written: list[list[str]] = []
    part: dict[str, torch.Tensor] = {}
    for name, t in itertools.chain(tensors, [(None, None)]):
        if part and (name is None or sum(x.nbytes for x in part.values()) + t.nbytes > shard_bytes):
            save_file(part, str(out / f"part-{len(written)}"), metadata={"format": "pt"})
            written.append(list(part))
            part = {}
        if name is not None:
            part[name] = t.to("cpu").contiguous()
    n = len(written)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for i, f in enumerate(names):
        (out / f"part-{i}").rename(out / f)
    if n > 1:
        index = {"metadata": {}, "weight_map": {k: f for f, keys in zip(names, written) for k in keys}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
