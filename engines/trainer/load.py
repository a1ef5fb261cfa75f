"""The FSDP2 trainer's models loaded sharded from the start (engines/trainer/fsdp.py, when sharded).

`from_pretrained(dtype=float32)` builds the whole fp32 model on every rank before FSDP2 shards it:
4 B x P of host memory on each rank (and of GPU memory after `.to`). Instead the model is built
on the meta device (`empty`: shapes, no storage), prepared and sharded there as before (gradient
checkpointing, Ulysses / varlen attention, peft, `fully_shard`), and `fill` then gives each rank
storage for its own shards only (`Module.to_empty`) and their values.

The values come from the HF safetensors through torch.distributed.checkpoint's
`HuggingFaceStorageReader` (`dcp.load` into the DTensor parameters): a rank reads only its rows of
each tensor (a safetensors slice of the mapped file), one tensor at a time, and `copy_`s it into
its shard, which casts the file's dtype (bf16 or fp32) to the parameter's (fp32 master, fp64 for
the checks, bf16 reference). So a rank's host memory peaks at its share of one tensor in the
file's dtype (the largest: the embedding, ceil(V / S) x h) on top of its shards (which on CUDA
are on the GPU); the file's pages are page cache, reclaimable. The alternative,
`set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)`, is higher on every
rank: rank 0 reads every whole tensor, and each whole tensor is broadcast to every rank, which
then keeps its shard, so each rank holds a whole tensor at a time (V x h for the embedding), and
the whole model crosses the network.
"""

from __future__ import annotations

import torch
from torch import nn

Slot = tuple[str, nn.Module, str]
"""(HF name, the module holding the tensor, its attribute name on that module)."""


def empty(model_dir: str, dtype: torch.dtype) -> nn.Module:
    """model_dir's causal LM on the meta device (no storage), parameters in `dtype`, with the config
    and generation config from_pretrained would give it, in eval mode as from_pretrained returns it."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=dtype)
    try:
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    except OSError:  # no generation_config.json: keep the one from_config made from the model config
        pass
    return model.eval()


def slots(model: nn.Module) -> list[Slot]:
    """Where each tensor of the HF files goes: every parameter and persistent buffer of the HF
    model, a tied one once, under its first name (as HF saves it). Taken before peft wraps the
    modules and FSDP2 swaps their parameters: the modules stay, so the slots find the tensors
    after both."""
    seen, out = set(), []
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            module, _, attr = name.rpartition(".")
            out.append((name, model.get_submodule(module), attr))
    return out


def peft_on_meta(model: nn.Module, lora) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """peft's `get_peft_model(model, lora)` for a meta `model`, and the adapter's initial values:
    {FQN in the returned model: the whole tensor, on the CPU, as peft made it (float32)}.

    peft builds each adapter layer (an nn.Linear for lora_A, one for lora_B) on the CPU and
    initialises it there (lora_A kaiming-uniform, lora_B zeros), drawing from torch's CPU generator
    exactly as for a loaded model, then moves it to its base layer's device. For the meta device
    `Module.to` gives the layer new (meta) parameters, so the values would be lost: the parameters
    each layer had when peft registered it (torch's module registration hook) are kept, and
    `fill` gives every rank the adapter an unsharded trainer gets for the same seed. Holds the
    whole adapter (its LoRA parameters x 4 B) until then. Raises what get_peft_model raises
    (ValueError for target modules the model lacks), RuntimeError if the values were lost."""
    from peft import get_peft_model

    made = []  # (ModuleDict, key, {name: the CPU parameter peft made and initialises in place})

    def keep(parent: nn.Module, key: str, module: nn.Module) -> None:
        params = {name: p for name, p in module.named_parameters() if not p.is_meta}
        if params:
            made.append((parent, key, params))

    handle = torch.nn.modules.module.register_module_module_registration_hook(keep)
    try:
        model = get_peft_model(model, lora)
    finally:
        handle.remove()
    fqn = {id(m): name for name, m in model.named_modules()}
    adapter = {
        f"{fqn[id(parent)]}.{key}.{name}": p.detach()
        for parent, key, params in made
        if id(parent) in fqn
        for name, p in params.items()
    }
    if missing := [
        name for name, p in model.named_parameters() if p.is_meta and p.requires_grad and name not in adapter
    ]:
        raise RuntimeError(f"peft's initial values of {missing[:3]}... were not kept")
    if lost := [name for name, t in adapter.items() if t.is_meta]:
        raise RuntimeError(f"peft moved {lost[:3]}... to the meta device in place: their initial values are lost")
    return model, adapter


def _rotary(model: nn.Module) -> None:
    """Recomputes the non-persistent buffers (in no file; garbage after `to_empty`): each HF rotary
    embedding's inverse frequencies, [head_dim / 2] float32, from its config as its __init__ does.
    Raises NotImplementedError naming any other non-persistent buffer."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    done = set(model.state_dict(keep_vars=True))  # persistent: read from the files
    for name, module in model.named_modules():
        if hasattr(module, "original_inv_freq") and hasattr(module, "rope_type"):
            init = ROPE_INIT_FUNCTIONS.get(module.rope_type) or module.compute_default_rope_parameters
            inv_freq, _ = init(module.config)
            module.inv_freq.copy_(inv_freq)
            module.original_inv_freq.copy_(inv_freq)
            done |= {f"{name}.inv_freq", f"{name}.original_inv_freq"}
    other = [name for name, _ in model.named_buffers() if name not in done]
    if other:
        raise NotImplementedError(f"the sharded load cannot recompute the non-persistent buffers {other}")


@torch.no_grad()
def fill(
    model: nn.Module,
    slots: list[Slot],
    model_dir: str,
    device: torch.device,
    adapter: dict[str, torch.Tensor] | None = None,
) -> None:
    """Materialises a meta `model` that `fully_shard` has sharded: storage for this rank's shards on
    `device` (`Module.to_empty`; tied parameters stay one parameter), the HF tensors of `slots` read
    from model_dir's *.safetensors (this rank's rows of each, cast to the parameter's dtype), the
    rotary buffers recomputed, and `adapter` ({FQN of model: whole tensor}, the same on every rank,
    from `peft_on_meta`) sliced to this rank's shards.

    A collective (dcp.load plans over the process group): every rank calls it. Raises ValueError
    naming model_dir and torch.distributed.checkpoint's reason (a tensor of the model missing from
    the files, a shape that differs) -- DCP's CheckpointException is a BaseException, which a
    worker's `except Exception` would not see -- and NotImplementedError for a non-persistent buffer
    other than the rotary ones."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import CheckpointException
    from torch.distributed.tensor import distribute_tensor

    model.to_empty(device=device)
    _rotary(model)
    state = {name: getattr(module, attr) for name, module, attr in slots}
    try:
        dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(model_dir))
    except CheckpointException as e:  # its str is every rank's traceback: keep the reasons
        reasons = sorted({" ".join(str(exc).split()) for exc, _ in e.failures.values()})
        raise ValueError(
            f"model.path={model_dir}: its safetensors do not hold the model its config.json describes "
            f"({'; '.join(reasons)[:400]}); save it again with save_pretrained"
        ) from None
    for name, whole in (adapter or {}).items():
        p = model.get_parameter(name)  # a DTensor: FSDP2 shards every parameter
        mine = distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None)  # sliced here, not sent
        p.to_local().copy_(mine.to_local())
