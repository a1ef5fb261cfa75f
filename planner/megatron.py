"""`grpo plan`'s Megatron trainer (actor.strategy=megatron, issue 16): what one GPU holds, item by item.

The backend builds megatron-core's GPT model with the local layer spec (no Transformer Engine:
engines/trainer/megatron_model.py): bf16 weights, its DistributedDataParallel's fp32 gradient
buffer, and an optimizer holding fp32 main params and AdamW's two moments; tensor parallelism (TP)
splits every Linear and the vocabulary, pipeline parallelism (PP) splits the layers, and the
distributed optimizer splits its state over the data-parallel ranks (DP = world / (TP x PP)).

Bytes per parameter: bf16 weights 2, fp32 gradients 4, fp32 main params 4, AdamW moments 2 x 4:
"bf16 parameters, fp32 gradients: 18 (non-distributed optimizer), 6 + 12/d (distributed
optimizer)", d the data-parallel size (the Megatron Core developer guide, "Distributed Optimizer",
its table of theoretical bytes per parameter). Activations follow the per-layer count of Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models" (s. 4, Table 2: sequence parallelism splits the part
tensor parallelism leaves whole), redone for the local spec's tensors: SwiGLU MLP, grouped-query
attention whose K/V are expanded to every query head, softmax in fp32, no dropout (p = 0).

Symbols: h hidden, I intermediate, a query heads, q_dim = a x head_dim, kv_dim = kv_heads x
head_dim, L layers, V vocabulary, b micro-batch samples, T = prompt + response tokens (every sample
at full length, padded: the local spec's DotProductAttention takes no packed sequences).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from configs.schema import GRPOConfig
from planner.items import Item, TrainerMemory
from planner.shapes import Shape

MEGATRON_STRATEGY = "megatron"
"""The actor.strategy of the Megatron backend."""

MEGATRON_LOGIT_BYTES_TRAIN = 8
"""Bytes per vocab-parallel logit element in a training micro-batch: the output layer's bf16 logits
(2), the fp32 copy megatron-core's vocab-parallel cross-entropy works on in place and saves as the
softmax for backward (4: tensor_parallel/cross_entropy.py, `.float()`, `exp`, `div_`), and the bf16
gradient back into the output layer (2). Read from megatron-core 0.16, not measured."""
MEGATRON_LOGIT_BYTES_NOGRAD = 6
"""The same in a no-grad log-prob pass: bf16 logits (2) and the fp32 working copy (4)."""


@dataclass(frozen=True)
class MegatronLayout:
    """How the Megatron backend splits the model over the world.

    tensor_parallel / pipeline_parallel / data_parallel: TP, PP and DP = world / (TP x PP).
    sequence_parallel: the tensors TP leaves whole (norm and Linear inputs) are split over the
    sequence too. distributed_optimizer: fp32 main params and moments split over DP. recompute:
    full activation recompute, one layer per checkpoint. param_offload / grad_offload /
    optimizer_offload: which state leaves the GPU while vLLM generates (verl's
    actor.megatron.param_offload, grad_offload, optimizer_offload)."""

    tensor_parallel: int
    pipeline_parallel: int
    data_parallel: int
    sequence_parallel: bool
    distributed_optimizer: bool
    recompute: bool
    param_offload: bool
    grad_offload: bool
    optimizer_offload: bool

    @property
    def optimizer_split(self) -> int:
        """How many ranks share the optimizer state: DP with the distributed optimizer, else 1."""
        return self.data_parallel if self.distributed_optimizer else 1


def megatron_layout(cfg: GRPOConfig) -> MegatronLayout:
    """The layout from the config: TP from actor.megatron_tensor_parallel_size; this build's
    schema has no pipeline, sequence-parallel, distributed-optimizer or gradient-offload key yet, so
    PP = 1, sequence parallel whenever TP > 1, the distributed optimizer on (verl's defaults), the
    gradients offloaded with the weights (actor.param_offload, as the FSDP2 backend moves them),
    recompute from model.enable_gradient_checkpointing. Raises ValueError, one line, when TP x PP
    does not divide the world."""
    actor = cfg.actor
    tensor_parallel, pipeline_parallel = actor.megatron_tensor_parallel_size, 1
    model_parallel = tensor_parallel * pipeline_parallel
    if cfg.world_size % model_parallel:
        raise ValueError(
            f"actor.megatron_tensor_parallel_size={tensor_parallel} does not divide the world size "
            f"{cfg.world_size} (trainer.n_gpus_per_node x trainer.nnodes); choose a tensor-parallel size that divides it"
        )
    return MegatronLayout(
        tensor_parallel=tensor_parallel,
        pipeline_parallel=pipeline_parallel,
        data_parallel=cfg.world_size // model_parallel,
        sequence_parallel=tensor_parallel > 1,
        distributed_optimizer=True,
        recompute=cfg.model.enable_gradient_checkpointing,
        param_offload=actor.param_offload,
        grad_offload=actor.param_offload,
        optimizer_offload=actor.optimizer_offload,
    )


# ---- parameters on one rank --------------------------------------------------------------------
def layer_params_per_rank(shape: Shape, tensor_parallel: int) -> int:
    """Parameters of one decoder layer on one TP rank: linear_qkv (h x (q_dim + 2 kv_dim), its bias
    for Qwen2), linear_proj (q_dim x h), linear_fc1 (h x 2I: gate and up), linear_fc2 (I x h), each
    / TP; the two RMSNorm weights (h each) are replicated on every TP rank."""
    hidden, qkv_out = shape.hidden, (shape.heads + 2 * shape.kv_heads) * shape.head_size
    split = (
        hidden * qkv_out
        + (qkv_out if shape.qkv_bias else 0)
        + shape.heads * shape.head_size * hidden
        + hidden * 2 * shape.intermediate
        + shape.intermediate * hidden
    ) // tensor_parallel
    return split + 2 * hidden


def params_per_rank(shape: Shape, layout: MegatronLayout) -> int:
    """Parameters on the most loaded rank: ceil(L / PP) layers (layer_params_per_rank), the
    vocab-parallel embedding (ceil(V / TP) x h), and on the last stage the final norm (h) and the
    output layer (ceil(V / TP) x h; tied: with PP > 1 the last stage holds a copy of the embedding,
    megatron-core's shared output weight; with PP = 1 nothing more)."""
    tensor_parallel, pipeline_parallel = layout.tensor_parallel, layout.pipeline_parallel
    layers = math.ceil(shape.layers / pipeline_parallel) * layer_params_per_rank(shape, tensor_parallel)
    vocab_rows = math.ceil(shape.vocab / tensor_parallel) * shape.hidden
    if pipeline_parallel == 1:
        return layers + vocab_rows * (1 if shape.tie else 2) + shape.hidden
    return layers + vocab_rows + shape.hidden  # the last stage: output layer + final norm


def layout_note(layout: MegatronLayout) -> str:
    """The note naming the split, e.g. " / TP 8" or " / TP 2 x PP 2"."""
    parts = [f"TP {layout.tensor_parallel}"] + (
        [f"PP {layout.pipeline_parallel}"] if layout.pipeline_parallel > 1 else []
    )
    return " / " + " x ".join(parts)


# ---- resident state ----------------------------------------------------------------------------
def megatron_weights(per_rank: int, layout: MegatronLayout) -> Item:
    """The model's bf16 weights on one rank: 2 B x params_per_rank."""
    return Item(
        "actor weights (bf16)",
        "both",
        2 * per_rank,
        f"{per_rank / 1e9:.3f}B params on this rank x 2 B{layout_note(layout)}",
    )


def megatron_gradients(per_rank: int) -> Item:
    """DistributedDataParallel's fp32 gradient buffer (grad_reduce_in_fp32, the bf16 default of
    Megatron-LM): 4 B x params_per_rank, allocated when the model is wrapped and zeroed, not freed,
    between steps; not split by the distributed optimizer (it reduce-scatters from it)."""
    return Item("gradients (fp32 buffer)", "both", 4 * per_rank, "DDP grad buffer, kept between steps")


def main_params(per_rank: int, layout: MegatronLayout) -> Item:
    """The optimizer's fp32 main params: 4 B x params_per_rank / (DP with the distributed optimizer)."""
    note = (
        f"fp32 copy / DP {layout.optimizer_split} (distributed optimizer)"
        if layout.optimizer_split > 1
        else "fp32 copy"
    )
    return Item("optimizer main params (fp32)", "both", 4 * per_rank / layout.optimizer_split, note)


def megatron_adamw_states(per_rank: int, layout: MegatronLayout) -> Item:
    """AdamW's exp_avg and exp_avg_sq in fp32: 2 x 4 B x params_per_rank / (DP with the
    distributed optimizer), created at the first step."""
    split = layout.optimizer_split
    note = "2 x 4 B" + (f" / DP {split} (distributed optimizer)" if split > 1 else "")
    return Item("AdamW states (exp_avg, exp_avg_sq)", "both", 8 * per_rank / split, note)


def megatron_reference(per_rank: int, has_reference: bool) -> Item:
    """The KL reference, a second bf16 model with the same layout: 2 B x params_per_rank; nothing
    without actor.use_kl_loss."""
    if has_reference:
        return Item("reference model (bf16)", "both", 2 * per_rank, "same TP/PP split, full FT with KL loss")
    return Item("reference model", "both", 0, "no KL loss")


# ---- one training micro-batch ------------------------------------------------------------------
def layer_activation_bytes_per_token(shape: Shape, layout: MegatronLayout, seq: int) -> float:
    """Bytes one decoder layer saves for backward, per token of a micro-batch of T = seq tokens.

    Sequence-parallel part, split by TP only with sequence parallelism: 2 B x (the two norm inputs
    and the inputs of linear_qkv and linear_fc1) = 8h. Tensor-parallel part, / TP: q, and K and V
    expanded to every query head (2 B x 3 q_dim, saved by the two batched matmuls), linear_proj's
    input (2 B x q_dim), fc1's output (gate and up, 2 B x 2I), silu(gate) (2 B x I) and fc2's input
    (2 B x I): 8 q_dim + 8I; and the attention scores, per token a / TP heads x T scores, each kept
    as the fp32 softmax output and its bf16 copy (6 B). Korthikanti et al.'s 34 sbh + 5 as^2 b
    counts the same tensors for a 4h GeLU MLP with dropout."""
    tensor_parallel = layout.tensor_parallel
    sequence_part = 8 * shape.hidden
    tensor_part = 8 * shape.heads * shape.head_size + 8 * shape.intermediate + 6 * shape.heads * seq
    return (sequence_part / (tensor_parallel if layout.sequence_parallel else 1)) + tensor_part / tensor_parallel


def hidden_bytes_per_token(shape: Shape, layout: MegatronLayout) -> float:
    """One bf16 hidden state per token, 2 B x h, / TP with sequence parallelism: what a recompute
    checkpoint keeps of each layer (its input), and each of the final norm's and the output
    layer's saved inputs."""
    return 2 * shape.hidden / (layout.tensor_parallel if layout.sequence_parallel else 1)


def in_flight_micro_batches(layout: MegatronLayout) -> int:
    """Micro-batches whose activations the first pipeline stage holds at once under the 1F1B
    schedule: PP (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU
    Clusters Using Megatron-LM", s. 2.2.1); 1 without pipeline parallelism."""
    return layout.pipeline_parallel


def megatron_activations(shape: Shape, layout: MegatronLayout, micro: int, seq: int) -> tuple[Item, float, float]:
    """Saved activations of one training micro-batch of b x T tokens on the most loaded stage, and
    their split: (item, kept, recomputed layer) in bytes.

    Recompute (full, one layer per checkpoint): each of the stage's ceil(L / PP) layers keeps its
    input (hidden_bytes_per_token) for each in-flight micro-batch, and one layer's tensors live
    while it is recomputed in backward. Without: every layer's tensors for each in-flight
    micro-batch. Plus the final norm's and the output layer's inputs (2 x hidden_bytes_per_token)."""
    tokens = micro * seq
    layers = math.ceil(shape.layers / layout.pipeline_parallel)
    in_flight = in_flight_micro_batches(layout)
    per_layer = layer_activation_bytes_per_token(shape, layout, seq) * tokens
    head_inputs = 2 * hidden_bytes_per_token(shape, layout) * tokens
    if layout.recompute:
        kept = in_flight * layers * hidden_bytes_per_token(shape, layout) * tokens + head_inputs
        recomputed = per_layer
    else:
        kept, recomputed = in_flight * layers * per_layer + head_inputs, 0
    note = f"micro-batch {micro} x {seq} tokens{layout_note(layout)}" + (
        ", sequence parallel" if layout.sequence_parallel else ""
    )
    name = f"activations, recompute {'on' if layout.recompute else 'off'}"
    return Item(name, "train", kept + recomputed, note), kept, recomputed


def megatron_activations_other_way(shape: Shape, layout: MegatronLayout, micro: int, seq: int) -> Item:
    """The activations with recompute flipped, for comparison: not summed into any phase."""
    flipped = megatron_activations(shape, replace(layout, recompute=not layout.recompute), micro, seq)[0]
    return Item(
        f"(activations if recompute {'off' if layout.recompute else 'on'})", "-", flipped.nbytes, "for comparison only"
    )


def attention_score_buffer(shape: Shape, layout: MegatronLayout, micro: int, seq: int) -> Item:
    """The bf16 [b x a / TP, T, T] buffer DotProductAttention takes from megatron-core's global memory
    buffer for its scores (torch.baddbmm's input): 2 B x b x a / TP x T^2, kept across layers and steps."""
    nbytes = 2 * micro * (shape.heads // layout.tensor_parallel) * seq * seq
    return Item(
        "attention score buffer (bf16)", "train", nbytes, "megatron-core global memory buffer, [B x heads/TP, T, T]"
    )


def megatron_attention_mask(micro: int, seq: int) -> Item:
    """The [b, 1, T, T] bool attention mask of a padded micro-batch (causal + padding): 1 B x b x T^2."""
    return Item("attention mask", "train", micro * seq * seq, "[B,1,T,T] bool (padded batch, no packed sequences)")


def vocab_parallel_logit_elements(shape: Shape, layout: MegatronLayout, micro: int, seq: int) -> int:
    """Logit elements on one TP rank: b x T x ceil(V / TP) (megatron-core's output layer computes
    every position, split over the vocabulary)."""
    return micro * seq * math.ceil(shape.vocab / layout.tensor_parallel)


def megatron_logits(shape: Shape, layout: MegatronLayout, micro: int, seq: int) -> Item:
    """Vocab-parallel logits of a training micro-batch: MEGATRON_LOGIT_BYTES_TRAIN x
    vocab_parallel_logit_elements."""
    elements = vocab_parallel_logit_elements(shape, layout, micro, seq)
    note = f"{micro} x {seq} x vocab {shape.vocab}/{layout.tensor_parallel} x {MEGATRON_LOGIT_BYTES_TRAIN} B"
    return Item("logits (vocab-parallel, fwd+bwd)", "train", MEGATRON_LOGIT_BYTES_TRAIN * elements, note)


def megatron_step_temporary(per_rank: int, layout: MegatronLayout) -> Item:
    """AdamW's step temporary: without Transformer Engine or Apex megatron-core steps with
    torch.optim.AdamW (optimizer/__init__.py), foreach on CUDA, which materialises
    sqrt(exp_avg_sq): 4 B x params_per_rank / (DP with the distributed optimizer)."""
    nbytes = 4 * per_rank / layout.optimizer_split
    return Item("optimizer step temporary", "train", nbytes, "torch foreach AdamW sqrt(exp_avg_sq)")


def megatron_trainer_memory(cfg: GRPOConfig, shape: Shape, micro: int) -> TrainerMemory:
    """The Megatron trainer's items and phase peaks for micro-batches of `micro` samples.

    Update: the state in the update (the reference off the GPU with actor.param_offload) + score
    buffer + mask + kept activations + the larger of the logits (the loss's backward comes first)
    and the recomputed layer (after the logits are freed). Log-prob (no grad): the resident state +
    score buffer + mask + the larger of one layer's tensors and the no-grad logits. Optimizer step:
    the state in the update + the step temporary. At vLLM's start the weights, gradient buffer and
    main params exist unless offloaded; the AdamW moments not yet. LoRA is not planned here
    (planner/__init__.py says NOT MODELLED)."""
    layout = megatron_layout(cfg)
    per_rank = params_per_rank(shape, layout)
    seq = cfg.data.max_prompt_length + cfg.rollout.max_response_length
    weights = megatron_weights(per_rank, layout)
    grads = megatron_gradients(per_rank)
    main = main_params(per_rank, layout)
    moments = megatron_adamw_states(per_rank, layout)
    ref = megatron_reference(per_rank, cfg.actor.use_kl_loss)
    saved, kept, recomputed = megatron_activations(shape, layout, micro, seq)
    buffer = attention_score_buffer(shape, layout, micro, seq)
    mask = megatron_attention_mask(micro, seq)
    logit_item = megatron_logits(shape, layout, micro, seq)
    step_temp = megatron_step_temporary(per_rank, layout)
    comparison = megatron_activations_other_way(shape, layout, micro, seq)
    items = [weights, grads, main, moments, ref, saved, comparison, buffer, mask, logit_item, step_temp]

    resident = weights.nbytes + grads.nbytes + main.nbytes + moments.nbytes + ref.nbytes
    params_away = weights.nbytes + ref.nbytes if layout.param_offload else 0
    grads_away = grads.nbytes if layout.grad_offload else 0
    offloaded = params_away + grads_away + (main.nbytes + moments.nbytes if layout.optimizer_offload else 0)
    at_vllm_init = (
        resident - moments.nbytes - params_away - grads_away - (main.nbytes if layout.optimizer_offload else 0)
    )
    in_update = resident - (ref.nbytes if layout.param_offload else 0)
    update_peak = in_update + buffer.nbytes + mask.nbytes + kept + max(logit_item.nbytes, recomputed)
    nograd_logits = MEGATRON_LOGIT_BYTES_NOGRAD * vocab_parallel_logit_elements(shape, layout, micro, seq)
    one_layer = layer_activation_bytes_per_token(shape, layout, seq) * micro * seq
    log_prob_peak = resident + buffer.nbytes + mask.nbytes + max(nograd_logits, one_layer)
    n_params = shape.n_params()
    return TrainerMemory(
        items=items,
        resident=resident,
        offloaded=offloaded,
        at_vllm_init=at_vllm_init,
        update=update_peak,
        log_prob=log_prob_peak,
        optimizer_step=in_update + step_temp.nbytes,
        shard=1,
        n_params=n_params,
        n_trainable=n_params,
    )
