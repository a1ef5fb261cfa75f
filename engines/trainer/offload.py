"""Trainer state in host memory between uses (actor.param_offload, actor.optimizer_offload).

Colocated with vLLM, the trainer's fp32 weights, its reference copy and the AdamW moments sit idle
while the engine generates. The recipes move them to host memory for that time, so the engine's
KV cache can have the memory, and back to the GPU just before the trainer computes.

Host copies go into exact-size buffers made once (`HostPool`) and reused every cycle. Before, each
cycle ran `Module.to("cpu", non_blocking=True)`, whose destination torch allocates in pinned memory
through its caching host allocator: every block rounded up to the next power of two and kept cached
(ATen/core/CachingHostAllocator.h, `PowerOf2Ceil`). For the 7B full fine-tune on 2 ranks that is
121 GiB per rank for 64 GiB of state (planner/host.py, tests/test_plan.py): the 113-119 GB per
worker that Ray's memory monitor killed in issue 12.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


class HostPool:
    """Host buffers of exact size, one per offloaded tensor, made at the first offload and reused.

    `take` lends a buffer shaped like a tensor (a free one of the same dtype and shape, else a new
    one), `release_all` returns every lent buffer once the tensors copied into them are back on the
    device. On CUDA each buffer is page-locked once with cudaHostRegister, so copies run at pinned
    speed without torch's power-of-two pinned blocks. `nbytes` is what the pool holds in all."""

    def __init__(self, pin: bool):
        """pin: page-lock each new buffer (CUDA only)."""
        self.pin = pin
        self.nbytes = 0
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._lent: list[tuple[tuple, torch.Tensor]] = []

    def take(self, like: torch.Tensor) -> torch.Tensor:
        """A CPU buffer of `like`'s dtype and shape (any shape; contents undefined), lent until
        release_all. Raises RuntimeError when cudaHostRegister fails (host memory exhausted)."""
        key = (like.dtype, tuple(like.shape))
        free = self._free.setdefault(key, [])
        if free:
            buf = free.pop()
        else:
            buf = torch.empty(like.shape, dtype=like.dtype, device="cpu")
            if self.pin and buf.nbytes:
                err = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.nbytes, 0)
                if int(err) != 0:
                    raise RuntimeError(f"cudaHostRegister of {buf.nbytes} B failed ({err}): host memory exhausted?")
            self.nbytes += buf.nbytes
        self._lent.append((key, buf))
        return buf

    def release_all(self) -> None:
        """Every lent buffer back to the free lists (the tensors in them must be back on the device)."""
        for key, buf in self._lent:
            self._free[key].append(buf)
        self._lent = []


def _host_copy(pool: HostPool):
    """A `Module._apply` function: the tensor copied into a pool buffer (a DTensor keeps its spec,
    its local shard copied), as `Tensor.to("cpu")` would return it."""

    def fn(t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, DTensor):
            local = t._local_tensor
            buf = pool.take(local)
            buf.copy_(local, non_blocking=True)
            return DTensor(buf, t._spec, requires_grad=False)
        buf = pool.take(t)
        buf.copy_(t, non_blocking=True)
        return buf

    return fn


def _device_copy(device: str):
    """A `Module._apply` function: a fresh copy on `device` (copy=True, so the pool's buffer is
    never the tensor the trainer computes with, even when device is the host)."""
    return lambda t: t.to(device, non_blocking=True, copy=True)


def module_to_host(module: torch.nn.Module, pool: HostPool) -> None:
    """Weights, gradients and buffers into pool buffers, through `Module._apply`, the path of
    `Module.to`: FSDP2 overrides it to re-register each shard it holds (moving `p.data` behind its
    back left it gathering from the old copy). An unevenly sharded FSDP2 parameter is re-padded by
    FSDP2 into a copy of its own (`reset_sharded_param`)."""
    module._apply(_host_copy(pool))


def module_to_device(module: torch.nn.Module, device: str) -> None:
    """Weights, gradients and buffers back to `device`, fresh copies (the pool keeps its buffers)."""
    module._apply(_device_copy(device))


def _map_optimizer(optimizer: torch.optim.Optimizer, fn) -> None:
    """Every tensor of the optimizer's state (AdamW moments, step counters) replaced by fn(tensor)."""
    for state in optimizer.state.values():
        for k, v in state.items():
            if torch.is_tensor(v):
                state[k] = fn(v)


def optimizer_to_host(optimizer: torch.optim.Optimizer, pool: HostPool) -> None:
    """The optimizer's state tensors into pool buffers."""
    _map_optimizer(optimizer, _host_copy(pool))


def optimizer_to_device(optimizer: torch.optim.Optimizer, device: str) -> None:
    """The optimizer's state tensors back to `device`, fresh copies."""
    _map_optimizer(optimizer, _device_copy(device))


class Offloader:
    """Moves what the config offloads: to host memory just before vLLM wakes (`to_host`), back to
    the GPU at the trainer's next use (`to_device`). Lazy both ways, so an update followed by a
    weight sync moves nothing in between. Does nothing off CUDA or when neither knob is set.

    modules: the trainer's models (policy, and the reference if it has one); optimizer: its AdamW."""

    def __init__(
        self,
        modules: list[torch.nn.Module],
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        param_offload: bool,
        optimizer_offload: bool,
    ):
        """device: the trainer's; param_offload / optimizer_offload: actor.param_offload and
        actor.optimizer_offload (both ignored off CUDA)."""
        cuda = device.type == "cuda"
        self.modules, self.optimizer = modules, optimizer
        self.params = cuda and param_offload
        self.optim = cuda and optimizer_offload
        self.params_on_host = self.optim_on_host = False
        self.param_pool, self.optim_pool = HostPool(pin=cuda), HostPool(pin=cuda)

    def to_host(self) -> None:
        """What the config offloads (weights with their gradients and the reference; the AdamW
        state) into exact-size host buffers, then the CUDA cache emptied for vLLM; a no-op for
        what is already there."""
        moved = False
        if self.params and not self.params_on_host:
            for m in self.modules:
                module_to_host(m, self.param_pool)
            self.params_on_host = moved = True
        if self.optim and not self.optim_on_host:
            optimizer_to_host(self.optimizer, self.optim_pool)
            self.optim_on_host = moved = True
        if moved:
            torch.cuda.synchronize()  # the copies into the buffers are done before the GPU copies go
            torch.cuda.empty_cache()  # vLLM allocates outside torch's cache: give the memory back

    def to_device(self, optimizer: bool = False) -> None:
        """The weights (and with `optimizer`, the AdamW state) on the GPU for the trainer's use."""
        if self.params_on_host:
            for m in self.modules:
                module_to_device(m, "cuda")
            torch.cuda.synchronize()  # the buffers are read before they are lent again
            self.param_pool.release_all()
            self.params_on_host = False
        if optimizer and self.optim_on_host:
            optimizer_to_device(self.optimizer, "cuda")
            torch.cuda.synchronize()
            self.optim_pool.release_all()
            self.optim_on_host = False
