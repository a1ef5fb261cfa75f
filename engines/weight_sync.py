"""The one owner of how the trainer's weights reach the rollout engine and when each sleeps.

Colocated on one device, the two take turns: the engine sleeps while the trainer works, and the
trainer's idle state (actor.param_offload / optimizer_offload) goes to host memory while the engine
generates. The sleep level follows from what the trainer holds:
- LoRA (level 1): the engine's base weights wait in host memory (only an adapter changes);
- full fine-tuning (level 2): the engine's weights are dropped and refilled from the trainer
  before the next generation; a device-host round trip of weights the next push would overwrite
  anyway is saved. A refill borrows the trainer's offloaded weights onto the device for the
  moment of the copy, one tensor at a time, and puts them back.
Off CUDA (or with rollout.free_cache_engine=false) the engine never sleeps and nothing is refilled.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from engines.rollout.base import TAGS, RolloutEngine
from engines.trainer.base import TrainerBackend


class WeightSync:
    """Sleep level, refill and offload borrowing between one trainer and its rollout engine."""

    def __init__(self, trainer: TrainerBackend, rollout: RolloutEngine):
        """Sleep level 1 with LoRA (the engine keeps its base weights on the host), else 2 (the
        weights are dropped and refilled from the trainer)."""
        self.trainer, self.rollout = trainer, rollout
        self.level = 1 if trainer.is_lora else 2
        self._owed = False  # a level-2 sleep dropped the engine's weights: refill before generating

    @property
    def refills(self) -> bool:
        """Whether the engine's weights are dropped at each sleep and refilled from the trainer."""
        return self.rollout.sleep_mode and self.level == 2

    def sleep(self) -> None:
        """The engine frees the device for the trainer (from fully awake only; a no-op without
        sleep mode)."""
        if self.rollout.sleep_mode and not self.rollout.asleep:
            self.rollout.sleep(self.level)
            self._owed = self.level == 2

    def wake(self) -> None:
        """Before generating: the trainer's idle state to the host, then the engine's weights
        (refilled from the trainer if a level-2 sleep dropped them) before its KV cache."""
        self.trainer.to_host()
        if self._owed and "weights" in self.rollout.asleep:
            self._owed = False
            self.rollout.load_weights(self._weights())  # wakes the weights alone, then fills them
        self.rollout.wake_up(TAGS)

    def push(self) -> None:
        """After an update: the new adapter (LoRA) or every new weight into the engine."""
        if self.trainer.is_lora:
            self.trainer.to_device()
            self.rollout.load_adapter(self.trainer.save_adapter)
        else:
            self._owed = False  # these weights replace whatever a sleep dropped
            self.rollout.load_weights(self._weights())

    def _weights(self) -> Iterator:
        """The trainer's weights, one tensor at a time, borrowed onto the device if offloaded."""
        with self._borrowed():
            yield from self.trainer.weights_for_rollout()

    @contextmanager
    def _borrowed(self):
        """The trainer's weights on the device for a moment (the engine is awake), then back."""
        was = self.trainer.weights_on_host
        self.trainer.to_device()
        try:
            yield
        finally:
            if was:
                self.trainer.to_host()
