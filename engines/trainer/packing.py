"""Padding-free micro-batches (`use_remove_padding`): samples packed into one row.

A micro-batch of B samples (prompt ids + response ids each) becomes one row of T = sum of their
lengths, with position ids restarting at 0 at every sample and the segments' offsets in
cu_seqlens. The trainer (engines/trainer/fsdp.py `_forward_packed`) calls
``model(input_ids, position_ids=..., attention_mask=None, logits_to_keep=logits_index,
use_cache=False, cu_seq_lens_q/k=..., max_length_q/k=...)`` with its own attention function
(engines/trainer/varlen.py), which keeps each sample to itself. (transformers alone would also
find the segments from the position ids, ``masking_utils.find_packed_sequence_indices``, but only
without a cache object: tests/test_packing.py shows both.)
Only the N = sum of response lengths logits that predict a response token are computed
(``logits_to_keep`` accepts an index tensor), so the [tokens, vocab] logits hold no padding and no
prompt positions.

The reference framework's name and meaning (``actor_rollout_ref.model.use_remove_padding``); the
padded layout ([left-padded prompt | right-padded response], engines/trainer/fsdp.py) stays the
one the per-token tensors of the update use: ``unpack`` scatters the packed values back into it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Packed", "pack", "unpack"]


@dataclass(frozen=True)
class Packed:
    """One packed row. T: tokens in the row (all samples, plus any tail padding); N: response tokens.

    input_ids, position_ids: [1, T] int64. cu_seqlens: [S + 1] int32, the segments' start offsets
    and T (S = B samples, plus one tail segment when padded to a multiple). max_seqlen: the longest
    segment. logits_index: [N] int64, the row positions whose logits predict the response tokens,
    sample by sample (the logit at t predicts the token at t + 1). labels: [N] int64, those tokens.
    response_lengths: B ints.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    logits_index: torch.Tensor
    labels: torch.Tensor
    response_lengths: tuple[int, ...]


def pack(prompts: list[list[int]], responses: list[list[int]], *, pad_id: int = 0, multiple_of: int = 1) -> Packed:
    """Pack B (prompt, response) token-id pairs into one row.

    multiple_of: pad the row's end to a multiple of this (Ulysses sequence parallelism cuts the
    row into that many equal column slices); the padding is a segment of its own (positions from
    0), so it attends only to itself and no real token attends to it. Raises ValueError on an
    empty prompt (the first response token needs a logit before it) or mismatched lengths.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"pack: {len(prompts)} prompts but {len(responses)} responses")
    ids: list[int] = []
    pos: list[int] = []
    cu = [0]
    index: list[int] = []
    for k, (p, r) in enumerate(zip(prompts, responses)):
        if not p:
            raise ValueError(f"pack: sample {k} has an empty prompt")
        start = len(ids)
        ids += list(p) + list(r)
        pos += range(len(p) + len(r))
        index += range(start + len(p) - 1, start + len(p) - 1 + len(r))
        cu.append(len(ids))
    tail = -len(ids) % multiple_of
    if tail:
        ids += [pad_id] * tail
        pos += range(tail)
        cu.append(len(ids))
    input_ids = torch.tensor([ids], dtype=torch.long)
    logits_index = torch.tensor(index, dtype=torch.long)
    cu_seqlens = torch.tensor(cu, dtype=torch.int32)
    return Packed(
        input_ids=input_ids,
        position_ids=torch.tensor([pos], dtype=torch.long),
        cu_seqlens=cu_seqlens,
        max_seqlen=int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if len(cu) > 1 else 0,
        logits_index=logits_index,
        labels=input_ids[0, logits_index + 1],
        response_lengths=tuple(len(r) for r in responses),
    )


def unpack(
    values: torch.Tensor, response_lengths: tuple[int, ...] | list[int], width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-response-token values [N] (or [1, N]) back to the padded layout: ([B, W] values, zeros
    where there is no token; [B, W] mask of 1.0/0.0 in values' dtype). W: ``width``, else the
    longest response. Differentiable (a scatter into zeros). Raises ValueError when N is not the
    sum of the lengths or a response is longer than W.
    """
    values = values.reshape(-1)
    lengths = torch.tensor(list(response_lengths), dtype=torch.long, device=values.device)
    if values.numel() != int(lengths.sum()):
        raise ValueError(f"unpack: {values.numel()} values for responses of {int(lengths.sum())} tokens in all")
    w = int(lengths.max()) if width is None and len(lengths) else (width or 0)
    if len(lengths) and int(lengths.max()) > w:
        raise ValueError(f"unpack: a response of {int(lengths.max())} tokens does not fit width {w}")
    cols = torch.arange(w, device=values.device)
    mask = cols[None, :] < lengths[:, None]  # [B, W]
    out = values.new_zeros(mask.shape)
    out = out.masked_scatter(mask, values)  # row-major: sample by sample
    return out, mask.to(values.dtype)
