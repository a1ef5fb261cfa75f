"""Qwen2 / Llama weights between Hugging Face and megatron-core's own GPT model (local layer spec).

Why our own mapping: the bridge libraries (mbridge 0.15, Megatron-Bridge) name and build the
model through Transformer Engine's fused modules (``linear_qkv.layer_norm_weight``), which the
GPU image does not carry and which do not exist on CPU. megatron-core's local spec
(``get_gpt_layer_local_spec``) runs without them, and its Qwen2 layout differs from HF's in four
places only, each a reshape or a concatenation (megatron-core 0.16, ``SelfAttention`` and ``MLP``):

* ``linear_qkv`` fuses q, k and v **per query group**: for group g the rows are the g-th group's
  ``heads_per_group`` query heads, then its key head, then its value head (each ``head_dim`` rows);
  tensor parallelism splits whole groups across ranks (``SelfAttention.get_query_key_value_tensors``).
* ``linear_fc1`` stacks ``[gate; up]``; under tensor parallelism each rank holds
  ``[gate shard; up shard]`` (``MLP`` with ``gated_linear_unit``, split on the output dim).
* ``linear_proj`` (o_proj) and ``linear_fc2`` (down_proj) are row-parallel: split on the input dim.
* Embedding and output layer are vocab-parallel (rows); a tied model has no ``output_layer.weight``.

Pipeline stages hold a contiguous run of layers, numbered from 0 in each stage's module; a
stage's ``layer_offset`` turns them into the HF layer index. Everything here works on tensors and
names alone (no process group): the caller gathers shards across tensor-parallel ranks.

Shapes below: H hidden size, I intermediate size, V vocabulary, nh query heads, ng key/value
heads (query groups), hd head dim, tp the tensor-parallel size.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

__all__ = ["QwenShape", "hf_to_mcore", "mcore_to_hf", "merge_tp_shards", "tp_split_dim"]


@dataclass(frozen=True)
class QwenShape:
    """The numbers the mapping needs, read from a HF Qwen2 config (``from_hf_config``)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tied: bool

    @classmethod
    def from_hf_config(cls, config) -> QwenShape:
        """``config``: a ``transformers`` Qwen2 config (or anything with the same attributes)."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            config.hidden_size,
            config.intermediate_size,
            config.num_hidden_layers,
            config.num_attention_heads,
            config.num_key_value_heads,
            head_dim,
            config.vocab_size,
            bool(getattr(config, "tie_word_embeddings", False)),
        )

    def check_tp(self, tp: int) -> None:
        """Raises ValueError naming the dimension that ``tp`` does not divide."""
        for what, n in (
            ("num_key_value_heads", self.num_kv_heads),
            ("num_attention_heads", self.num_heads),
            ("vocab_size", self.vocab_size),
            ("intermediate_size", self.intermediate_size),
        ):
            if n % tp:
                raise ValueError(
                    f"actor.megatron.tensor_model_parallel_size={tp} does not divide the model's "
                    f"{what} ({n}); choose a tensor-parallel size that divides it"
                )


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Row-parallel (split on dim 1) and column-parallel (split on dim 0) tensors of the local spec.
_ROW_PARALLEL = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")
_COL_PARALLEL = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias", "mlp.linear_fc1.weight")
_VOCAB_PARALLEL = ("embedding.word_embeddings.weight", "output_layer.weight")
_REPLICATED_LAYER = {
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
}


def tp_split_dim(name: str) -> int | None:
    """The dim along which megatron-core splits ``name`` across tensor-parallel ranks, None if replicated."""
    if name in _VOCAB_PARALLEL:
        return 0
    m = _LAYER.match(name)
    if m and m.group(2) in _COL_PARALLEL:
        return 0
    if m and m.group(2) in _ROW_PARALLEL:
        return 1
    return None


def _qkv_fuse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: QwenShape) -> torch.Tensor:
    """[nh*hd, ...], [ng*hd, ...], [ng*hd, ...] -> [(nh + 2 ng) hd, ...], grouped as megatron-core wants."""
    tail = q.shape[1:]
    per = s.num_heads // s.num_kv_heads
    q = q.reshape(s.num_kv_heads, per * s.head_dim, *tail)
    k = k.reshape(s.num_kv_heads, s.head_dim, *tail)
    v = v.reshape(s.num_kv_heads, s.head_dim, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def _qkv_split(fused: torch.Tensor, s: QwenShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of ``_qkv_fuse`` for the whole (all-rank) fused tensor."""
    tail = fused.shape[1:]
    per = s.num_heads // s.num_kv_heads
    g = fused.reshape(s.num_kv_heads, (per + 2) * s.head_dim, *tail)
    q, k, v = torch.split(g, [per * s.head_dim, s.head_dim, s.head_dim], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


def _fc1_fuse(gate: torch.Tensor, up: torch.Tensor, tp: int) -> torch.Tensor:
    """[I, H] x2 -> [2I, H] in the order the tp ranks' shards concatenate to: [g0; u0; g1; u1; ...]."""
    return torch.cat([t for pair in zip(gate.chunk(tp), up.chunk(tp)) for t in pair])


def _fc1_split(fc1: torch.Tensor, tp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of ``_fc1_fuse``."""
    parts = fc1.chunk(2 * tp)
    return torch.cat(parts[0::2]), torch.cat(parts[1::2])


def hf_to_mcore(
    hf: dict[str, torch.Tensor],
    s: QwenShape,
    *,
    tp: int = 1,
    tp_rank: int = 0,
    layers: range | None = None,
    first_stage: bool = True,
    last_stage: bool = True,
) -> dict[str, torch.Tensor]:
    """One rank's megatron-core state dict (local spec) from a HF Qwen2 state dict.

    hf: ``model.*`` / ``lm_head.weight`` tensors, full (unsharded). tp, tp_rank: this rank's place
    in its tensor-parallel group. layers: the HF layer indices of this pipeline stage (all layers
    when None), numbered from 0 in the result. first_stage / last_stage: whether this stage holds
    the embedding / the final norm and output layer. Returns views or slices of ``hf``'s tensors
    (clone before writing to them). Raises ValueError when tp does not divide a sharded dimension,
    KeyError naming a HF tensor that is missing.
    """
    s.check_tp(tp)
    layers = range(s.num_layers) if layers is None else layers
    out: dict[str, torch.Tensor] = {}

    def shard(name: str, full: torch.Tensor) -> torch.Tensor:
        dim = tp_split_dim(name)
        return full if dim is None else full.chunk(tp, dim=dim)[tp_rank]

    if first_stage:
        name = "embedding.word_embeddings.weight"
        out[name] = shard(name, hf["model.embed_tokens.weight"])
    for local, i in enumerate(layers):
        p, m = f"model.layers.{i}.", f"decoder.layers.{local}."
        for mc, h in _REPLICATED_LAYER.items():
            out[m + mc] = hf[p + h]
        a = p + "self_attn."
        out[m + "self_attention.linear_qkv.weight"] = shard(
            m + "self_attention.linear_qkv.weight",
            _qkv_fuse(hf[a + "q_proj.weight"], hf[a + "k_proj.weight"], hf[a + "v_proj.weight"], s),
        )
        if a + "q_proj.bias" in hf:  # Qwen2 (Llama: attention_bias only)
            out[m + "self_attention.linear_qkv.bias"] = shard(
                m + "self_attention.linear_qkv.bias",
                _qkv_fuse(hf[a + "q_proj.bias"], hf[a + "k_proj.bias"], hf[a + "v_proj.bias"], s),
            )
        proj = m + "self_attention.linear_proj.weight"
        out[proj] = shard(proj, hf[a + "o_proj.weight"])
        fc1 = _fc1_fuse(hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"], tp)
        out[m + "mlp.linear_fc1.weight"] = shard(m + "mlp.linear_fc1.weight", fc1)
        out[m + "mlp.linear_fc2.weight"] = shard(m + "mlp.linear_fc2.weight", hf[p + "mlp.down_proj.weight"])
    if last_stage:
        out["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
        if not s.tied:
            out["output_layer.weight"] = shard("output_layer.weight", hf["lm_head.weight"])
    return out


def merge_tp_shards(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """The full megatron-core tensor ``name`` from its tensor-parallel shards (rank order);
    a replicated tensor is returned as the first shard."""
    dim = tp_split_dim(name)
    return shards[0] if dim is None or len(shards) == 1 else torch.cat(shards, dim=dim)


def mcore_to_hf(
    tensors: Iterable[tuple[str, torch.Tensor]], s: QwenShape, *, tp: int = 1, layer_offset: int = 0
) -> Iterator[tuple[str, torch.Tensor]]:
    """HF (name, tensor) pairs, one megatron-core tensor at a time, for a weight sync or an export.

    tensors: (megatron-core name, full tensor) pairs: already merged across tensor-parallel ranks
    (``merge_tp_shards``) and in any order; ``_extra_state`` entries are skipped. tp: the
    tensor-parallel size the fc1 tensors were fused for. layer_offset: the HF index of this
    pipeline stage's layer 0. A tied model yields no ``lm_head.weight`` (HF and vLLM tie it to
    ``model.embed_tokens.weight``). Raises KeyError on a name the Qwen2 mapping does not know.
    """
    for name, t in tensors:
        if name.endswith("._extra_state"):
            continue
        if name == "embedding.word_embeddings.weight":
            yield "model.embed_tokens.weight", t
        elif name == "decoder.final_layernorm.weight":
            yield "model.norm.weight", t
        elif name == "output_layer.weight":
            yield "lm_head.weight", t
        else:
            m = _LAYER.match(name)
            if not m:
                raise KeyError(f"no HF name for megatron-core tensor {name!r}")
            p, rest = f"model.layers.{int(m.group(1)) + layer_offset}.", m.group(2)
            if rest in _REPLICATED_LAYER:
                yield p + _REPLICATED_LAYER[rest], t
            elif rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
                kind = rest.rsplit(".", 1)[1]
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), _qkv_split(t, s)):
                    yield f"{p}self_attn.{proj}.{kind}", part
            elif rest == "self_attention.linear_proj.weight":
                yield p + "self_attn.o_proj.weight", t
            elif rest == "mlp.linear_fc1.weight":
                gate, up = _fc1_split(t, tp)
                yield p + "mlp.gate_proj.weight", gate
                yield p + "mlp.up_proj.weight", up
            elif rest == "mlp.linear_fc2.weight":
                yield p + "mlp.down_proj.weight", t
            else:
                raise KeyError(f"no HF name for megatron-core tensor {name!r}")
