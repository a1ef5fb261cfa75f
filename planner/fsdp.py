"""`grpo plan`'s FSDP2 trainer (engines/trainer/fsdp.py): what it holds on one GPU, item by item.

Each item is a function returning an `Item` (bytes on one GPU, shown in GiB); `fsdp_trainer_memory`
puts them together with the peak of each phase. It models what the code in engines/ allocates
(the `TrainerFeatures` passed in), so a prediction can be checked against a measured
`perf/max_memory_allocated_gb`. The trainer keeps fp32 master weights whatever model.dtype and
computes in bf16 under autocast; with several GPUs (or fsdp=True) FSDP2 shards its state over the
world and gathers one layer's bf16 unit at a time.

Symbols in the formulas: P parameters, P_train trained parameters (the adapter with LoRA), S the
FSDP shard count, h hidden size, I intermediate size, L layers, V vocabulary, b micro-batch
samples, T = prompt + response tokens (every sample at full length), R response tokens, sp the
Ulysses degree.
"""

from __future__ import annotations

from dataclasses import dataclass

from configs.schema import GRPOConfig
from planner.items import Item, TrainerFeatures, TrainerMemory
from planner.shapes import Shape

FSDP_STRATEGIES = ("fsdp", "fsdp2")
"""The actor.strategy names of the FSDP2 backend (engines/trainer/fsdp.py registers both)."""


# ---- activations -------------------------------------------------------------------------------
def layer_act_bytes_per_token(shape: Shape) -> int:
    """Bytes one decoder layer keeps for backward, per token, under bf16 autocast on fp32 weights.

    The residual stream stays fp32 (fp32 embedding + bf16 branch outputs promote), RMSNorm keeps
    fp32 normed + output, Linear inputs are cast to bf16, SDPA with a padding mask runs on
    repeat_kv-expanded K/V (transformers' sdpa path), the MLP keeps gate, up, silu(gate), product:
    4 B x 6h + 2 B x 4h + 2 B x (6 q_dim + 3 kv_dim) + 4 B x heads (the softmax's log-sum-exp) +
    2 B x 4I, with q_dim = heads x head_dim, kv_dim = kv_heads x head_dim. Read from transformers'
    Qwen2 modelling code; tests/test_plan.py works the sum by hand.
    """
    hidden, q_dim, kv_dim, inter = (
        shape.hidden,
        shape.heads * shape.head_size,
        shape.kv_heads * shape.head_size,
        shape.intermediate,
    )
    fp32_hidden_tensors = 4 * (1 + 2 + 1 + 2)  # residual in, norm1 (normed + out), residual mid, norm2
    bf16_hidden_tensors = 2 * (1 + 1 + 1 + 1)  # casts into qkv and mlp, o_proj out, down_proj out
    attention = (
        2 * (q_dim + 2 * kv_dim + q_dim + kv_dim + 2 * q_dim + q_dim + q_dim) + 4 * shape.heads
    )  # q,k,v, rope q/k, repeat k/v, out, o_in; lse
    mlp = 2 * 4 * inter
    return fp32_hidden_tensors * hidden + bf16_hidden_tensors * hidden + attention + mlp


def activation_bytes(shape: Shape, tokens: int, checkpointing: bool, input_bytes: int = 4) -> int:
    """Bytes of saved activations of the decoder stack for `tokens` (micro-batch x padded length).

    Without checkpointing: L x layer_act_bytes_per_token x tokens. With it, each layer keeps its
    input (input_bytes x h per token: fp32 on autocast, 4; bf16 under FSDP2's bf16 params, 2) and
    one layer's tensors live while it is recomputed: L x input_bytes x h x tokens +
    layer_act_bytes_per_token x tokens."""
    per_layer = layer_act_bytes_per_token(shape) * tokens
    if checkpointing:
        return shape.layers * input_bytes * shape.hidden * tokens + per_layer
    return shape.layers * per_layer


@dataclass(frozen=True)
class LogitBytes:
    """Bytes per response-logit element (b x (R+1) x V) at the peak of a training micro-batch.

    The bf16 lm_head output and its bf16 gradient (train, 4 B); log-probs and entropy are computed
    one row at a time and recomputed in backward (engines/algos.py token_logprobs), so their fp32
    temporaries exist for one row only (row, per element of that row). A no-grad pass holds the
    bf16 logits and one row (nograd, 2 B). Checked on one H100 (tests/test_plan.py lists the
    measured runs); benchmarks/plan_check.py passes other values for trainers before 8dc6f9e."""

    train: int = 4  # per logit element at a training micro-batch's peak
    nograd: int = 2  # per logit element in a no-grad pass
    row: int = 20  # per element of the one row whose fp32 temporaries exist


LOGIT_BYTES = LogitBytes()


def logits_elems(shape: Shape, batch: int, resp: int) -> int:
    """Response-logit elements of `batch` rows: batch x (R + 1) x V (the trainer's logits_to_keep
    is R + 1: only the response's logits exist)."""
    return batch * (resp + 1) * shape.vocab


def one_row_bytes(shape: Shape, resp: int, logit_bytes: LogitBytes) -> int:
    """Bytes of the fp32 temporaries of the one logits row being computed: row x (R + 1) x V."""
    return logit_bytes.row * (resp + 1) * shape.vocab


# ---- resident state ----------------------------------------------------------------------------
def fsdp_shard(cfg: GRPOConfig, features: TrainerFeatures) -> int:
    """How many ranks share the trainer state: the world size when FSDP2 shards it
    (features.fsdp_shard and an FSDP actor.strategy), else 1 (a replica per GPU)."""
    return cfg.world_size if (features.fsdp_shard and cfg.actor.strategy in FSDP_STRATEGIES) else 1


def shard_note(shard: int) -> str:
    """The note's suffix naming the shard count (empty on one GPU)."""
    return f" / {shard} (FSDP shard)" if shard > 1 else ""


def actor_weights(n_params: int, shard: int) -> Item:
    """fp32 master weights: 4 B x P / S. The trainer loads float32 whatever model.dtype
    (engines/trainer/fsdp.py) and computes in bf16 under autocast."""
    return Item(
        "actor weights (fp32 master)",
        "both",
        4 * n_params / shard,
        f"{n_params / 1e9:.3f}B params x 4 B{shard_note(shard)}",
    )


def lora_adapter(n_lora: int, rank: int, targets: str | list[str], shard: int) -> Item:
    """The LoRA adapter in fp32: 4 B x P_lora / S, P_lora = L x rank x sum(in + out) over the
    targeted Linears (Shape.lora_params, checked against peft in tests/test_plan.py)."""
    return Item("LoRA adapter (fp32)", "both", 4 * n_lora / shard, f"r={rank} on {targets}: {n_lora / 1e6:.1f}M params")


def gradients(n_trainable: int, shard: int) -> Item:
    """fp32 gradients of the trained parameters: 4 B x P_train / S, kept between steps (zero_grad
    with set_to_none opens the next update)."""
    return Item("gradients (fp32)", "both", 4 * n_trainable / shard, "kept between steps (zero_grad at next step)")


def adamw_states(n_trainable: int, shard: int) -> Item:
    """AdamW's exp_avg and exp_avg_sq in fp32: 2 x 4 B x P_train / S."""
    return Item(
        "AdamW states (exp_avg, exp_avg_sq)", "both", 8 * n_trainable / shard, f"2 x 4 B x {n_trainable / 1e6:.1f}M"
    )


def reference(n_params: int, shard: int, has_reference: bool, lora: bool) -> Item:
    """The KL reference: a bf16 copy, 2 B x P / S, for full fine-tuning with actor.use_kl_loss;
    nothing with LoRA (the base with the adapter disabled is the reference) or without a KL loss."""
    if has_reference:
        return Item("reference model (bf16 copy)", "both", 2 * n_params / shard, "full FT with KL loss")
    return Item("reference model", "both", 0, "base with adapter disabled (LoRA)" if lora else "no KL loss")


# ---- one training micro-batch ------------------------------------------------------------------
def saved_weight_casts(shape: Shape, checkpointing: bool) -> int:
    """Replica (no FSDP): bf16 weight copies autocast keeps for backward. With checkpointing only
    lm_head's, 2 B x V x h (the layers recompute theirs); without, every Linear's, 2 B x n_linear."""
    return 2 * shape.vocab * shape.hidden if checkpointing else 2 * shape.n_linear()


def weight_casts(shape: Shape, fsdp: bool, lora: bool, checkpointing: bool) -> Item:
    """bf16 weight copies alive during a training forward.

    FSDP2: one layer's bf16 unit gathered and one prefetched, 2 x 2 B x (n_linear - V h) / L (the
    root unit is its own item). Replica with LoRA: the frozen base is cast per op, so what lives is
    what is saved (saved_weight_casts). Replica, full fine-tuning: autocast caches a bf16 copy of
    every trainable Linear until the forward returns, 2 B x n_linear (n_linear: Shape.n_linear)."""
    if fsdp:
        nbytes = 2 * 2 * (shape.n_linear() - shape.vocab * shape.hidden) // shape.layers
        return Item("bf16 weight copies", "train", nbytes, "FSDP2 all-gathered bf16 layer units (current + prefetched)")
    if lora:
        note = "frozen base cast per op" + ("; lm_head's kept for backward" if checkpointing else ", all saved")
        return Item("bf16 weight copies", "train", saved_weight_casts(shape, checkpointing), note)
    return Item(
        "bf16 weight copies", "train", 2 * shape.n_linear(), "autocast cache of every Linear during the forward"
    )


def fsdp_root_unit(shape: Shape) -> Item:
    """FSDP2 does not reshard the root unit after the forward: embedding and lm_head stay gathered
    in bf16, 2 B x V x h x (1 tied, 2 untied)."""
    nbytes = 2 * shape.vocab * shape.hidden * (1 if shape.tie else 2)
    return Item(
        "FSDP2 root unit (bf16, gathered)", "train", nbytes, "embedding + lm_head, kept gathered after the forward"
    )


def activations(shape: Shape, micro: int, seq: int, ulysses: int, checkpointing: bool, fsdp: bool) -> Item:
    """Saved activations of a micro-batch: activation_bytes at b x T / sp tokens (Ulysses: a GPU
    holds 1/sp of every sequence's columns), layer inputs in bf16 under FSDP2, fp32 otherwise."""
    nbytes = activation_bytes(shape, micro * seq // ulysses, checkpointing, input_bytes=2 if fsdp else 4)
    note = f"micro-batch {micro} x {seq} tokens" + (f" / Ulysses {ulysses}" if ulysses > 1 else "")
    return Item(f"activations, checkpointing {'on' if checkpointing else 'off'}", "train", nbytes, note)


def activations_other_way(shape: Shape, micro: int, seq: int, ulysses: int, checkpointing: bool) -> Item:
    """The activations with gradient checkpointing flipped (fp32 layer inputs), for comparison:
    not summed into any phase."""
    nbytes = activation_bytes(shape, micro * seq // ulysses, not checkpointing)
    return Item(
        f"(activations if checkpointing {'off' if checkpointing else 'on'})", "-", nbytes, "for comparison only"
    )


def attention_mask(micro: int, seq: int, packed: bool) -> Item:
    """Padded batches: the [b, 1, T, T] bool mask and SDPA's bf16 additive bias, 3 B x b x T^2.
    Packed (model.use_remove_padding): one row, FlashAttention's varlen kernel takes no mask."""
    if packed:
        return Item("attention mask", "train", 0, "none: one packed row, FlashAttention varlen")
    return Item("attention mask", "train", 3 * micro * seq * seq, "[B,1,T,T] bool + bf16 SDPA bias (padded batch)")


def logits(shape: Shape, micro: int, ulysses: int, resp: int, logit_bytes: LogitBytes) -> Item:
    """Response logits at a training micro-batch's peak: train B x ceil(b / sp) x (R + 1) x V plus
    one row's fp32 temporaries (one_row_bytes); Ulysses gives each GPU 1/sp of the rows."""
    elems = logits_elems(shape, -(-micro // ulysses), resp)
    nbytes = logit_bytes.train * elems + one_row_bytes(shape, resp, logit_bytes)
    note = f"{micro} x {resp + 1} x vocab {shape.vocab} x {logit_bytes.train} B + {logit_bytes.row} B x one row"
    return Item("logits (fwd+bwd) + one row's fp32", "train", nbytes, note)


def fused_chunk_elems(shape: Shape, tokens: int) -> int:
    """Logit elements of one chunk of liger's fused linear cross entropy (model.use_fused_kernels)
    over `tokens` positions, as liger-kernel 0.8.5 sizes it (ops/fused_linear_cross_entropy.py):
    chunk = min(next_pow2(ceil(tokens / ceil(V / h))), tokens) rows x V, about h x tokens (<= 2x)."""
    if tokens <= 0:
        return 0
    rows = -(-tokens // -(-shape.vocab // shape.hidden))
    return min(1 << (rows - 1).bit_length(), tokens) * shape.vocab


def fused_logits(shape: Shape, micro: int, ulysses: int, resp: int, lora: bool) -> Item:
    """model.use_fused_kernels at a training micro-batch's peak (engines/trainer/liger.py): one
    chunk's bf16 logits (its gradient written in place), 2 B x fused_chunk_elems of the N = b x R
    response positions; the fp32 hidden states / T it saves for backward and their fp32 gradient,
    2 x 4 B x N h; the fp32 weight-gradient accumulator, 4 B x V h, whole on every GPU (full
    fine-tuning; LoRA trains no output layer)."""
    tokens = -(-micro // ulysses) * resp
    chunk = fused_chunk_elems(shape, tokens)
    acc = 0 if lora else 4 * shape.vocab * shape.hidden
    nbytes = 2 * chunk + 8 * tokens * shape.hidden + acc
    note = f"fused: chunk {chunk // shape.vocab} x vocab {shape.vocab} x 2 B + 8 B x {tokens} x h" + (
        "" if lora else " + fp32 V x h accumulator"
    )
    return Item("logits (fused, liger chunks)", "train", nbytes, note)


def optimizer_step_temporary(n_trainable: int, shard: int, fused: bool) -> Item:
    """AdamW's step temporaries: none for fused AdamW; foreach AdamW materialises
    sqrt(exp_avg_sq), 4 B x P_train / S (torch.optim.adamw's _multi_tensor_adamw)."""
    if fused:
        return Item("optimizer step temporary", "train", 0, "none: fused AdamW")
    return Item("optimizer step temporary", "train", 4 * n_trainable / shard, "foreach AdamW sqrt(exp_avg_sq)")


# ---- the phases' peaks -------------------------------------------------------------------------
def fsdp2_update_peak(
    in_update: float,
    grads: float,
    root: float,
    mask: float,
    saved: float,
    recomputed_layer: int,
    final_norm_out: int,
    logits_bytes: float,
    head_grad: float,
    layer_units: float,
) -> float:
    """Peak bytes of an FSDP2 training micro-batch. Measured on one H200 (benchmarks/BENCHMARKS.md,
    section 11): the logits stage is the peak, over the kept layer inputs and the final norm's bf16
    output; one layer's recompute (with its gathered units) comes after the logits are freed.
    State in the update (gradients freed by zero_grad) + root + mask + saved activations less the
    recomputed layer + final-norm output + max(logits + lm_head grad, recomputed layer + units)."""
    return (
        in_update
        - grads
        + root
        + mask
        + saved
        - recomputed_layer
        + final_norm_out
        + max(logits_bytes + head_grad, recomputed_layer + layer_units)
    )


def replica_update_peak(
    in_update: float,
    grads: float,
    mask: float,
    saved: float,
    casts_forward: float,
    casts_saved: float,
    logit_elements: int,
    logits_bytes: float,
    head_grad: float,
) -> float:
    """Peak bytes of a replica's training micro-batch: the forward's end (weight casts + bf16
    logits, 2 B per element) or the logits stage (casts freed but those saved, the logits item and
    lm_head's gradient), whichever is larger, over the state in the update and the activations."""
    return (
        in_update
        - grads
        + mask
        + saved
        + max(casts_forward + 2 * logit_elements, casts_saved + logits_bytes + head_grad)
    )


def fsdp_trainer_memory(
    cfg: GRPOConfig,
    shape: Shape,
    features: TrainerFeatures,
    micro: int,
    fsdp: bool | None = None,
    logit_bytes: LogitBytes = LOGIT_BYTES,
) -> TrainerMemory:
    """The FSDP2 (or replica) trainer's items and phase peaks for micro-batches of `micro` samples.

    fsdp: the trainer runs FSDP2 (default: when sharded over several GPUs; True also plans FSDP2 on
    one GPU). In the update, offload (actor.param_offload) takes the reference off the GPU; while
    the logits peak, zero_grad(set_to_none) has freed every gradient but lm_head's (4 B x V h / S,
    full fine-tuning). Log-prob passes hold the resident state, the bf16 logits and one row; with
    model.use_fused_kernels (features.fused_logprobs) one chunk of liger's instead (fused_logits)."""
    actor, model = cfg.actor, cfg.model
    shard = fsdp_shard(cfg, features)
    fsdp = shard > 1 if fsdp is None else fsdp
    lora = model.lora_rank > 0
    n_params = shape.n_params()
    n_lora = shape.lora_params(model.lora_rank, model.target_modules)
    n_trainable = n_lora if lora else n_params
    has_reference = actor.use_kl_loss and not lora
    resp = cfg.rollout.max_response_length
    seq = cfg.data.max_prompt_length + resp
    ulysses = actor.ulysses_sequence_parallel_size
    checkpointing = model.enable_gradient_checkpointing

    weights = actor_weights(n_params, shard)
    adapter = lora_adapter(n_lora, model.lora_rank, model.target_modules, shard) if lora else None
    grads = gradients(n_trainable, shard)
    adamw = adamw_states(n_trainable, shard)
    ref = reference(n_params, shard, has_reference, lora)
    adapter_bytes = adapter.nbytes if adapter else 0
    resident = weights.nbytes + adapter_bytes + grads.nbytes + adamw.nbytes + ref.nbytes
    params_offloaded = features.param_offload and actor.param_offload
    optimizer_offloaded = features.optimizer_offload and actor.optimizer_offload
    # Offload between uses: gone while vLLM generates, back on the GPU for compute.
    offloaded = (weights.nbytes + adapter_bytes + ref.nbytes if params_offloaded else 0) + (
        grads.nbytes + adamw.nbytes if optimizer_offloaded else 0
    )

    casts = weight_casts(shape, fsdp, lora, checkpointing)
    root = fsdp_root_unit(shape) if fsdp else None
    saved = activations(shape, micro, seq, ulysses, checkpointing, fsdp)
    mask = attention_mask(micro, seq, features.remove_padding and model.use_remove_padding)
    fused = features.fused_logprobs and model.use_fused_kernels  # no [tokens, vocab] logits, no row
    if fused:
        logit_item = fused_logits(shape, micro, ulysses, resp, lora)
    else:
        logit_item = logits(shape, micro, ulysses, resp, logit_bytes)
    step_temp = optimizer_step_temporary(n_trainable, shard, features.fused_adamw)
    items = [weights, *([adapter] if adapter else []), grads, adamw, ref, casts, *([root] if root else [])]
    items += [saved, activations_other_way(shape, micro, seq, ulysses, checkpointing), mask, logit_item, step_temp]

    tokens = micro * seq
    logit_elements = logits_elems(shape, -(-micro // ulysses), resp)
    row = one_row_bytes(shape, resp, logit_bytes)
    if fused:  # the largest logits that exist at once: one chunk
        logit_elements, row = fused_chunk_elems(shape, -(-micro // ulysses) * resp), 0
    in_update = resident - (ref.nbytes if params_offloaded else 0)  # the ref leaves during the update
    head_grad = 0 if lora else 4 * shape.vocab * shape.hidden / shard
    if fsdp:
        recomputed_layer = layer_act_bytes_per_token(shape) * tokens // ulysses if checkpointing else 0
        final_norm_out = 2 * shape.hidden * tokens // ulysses
        update_peak = fsdp2_update_peak(
            in_update,
            grads.nbytes,
            root.nbytes,
            mask.nbytes,
            saved.nbytes,
            recomputed_layer,
            final_norm_out,
            logit_item.nbytes,
            head_grad,
            casts.nbytes,
        )
        log_prob_peak = (
            resident
            + root.nbytes
            + mask.nbytes
            + max(2 * logit_elements + final_norm_out, logit_bytes.nograd * logit_elements + row)
        )
    else:
        casts_saved = saved_weight_casts(shape, checkpointing)
        update_peak = replica_update_peak(
            in_update,
            grads.nbytes,
            mask.nbytes,
            saved.nbytes,
            casts.nbytes,
            casts_saved,
            logit_elements,
            logit_item.nbytes,
            head_grad,
        )
        nograd_casts = 0 if lora else casts.nbytes  # trainable weights are cached under no_grad too
        final_hidden = 4 * shape.hidden * tokens // ulysses  # the fp32 hidden states lm_head reads
        log_prob_peak = (
            resident
            + mask.nbytes
            + max(nograd_casts + 2 * logit_elements + final_hidden, logit_bytes.nograd * logit_elements + row)
        )
    # vLLM starts after the trainer loads (and offloads), before any gradient or AdamW state exists.
    at_vllm_init = (
        resident
        - grads.nbytes
        - adamw.nbytes
        - (weights.nbytes + adapter_bytes + ref.nbytes if params_offloaded else 0)
    )
    return TrainerMemory(
        items=items,
        resident=resident,
        offloaded=offloaded,
        at_vllm_init=at_vllm_init,
        update=update_peak,
        log_prob=log_prob_peak,
        optimizer_step=in_update + step_temp.nbytes,
        shard=shard,
        n_params=n_params,
        n_trainable=n_trainable,
    )
