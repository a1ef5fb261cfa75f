"""The LoRA trainer's HF export without the whole base model in memory: the base model's
safetensors are read one tensor at a time (memory-mapped, `safetensors.safe_open`) and each
weight with a LoRA pair in the peft adapter gets its update added, as peft's `merge_and_unload`
computes it for a Linear layer (peft 0.21, tuners/lora/layer.py `Linear.get_delta_weight`):

    W' = W + (B @ A) * scaling,   scaling = lora_alpha / r   (use_rslora: lora_alpha / sqrt(r))

in float32 (W upcast exactly, B and A as saved, upcast if stored narrower), then cast once to the
export dtype; every other tensor is only cast. The same arithmetic in the same order as the fp32
`merge_and_unload` of today's reference, so the tensors are bitwise equal to its export.

Plain LoRA on nn.Linear layers only: every adapter feature that changes the merge beyond that
(DoRA and the other variants, trained biases, modules_to_save, per-module rank/alpha patterns,
trainable tokens, layer replication, inits that rewrite the base weights, LoRA on embeddings or
Conv1D layers) is refused with one line naming it. peft ignores fan_in_fan_out for nn.Linear (it
resets it to False), so it is read as peft reads it.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Iterator

import torch

# adapter_config.json keys the merge reads.
_USED = {"peft_type", "r", "lora_alpha", "use_rslora"}
# Keys that choose which modules get an adapter, or shape training, not the merge of the saved
# tensors (or that only matter with a feature that is refused when on).
_INERT = {
    "auto_mapping",
    "base_model_name_or_path",
    "exclude_modules",
    "fan_in_fan_out",  # peft sets it to False for nn.Linear, the only layer type merged here
    "inference_mode",
    "layers_pattern",
    "layers_to_transform",
    "lora_dropout",
    "megatron_core",
    "peft_version",
    "qalora_group_size",
    "revision",
    "target_modules",
    "task_type",
}
# Every other key must be off: falsy (None, False, {}, []: what peft's defaults for its variants and
# extras are), or one of these values. init_lora_weights: the inits that leave the base as it is.
_OFF = {"bias": ("none",), "init_lora_weights": (True, False, "gaussian")}
_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")


def _refuse(adapter_dir: Path, what: str) -> ValueError:
    return ValueError(
        f"{adapter_dir}: the streamed LoRA merge of the HF export does not support {what} "
        "(plain LoRA on Linear layers only: r, lora_alpha, use_rslora)"
    )


def _scaling(conf: dict, adapter_dir: Path) -> float:
    """peft's LoRA scaling from adapter_config.json's dict. Raises ValueError (one line, naming the
    key) for any key set to something the streamed merge does not reproduce."""
    if conf.get("peft_type") != "LORA":
        raise _refuse(adapter_dir, f"peft_type={conf.get('peft_type')!r}")
    for key, value in sorted(conf.items()):
        if key in _USED or key in _INERT:
            continue
        off = value in _OFF[key] if key in _OFF else not value
        if not off:
            raise _refuse(adapter_dir, f"{key}={value!r}")
    r, alpha = conf["r"], conf["lora_alpha"]
    return alpha / math.sqrt(r) if conf.get("use_rslora") else alpha / r


def _pairs(adapter: Path, r: int) -> dict[str, tuple[list[int], list[int]]]:
    """{HF weight name: (shape of A [r, in], shape of B [out, r])} from the adapter's safetensors
    header. Raises ValueError naming the first tensor that is not half of a lora_A / lora_B pair of
    rank r."""
    from safetensors import safe_open

    halves: dict[str, dict[str, list[int]]] = {}
    with safe_open(adapter, framework="pt") as s:
        for key in s.keys():
            m = _KEY.fullmatch(key)
            if m is None:
                raise _refuse(adapter.parent, f"the adapter tensor {key}")
            halves.setdefault(f"{m[1]}.weight", {})[m[2]] = s.get_slice(key).get_shape()
    out = {}
    for name, h in halves.items():
        a, b = h.get("A", []), h.get("B", [])
        if len(a) != 2 or len(b) != 2 or a[0] != r or b[1] != r:
            raise _refuse(adapter.parent, f"the LoRA tensors of {name} {h} (want lora_A [{r}, in], lora_B [out, {r}])")
        out[name] = (a, b)
    return out


def merged_state(model_dir: str, adapter_dir: Path, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The merged model's tensors, HF-named, in `dtype` (floating ones; others as stored), one at a
    time in the order of model_dir's safetensors files: every tensor the model's state dict holds
    (a tied one once, under its first name, as save_pretrained writes it; file tensors the model
    lacks are left out), each LoRA-targeted weight [out, in] merged as the module docstring says.

    Host memory: one tensor at a time in its file dtype, its LoRA pair, its float32 merge and its
    cast (the files are memory-mapped). Checks eagerly, before the first tensor: raises ValueError
    (one line, naming it) for an adapter feature the merge does not support, a LoRA pair on a
    module that is not an nn.Linear, whose weight is not in the files (a tied output embedding) or
    whose shape B @ A does not fit, and for a model tensor missing from the files."""
    from safetensors import safe_open

    from engines.trainer.load import empty, slots

    adapter_dir = Path(adapter_dir)
    conf = json.loads((adapter_dir / "adapter_config.json").read_text())
    scaling = _scaling(conf, adapter_dir)
    adapter = adapter_dir / "adapter_model.safetensors"
    pairs = _pairs(adapter, conf["r"])
    model = empty(model_dir, dtype)
    wanted = {name for name, _, _ in slots(model)}
    files = sorted(Path(model_dir).glob("*.safetensors"))
    shapes = {}
    for f in files:
        with safe_open(f, framework="pt") as s:
            shapes |= {k: s.get_slice(k).get_shape() for k in s.keys() if k in wanted}
    if missing := sorted(wanted - set(shapes)):
        raise ValueError(f"{model_dir}: its safetensors lack {missing[:3]} of the model")
    for name, (a, b) in pairs.items():
        module = name.removesuffix(".weight")
        if name not in shapes:
            raise _refuse(adapter_dir, f"LoRA on {module}, whose weight is not in {model_dir}'s files (tied?)")
        kind = type(model.get_submodule(module))
        if not issubclass(kind, torch.nn.Linear):
            raise _refuse(adapter_dir, f"LoRA on {module}, a {kind.__name__}")
        if [b[0], a[1]] != shapes[name]:
            raise _refuse(adapter_dir, f"LoRA on {name} of shape {shapes[name]}: B @ A is {[b[0], a[1]]}")
    return _stream(files, wanted, adapter, set(pairs), scaling, dtype)


@torch.no_grad()
def _stream(files, wanted, adapter, lora, scaling, dtype) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    with safe_open(adapter, framework="pt") as ad:
        for f in files:
            with safe_open(f, framework="pt") as s:
                for name in s.keys():
                    if name not in wanted:
                        continue
                    t = s.get_tensor(name)
                    if name in lora:
                        lora_key = f"base_model.model.{name.removesuffix('.weight')}.lora_"
                        a, b = (ad.get_tensor(f"{lora_key}{x}.weight").float() for x in "AB")
                        delta = b @ a  # peft: transpose(B @ A, fan_in_fan_out=False) * scaling
                        delta.mul_(scaling)
                        t = delta.add_(t)  # W + delta in fp32 (W upcast exactly), as peft's W += delta
                    yield name, t.to(dtype) if t.is_floating_point() else t
