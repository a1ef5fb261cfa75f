"""The shape of a Qwen2/Llama decoder as the planner sees it (config.json fields), and where a
recipe's shape comes from: a local config.json, a random-init preset, or a published hub config."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from configs.schema import GRPOConfig
from engines.models import ARCH_PRESETS


@dataclass(frozen=True)
class Shape:
    """The config.json fields that size a Qwen2/Llama decoder."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tie: bool
    head_dim: int = 0  # 0: hidden // heads
    qkv_bias: bool = True  # Qwen2: q/k/v projections carry a bias; Llama: attention_bias

    @property
    def head_size(self) -> int:
        """Channels per attention head: head_dim, else hidden // heads (config.json's rule)."""
        return self.head_dim or self.hidden // self.heads

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each Linear in one decoder layer, named as in transformers."""
        hidden, q_dim, kv_dim, inter = (
            self.hidden,
            self.heads * self.head_size,
            self.kv_heads * self.head_size,
            self.intermediate,
        )
        return {
            "q_proj": (hidden, q_dim),
            "k_proj": (hidden, kv_dim),
            "v_proj": (hidden, kv_dim),
            "o_proj": (q_dim, hidden),
            "gate_proj": (hidden, inter),
            "up_proj": (hidden, inter),
            "down_proj": (inter, hidden),
        }

    def n_params(self) -> int:
        """All parameters: embedding (+ untied lm_head) V x h, per layer the Linears, the q/k/v biases
        (Qwen2) and two RMSNorms, and the final norm (tests/test_plan.py checks it against transformers)."""
        per_layer = (
            sum(fan_in * fan_out for fan_in, fan_out in self.linears().values()) + 2 * self.hidden
        )  # + 2 RMSNorms
        if self.qkv_bias:
            per_layer += (self.heads + 2 * self.kv_heads) * self.head_size
        emb = self.vocab * self.hidden
        return emb * (1 if self.tie else 2) + self.layers * per_layer + self.hidden

    def n_linear(self) -> int:
        """Parameters autocast casts to bf16 in a forward: every Linear, lm_head included."""
        return (
            self.layers * sum(fan_in * fan_out for fan_in, fan_out in self.linears().values())
            + self.vocab * self.hidden
        )

    def lora_params(self, rank: int, targets: str | list[str]) -> int:
        """LoRA adapter parameters: L x rank x (in + out) summed over the targeted Linears
        (model.target_modules: "all-linear", one name or a list); 0 at rank 0."""
        if rank == 0:
            return 0
        linears = self.linears()
        names = list(linears) if targets == "all-linear" else ([targets] if isinstance(targets, str) else targets)
        return self.layers * sum(rank * sum(linears[name]) for name in names if name in linears)

    def kv_bytes_per_token(self, tp: int = 1, dtype_bytes: int = 2) -> int:
        """K and V of one token, all layers, on one GPU of a TP group (KV heads replicate past TP)."""
        return 2 * self.layers * max(1, self.kv_heads // tp) * self.head_size * dtype_bytes


def shape_from_hf(conf: dict) -> Shape:
    """The Shape of a HF config.json dict (Qwen2 or Llama field names). Raises KeyError for a
    missing size field."""
    heads = conf["num_attention_heads"]
    return Shape(
        hidden=conf["hidden_size"],
        layers=conf["num_hidden_layers"],
        heads=heads,
        kv_heads=conf.get("num_key_value_heads") or heads,
        intermediate=conf["intermediate_size"],
        vocab=conf["vocab_size"],
        tie=bool(conf.get("tie_word_embeddings", False)),
        head_dim=conf.get("head_dim") or 0,
        qkv_bias=conf.get("model_type") == "qwen2" or bool(conf.get("attention_bias", False)),
    )


# PUBLISHED_HUB_CONFIGS: the config.json fields that size each hub model the reference recipes
# name, so `grpo plan` needs no network. The Qwen2.5 shapes are engines/models.py's ARCH_PRESETS
# (the public config.json numbers, also what model.source=random builds); Qwen2 7B/72B share the
# Qwen2.5 shapes of their sizes; SmolLM2 (model.source=gguf builds it) is a Llama.
_HUB_PRESETS = {
    "Qwen/Qwen2.5-0.5B-Instruct": "0.5b",
    "Qwen/Qwen2.5-1.5B-Instruct": "1.5b",
    "Qwen/Qwen2.5-3B-Instruct": "3b",
    "Qwen/Qwen2.5-7B-Instruct": "7b",
    "Qwen/Qwen2.5-14B-Instruct": "14b",
    "Qwen/Qwen2.5-32B-Instruct": "32b",
    "Qwen/Qwen2.5-32B": "32b",
    "Qwen/Qwen2.5-72B-Instruct": "72b",
    "Qwen/Qwen2-7B-Instruct": "7b",
    "Qwen/Qwen2-72B-Instruct": "72b",
}
PUBLISHED_HUB_CONFIGS: dict[str, dict] = {
    **{hub: {"model_type": "qwen2", **ARCH_PRESETS[arch]} for hub, arch in _HUB_PRESETS.items()},
    "HuggingFaceTB/SmolLM2-135M-Instruct": dict(
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
        tie_word_embeddings=True,
        model_type="llama",
    ),
}


def model_config(cfg: GRPOConfig) -> tuple[dict, str]:
    """The policy's config.json fields and where they came from: a local config.json, a preset, or
    the table. Raises ValueError for a hub id outside the table (no network here)."""
    model = cfg.model
    local = Path(model.path) / "config.json"
    if local.is_file():
        return json.loads(local.read_text()), str(local)
    if model.source == "random":
        if model.arch not in ARCH_PRESETS:
            raise ValueError(f"model.arch={model.arch!r} is not a preset; choose one of {sorted(ARCH_PRESETS)}")
        # tiny's vocab is the trained tokenizer's size rounded to 64, known only after the build.
        return {"vocab_size": 1024, "model_type": "qwen2", **ARCH_PRESETS[model.arch]}, (
            f"engines.models.ARCH_PRESETS[{model.arch!r}]"
        )
    if model.source == "gguf":
        return PUBLISHED_HUB_CONFIGS["HuggingFaceTB/SmolLM2-135M-Instruct"], "SmolLM2 table"
    if model.path in PUBLISHED_HUB_CONFIGS:
        return PUBLISHED_HUB_CONFIGS[model.path], "PUBLISHED_HUB_CONFIGS"
    raise ValueError(
        f"model.path={model.path}: no config.json there and not a known hub id; give a local "
        f"HF dir or one of: {', '.join(PUBLISHED_HUB_CONFIGS)}"
    )


def model_shape(cfg: GRPOConfig) -> tuple[Shape, str]:
    """The policy's shape and where it came from: a local config.json, a preset, or the table."""
    conf, source = model_config(cfg)
    return shape_from_hf(conf), source
