"""Ulysses sequence parallelism (DeepSpeed-Ulysses, arXiv:2309.14509) for the trainer's forward.

The sp ranks of a group take the same samples; each holds 1/sp of every sequence's columns
through the decoder stack, so activations per GPU shrink by sp. Attention needs whole sequences:
an all-to-all trades the column slice for 1/sp of the heads, attention runs over all columns, and
a second all-to-all trades back. After the final norm a third one trades columns for rows: each
rank then holds whole sequences of 1/sp of the micro-batch's rows, so the logits, the log-probs
and the loss are computed exactly as without sequence parallelism, on fewer rows.
All three all-to-alls have autograd (their backward is the reverse all-to-all).

A packed row (model.use_remove_padding, one row for the whole micro-batch) cannot be cut into
rows, so under `packed_rows()` the final norm's output is all-gathered instead (its backward sums
the ranks' gradients into each one's columns) and attention runs per sample on the segments the
model call passes (engines/trainer/varlen.py).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.nn.functional import all_to_all_single

from engines.models import head_split_problem
from engines.trainer import varlen

NAME = "ulysses_sdpa"  # the attention implementation registered with transformers
_GROUP: dist.ProcessGroup | None = None  # this process's sequence-parallel group
_PACKED = False  # inside packed_rows(): the forward's input is one packed row


def new_groups(sp: int) -> dist.ProcessGroup:
    """Groups of sp consecutive ranks; this rank's. Every rank must call it (group creation is collective)."""
    global _GROUP
    world, rank = dist.get_world_size(), dist.get_rank()
    for start in range(0, world, sp):
        g = dist.new_group(list(range(start, start + sp)))
        if start <= rank < start + sp:
            _GROUP = g
    return _GROUP


def _swap(x: torch.Tensor, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Cut x into sp chunks along scatter_dim, send chunk j to rank j, and join what arrives
    (in rank order) along gather_dim."""
    sp = dist.get_world_size(_GROUP)
    send = torch.stack([c.contiguous() for c in x.chunk(sp, dim=scatter_dim)])
    got = all_to_all_single(torch.empty_like(send), send, group=_GROUP)
    return torch.cat(got.unbind(0), dim=gather_dim)


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface. query [B, H, T/sp, d], key/value [B, KV, T/sp, d] (rotary
    applied, at the columns' true positions); attention_mask: the whole [B, 1, T, T] bool mask."""
    sp = dist.get_world_size(_GROUP)
    if key.shape[1] < sp:  # fewer KV heads than ranks: each rank gets a copy of its group's head
        key, value = (t.repeat_interleave(sp // key.shape[1], dim=1) for t in (key, value))
    q, k, v = (_swap(t, 1, 2) for t in (query, key, value))  # [B, heads/sp, T, d]
    if kwargs.get("cu_seq_lens_q") is not None:  # a packed row: per-sample attention
        out = varlen.attend(q, k, v, kwargs["cu_seq_lens_q"], kwargs["max_length_q"], scaling)  # [1, T, h/sp, d]
        return _swap(out, 1, 2), None  # [1, T/sp, H, d]
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=scaling)
    return _swap(out, 2, 1).transpose(1, 2).contiguous(), None  # [B, T/sp, H, d]


def _rows_for_columns(module, args, output):
    """Forward hook on the final norm: [B, T/sp, h] column slices -> [B/sp, T, h] whole rows;
    under packed_rows() [1, T/sp, h] -> the whole [1, T, h] row on every rank."""
    if _PACKED:
        return _GatherColumns.apply(output)
    return _swap(output, 0, 1)


class _GatherColumns(torch.autograd.Function):
    """[1, T/sp, h] on each rank of the group -> the whole [1, T, h] on every rank. Backward: each
    rank's gradient of the whole row, summed over the group (all_reduce), this rank's columns kept
    (every rank's logits may depend on every column)."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(size())]
        dist.all_gather(parts, x.contiguous(), group=_GROUP)
        ctx.cols = (rank() * x.shape[1], x.shape[1])
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=_GROUP)
        start, n = ctx.cols
        return grad[:, start : start + n]


@contextmanager
def packed_rows(on: bool = True):
    """Within it, forwards take one packed row (see the module docstring)."""
    global _PACKED
    before, _PACKED = _PACKED, on
    try:
        yield
    finally:
        _PACKED = before


def enable(hf_model: torch.nn.Module) -> None:
    """Route hf_model's attention through `attention` and its final norm through the row swap."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, attention)
    hf_model.set_attn_implementation(NAME)
    hf_model.model.norm.register_forward_hook(_rows_for_columns)


def check_heads(config, sp: int) -> None:
    """Raises ValueError unless sp divides the HF config's attention heads and divides (or is a
    multiple of) its key-value heads: each rank of a group takes heads / sp of them."""
    problem = head_split_problem(
        "actor.ulysses_sequence_parallel_size", sp, config.num_attention_heads, config.num_key_value_heads
    )
    if problem:
        raise ValueError(problem)


def full_mask(attn: torch.Tensor) -> torch.Tensor:
    """[B, T] 0/1 -> [B, 1, T, T] bool: causal, padded keys masked. A padded query keeps its own
    column, so no row is empty (an empty row makes SDPA return NaN); its output is never used."""
    T = attn.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=attn.device).tril()
    mask = causal & attn.bool()[:, None, None, :]
    return mask | torch.eye(T, dtype=torch.bool, device=attn.device)


def rank() -> int:
    """This rank's index in its Ulysses group (0..sp-1)."""
    return dist.get_rank(_GROUP)


def size() -> int:
    """The Ulysses group's size (1 when none was made)."""
    return dist.get_world_size(_GROUP) if _GROUP is not None else 1


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, in rank order: [B, ...] on each of the group's sp ranks (the same shape
    on every rank) -> [sp x B, ...], same dtype. A collective of the Ulysses group; no autograd
    (for the log-probs the caller returns)."""
    parts = [torch.empty_like(t) for _ in range(size())]
    dist.all_gather(parts, t.contiguous(), group=_GROUP)
    return torch.cat(parts)
