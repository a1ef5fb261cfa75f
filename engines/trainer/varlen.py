"""Attention over a packed row (model.use_remove_padding): each sample attends causally to itself only.

The row's segments are given by cu_seqlens ([S + 1] int32 offsets, engines/trainer/packing.py),
passed down the model call as transformers' flash-attention kwargs (``cu_seq_lens_q/k``,
``max_length_q/k``) to the attention function registered here under NAME. On CUDA that is
PyTorch's own FlashAttention varlen kernel (``torch.nn.attention.varlen.varlen_attn``, torch >=
2.10; fp16/bf16, so under autocast q/k/v are cast as SDPA's autocast casts them): no mask, no
padding, cost sum(s_i^2) instead of T^2. On CPU (tests), and for a float32 model on CUDA, the
same result comes from SDPA with the block-diagonal causal mask built from cu_seqlens.

Because NAME is not one of transformers' mask kinds, the model builds no [T, T] mask for it
(masking_utils: custom attention "without equivalent mask creation").
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

NAME = "grpo_varlen"


def block_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[1, 1, T, T] bool: query t sees key u iff both are in one segment and u <= t."""
    seg = torch.zeros(total, dtype=torch.long, device=cu_seqlens.device)
    seg[cu_seqlens[1:-1].long()] = 1
    seg = seg.cumsum(0)
    same = seg[:, None] == seg[None, :]
    return (same & torch.ones(total, total, dtype=torch.bool, device=seg.device).tril())[None, None]


@functools.cache
def _varlen_params() -> frozenset[str]:
    """The keyword parameters of this torch's varlen_attn (read once, not per layer call)."""
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def _flash_varlen(q, k, v, cu, max_len: int, scale):
    """q [T, H, d], k/v [T, KV, d] on CUDA -> [T, H, d]."""
    from torch.nn.attention.varlen import varlen_attn

    params = _varlen_params()
    kw = {"scale": scale}
    if "window_size" in params:  # torch >= 2.11: (-1, 0) is causal
        kw["window_size"] = (-1, 0)
    else:  # torch 2.10
        kw["is_causal"] = True
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kw)


def attend(query, key, value, cu_seqlens: torch.Tensor, max_seqlen: int, scaling=None) -> torch.Tensor:
    """query [1, H, T, d], key/value [1, KV, T, d] (rotary applied) -> [1, T, H, d], each
    segment of cu_seqlens attending causally to itself. Raises ValueError for a batch of more
    than one row."""
    if query.shape[0] != 1:
        raise ValueError(f"packed attention takes one row, got {query.shape[0]}")
    cu = cu_seqlens.to(device=query.device, dtype=torch.int32)
    half = (torch.float16, torch.bfloat16)
    dtype = query.dtype if query.dtype in half else torch.get_autocast_dtype("cuda")
    if query.is_cuda and (query.dtype in half or (torch.is_autocast_enabled("cuda") and dtype in half)):
        # FlashAttention takes fp16/bf16 only; under autocast q/k come out of rotary in fp32 (as
        # SDPA's autocast would, cast them to the autocast dtype). A float32 model takes SDPA below.
        q, k, v = (t[0].transpose(0, 1).to(dtype).contiguous() for t in (query, key, value))  # [T, heads, d]
        return _flash_varlen(q, k, v, cu, int(max_seqlen), scaling).unsqueeze(0)
    rep = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    mask = block_causal_mask(cu, query.shape[2])
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous()


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface for a packed row; needs the ``cu_seq_lens_q`` and
    ``max_length_q`` kwargs of the model call (raises ValueError without them)."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        raise ValueError(f"attention {NAME!r} needs cu_seq_lens_q (a packed row, engines/trainer/packing.py)")
    return attend(query, key, value, cu, kwargs["max_length_q"], scaling), None


def enable(hf_model: torch.nn.Module) -> None:
    """Route hf_model's attention through `attention` (the packed forward's only layout)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, attention)
    hf_model.set_attn_implementation(NAME)


def model_kwargs(cu_seqlens: torch.Tensor, max_seqlen: int, device) -> dict:
    """The model-call kwargs that carry a packed row's segments to the attention function."""
    cu = cu_seqlens.to(device=device, dtype=torch.int32)
    return dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=int(max_seqlen), max_length_k=int(max_seqlen))
