"""Checkpoints and exports of the FSDP2 trainer (engines/trainer/fsdp.py): the training state as a
torch.distributed.checkpoint (each rank its shards; reshards on load), the LoRA adapter in peft
format, the HF export streamed to safetensors; and the file writers they use, which record what
each rank wrote so that it can checksum its own files (runtime/checkpoints.py writes the manifest).
"""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemWriter

SHARD_BYTES = 4 << 30  # largest safetensors file written by a checkpoint or export


class RecordingWriter(FileSystemWriter):
    """torch.distributed.checkpoint's file writer (it fsyncs its files) that keeps the names of the
    files this rank wrote, relative to the checkpoint dir, in `written` (rank 0's .metadata is
    written later, in finish(), and is not among them)."""

    written: list[str] = []

    def write_data(self, plan, planner):
        """FileSystemWriter.write_data, recording the files written (waits for the writes)."""
        fut = super().write_data(plan, planner)
        self.written = sorted({r.storage_data.relative_path for r in fut.wait()})
        return fut


def write_safetensors(out: Path, tensors: Iterable[tuple[str, torch.Tensor]], write: bool, shard_bytes: int) -> None:
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


def _train_state(trainer) -> dict:
    """Weights (LoRA: the adapter) and AdamW state as this rank holds them: its shards when
    sharded, keyed by parameter name. A fresh optimizer gets zero moments first, as a template."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model, optim = get_state_dict(
        trainer.model, trainer.optimizer, options=StateDictOptions(ignore_frozen_params=trainer.is_lora)
    )
    return {"model": model, "optim": optim}


def save_state(trainer, ckpt_dir: str) -> list[Path]:
    """Training state in ckpt_dir/actor: a torch.distributed.checkpoint, every rank writing its own
    shards in parallel, so nothing is gathered (a 72B optimizer state does not fit one host), and a
    load at another world size reshards from its metadata; rank 0 adds the scheduler, RNG and skip
    count (extra_state.pt). No collective beyond DCP's planning, so it may run with the state
    offloaded: DCP holds a host copy of every GPU tensor of a file until the file is closed (a
    rank's whole shard: +48 GB per rank at 7B, Ray's OOM kill at the save in issue 12), and none
    of a tensor already in host memory. Returns the files this rank wrote, for their checksums."""
    import torch.distributed.checkpoint as dcp

    actor = Path(ckpt_dir) / "actor"
    writer = RecordingWriter(actor)
    dcp.save(_train_state(trainer), storage_writer=writer, no_dist=not dist.is_initialized())
    written = [actor / f for f in writer.written]
    if trainer.rank == 0:
        written += [actor / ".metadata", save_extra_state(trainer, actor)]
    return written


def save_extra_state(trainer, actor: Path) -> Path:
    """actor/extra_state.pt, rank 0's, for every backend: the LR scheduler's state, the count of
    skipped (non-finite) steps and torch's CPU RNG state. Returns the file."""
    f = actor / "extra_state.pt"
    state = {"scheduler": trainer.scheduler.state_dict(), "bad_steps": trainer.bad_steps}
    torch.save({**state, "torch_rng": torch.get_rng_state()}, f)
    return f


def load_extra_state(trainer, actor: Path) -> None:
    """save_extra_state's file back into trainer's scheduler, bad_steps and torch's RNG."""
    extra = torch.load(actor / "extra_state.pt", weights_only=True)
    trainer.scheduler.load_state_dict(extra["scheduler"])
    trainer.bad_steps = extra["bad_steps"]
    torch.set_rng_state(extra["torch_rng"])


def save_exports(trainer, ckpt_dir: str, export_hf: bool = True) -> list[Path]:
    """LoRA: the adapter in peft format (actor/lora_adapter); with export_hf the HF export
    (huggingface/). Tensors are gathered one at a time (collectives: every rank calls it, with
    its weights on the GPU); rank 0 writes. Returns the files this rank wrote."""
    root, actor = Path(ckpt_dir), Path(ckpt_dir) / "actor"
    if trainer.is_lora:
        adapter = dict(trainer.full_state(lora_only=True))
        if trainer.rank == 0:
            trainer.model.save_pretrained(actor / "lora_adapter", state_dict=adapter)
    if export_hf:
        write_hf_export(trainer, str(root / "huggingface"), adapter_dir=actor / "lora_adapter")
    if trainer.rank != 0:
        return []
    return sorted(
        p for d in (actor / "lora_adapter", root / "huggingface") if d.is_dir() for p in d.rglob("*") if p.is_file()
    )


def write_hf_export(trainer, out_dir: str, adapter_dir: Path) -> None:
    """A plain HF model dir in the compute dtype, loadable by from_pretrained and vLLM: safetensors
    (sharded past SHARD_BYTES, + index), config.json (dtype the compute dtype, use_cache on), the
    generation config and the tokenizer. Every rank takes part; rank 0 writes.

    Full fine-tuning: the trainer's weights, gathered one at a time (a collective). LoRA: the peft
    adapter rank 0 wrote to adapter_dir merged into model_dir's base weights in fp32 and then cast
    (engines/trainer/lora_merge.py; a bf16 merge rounds the base first: small early deltas were
    lost twice; any delta under half a compute-dtype ulp of its weight is still lost by a bf16
    export, the adapter keeps it), streamed from the files by rank 0 alone, one tensor at a time
    (host memory: that tensor and its merge, + the writer's one file); the others return at once.
    Raises ValueError (one line) for an adapter feature that merge does not support."""
    if trainer.is_lora:
        if trainer.rank != 0:
            return
        from engines.trainer.lora_merge import merged_state

        tensors = merged_state(trainer.model_dir, adapter_dir, trainer.compute_dtype)
    else:
        tensors = trainer.full_state(trainer.compute_dtype, files=True)
    write_safetensors(Path(out_dir), tensors, write=trainer.rank == 0, shard_bytes=SHARD_BYTES)
    if trainer.rank == 0:
        conf = copy.deepcopy(trainer.hf_config)
        conf.dtype, conf.use_cache = trainer.compute_dtype, True
        conf.save_pretrained(out_dir)
        trainer.model.generation_config.save_pretrained(out_dir)
        trainer.tokenizer.save_pretrained(out_dir)


def load(trainer, ckpt_dir: str) -> None:
    """Restore save_state's checkpoint, written at this or any other world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import CheckpointException
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    actor = Path(ckpt_dir) / "actor"
    if not (actor / ".metadata").is_file():
        raise ValueError(
            f"{actor} is not a checkpoint this build can resume (no DCP .metadata; earlier "
            f"builds wrote optim.pt). Its weights are in {Path(ckpt_dir) / 'huggingface'}: "
            "start from them with model.path=<that dir> trainer.resume_mode=disable"
        )
    state = _train_state(trainer)
    try:
        dcp.load(state, checkpoint_id=actor, no_dist=not dist.is_initialized())
    except CheckpointException as e:  # a BaseException: name the checkpoint and the model
        raise ValueError(
            f"checkpoint {actor} does not match model {trainer.model_dir} "
            f"(lora_rank={trainer.cfg.model.lora_rank}): {str(e)[:500]}"
        ) from None
    set_state_dict(
        trainer.model,
        trainer.optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        # LoRA: the frozen base stays as loaded from model_dir (dcp.load checked the adapter)
        options=StateDictOptions(ignore_frozen_params=trainer.is_lora, strict=not trainer.is_lora),
    )
    load_extra_state(trainer, actor)
