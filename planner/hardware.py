"""The GPUs the recipes name (memory, bandwidth, dense bf16 peak) and the FLOP counts of a
decoder pass: one table and one formula for the trainer's perf/mfu/actor and for `grpo plan`.

FLOPs, 2 per multiply-add: a forward costs 2 N per token for the matmuls of the N parameters
(the "6 N per token" training rule of Kaplan et al. 2020, "Scaling Laws for Neural Language
Models", s. 2.1, is this forward plus a backward of twice its cost) plus 4 L h S per token for
attention's two products over a sequence of S tokens (scores Q K^T and their weighted sum of V,
each h x S multiply-adds per token and layer; L layers, hidden size h). Gradient checkpointing's
recomputation is not counted: MFU counts model FLOPs, not hardware FLOPs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from configs.schema import GRPOConfig


@dataclass(frozen=True)
class GPU:
    name: str
    mem_gib: float  # total memory torch (and vLLM's budget) sees
    hbm_tbs: float  # HBM bandwidth, TB/s (datasheet)
    bf16_tflops: float  # dense bf16 peak, TFLOP/s (datasheet)


def _mib(smi_mib: int) -> float:
    """torch's total_memory (GiB) from nvidia-smi's total (MiB): 481 MiB less on an H100
    (85017493504 B seen)."""
    return (smi_mib - 481) / 1024


# Memory: nvidia-smi totals (H100/H800 80GB HBM3 81559 MiB, H200 143771 MiB, H20 97871 MiB,
# A100 80GB 81920 MiB). Bandwidth: NVIDIA datasheets (SXM parts). Dense bf16 peak (without
# sparsity): NVIDIA datasheets, H100/H800/H200 SXM 989 TFLOP/s, H20 148, A100 312.
# Order matters for peak_bf16_tflops: "H200" is tried before "H20".
GPUS = {
    "H100": GPU("H100", _mib(81559), 3.35, 989.0),
    "H800": GPU("H800", _mib(81559), 3.35, 989.0),
    "H200": GPU("H200", _mib(143771), 4.8, 989.0),
    "H20": GPU("H20", _mib(97871), 4.0, 148.0),
    "A100": GPU("A100", _mib(81920), 2.039, 312.0),
}


def peak_bf16_tflops(device_name: str | None) -> float | None:
    """Dense bf16 peak (TFLOP/s) of the first GPUS entry named in `device_name` (as
    torch.cuda.get_device_name() says it, e.g. "NVIDIA H100 80GB HBM3"); None if none is."""
    return next((spec.bf16_tflops for key, spec in GPUS.items() if device_name and key in device_name), None)


def forward_flops(n_params: int, layers: int, hidden: int, seq_lens: list[int]) -> int:
    """One forward over sequences of seq_lens tokens: 2 N per token + 4 L h S^2 per sequence."""
    return 2 * n_params * sum(seq_lens) + 4 * layers * hidden * sum(length * length for length in seq_lens)


def train_flops(n_params: int, tokens: int, layers: int, hidden: int, seq_lens: list[int], epochs: int = 1) -> int:
    """Forward + backward (3 forwards) of `epochs` passes over sequences of seq_lens tokens, with
    `tokens` the tokens of all passes (sum(seq_lens) x epochs): 6 N tokens + 12 L h sum(S^2) x epochs."""
    return 6 * n_params * tokens + 12 * layers * hidden * sum(length * length for length in seq_lens) * epochs


def gpu_of(cfg: GRPOConfig, name: str | None = None) -> tuple[GPU, str]:
    """The GPU from an explicit name, else from the recipe name (`...-4xh800`), else H100."""
    if name:
        key = name.upper()
        if key not in GPUS:
            raise ValueError(f"unknown GPU {name!r}; choose one of {', '.join(GPUS)}")
        return GPUS[key], "given"
    hit = re.search(r"\d+x(h200|h100|h800|h20|a100)\b", cfg.recipe, re.IGNORECASE)
    if hit:
        return GPUS[hit.group(1).upper()], f"recipe name '{cfg.recipe}'"
    why = "a CPU recipe, planned as if on a GPU" if cfg.trainer.device == "cpu" else "recipe names no GPU"
    return GPUS["H100"], f"default ({why}; --gpu to choose)"
