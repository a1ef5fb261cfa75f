"""Per-token log-probs and entropy from vocab-parallel logits (each tensor-parallel rank holds a
contiguous 1/tp of the vocabulary), without gathering any row's whole logits.

With z = logits / temperature split over ranks, m the global max (a constant: no gradient),
S = sum over every rank of sum(exp(z - m)):
    log p(label) = (z[label] - m) - log S
    entropy      = log S - sum_v p_v (z_v - m)          (= -sum p log p; no log 0 for tiny p)
the same quantities engines/algos.token_logprobs computes on whole rows (log-softmax and
logsumexp - sum(softmax * z)), here with each vocabulary sum split into tp partial sums.
The sums across ranks are megatron-core's `reduce_from_tensor_model_parallel_region`: all-reduce
forward, identity backward, right because every rank of the group computes the same loss from them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def vocab_parallel_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, with_entropy: bool, vocab_start: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits: [B, R, V/tp], this rank's vocabulary rows vocab_start .. vocab_start + V/tp;
    labels: [B, R] token ids in the whole vocabulary. Returns log p(label) and (with_entropy)
    the entropy, [B, R] each, in float32 (float64 for float64 logits), differentiable. A
    collective over the tensor-parallel group (identity without one)."""
    from megatron.core import parallel_state as mpu
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region as tp_sum

    x = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    m = x.detach().amax(dim=-1, keepdim=True)
    if mpu.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=mpu.get_tensor_model_parallel_group())
    z = x - m
    e = z.exp()
    s = tp_sum(e.sum(dim=-1))
    log_s = s.log()
    width = x.shape[-1]
    local = labels.to(z.device).long() - vocab_start
    mine = (local >= 0) & (local < width)
    picked = z.gather(-1, local.clamp(0, width - 1).unsqueeze(-1)).squeeze(-1) * mine
    logp = tp_sum(picked) - log_s
    if not with_entropy:
        return logp, None
    ent = log_s - tp_sum((e * z).sum(dim=-1)) / s
    return logp, ent
