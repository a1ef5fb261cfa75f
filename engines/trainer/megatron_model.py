"""megatron-core's GPT model for a HF Qwen2 / Llama config (local layer spec, no Transformer Engine).

The trainer backend on megatron-core (issue 16) builds its policy here and fills it through
engines/trainer/megatron_weights.py. megatron-core is imported inside the functions: the CPU install
does not need it, and importing this module costs nothing.

Building runs on CPU (``use_cpu_initialization``), which the weight-layout tests use; the forward
of megatron-core 0.16 does not (its rotary embedding, attention core and tensor-parallel gathers
allocate on CUDA), so the backend itself runs on GPUs only.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["build_gpt_model", "rope_theta", "transformer_config"]

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")


def rope_theta(hf_config: Any) -> float:
    """RoPE base of a HF config: transformers 5 keeps it in ``rope_parameters``, 4.x as ``rope_theta``.
    Raises ValueError for RoPE scaling this mapping does not reproduce (only plain RoPE is)."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    kind = params.get("rope_type", "default")
    if kind != "default":
        raise ValueError(f"rope_type={kind!r}: the Megatron backend maps plain RoPE only (rope_type 'default')")
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    if theta is None:
        raise ValueError("the model config gives no rope_theta")
    return float(theta)


def has_qkv_bias(hf_config: Any) -> bool:
    """Qwen2 projects q/k/v with a bias; Llama only with ``attention_bias``."""
    return hf_config.model_type == "qwen2" or bool(getattr(hf_config, "attention_bias", False))


def transformer_config(
    hf_config: Any,
    *,
    tp: int = 1,
    pp: int = 1,
    sequence_parallel: bool = False,
    params_dtype: torch.dtype = torch.float32,
    recompute: bool = False,
    cpu_init: bool = False,
    **overrides,
):
    """A megatron-core ``TransformerConfig`` with the HF model's shape.

    hf_config: a transformers Qwen2 or Llama config (model_type in SUPPORTED_MODEL_TYPES). tp, pp:
    tensor- and pipeline-parallel sizes. recompute: full activation recompute of every layer
    (``recompute_granularity='full'``, uniform, one layer per chunk). cpu_init: initialise on the CPU
    (tests; the backend initialises on the GPU). overrides: any other TransformerConfig field.
    Raises ValueError for another model family, biased MLPs or scaled RoPE.
    """
    from megatron.core.transformer import TransformerConfig

    if hf_config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type={hf_config.model_type!r}: the Megatron backend maps {', '.join(SUPPORTED_MODEL_TYPES)} only"
        )
    if getattr(hf_config, "mlp_bias", False) or getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ValueError("the Megatron backend maps SwiGLU MLPs without bias only (hidden_act silu, mlp_bias false)")
    rope_theta(hf_config)  # raises on scaled RoPE
    kw = dict(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=hf_config.num_key_value_heads,
        kv_channels=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        activation_func=torch.nn.functional.silu,
        gated_linear_unit=True,
        add_bias_linear=False,
        add_qkv_bias=has_qkv_bias(hf_config),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel and tp > 1,
        use_cpu_initialization=cpu_init,
        # RL micro-batches change length every time (pipeline stages exchange their shapes); 0.16's
        # config check refuses that with its default MoE dispatcher even in a dense model.
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",
        # Unfused paths: the fused kernels come from Apex / Transformer Engine, which are not installed.
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        masked_softmax_fusion=False,
    )
    if recompute:
        kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    kw.update(overrides)
    return TransformerConfig(**kw)


def build_gpt_model(hf_config: Any, config, *, pre_process: bool = True, post_process: bool = True):
    """megatron-core ``GPTModel`` (local layer spec) for ``hf_config`` under ``config``
    (``transformer_config``); pre_process / post_process: whether this pipeline stage holds the
    embedding / the final norm and output layer. Tied embeddings share the output weight with the
    embedding, as HF does. Needs megatron-core's parallel state initialised (tp x pp ranks)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=hf_config.vocab_size,
        max_sequence_length=hf_config.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        position_embedding_type="rope",
        rotary_base=int(rope_theta(hf_config)),
        share_embeddings_and_output_weights=bool(getattr(hf_config, "tie_word_embeddings", False)),
    )
