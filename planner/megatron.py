"""`grpo plan`'s Megatron trainer (actor.strategy=megatron, issue 16): what one GPU holds, item by item.

What engines/trainer/megatron.py builds, and so what is planned here: megatron-core's GPT model
with the local layer spec (no Transformer Engine), tensor parallelism (TP) splitting every Linear
and the vocabulary, one pipeline stage, no sequence parallelism (configs/schema.py refuses
actor.megatron.pipeline_model_parallel_size > 1 and sequence_parallel=true), DP = world / TP
data-parallel ranks. fp32 parameters; on CUDA the forward runs under bf16 autocast (model.dtype
bfloat16); torch AdamW (fused on CUDA) over the rank's shards, its state replicated over DP (no
distributed optimizer); the KL reference a second model in model.dtype on the same GPU; offload
through engines/trainer/offload.py (the modules with their gradients; the AdamW state).

Bytes per parameter of the rank's shard: fp32 weights 4, fp32 gradients 4, AdamW moments 2 x 4,
the reference 2 (bf16): 18, none split over DP. Activations are counted from megatron-core 0.16's
local-spec code (transformer/attention.py, dot_product_attention.py, mlp.py,
tensor_parallel/layers.py and random.py), not measured: every tensor whole on each TP rank but for
the heads and the MLP columns it holds.

Symbols: h hidden, I intermediate, a query heads, q_dim = a x head_dim, L layers, V vocabulary,
t = TP, b micro-batch samples, T = prompt + response tokens and R response tokens (every sample at
full length, padded: the backend takes no packed rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from configs.schema import GRPOConfig
from planner.items import GIB, Item, TrainerMemory
from planner.shapes import Shape

MEGATRON_STRATEGY = "megatron"
"""The actor.strategy of the Megatron backend."""


@dataclass(frozen=True)
class MegatronLayout:
    """What the backend does with the config.

    tensor_parallel / data_parallel: TP (actor.megatron.tensor_model_parallel_size) and DP =
    world / TP. autocast: the forward under bf16 autocast on fp32 weights (CUDA and model.dtype
    bfloat16; else everything fp32). recompute: megatron-core's full recompute, one layer per
    checkpoint (model.enable_gradient_checkpointing; CUDA only, the config refuses it on CPU). param_offload / optimizer_offload:
    actor.param_offload (weights with their gradients, and the reference) and
    actor.optimizer_offload (the AdamW moments) to host memory while vLLM generates (CUDA only)."""

    tensor_parallel: int
    data_parallel: int
    autocast: bool
    recompute: bool
    param_offload: bool
    optimizer_offload: bool


def megatron_layout(cfg: GRPOConfig) -> MegatronLayout:
    """The layout from the config (configs/schema.py has checked that TP divides the world)."""
    actor, cuda = cfg.actor, cfg.trainer.device == "cuda"
    tensor_parallel = actor.megatron.tensor_model_parallel_size
    return MegatronLayout(
        tensor_parallel=tensor_parallel,
        data_parallel=cfg.world_size // tensor_parallel,
        autocast=cuda and cfg.model.dtype == "bfloat16",
        recompute=cfg.model.enable_gradient_checkpointing,  # configs/schema.py refuses it on CPU
        param_offload=cuda and actor.param_offload,
        optimizer_offload=cuda and actor.optimizer_offload,
    )


# ---- parameters on one rank --------------------------------------------------------------------
def layer_linear_weights(shape: Shape, tensor_parallel: int) -> int:
    """Linear weights of one decoder layer on one TP rank: linear_qkv (h x (q_dim + 2 kv_dim)),
    linear_proj (q_dim x h), linear_fc1 (h x 2I: gate and up), linear_fc2 (I x h), each / TP."""
    hidden, q_dim = shape.hidden, shape.heads * shape.head_size
    qkv_out = q_dim + 2 * shape.kv_heads * shape.head_size
    return (hidden * qkv_out + q_dim * hidden + hidden * 2 * shape.intermediate + shape.intermediate * hidden) // (
        tensor_parallel
    )


def layer_params_per_rank(shape: Shape, tensor_parallel: int) -> int:
    """Parameters of one decoder layer on one TP rank: layer_linear_weights, the qkv bias
    ((q_dim + 2 kv_dim) / TP, Qwen2), and the two RMSNorm weights (h each, on every TP rank)."""
    qkv_out = (shape.heads + 2 * shape.kv_heads) * shape.head_size
    bias = qkv_out // tensor_parallel if shape.qkv_bias else 0
    return layer_linear_weights(shape, tensor_parallel) + bias + 2 * shape.hidden


def vocab_rows(shape: Shape, layout: MegatronLayout) -> int:
    """Vocabulary rows on one TP rank: ceil(V / TP) (vocab-parallel embedding and output layer)."""
    return math.ceil(shape.vocab / layout.tensor_parallel)


def params_per_rank(shape: Shape, layout: MegatronLayout) -> int:
    """Parameters on one rank: L layers (layer_params_per_rank), the embedding (ceil(V / TP) x h),
    the final norm (h) and, untied, the output layer (ceil(V / TP) x h; tied, it is the embedding)."""
    layers = shape.layers * layer_params_per_rank(shape, layout.tensor_parallel)
    return layers + vocab_rows(shape, layout) * shape.hidden * (1 if shape.tie else 2) + shape.hidden


def layout_note(layout: MegatronLayout) -> str:
    """The note naming the split, e.g. " / TP 8"."""
    return f" / TP {layout.tensor_parallel}"


# ---- resident state ----------------------------------------------------------------------------
def megatron_weights(per_rank: int, layout: MegatronLayout) -> Item:
    """The policy's fp32 parameters (master weights): 4 B x params_per_rank."""
    note = f"{per_rank / 1e9:.3f}B params on this rank x 4 B{layout_note(layout)}"
    return Item("actor weights (fp32)", "both", 4 * per_rank, note)


def megatron_gradients(per_rank: int) -> Item:
    """fp32 `.grad` of every parameter (autograd casts the bf16 weight gradients to the fp32
    parameter's dtype): 4 B x params_per_rank, made in the first backward of a step and kept
    until the next step's zero_grad(set_to_none=True) (engines/trainer/actor.py)."""
    return Item("gradients (fp32)", "both", 4 * per_rank, "kept between steps (zero_grad at the next step)")


def megatron_adamw_states(per_rank: int, layout: MegatronLayout) -> Item:
    """torch AdamW's exp_avg and exp_avg_sq in fp32: 2 x 4 B x params_per_rank, made at the first
    step; every DP rank holds all of its TP shard's (no distributed optimizer)."""
    replicated = f", replicated over DP {layout.data_parallel}" if layout.data_parallel > 1 else ""
    return Item("AdamW states (exp_avg, exp_avg_sq)", "both", 8 * per_rank, f"2 x 4 B{replicated}")


def reference_bytes(cfg: GRPOConfig) -> int:
    """Bytes per parameter of the reference: it is built in model.dtype (2 B bfloat16, 4 B float32)."""
    return 2 if cfg.model.dtype == "bfloat16" else 4


def megatron_reference(per_rank: int, cfg: GRPOConfig) -> Item:
    """The KL reference (actor.use_kl_loss): a second GPTModel of the same split in model.dtype on
    the trainer's GPU, reference_bytes x params_per_rank; nothing without a KL loss."""
    if not cfg.actor.use_kl_loss:
        return Item("reference model", "both", 0, "no KL loss")
    nbytes = reference_bytes(cfg)
    return Item(f"reference model ({cfg.model.dtype})", "both", nbytes * per_rank, f"same TP split x {nbytes} B")


def attention_score_buffer(shape: Shape, layout: MegatronLayout, micro: int, seq: int) -> Item:
    """The [b x a / TP, T, T] buffer DotProductAttention takes from megatron-core's global memory
    buffer for torch.baddbmm's input, one per dtype, never freed (not offloaded either). Its dtype
    is the query's: fp32 when linear_qkv adds its fp32 bias (Qwen2: bf16 + fp32 promotes) or
    without autocast, bf16 otherwise; the recompute in backward runs without autocast (megatron-core's
    CheckpointFunction does not restore it), so recompute adds an fp32 one. Bytes per element:
    (4 if qkv bias or no autocast, else 2) + (4 with recompute when that first one is bf16)."""
    forward = 4 if shape.qkv_bias or not layout.autocast else 2
    per_element = forward + (4 if layout.recompute and forward == 2 else 0)
    nbytes = per_element * micro * (shape.heads // layout.tensor_parallel) * seq * seq
    note = f"megatron-core global memory buffer, [B x heads/TP, T, T] x {per_element} B"
    return Item("attention score buffer", "both", nbytes, note)


# ---- one micro-batch ---------------------------------------------------------------------------
def layer_bytes_per_token(shape: Shape, layout: MegatronLayout, seq: int, autocast: bool) -> int:
    """Bytes one decoder layer saves for backward, per token of a micro-batch of T = seq tokens.

    Both ways: the two RMSNorms' fp32 inputs (the residual stream is fp32: fp32 embedding plus bf16
    branch outputs) and their fp32 outputs, which linear_qkv and linear_fc1 save: 4 B x 4h.
    Under autocast (bf16 matmuls): q, and K and V repeat_interleave'd to a / TP heads, as the
    bf16 casts baddbmm and bmm save (2 B x 3 q_dim / TP), linear_proj's bf16 input (2 B x q_dim /
    TP), fc1's output (gate and up), silu(gate) and their product (2 B x 4I / TP), and per score
    (a / TP heads x T) the fp32 softmax output and its bf16 cast for bmm (6 B). Without autocast
    (the recompute in backward, or no CUDA) the same tensors in fp32, the probabilities once:
    4 B x (4 q_dim + 4I) / TP + 4 B per score."""
    tensor_parallel, q_dim = layout.tensor_parallel, shape.heads * shape.head_size
    heads = shape.heads // tensor_parallel
    if autocast:
        split = 2 * (4 * q_dim + 4 * shape.intermediate) // tensor_parallel + 6 * heads * seq
    else:
        split = 4 * (4 * q_dim + 4 * shape.intermediate) // tensor_parallel + 4 * heads * seq
    return 16 * shape.hidden + split


def head_input_bytes_per_token(shape: Shape) -> int:
    """The final norm's fp32 input and its fp32 output (saved by the output layer): 4 B x 2h."""
    return 8 * shape.hidden


def megatron_activations(shape: Shape, layout: MegatronLayout, micro: int, seq: int) -> tuple[Item, float, float]:
    """Saved activations of one training micro-batch of b x T tokens: (item, kept, recomputed
    layer) in bytes.

    Recompute: each of the L checkpoints keeps its layer's fp32 input (4 B x h per token); in
    backward one layer is recomputed without autocast (layer_bytes_per_token, fp32) and lives with
    its fp32 pre-softmax scores (4 B x a / TP x T per token). Without: L x layer_bytes_per_token
    (autocast as the layout runs). Both: + head_input_bytes_per_token."""
    tokens = micro * seq
    head = head_input_bytes_per_token(shape) * tokens
    if layout.recompute:
        kept = shape.layers * 4 * shape.hidden * tokens + head
        scores = 4 * (shape.heads // layout.tensor_parallel) * seq * tokens
        recomputed = layer_bytes_per_token(shape, layout, seq, autocast=False) * tokens + scores
    else:
        kept = shape.layers * layer_bytes_per_token(shape, layout, seq, layout.autocast) * tokens + head
        recomputed = 0
    note = (
        f"micro-batch {micro} x {seq} tokens, TP {layout.tensor_parallel} splits heads and MLP only (no sequence parallel)"
        + (f"; + {recomputed / GIB:.2f} GiB: one layer recomputed in fp32" if recomputed else "")
    )
    name = f"activations, recompute {'on' if layout.recompute else 'off'}"
    return Item(name, "train", kept + recomputed, note), kept, recomputed


def megatron_activations_other_way(shape: Shape, layout: MegatronLayout, micro: int, seq: int) -> Item:
    """The activations with recompute flipped, for comparison: not summed into any phase."""
    flipped = megatron_activations(shape, replace(layout, recompute=not layout.recompute), micro, seq)[0]
    name = f"(activations if recompute {'off' if layout.recompute else 'on'})"
    return Item(name, "-", flipped.nbytes, "for comparison only")


def megatron_attention_mask(micro: int, seq: int) -> Item:
    """The backend's masks (engines/trainer/megatron.py _forward): the [T, T] causal bool and the
    [b, 1, T, T] bool mask of the padded micro-batch, 1 B x (b + 1) x T^2."""
    return Item("attention mask", "train", (micro + 1) * seq * seq, "[T,T] causal + [B,1,T,T] bool (padded batch)")


def weight_casts(shape: Shape, layout: MegatronLayout) -> Item:
    """bf16 copies of the rank's matmul weights: autocast casts each fp32 weight once and caches
    the copy until the forward's autocast context exits (a cached leaf that requires grad), so at
    the forward's end all of them exist: 2 B x (L x layer_linear_weights + ceil(V / TP) x h, the
    output layer's, or the embedding's when tied). Biases and norms are not cast. None without
    autocast."""
    if not layout.autocast:
        return Item("bf16 weight copies", "train", 0, "none: no autocast")
    n = shape.layers * layer_linear_weights(shape, layout.tensor_parallel) + vocab_rows(shape, layout) * shape.hidden
    return Item("bf16 weight copies", "train", 2 * n, "autocast cache of every Linear during a policy forward")


def logit_elements(shape: Shape, layout: MegatronLayout, micro: int, tokens: int) -> int:
    """Vocab-parallel logit elements of `tokens` positions per sample: b x tokens x ceil(V / TP)."""
    return micro * tokens * vocab_rows(shape, layout)


def logit_dtype_bytes(layout: MegatronLayout) -> int:
    """Bytes of the output layer's logits: 2 under bf16 autocast, 4 without."""
    return 2 if layout.autocast else 4


def forward_end_logits(shape: Shape, layout: MegatronLayout, micro: int, seq: int) -> int:
    """The output layer's [T, b, V / TP] logits and GPTModel's transposed contiguous [b, T, V / TP]
    copy, both alive a moment: 2 x logit_dtype_bytes x b x T x ceil(V / TP)."""
    return 2 * logit_dtype_bytes(layout) * logit_elements(shape, layout, micro, seq)


def megatron_logits(shape: Shape, layout: MegatronLayout, micro: int, seq: int, resp: int) -> Item:
    """The log-prob stage of a training micro-batch (engines/trainer/megatron_logprobs.py, with
    entropy): the logits of every position stay (c = logit_dtype_bytes, [b, T, V / TP]) while the
    response slice ([b, R, V / TP]) is worked in fp32: x = logits.float() / temperature, z = x - m,
    e = exp(z) and e x z, 4 B each: c x b T V/TP + 16 B x b R V/TP. Backward: the saved z and e
    with the products of MulBackward (e x z), their sum and exp's gradient, five fp32 [b, R, V/TP]
    at once: 20 B x b R V/TP. The larger of the two (read from the code, not measured)."""
    full, response = logit_elements(shape, layout, micro, seq), logit_elements(shape, layout, micro, resp)
    forward = logit_dtype_bytes(layout) * full + 16 * response
    nbytes = max(forward, 20 * response)
    note = (
        f"{micro} x {seq} x vocab {shape.vocab}/{layout.tensor_parallel}; fp32 copies of the {resp} response positions"
    )
    return Item("logits + fp32 log-prob copies", "train", nbytes, note)


def nograd_logits(shape: Shape, layout: MegatronLayout, micro: int, seq: int, resp: int) -> int:
    """The log-prob stage of a no-grad pass (no entropy): the logits of every position and x, z
    and e of the response slice: logit_dtype_bytes x b T V/TP + 12 B x b R V/TP."""
    full, response = logit_elements(shape, layout, micro, seq), logit_elements(shape, layout, micro, resp)
    return logit_dtype_bytes(layout) * full + 12 * response


def gradient_all_reduce_buffer(per_rank: int, layout: MegatronLayout) -> Item:
    """With DP > 1 the clip sums the gradients over DP through one flat fp32 buffer of all of them
    (engines/trainer/megatron.py _all_reduce_coalesced, torch.cat): 4 B x params_per_rank; none at
    DP 1. AdamW is fused on CUDA: its step makes no temporary."""
    if layout.data_parallel == 1:
        return Item("gradient all-reduce buffer", "train", 0, "none: DP 1")
    return Item(
        "gradient all-reduce buffer", "train", 4 * per_rank, f"flat fp32 copy, summed over DP {layout.data_parallel}"
    )


def megatron_trainer_memory(cfg: GRPOConfig, shape: Shape, micro: int) -> TrainerMemory:
    """The Megatron trainer's items and phase peaks for micro-batches of `micro` samples.

    State: weights + gradients + moments + reference; the score buffer stays on the GPU through
    every phase. Update (engines/worker.py brings everything back first): state + buffer + mask +
    kept activations + the largest of the forward's end (weight casts + forward_end_logits), the
    log-prob stage (megatron_logits) and the recomputed layer; the gradients are counted whole
    (from a step's second micro-batch on they all exist). Log-prob pass (no grad; the moments stay
    on the host with actor.optimizer_offload): state + buffer + mask + the larger of the policy
    forward's end (casts + the larger of the logits and one layer's tensors) and nograd_logits.
    Optimizer step: state + buffer + gradient_all_reduce_buffer. At vLLM's start (after the first
    offload) the weights and reference unless offloaded; no gradient, moment or buffer yet."""
    layout = megatron_layout(cfg)
    per_rank = params_per_rank(shape, layout)
    resp = cfg.rollout.max_response_length
    seq = cfg.data.max_prompt_length + resp
    weights, grads = megatron_weights(per_rank, layout), megatron_gradients(per_rank)
    moments, ref = megatron_adamw_states(per_rank, layout), megatron_reference(per_rank, cfg)
    buffer = attention_score_buffer(shape, layout, micro, seq)
    saved, kept, recomputed = megatron_activations(shape, layout, micro, seq)
    mask = megatron_attention_mask(micro, seq)
    casts = weight_casts(shape, layout)
    logit_item = megatron_logits(shape, layout, micro, seq, resp)
    all_reduce = gradient_all_reduce_buffer(per_rank, layout)
    comparison = megatron_activations_other_way(shape, layout, micro, seq)
    items = [weights, grads, moments, ref, buffer, saved, comparison, mask, casts, logit_item, all_reduce]

    state = weights.nbytes + grads.nbytes + moments.nbytes + ref.nbytes
    resident = state + buffer.nbytes
    offloaded = (weights.nbytes + grads.nbytes + ref.nbytes if layout.param_offload else 0) + (
        moments.nbytes if layout.optimizer_offload else 0
    )
    forward_end = casts.nbytes + forward_end_logits(shape, layout, micro, seq)
    update_peak = resident + mask.nbytes + kept + max(forward_end, logit_item.nbytes, recomputed)
    one_layer = layer_bytes_per_token(shape, layout, seq, layout.autocast) * micro * seq
    nograd_forward = casts.nbytes + max(forward_end_logits(shape, layout, micro, seq), one_layer)
    in_log_prob = resident - (moments.nbytes if layout.optimizer_offload else 0)
    log_prob_peak = in_log_prob + mask.nbytes + max(nograd_forward, nograd_logits(shape, layout, micro, seq, resp))
    n_params = shape.n_params()
    return TrainerMemory(
        items=items,
        resident=resident,
        offloaded=offloaded,
        at_vllm_init=0 if layout.param_offload else weights.nbytes + ref.nbytes,
        update=update_peak,
        log_prob=log_prob_peak,
        optimizer_step=resident + all_reduce.nbytes,
        shard=1,
        n_params=n_params,
        n_trainable=n_params,
    )
