"""Trainer state in host memory between uses (actor.param_offload, actor.optimizer_offload).

Colocated with vLLM, the trainer's fp32 weights, its reference copy and the AdamW moments sit idle
while the engine generates. The recipes move them to host memory for that time, so the engine's
KV cache can have the memory, and back to the GPU just before the trainer computes.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


def _move_module(module: torch.nn.Module, device: str) -> None:
    """Weights, gradients and buffers, through `Module.to`: FSDP2 overrides it to re-register each
    shard it holds (moving `p.data` behind its back left it gathering from the old copy)."""
    module.to(device, non_blocking=True)


def _move_optimizer(optimizer: torch.optim.Optimizer, device: str) -> None:
    for state in optimizer.state.values():
        for k, v in state.items():
            if torch.is_tensor(v):
                state[k] = v.to(device, non_blocking=True)


class Offloader:
    """Moves what the config offloads: to host memory just before vLLM wakes (`to_host`), back to
    the GPU at the trainer's next use (`to_gpu`). Lazy both ways, so an update followed by a weight
    sync moves nothing in between. Does nothing off CUDA or when neither knob is set."""

    def __init__(self, trainer, param_offload: bool, optimizer_offload: bool):
        cuda = trainer.device.type == "cuda"
        self.trainer = trainer
        self.params = cuda and param_offload
        self.optim = cuda and optimizer_offload
        self.params_on_host = self.optim_on_host = False

    def _modules(self):
        return [m for m in (self.trainer.model, self.trainer.ref) if m is not None]

    def to_host(self) -> None:
        moved = False
        if self.params and not self.params_on_host:
            for m in self._modules():
                _move_module(m, "cpu")
            self.params_on_host = moved = True
        if self.optim and not self.optim_on_host:
            _move_optimizer(self.trainer.optimizer, "cpu")
            self.optim_on_host = moved = True
        if moved:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # vLLM allocates outside torch's cache: give the memory back

    def to_gpu(self, optimizer: bool = False) -> None:
        """The weights (and with `optimizer`, the AdamW state) on the GPU for the trainer's use."""
        if self.params_on_host:
            for m in self._modules():
                _move_module(m, "cuda")
            self.params_on_host = False
        if optimizer and self.optim_on_host:
            _move_optimizer(self.trainer.optimizer, "cuda")
            self.optim_on_host = False

    @contextmanager
    def borrowed(self):
        """The weights on the GPU for a moment while vLLM is awake (a refill), then back."""
        was = self.params_on_host
        self.to_gpu()
        try:
            yield
        finally:
            if was:
                self.to_host()
