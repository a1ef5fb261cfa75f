"""GRPO/PPO maths for the actor update: advantages, KL estimators, loss aggregation,
the clipped policy loss and log-prob / entropy from logits.

Everything here is pure torch so it can be unit-tested on CPU and reused by any
training engine. Token-level tensors are ``[batch, response_len]`` and come with a
float ``mask`` (1 = real response token, 0 = padding). Knob names follow the
verl / TRL GRPO configs (``clip_ratio_low``, ``clip_ratio_high``, ``clip_ratio_c``,
``loss_agg_mode``, ``kl_loss_type``, ``norm_adv_by_std_in_grpo``) so recipe values
can be copied over unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "KL_ESTIMATORS",
    "LOSS_AGG_MODES",
    "agg_loss",
    "grpo_advantages",
    "kl_penalty",
    "token_logprobs",
    "masked_mean",
    "num_valid_seqs",
    "policy_loss",
]

# Every accepted spelling; verl's names and the k1/k2/k3 names from Schulman's note.
KL_ESTIMATORS: tuple[str, ...] = ("k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl")

LOSS_AGG_MODES: tuple[str, ...] = (
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)


# --------------------------------------------------------------------------- helpers
def _safe_denom(denom: Tensor | float, like: Tensor) -> Tensor:
    """Turn a zero denominator into 1: an all-padding batch then gives 0, not NaN
    (its numerator is 0 anyway)."""
    d = torch.as_tensor(denom, dtype=like.dtype, device=like.device)
    return torch.where(d > 0, d, torch.ones_like(d))


def _masked(x: Tensor, mask: Tensor) -> Tensor:
    """x * mask, but padding positions that hold inf/NaN cannot leak into sums."""
    mask = mask.to(x.dtype)
    return torch.where(mask != 0, x, torch.zeros_like(x)) * mask


def masked_mean(x: Tensor, mask: Tensor, denom: Tensor | float | None = None) -> Tensor:
    """Mean of ``x`` over the tokens where ``mask`` is set: a 0-dim tensor in ``x``'s dtype.

    x, mask: the same shape (e.g. ``[B, T]``; mask 0/1 or bool). ``denom`` replaces the local token count; pass the token count of the whole
    mini-batch to get this micro-batch's share of the mini-batch mean (the shares
    sum to the full-batch mean). A zero denominator yields 0 instead of NaN.
    """
    mask = mask.to(x.dtype)
    if denom is None:
        denom = mask.sum()
    return _masked(x, mask).sum() / _safe_denom(denom, x)


def num_valid_seqs(mask: Tensor) -> Tensor:
    """How many rows of a ``[B, T]`` 0/1 mask have at least one real token (a 0-dim integer
    tensor): the sequence count the ``seq-mean-*`` modes divide by. Use it to compute ``global_seqs`` over a
    mini-batch so micro-batch shares add up exactly."""
    return (mask.sum(dim=-1) > 0).sum()


# ------------------------------------------------------------------------ advantages
@torch.no_grad()
def grpo_advantages(
    scores: Tensor,
    group_ids: Sequence[Any] | Tensor,
    norm_by_std: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """Group-relative outcome advantage (GRPO), one scalar per sample.

    Samples with the same group id (the n responses to one prompt) are compared
    with each other: ``(r - mean) / (std + eps)`` with the unbiased std, as in
    verl's ``compute_grpo_outcome_advantage``. A group holding a single sample has
    no baseline to compare with, so verl uses mean 0 and std 1 for it, giving
    ``r / (1 + eps)``; we do the same. ``norm_by_std=False`` (verl's
    ``norm_adv_by_std_in_grpo=False``) drops the std division, as Dr. GRPO argues
    the std re-weights easy/hard prompts. The caller broadcasts over tokens.

    scores: ``[N]`` rewards; group_ids: N ids (any hashables, or a tensor). Returns ``[N]``
    advantages in scores' dtype (float32 for integer scores). Raises ValueError when scores are
    not 1-D or the ids are not one per score.
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D [batch], got shape {tuple(scores.shape)}")
    out_dtype = scores.dtype if scores.is_floating_point() else torch.float32
    n = scores.shape[0]
    if len(group_ids) != n:
        raise ValueError(f"got {len(group_ids)} group ids for {n} scores")
    if n == 0:
        return scores.to(out_dtype).clone()

    # Map arbitrary group ids (ints, uid strings, tensor values) to 0..G-1.
    if isinstance(group_ids, Tensor):
        _, inv = torch.unique(group_ids.reshape(-1), return_inverse=True)
        inv = inv.to(scores.device)
    else:
        slot: dict[Any, int] = {}
        inv_list = [slot.setdefault(g, len(slot)) for g in group_ids]
        inv = torch.tensor(inv_list, dtype=torch.long, device=scores.device)
    num_groups = int(inv.max().item()) + 1

    # Float64 for the group statistics, so an all-equal group gives an exact 0.
    r = scores.to(torch.float64)
    count = torch.zeros(num_groups, dtype=torch.float64, device=r.device).index_add_(0, inv, torch.ones_like(r))
    total = torch.zeros_like(count).index_add_(0, inv, r)
    mean = total / count
    sq_dev = torch.zeros_like(count).index_add_(0, inv, (r - mean[inv]) ** 2)
    std = torch.sqrt(sq_dev / (count - 1).clamp(min=1))  # unbiased (n - 1)

    single = count == 1
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(std), std)

    adv = r - mean[inv]
    if norm_by_std:
        adv = adv / (std[inv] + eps)
    return adv.to(out_dtype)


# ------------------------------------------------------------------------------- KL
# algorithm.adv_estimator -> fn(scores [N], group_ids (N), norm_by_std) -> advantages [N]. The
# schema's Literal lists the same names: a new estimator is a function here and its name there.
ADV_ESTIMATORS = {"grpo": grpo_advantages}


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str) -> Tensor:
    """Per-token estimate of KL(policy || ref) from sampled-token log-probs
    (verl's ``kl_loss_type``).

    - ``k1`` / ``kl``: ``logp - ref_logp``; unbiased but high variance, can be < 0.
    - ``abs``: ``|logp - ref_logp|``.
    - ``k2`` / ``mse``: ``0.5 * (logp - ref_logp)^2``.
    - ``k3`` / ``low_var_kl``: with ``d = ref_logp - logp``, ``exp(d) - d - 1``;
      unbiased, always >= 0 and low variance. ``d`` is clamped to [-20, 20] before
      the exp and the result to [-10, 10], as verl does, so one badly-off token
      cannot blow up the loss.

    logp, ref_logp: sampled-token log-probs in nats, the same shape (``[B, T]``); returns that
    shape, in nats. Raises ValueError for an unknown ``kind`` (KL_ESTIMATORS lists them).
    """
    if kind in ("k1", "kl"):
        return logp - ref_logp
    if kind == "abs":
        return (logp - ref_logp).abs()
    if kind in ("k2", "mse"):
        return 0.5 * (logp - ref_logp).square()
    if kind in ("k3", "low_var_kl"):
        d = torch.clamp(ref_logp - logp, min=-20.0, max=20.0)
        return torch.clamp(torch.exp(d) - d - 1.0, min=-10.0, max=10.0)
    raise ValueError(f"unknown KL estimator {kind!r}; valid: {', '.join(KL_ESTIMATORS)}")


# ----------------------------------------------------------------- loss aggregation
def agg_loss(
    loss_mat: Tensor,
    mask: Tensor,
    mode: str,
    *,
    global_tokens: Tensor | float | None = None,
    global_seqs: Tensor | float | None = None,
    norm_len: int | None = None,
) -> Tensor:
    """Reduce a ``[batch, response_len]`` loss matrix to a scalar (verl's
    ``loss_agg_mode``). With T = masked token count and S = number of sequences
    having at least one real token (see ``num_valid_seqs``; empty rows are padding
    and neither count nor produce NaN):

    - ``token-mean``: ``sum(loss*mask) / T``. Every token weighs the same (DAPO).
    - ``seq-mean-token-sum``: ``sum_i(sum_t loss*mask) / S``.
    - ``seq-mean-token-mean``: ``sum_i(mean_t loss over row i) / S`` (original
      GRPO; each sequence weighs the same whatever its length).
    - ``seq-mean-token-sum-norm``: ``sum(loss*mask) / (norm_len * S)``, i.e. each
      sequence's token sum divided by the constant ``norm_len`` (Dr. GRPO's
      MAX_TOKENS; defaults to ``loss_mat.shape[-1]``), then averaged over the
      sequences. This follows the Dr. GRPO paper and TRL's ``dr_grpo`` loss
      (``sum / (batch * max_completion_length)``). verl divides by ``norm_len``
      only, with no average over sequences, which makes the loss (and effective
      learning rate) grow with the batch size; we chose the batch-size-independent
      form. Pass ``norm_len`` explicitly (the max response length) if micro-batches
      are padded to different lengths, otherwise the constant would vary.

    loss_mat, mask: ``[B, T]``; returns a 0-dim tensor. Raises ValueError for an unknown mode or
    a norm_len that is not positive.

    Gradient accumulation: ``global_tokens`` / ``global_seqs`` replace T / S by the
    counts of the whole mini-batch; the result is then this micro-batch's share and
    the shares summed over micro-batches equal the full-batch value exactly. (Under
    DDP, which averages gradients over ranks, multiply by the world size.)
    """
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss_agg_mode {mode!r}; valid: {', '.join(LOSS_AGG_MODES)}")
    mask = mask.to(loss_mat.dtype)
    masked = _masked(loss_mat, mask)

    if mode == "token-mean":
        denom = mask.sum() if global_tokens is None else global_tokens
        return masked.sum() / _safe_denom(denom, loss_mat)

    seqs = num_valid_seqs(mask) if global_seqs is None else global_seqs
    seqs = _safe_denom(seqs, loss_mat)
    seq_sums = masked.sum(dim=-1)
    if mode == "seq-mean-token-sum":
        return seq_sums.sum() / seqs
    if mode == "seq-mean-token-mean":
        seq_lens = mask.sum(dim=-1)
        # empty rows: 0 / 1 = 0 instead of 0 / 0
        return (seq_sums / _safe_denom(seq_lens, loss_mat)).sum() / seqs
    # seq-mean-token-sum-norm
    if norm_len is None:
        norm_len = loss_mat.shape[-1]
    if norm_len <= 0:
        raise ValueError(f"norm_len must be positive, got {norm_len}")
    return seq_sums.sum() / (norm_len * seqs)


# ---------------------------------------------------------------------- policy loss
def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    clip_ratio_c: float = 3.0,
    loss_agg_mode: str = "token-mean",
    **agg_kwargs: Any,
) -> dict[str, Tensor]:
    """PPO clipped surrogate with dual clip, as verl's vanilla ``compute_policy_loss``.

    The ratio is clipped to ``[1 - clip_ratio_low, 1 + clip_ratio_high]`` (asymmetric
    bounds allow DAPO's clip-higher). For negative advantages the loss is further
    capped at ``clip_ratio_c * |A|`` (dual clip), so a token whose ratio exploded
    cannot dominate the update. ``advantages`` may be ``[B]`` (one per sequence) or
    ``[B, T]``. ``agg_kwargs`` (``global_tokens``, ``global_seqs``, ``norm_len``) go
    to ``agg_loss``.

    logp, old_logp, mask: ``[B, T]`` (log-probs in nats, mask 0/1). Raises ValueError for
    clip_ratio_c <= 1 or an unknown loss_agg_mode, TypeError for another keyword.

    Returns ``pg_loss`` (differentiable) and the detached 0-dim metrics
    ``pg_clipfrac``, ``ppo_kl`` and ``pg_clipfrac_lower``, all token means over
    ``mask``; with ``global_tokens`` they are this micro-batch's share, like the loss.
    """
    if clip_ratio_c <= 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 for dual-clip PPO, got {clip_ratio_c}")
    unknown = set(agg_kwargs) - {"global_tokens", "global_seqs", "norm_len"}
    if unknown:
        raise TypeError(f"unexpected keyword arguments: {sorted(unknown)}")
    if advantages.dim() == logp.dim() - 1:
        advantages = advantages.unsqueeze(-1)
    advantages = advantages.to(logp.dtype)
    global_tokens = agg_kwargs.get("global_tokens")

    neg_kl = torch.clamp(logp - old_logp, min=-20.0, max=20.0)
    ratio = torch.exp(neg_kl)

    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    loss_ppo = torch.maximum(loss_unclipped, loss_clipped)

    loss_cap = -advantages * clip_ratio_c
    loss_dual = torch.minimum(loss_cap, loss_ppo)
    per_token = torch.where(advantages < 0, loss_dual, loss_ppo)

    pg_loss = agg_loss(per_token, mask, loss_agg_mode, **agg_kwargs)

    with torch.no_grad():
        ppo_kl = masked_mean(-neg_kl, mask, global_tokens)
        clipfrac = masked_mean((loss_clipped > loss_unclipped).to(logp.dtype), mask, global_tokens)
        lower = ((loss_ppo > loss_cap) & (advantages < 0)).to(logp.dtype)
        clipfrac_lower = masked_mean(lower, mask, global_tokens)

    return {
        "pg_loss": pg_loss,
        "pg_clipfrac": clipfrac.detach(),
        "ppo_kl": ppo_kl.detach(),
        "pg_clipfrac_lower": clipfrac_lower.detach(),
    }


# ------------------------------------------------------------ log-probs and entropy
def _row_logprobs(logits: Tensor, labels: Tensor, temperature: float, with_entropy: bool):
    x = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # fp32 or wider
    lse = torch.logsumexp(x, dim=-1)
    logp = torch.gather(x, -1, labels.unsqueeze(-1).long()).squeeze(-1) - lse
    # entropy as logsumexp(l) - sum(softmax(l) * l): no log(0) for tiny probabilities
    ent = lse - (torch.softmax(x, dim=-1) * x).sum(dim=-1) if with_entropy else torch.zeros_like(lse)
    return logp, ent


def token_logprobs(
    logits: Tensor, labels: Tensor, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[Tensor, Tensor | None]:
    """``log softmax(logits / temperature)[label]`` (and the entropy) per token, in float32 (float64
    for float64 logits). logits: [B, T, V]; labels: [B, T]; returns two [B, T] tensors (entropy
    None unless asked).

    One batch row at a time, and under autograd each row is recomputed in backward
    (checkpointed): the float32 [B, T, V] copy, its softmax and their saved activations (V ~
    150k for Qwen) never exist whole. What stays is the model's own logits and their gradient,
    ~4 bytes per element in bf16 instead of ~26: the largest item of a small model's update.
    """
    from torch.utils.checkpoint import checkpoint

    grad = torch.is_grad_enabled() and logits.requires_grad
    parts = []
    # split, not logits[i:i+1]: a slice's backward writes its row into a zero tensor of the whole
    # [B, T, V] and adds that up, B times per micro-batch (quadratic in B; 1.5x slower updates at
    # micro-batch 116, BENCHMARKS.md); split's backward concatenates the rows' gradients once.
    for i, row in enumerate(logits.split(1)):
        args = (row, labels[i : i + 1], temperature, with_entropy)
        parts.append(checkpoint(_row_logprobs, *args, use_reentrant=False) if grad else _row_logprobs(*args))
    if not parts:
        empty = logits.new_empty(logits.shape[:-1], dtype=torch.promote_types(logits.dtype, torch.float32))
        return empty, (empty if with_entropy else None)
    logp = torch.cat([lp for lp, _ in parts])
    return logp, (torch.cat([e for _, e in parts]) if with_entropy else None)


def warmup_lambda(warmup_steps: int, warmup_ratio: float, total_steps: int | None, updates_per_step: int):
    """LR multiplier of optimizer update i (0-based), for LambdaLR: linear warmup (i+1)/W, then 1.0.

    W = warmup_steps (actor.lr_warmup_steps), or when that is -1, int(warmup_ratio x the run's
    optimizer updates) = int(warmup_ratio x total_steps x updates_per_step), as in the reference
    framework (total_steps: trainer.total_training_steps; updates per step: train_batch_size /
    ppo_mini_batch_size x ppo_epochs). An epoch-based recipe leaves total_training_steps unset: the
    flow fills it from trainer.total_epochs x steps per epoch (tasks.stages.total_steps) for the
    workers. Raises ValueError if a ratio is given without total_steps.
    """
    warmup = warmup_steps
    if warmup < 0 and warmup_ratio > 0:
        if total_steps is None:
            raise ValueError(
                "actor.lr_warmup_steps_ratio needs the run's length: set trainer.total_training_steps "
                "(the flow sets it from trainer.total_epochs and the train set) or actor.lr_warmup_steps"
            )
        warmup = int(warmup_ratio * total_steps * updates_per_step)
    return lambda i: min(1.0, (i + 1) / warmup) if warmup > 0 else 1.0
