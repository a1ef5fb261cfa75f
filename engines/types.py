"""The data that crosses layers (controller -> worker group -> worker -> trainer/rollout), declared once.

No tensors: token ids are lists of ints, log-probs float32 numpy arrays, so everything pickles
through Ray and the controller never touches a device.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class UpdateBatch:
    """One step's samples for `TrainerBackend.update`, N rows (a rank's share when sharded).

    prompts / responses: token ids, N ragged lists. old_log_probs / ref_log_probs: per response
    token, nats, N float32 arrays of len(responses[i]) (ref None without actor.use_kl_loss).
    advantages: [N] floats (GRPO, per sample). truncated: [N] bools, the response was cut at
    rollout.max_response_length (for actor.mask_truncated_completions; None: none was)."""

    prompts: list[list[int]]
    responses: list[list[int]]
    old_log_probs: list[np.ndarray]
    advantages: list[float]
    ref_log_probs: list[np.ndarray] | None = None
    truncated: list[bool] | None = field(default=None)

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, idx: list[int]) -> "UpdateBatch":
        """The rows `idx`, in that order (None columns stay None)."""
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        return UpdateBatch(pick(self.prompts), pick(self.responses), pick(self.old_log_probs),
                           pick(self.advantages), pick(self.ref_log_probs), pick(self.truncated))
