"""The combinations model.use_liger / model.use_fused_kernels (liger-kernel, engines/trainer/liger.py)
cannot run in, refused in one line each when the config is validated (configs/schema.py calls
`check_kernels`), before any model is built or liger-kernel imported."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from configs.schema import GRPOConfig


def check_kernels(cfg: GRPOConfig) -> None:
    """Raises ValueError (one line naming the keys and the fix) when either flag is on with
    trainer.device=cpu (liger's kernels are Triton, CUDA only here) or actor.strategy=megatron (it
    builds no HF model to patch); and when model.use_fused_kernels is on with Ulysses (each rank
    holds a column slice, not whole rows, of the final hidden states) or with actor.entropy_coeff
    != 0 (the fused kernel gives log-probs, no entropy)."""
    m, a = cfg.model, cfg.actor
    for key in ("use_liger", "use_fused_kernels"):
        if not getattr(m, key):
            continue
        if cfg.trainer.device != "cuda":
            raise ValueError(
                f"model.{key} needs trainer.device=cuda: liger-kernel's kernels are Triton; set model.{key}=false on CPU"
            )
        if a.strategy == "megatron":
            raise ValueError(
                f"model.{key}=true is for actor.strategy=fsdp2 (liger patches the HF model); with "
                f"actor.strategy=megatron set it to false"
            )
    if not m.use_fused_kernels:
        return
    if a.entropy_coeff != 0:
        raise ValueError(
            f"model.use_fused_kernels=true gives no entropy but actor.entropy_coeff={a.entropy_coeff} needs it; "
            "set actor.entropy_coeff=0 or model.use_fused_kernels=false"
        )
    if a.ulysses_sequence_parallel_size > 1:
        raise ValueError(
            f"model.use_fused_kernels=true is not supported with actor.ulysses_sequence_parallel_size="
            f"{a.ulysses_sequence_parallel_size} in this build; set one of them to false / 1"
        )
