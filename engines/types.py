"""The data that crosses layers (controller -> worker group -> worker -> trainer/rollout), declared once.

No tensors: token ids are lists of ints, log-probs float32 numpy arrays, so everything pickles
through Ray and the controller never touches a device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from configs.schema import GRPOConfig

# A step's rollouts, one row per sample: what an engine returns (GENERATED, RolloutEngine.generate),
# what the controller adds (ADDED, tasks/stages.rollout) and the reward stage's (SCORED). GENERATED +
# ADDED are the columns of rollouts/step_<N>.parquet, the format a resume reads back.
# name -> (arrow type, meaning)
GENERATED = {
    "prompt_index": ("int64", "index of the sample's prompt in the step's batch"),
    "sample_index": ("int64", "which of the rollout.n samples of that prompt (0..n-1)"),
    "response_ids": ("list<int64>", "generated token ids, at most rollout.max_response_length"),
    "response_text": ("string", "the response decoded"),
    "rollout_log_probs": (
        "list<double>",
        "the engine's log-prob of each sampled token, nats after temperature; [] unless rollout.calculate_log_probs",
    ),
    "finish_reason": ("string", '"stop", or "length" when cut at rollout.max_response_length'),
    "engine": ("int64", "the data-parallel rollout engine that made it (added by the worker group)"),
}
ADDED = {
    "row": ("int64", "the prompt's row in the train set (its seed and fingerprint use it)"),
    "prompt_ids": ("list<int64>", "the chat-templated prompt's token ids"),
    "data_source": ("string", "the dataset's name (the reward dispatches on it)"),
    "ground_truth": ("string", "the reference answer (reward_model.ground_truth)"),
    "extra_info": ("struct", "the dataset row's extra_info, when the dataset has one"),
}
SCORED = {
    "score": ("double", "the reward of the sample"),
    "advantage": ("float", "its GRPO advantage within its prompt's group"),
}
ROLLOUT_COLUMNS = {**GENERATED, **ADDED, **SCORED}


@dataclass(frozen=True)
class SamplingSpec:
    """How one generate call samples: n responses per prompt, prompt i drawn with seeds[i] (so a
    retry, a resume or another number of engines draws the same); temperature 0 is greedy, top_k -1
    all tokens; max_tokens caps each response (tokens); logprobs: also return each sampled token's
    log-prob (nats). Built once per purpose from the config: `for_training` (rollout.*, log-probs
    where rollout.calculate_log_probs) and `for_eval` (greedy by default, rollout.val_temperature;
    never log-probs: nothing reads them)."""

    n: int
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    seeds: list[int]
    logprobs: bool = False

    @classmethod
    def for_training(cls, cfg: "GRPOConfig", seeds: list[int]) -> "SamplingSpec":
        """The rollout's sampling: rollout.n samples per prompt at rollout.temperature / top_p /
        top_k, up to rollout.max_response_length tokens; seeds: one per prompt."""
        r = cfg.rollout
        return cls(
            n=r.n,
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            max_tokens=r.max_response_length,
            seeds=list(seeds),
            logprobs=r.calculate_log_probs,
        )

    @classmethod
    def for_eval(cls, cfg: "GRPOConfig", seeds: list[int]) -> "SamplingSpec":
        """The eval's sampling: one sample per prompt at rollout.val_temperature (0: greedy), no
        top-p / top-k cut, up to rollout.max_response_length tokens; seeds: one per prompt."""
        return cls(
            n=1,
            temperature=cfg.rollout.val_temperature,
            top_p=1.0,
            top_k=-1,
            max_tokens=cfg.rollout.max_response_length,
            seeds=list(seeds),
        )

    def with_seeds(self, seeds: list[int]) -> "SamplingSpec":
        """The same sampling for another share of the prompts."""
        return replace(self, seeds=list(seeds))

    def as_kwargs(self) -> dict:
        """The keyword arguments of RolloutEngine.generate."""
        return asdict(self)


@dataclass
class UpdateBatch:
    """One step's samples for `TrainerBackend.update`, N rows (a rank's share when sharded).

    prompts / responses: token ids, N ragged lists. old_log_probs / ref_log_probs: per response
    token, nats, N float32 (float64 in a float64 check) arrays of len(responses[i]) (ref None without actor.use_kl_loss; old
    None for an on-policy step, engines/batching.on_policy: the update then takes its own
    log-probs, detached). advantages: [N] floats (GRPO, per sample). truncated: [N] bools, the
    response was cut at rollout.max_response_length (for actor.mask_truncated_completions; None:
    none was). rollout_log_probs: the engine's per-token log-probs (rollout.calculate_log_probs),
    for the training/rollout_probs_diff_* check when no old_log_prob pass ran; None or [] rows
    when not computed."""

    prompts: list[list[int]]
    responses: list[list[int]]
    old_log_probs: list[np.ndarray] | None
    advantages: list[float]
    ref_log_probs: list[np.ndarray] | None = None
    truncated: list[bool] | None = field(default=None)
    rollout_log_probs: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, idx: list[int]) -> "UpdateBatch":
        """The rows `idx`, in that order (None columns stay None)."""
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        return UpdateBatch(
            pick(self.prompts),
            pick(self.responses),
            pick(self.old_log_probs),
            pick(self.advantages),
            pick(self.ref_log_probs),
            pick(self.truncated),
            pick(self.rollout_log_probs),
        )
