"""What a worker needs from a rollout engine (vLLM today): generate, sleep and wake, take new
weights or a new adapter. The weight sync (engines/weight_sync.py) decides when each happens.

The ranks of one engine (tensor parallel) make every call together, with the same arguments.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Iterable

TAGS = ("weights", "kv_cache")  # what an engine can put to sleep and wake, separately


class RolloutEngine(ABC):
    """Generation for one rank, colocated with its trainer.

    `sleep_mode` (bool): whether `sleep` frees device memory on this platform (False: sleep and
    wake are no-ops). `asleep` (set of TAGS): what sleeps now."""

    sleep_mode: bool
    asleep: set[str]

    @abstractmethod
    def generate(
        self,
        prompts: list[list[int]],
        *,
        n: int,
        temperature: float,
        top_p: float,
        top_k: int,
        max_tokens: int,
        seeds: list[int],
        logprobs: bool = False,
    ) -> list[dict]:
        """n samples for each prompt (token ids), prompt i drawn with its own seed seeds[i]
        (temperature 0: greedy; top_k -1: all tokens; max_tokens: response tokens at most;
        logprobs: fill rollout_log_probs, else it is empty). One row
        per sample, prompt by prompt: the columns of engines/types.py GENERATED (prompt_index,
        sample_index, response_ids, response_text, rollout_log_probs, finish_reason). Needs the
        engine awake."""

    @abstractmethod
    def sleep(self, level: int) -> None:
        """Free the device: level 1 keeps the weights in host memory, level 2 drops them (they
        must be loaded again before generating). The KV cache is dropped at both."""

    @abstractmethod
    def wake_up(self, tags: tuple[str, ...] = TAGS) -> None:
        """Bring back what sleeps among `tags` (waking weights that sleep at level 2 gives
        allocated, unfilled memory: load_weights fills it)."""

    @abstractmethod
    def load_weights(self, named_tensors: Iterable[tuple[str, "torch.Tensor"]]) -> None:  # noqa: F821
        """Overwrite every weight in place from (HF name, whole tensor) pairs, consumed one at a
        time; wakes the weights first if they sleep (the KV cache stays asleep)."""

    @abstractmethod
    def load_adapter(self, save_adapter: Callable[[str], None]) -> None:
        """LoRA: the next generations use the adapter that `save_adapter(dir)` writes (peft format)."""

    def close(self) -> None:
        """Remove what the engine left on disk."""
