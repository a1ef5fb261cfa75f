"""Checkpoints and the HF export of the Megatron backend (engines/trainer/megatron.py).

Training state: one torch file per tensor-parallel rank, ckpt_dir/actor/megatron/tp<r>-of<tp>.pt
(that rank's weight shards in megatron-core's names, its AdamW state, as megatron-core's and
torch's own state dicts), written by the ranks of data-parallel rank 0 (the dp ranks hold the same
state); rank 0 adds extra_state.pt (scheduler, skipped steps, RNG) as the FSDP2 backend does.
So a checkpoint loads at any number of data-parallel ranks but only at the tensor-parallel size
it was written at: `load` says so in one line otherwise. (megatron-core's dist_checkpointing
would reshard across tp but needs megatron-core's own optimizer, which needs CUDA.)
The files sit inside the controller's atomic, checksummed layout (runtime/checkpoints.py): each
rank returns the paths it wrote.

The HF export streams `hf_state` (gathered one tensor at a time) to safetensors through
engines/trainer/checkpoint.write_safetensors, in model.dtype.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from engines.trainer.checkpoint import SHARD_BYTES, load_extra_state, save_extra_state, write_safetensors


def _file(actor: Path, tp_rank: int, tp: int) -> Path:
    return actor / "megatron" / f"tp{tp_rank}-of{tp}.pt"


def save_state(trainer, ckpt_dir: str) -> list[Path]:
    """This rank's shards and optimizer state (dp rank 0's ranks only), rank 0's extra_state.pt.
    No collective, so it may run with the state offloaded. Returns the files this rank wrote."""
    actor = Path(ckpt_dir) / "actor"
    written: list[Path] = []
    if trainer.dp_rank == 0:
        f = _file(actor, trainer.tp_rank, trainer.tp)
        f.parent.mkdir(parents=True, exist_ok=True)
        model = {k: v for k, v in trainer.model.state_dict().items() if not k.endswith("_extra_state")}
        torch.save({"model": model, "optim": trainer.optimizer.state_dict()}, f)
        written.append(f)
    if trainer.rank == 0:
        written.append(save_extra_state(trainer, actor))
    return written


def load(trainer, ckpt_dir: str) -> None:
    """Restore save_state's checkpoint. Raises ValueError (one line) when ckpt_dir holds no
    Megatron state, state of another tensor-parallel size, or tensors that do not fit the model."""
    actor = Path(ckpt_dir) / "actor"
    f = _file(actor, trainer.tp_rank, trainer.tp)
    if not f.is_file():
        have = sorted(p.name for p in (actor / "megatron").glob("tp*-of*.pt")) if (actor / "megatron").is_dir() else []
        raise ValueError(
            f"{actor} holds no Megatron state for actor.megatron.tensor_model_parallel_size={trainer.tp} "
            f"(has: {', '.join(have) or 'none: not a Megatron checkpoint'}); resume at the size it was "
            f"written at, or start from its HF export with model.path={Path(ckpt_dir) / 'huggingface'} "
            "trainer.resume_mode=disable"
        )
    state = torch.load(f, map_location=trainer.device, weights_only=True)
    own = {k: v for k, v in trainer.model.state_dict().items() if not k.endswith("_extra_state")}
    bad = sorted(set(own) ^ set(state["model"])) or [
        k for k, v in state["model"].items() if v.shape != own[k].shape or v.dtype != own[k].dtype
    ]
    if bad:
        raise ValueError(
            f"checkpoint {f} does not match model {trainer.model_dir} (tensors {bad[:5]} differ in name, shape or dtype)"
        )
    with torch.no_grad():
        for k, v in state["model"].items():
            own[k].copy_(v)
    trainer.optimizer.load_state_dict(state["optim"])
    load_extra_state(trainer, actor)


def save_exports(trainer, ckpt_dir: str, export_hf: bool = True) -> list[Path]:
    """With export_hf, ckpt_dir/huggingface: a plain HF model dir in model.dtype (tensors gathered
    over the tp group one at a time: every rank calls it; rank 0 writes). Returns rank 0's files."""
    out = Path(ckpt_dir) / "huggingface"
    if not export_hf:
        return []
    write_safetensors(out, trainer.hf_state(trainer.compute_dtype, files=True), trainer.rank == 0, SHARD_BYTES)
    if trainer.rank != 0:
        return []
    conf = copy.deepcopy(trainer.hf_config)
    conf.dtype, conf.use_cache = trainer.compute_dtype, True
    conf.save_pretrained(out)
    try:
        from transformers import GenerationConfig

        GenerationConfig.from_pretrained(trainer.model_dir).save_pretrained(out)
    except OSError:  # the model dir has none: HF's defaults apply
        pass
    trainer.tokenizer.save_pretrained(out)
    return sorted(p for p in out.rglob("*") if p.is_file())
