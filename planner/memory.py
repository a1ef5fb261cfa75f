"""`grpo plan`'s GPU memory: what one GPU holds, item by item, in each phase of a step.

Pure arithmetic on config numbers: no CUDA, no model weights, no network. It models what the code
in engines/ allocates today (`features`, default TRAINER_IMPLEMENTS), so a prediction can be
checked against a measured `perf/max_memory_allocated_gb`; every feature True models every config
knob as the config states it (FSDP sharding over the world, offload between uses).

Peak, the number that must fit on one GPU, is trainer peak + vLLM's budget (util x GPU memory):
- torch.cuda.max_memory_allocated counts vLLM's blocks even while vLLM sleeps (its CuMem pool
  unmaps memory behind torch's back: vllm-project/vllm#17117, #33625), so it reads the same sum;
- without offload, the trainer's cached blocks stay reserved when vLLM wakes for the next
  rollout: the same sum must fit. With offload (or empty_cache between phases) the trainer
  releases its cache, so peak = max(rollout phase, training phase).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from configs.schema import GRPOConfig
from engines.models import VLLM_MAX_LORA_RANKS
from planner.hardware import GPU
from planner.shapes import Shape

GIB = 2**30

VLLM_NON_TORCH_GIB = 0.5
"""CUDA graphs, cuBLAS/NCCL workspaces inside vLLM's budget, not counted by torch (rough)."""

# What the trainer (engines/trainer/) does today with the knobs the schema has: the default
# `features` of every function here. Flip an entry when the trainer implements it;
# `grpo plan --as-configured` passes all True.
TRAINER_IMPLEMENTS = {
    "fsdp_shard": True,
    "fused_adamw": True,
    "param_offload": True,
    "optimizer_offload": True,
    "dynamic_bsz": True,
    "remove_padding": True,
    "empty_cache_between_phases": False,
}


# ---- activations -------------------------------------------------------------------------------
def layer_act_bytes_per_token(shape: Shape) -> int:
    """Tensors one decoder layer keeps for backward, per token, under bf16 autocast on fp32 weights.

    The residual stream stays fp32 (fp32 embedding + bf16 branch outputs promote), RMSNorm keeps
    fp32 normed + output, Linear inputs are cast to bf16, SDPA with a padding mask runs on
    repeat_kv-expanded K/V (transformers' sdpa path), the MLP keeps gate, up, silu(gate), product.
    """
    hidden, q_dim, kv_dim, inter = shape.hidden, shape.heads * shape.d, shape.kv_heads * shape.d, shape.intermediate
    fp32_h = 4 * (1 + 2 + 1 + 2)  # residual in, norm1 (normed + out), residual mid, norm2
    bf16_h = 2 * (1 + 1 + 1 + 1)  # casts into qkv and mlp, o_proj out, down_proj out
    attn = (
        2 * (q_dim + 2 * kv_dim + q_dim + kv_dim + 2 * q_dim + q_dim + q_dim) + 4 * shape.heads
    )  # q,k,v, rope q/k, repeat k/v, out, o_in; lse
    mlp = 2 * 4 * inter
    return fp32_h * hidden + bf16_h * hidden + attn + mlp


def activation_bytes(shape: Shape, tokens: int, checkpointing: bool, input_bytes: int = 4) -> int:
    """Saved activations of the decoder stack for `tokens` (micro-batch x padded length).
    input_bytes: of each kept layer input, fp32 on autocast (4) or bf16 under FSDP2's bf16 params (2)."""
    per_layer = layer_act_bytes_per_token(shape) * tokens
    if checkpointing:  # layer inputs kept; one layer's tensors live while it is recomputed
        return shape.layers * input_bytes * shape.hidden * tokens + per_layer
    return shape.layers * per_layer


# Bytes per response-logit element (b x (R+1) x vocab) at the peak of a training micro-batch:
# the bf16 lm_head output and its bf16 gradient; log-probs and entropy are computed one row at a
# time and recomputed in backward (algos.token_logprobs), so their fp32 temporaries exist for one
# row only (LogitBytes.row per element of one row). A no-grad pass holds the bf16 logits and one row.
# Checked on one H100 (tests/test_plan.py lists the measured runs).
@dataclass(frozen=True)
class LogitBytes:
    train: int = 4  # per logit element at a training micro-batch's peak
    nograd: int = 2  # per logit element in a no-grad pass
    row: int = 20  # per element of the one row whose fp32 temporaries exist


LOGIT_BYTES = LogitBytes()


def logits_elems(shape: Shape, batch: int, resp: int) -> int:
    """Only response logits exist (the trainer's logits_to_keep = R + 1)."""
    return batch * (resp + 1) * shape.vocab


def gpu_memory(
    cfg: GRPOConfig,
    shape: Shape,
    gpu: GPU,
    features: dict,
    micro: int,
    fsdp: bool | None = None,
    logit_bytes: LogitBytes = LOGIT_BYTES,
) -> dict[str, Any]:
    """Itemised per-GPU bytes for a micro-batch of `micro` samples, the phase totals and the peak. fsdp: the trainer
    runs FSDP2 (default: when sharded over several GPUs; True also plans FSDP2 on one GPU)."""
    actor, rollout, model = cfg.actor, cfg.rollout, cfg.model
    world, rollout_tp = cfg.world_size, rollout.tensor_model_parallel_size
    shard = world if (features["fsdp_shard"] and actor.strategy in ("fsdp", "fsdp2")) else 1
    fsdp = shard > 1 if fsdp is None else fsdp
    lora = model.lora_rank > 0
    n_params, n_linear = shape.n_params(), shape.n_linear()
    n_lora = shape.lora_params(model.lora_rank, model.target_modules)
    n_train = n_lora if lora else n_params
    has_ref = actor.use_kl_loss and not lora
    prompt, resp = cfg.data.max_prompt_length, rollout.max_response_length
    seq = prompt + resp
    items: list[dict] = []

    def add(item: str, phase: str, nbytes: float, note: str) -> float:
        items.append(dict(item=item, phase=phase, gib=nbytes / GIB, note=note))
        return nbytes

    shard_note = f" / {shard} (FSDP shard)" if shard > 1 else ""
    # Resident trainer state: fp32 master weights whatever model.dtype (the trainer loads float32).
    weights = add(
        "actor weights (fp32 master)", "both", 4 * n_params / shard, f"{n_params / 1e9:.3f}B params x 4 B{shard_note}"
    )
    lora_weights = (
        add(
            "LoRA adapter (fp32)",
            "both",
            4 * n_lora / shard,
            f"r={model.lora_rank} on {model.target_modules}: {n_lora / 1e6:.1f}M params",
        )
        if lora
        else 0
    )
    grads = add("gradients (fp32)", "both", 4 * n_train / shard, "kept between steps (zero_grad at next step)")
    opt = add("AdamW states (exp_avg, exp_avg_sq)", "both", 8 * n_train / shard, f"2 x 4 B x {n_train / 1e6:.1f}M")
    ref = add("reference model (bf16 copy)", "both", 2 * n_params / shard, "full FT with KL loss") if has_ref else 0
    if not has_ref:
        add("reference model", "both", 0, "base with adapter disabled (LoRA)" if lora else "no KL loss")
    resident = weights + lora_weights + grads + opt + ref
    off_p = features["param_offload"] and actor.param_offload
    off_o = features["optimizer_offload"] and actor.optimizer_offload
    # Offload between uses (recipes.md): gone while vLLM generates, back on the GPU for compute.
    offloaded = (weights + lora_weights + ref if off_p else 0) + (grads + opt if off_o else 0)

    tokens = micro * seq
    checkpointing = model.enable_gradient_checkpointing
    lm_cast = 2 * shape.vocab * shape.hidden
    if fsdp:  # one layer's bf16 unit gathered, one prefetched; the root's: its own item below
        cast_fwd = 2 * 2 * (n_linear - shape.vocab * shape.hidden) // shape.layers
        cast_note = "FSDP2 all-gathered bf16 layer units (current + prefetched)"
    elif lora:  # frozen base weights are cast per op; saved for backward only without checkpointing
        cast_fwd = saved_cast = lm_cast if checkpointing else 2 * n_linear
        cast_note = "frozen base cast per op" + ("; lm_head's kept for backward" if checkpointing else ", all saved")
    else:  # autocast caches bf16 copies of every trainable Linear until the forward returns
        cast_fwd, saved_cast = 2 * n_linear, (lm_cast if checkpointing else 2 * n_linear)
        cast_note = "autocast cache of every Linear during the forward"
    # Ulysses: a GPU holds 1/sp of every sequence's columns in the decoder, 1/sp of the rows' logits.
    sp = actor.ulysses_sequence_parallel_size
    act = activation_bytes(
        shape, tokens // sp, checkpointing, input_bytes=2 if fsdp else 4
    )  # FSDP2: bf16 residual stream
    logit_elems = logits_elems(shape, -(-micro // sp), resp)
    add("bf16 weight copies", "train", cast_fwd, cast_note)
    # FSDP2 does not reshard the root after the forward: embedding + lm_head stay gathered (bf16).
    root = (
        add(
            "FSDP2 root unit (bf16, gathered)",
            "train",
            2 * shape.vocab * shape.hidden * (1 if shape.tie else 2),
            "embedding + lm_head, kept gathered after the forward",
        )
        if fsdp
        else 0
    )
    add(
        f"activations, checkpointing {'on' if checkpointing else 'off'}",
        "train",
        act,
        f"micro-batch {micro} x {seq} tokens" + (f" / Ulysses {sp}" if sp > 1 else ""),
    )
    add(
        f"(activations if checkpointing {'off' if checkpointing else 'on'})",
        "-",
        activation_bytes(shape, tokens // sp, not checkpointing),
        "for comparison only",
    )
    packed = features["remove_padding"] and model.use_remove_padding
    mask = add(
        "attention mask",
        "train",
        0 if packed else 3 * micro * seq * seq,
        "none: one packed row, FlashAttention varlen" if packed else "[B,1,T,T] bool + bf16 SDPA bias (padded batch)",
    )
    train_bytes, row = logit_bytes.train, logit_bytes.row * (resp + 1) * shape.vocab
    logits = add(
        "logits (fwd+bwd) + one row's fp32",
        "train",
        train_bytes * logit_elems + row,
        f"{micro} x {resp + 1} x vocab {shape.vocab} x {train_bytes} B + {logit_bytes.row} B x one row",
    )
    step_temp = add(
        "optimizer step temporary",
        "train",
        0 if features["fused_adamw"] else 4 * n_train / shard,
        "none: fused AdamW" if features["fused_adamw"] else "foreach AdamW sqrt(exp_avg_sq)",
    )

    in_update = resident - (ref if off_p else 0)  # offload between uses: the ref leaves during the update
    # zero_grad(set_to_none) opens each update: while the logits peak, only lm_head's grad exists.
    head_grad = 0 if lora else 4 * shape.vocab * shape.hidden / shard
    if fsdp:
        # Measured on one H200 under FSDP2 (benchmarks/BENCHMARKS.md, section 11): the logits stage
        # is the peak, over the kept layer inputs and the final norm's bf16 output; one layer's
        # recompute (with its gathered units) comes after the logits are freed.
        per_layer = layer_act_bytes_per_token(shape) * tokens // sp if checkpointing else 0
        final_norm_out = 2 * shape.hidden * tokens // sp
        update_peak = (
            in_update
            - grads
            + root
            + mask
            + act
            - per_layer
            + final_norm_out
            + max(logits + head_grad, per_layer + cast_fwd)
        )
        log_prob_peak = (
            resident + root + mask + max(2 * logit_elems + final_norm_out, logit_bytes.nograd * logit_elems + row)
        )
    else:
        # forward end (weight casts + bf16 logits) vs logits stage (casts freed, fp32 logits and grads)
        update_peak = in_update - grads + mask + act + max(cast_fwd + 2 * logit_elems, saved_cast + logits + head_grad)
        nograd_cast = 0 if lora else cast_fwd  # trainable weights are cached under no_grad too
        log_prob_peak = (
            resident
            + mask
            + max(
                nograd_cast + 2 * logit_elems + 4 * shape.hidden * tokens // sp, logit_bytes.nograd * logit_elems + row
            )
        )
    step = in_update + step_temp
    trainer_peak = max(update_peak, log_prob_peak, step)

    # vLLM on this GPU: it may hold util x total (weights + profiled activations + KV cache).
    budget = rollout.gpu_memory_utilization * gpu.mem_gib * GIB
    vllm_weights = 2 * n_params / rollout_tp
    if lora:  # one adapter slot at vLLM's rank ladder (max_lora_rank), every linear layer
        rank = next((x for x in VLLM_MAX_LORA_RANKS if model.lora_rank <= x), 10**9)
        vllm_weights += 2 * shape.lora_params(rank, "all-linear") / rollout_tp
    max_tok = rollout.max_num_batched_tokens or max(rollout.max_model_len or seq, 8192)
    vllm_act = (
        max_tok * (4 * shape.intermediate // rollout_tp + 8 * shape.hidden) + 8 * rollout.max_num_seqs * shape.vocab
    )
    other = vllm_act + VLLM_NON_TORCH_GIB * GIB
    kv_cache = budget - vllm_weights - other
    add("vLLM weights (bf16)", "rollout", vllm_weights, f"/ TP {rollout_tp}" if rollout_tp > 1 else "whole model")
    add("vLLM activations + CUDA graphs", "rollout", other, f"profiled at {max_tok} tokens")
    add(
        "vLLM KV cache",
        "rollout",
        max(kv_cache, 0),
        f"rest of util {rollout.gpu_memory_utilization} x {gpu.mem_gib:.1f} GiB",
    )

    if features["empty_cache_between_phases"] or offloaded:  # engines/trainer/offload.py empties the cache
        rollout_phase = resident - offloaded + budget
        train_phase = trainer_peak + VLLM_NON_TORCH_GIB * GIB  # level-1 sleep: weights to host, KV freed
    else:  # the trainer's cached blocks stay reserved when vLLM wakes: both share the GPU
        rollout_phase, train_phase = resident + budget, trainer_peak + budget
    peak = max(rollout_phase, train_phase)
    # vLLM starts after the trainer loads (and offloads), before any gradient or AdamW state exists
    at_init = resident - grads - opt - (weights + lora_weights + ref if off_p else 0)
    total = gpu.mem_gib * GIB
    return dict(
        items=items,
        shard=shard,
        n_params=n_params,
        n_trainable=n_train,
        seq_len=seq,
        trainer_phases_gib=dict(update=update_peak / GIB, log_prob=log_prob_peak / GIB, optimizer_step=step / GIB),
        trainer_resident_gib=resident / GIB,
        trainer_peak_gib=trainer_peak / GIB,
        vllm_budget_gib=budget / GIB,
        vllm_weights_gib=vllm_weights / GIB,
        vllm_kv_gib=max(kv_cache, 0) / GIB,
        rollout_phase_gib=rollout_phase / GIB,
        train_phase_gib=train_phase / GIB,
        peak_gib=peak / GIB,
        torch_max_allocated_gib=(trainer_peak + budget - other + vllm_act) / GIB,
        vllm_init_ok=at_init + budget <= total,
        vllm_kv_ok=kv_cache > 0,
        fits=peak <= total and kv_cache > 0 and at_init + budget <= total,
    )


def largest_micro_batch(
    cfg: GRPOConfig, shape: Shape, gpu: GPU, features: dict, cap: int = 1 << 16, logit_bytes: LogitBytes = LOGIT_BYTES
) -> int:
    """Largest b whose plan fits (0: not even 1). Memory grows with b, so bisect."""
    if not gpu_memory(cfg, shape, gpu, features, 1, logit_bytes=logit_bytes)["fits"]:
        return 0
    lo, hi = 1, cap
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (
            (mid, hi) if gpu_memory(cfg, shape, gpu, features, mid, logit_bytes=logit_bytes)["fits"] else (lo, mid - 1)
        )
    return lo
