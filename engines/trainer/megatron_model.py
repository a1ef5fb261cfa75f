"""megatron-core's GPT model for a HF Qwen2 / Llama config (local layer spec, no Transformer Engine).

The trainer backend on megatron-core (issue 16) builds its policy here and fills it through
engines/trainer/megatron_weights.py. megatron-core is imported inside the functions: the CPU install
does not need it, and importing this module costs nothing.

Building runs on CPU (``use_cpu_initialization``). The forward of megatron-core 0.16 allocates on
``torch.cuda.current_device()`` (its rotary embedding, attention buffers and tensor-parallel
gathers) and forks the CUDA RNG around attention dropout; ``cpu_compat`` makes both work in a
process whose torch has no CUDA, so the backend's CPU tests run megatron-core's own code on gloo ranks.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "build_gpt_model",
    "cpu_compat",
    "load_hf_weights",
    "mark_tp_shards",
    "rope_theta",
    "seed_rng",
    "transformer_config",
]

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


def cpu_compat() -> None:
    """Let megatron-core's forward run on CPU: in a process whose torch build has no CUDA,
    ``torch.cuda.current_device()`` (which megatron-core 0.16 passes as ``device=`` when it
    allocates) returns the CPU device instead of raising. A no-op where CUDA exists, so a GPU
    process is never affected."""
    if torch.cuda.is_available() or getattr(torch.cuda.current_device, "_cpu_compat", False):
        return

    def current_device():
        return torch.device("cpu")

    current_device._cpu_compat = True
    torch.cuda.current_device = current_device


def seed_rng(seed: int, device: torch.device) -> None:
    """megatron-core's RNG tracker: on CUDA seeded per tensor-parallel rank
    (``model_parallel_cuda_manual_seed``); on CPU the no-op tracker (``inference_rng_tracker``):
    the backend's dropouts are 0, so no random number is drawn under it."""
    from megatron.core.tensor_parallel import random as mrandom

    if device.type == "cuda":
        mrandom.model_parallel_cuda_manual_seed(seed)
    else:
        mrandom.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


class _SafetensorsDir:
    """The HF tensors of a model dir, read on access (``hf[name]``, ``name in hf``) from its
    safetensors files, so that a caller holds only the tensors it asks for. Raises ValueError
    for a dir without safetensors."""

    def __init__(self, model_dir: str):
        import json
        from pathlib import Path

        d = Path(model_dir)
        index = d / "model.safetensors.index.json"
        if index.is_file():
            self.where = {k: d / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        elif (d / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(d / "model.safetensors", "pt") as f:
                self.where = {k: d / "model.safetensors" for k in f.keys()}
        else:
            raise ValueError(
                f"{model_dir} has no model.safetensors(.index.json): the Megatron backend reads safetensors"
            )

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.where[name], "pt") as f:
            return f.get_tensor(name)


def load_hf_weights(model, model_dir: str, shape, tp: int, tp_rank: int) -> None:
    """Fill ``model`` (this tensor-parallel rank's GPTModel, one pipeline stage) from the HF
    safetensors of model_dir, one decoder layer at a time (host memory: one layer's full tensors),
    through megatron_weights.hf_to_mcore. Raises ValueError naming the tensors the files lack or
    the model does not have."""
    from engines.trainer.megatron_weights import hf_to_mcore

    hf = _SafetensorsDir(model_dir)
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    done: set[str] = set()

    def fill(part: dict, layer: int | None) -> None:
        for name, t in part.items():
            if layer is not None:
                name = name.replace("decoder.layers.0.", f"decoder.layers.{layer}.", 1)
            if name not in own:
                raise ValueError(f"{model_dir}: megatron-core model has no tensor {name}")
            with torch.no_grad():
                own[name].copy_(t)
            done.add(name)

    try:
        fill(hf_to_mcore(hf, shape, tp=tp, tp_rank=tp_rank, layers=range(0), last_stage=True), None)
        for i in range(shape.num_layers):
            fill(
                hf_to_mcore(
                    hf, shape, tp=tp, tp_rank=tp_rank, layers=range(i, i + 1), first_stage=False, last_stage=False
                ),
                i,
            )
    except KeyError as e:
        raise ValueError(f"{model_dir}: the weight files lack {e}") from None
    missing = sorted(set(own) - done)
    if missing:
        raise ValueError(f"{model_dir}: no HF weight for megatron-core tensors {missing[:5]}")


def mark_tp_shards(model) -> None:
    """Sets megatron-core's ``tensor_model_parallel`` / ``partition_dim`` attributes on every
    parameter that megatron_weights.tp_split_dim says is split over tensor-parallel ranks (the
    gradient norm counts those on every rank, the others once). megatron-core sets them in its
    weight initialisers, which ``perform_initialization=False`` skips."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    from engines.trainer.megatron_weights import tp_split_dim

    for name, p in model.named_parameters():
        dim = tp_split_dim(name)
        if dim is not None and not hasattr(p, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(p, True, dim, 1)
