"""How a step's samples are cut for the update: mini-batches (one optimizer step each, shared out
over the ranks: `minibatch_schedule`) and, inside a rank's share, token-budget micro-batches
(one forward/backward each: `actor.use_dynamic_bsz`, `actor.ppo_max_token_len_per_gpu`).

A sample is its (prompt length, response length). The padded trainer lays a micro-batch out as
[left-padded prompt | right-padded response], so what a forward holds is rows x (longest
prompt + longest response): `padded_tokens`, the cost the budget bounds by default. With
model.use_remove_padding the samples are packed into one row (engines/trainer/packing.py) and a
forward holds the sum of their lengths, the count verl bounds too (`packed=True` here); with
padding that sum under-counts (samples of 10+1 and 1+10 tokens lay out 2 x 20, not 22).

Samples are sorted by length and cut into runs of neighbours, so similar lengths share a
micro-batch and padding stays small. verl's balanced LPT partition spreads the longest samples
over the bins, so every bin pads to one of them: on GSM8K-like lengths (prompts 80-250 tokens,
responses 20-1024, 40-640 samples, budgets 4096-24000) it laid out 1.8-2.6x the real tokens and
needed 1.4-1.9x the forwards, against 1.2-1.4x real tokens for sorted runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from configs.schema import GRPOConfig

Shape = tuple[int, int]  # (prompt tokens, response tokens)


def padded_tokens(shapes: list[Shape]) -> int:
    """Tokens of the padded [rows, max prompt + max response] micro-batch the trainer builds."""
    if not shapes:
        return 0
    return len(shapes) * (max(p for p, _ in shapes) + max(r for _, r in shapes))


def tokens(shapes: list[Shape], packed: bool = False) -> int:
    """What a micro-batch of these samples holds: the padded count, or with packed the real
    tokens (sum of prompt + response lengths)."""
    return sum(p + r for p, r in shapes) if packed else padded_tokens(shapes)


def _order(shapes: list[Shape]) -> list[int]:
    return sorted(range(len(shapes)), key=lambda i: -sum(shapes[i]))  # longest first, stable


def _runs(shapes: list[Shape], order: list[int], cap: int, packed: bool = False) -> list[list[int]]:
    """Next fit along `order`: each run as long as cap allows (a lone sample always makes a run).
    For a fixed order this is the fewest runs within cap, and their count never grows with cap."""
    runs: list[list[int]] = []
    rows = longest_p = longest_r = total = 0
    for i in order:
        p, r = shapes[i]
        cost = total + p + r if packed else (rows + 1) * (max(longest_p, p) + max(longest_r, r))
        if runs and cost <= cap:
            runs[-1].append(i)
            rows, longest_p, longest_r, total = rows + 1, max(longest_p, p), max(longest_r, r), total + p + r
        else:
            runs.append([i])
            rows, longest_p, longest_r, total = 1, p, r, p + r
    return runs


def count(shapes: list[Shape], budget: int, packed: bool = False) -> int:
    """The fewest micro-batches within budget (0 for no samples): this rank's need."""
    return len(_runs(shapes, _order(shapes), budget, packed))


def micro_batches(shapes: list[Shape], budget: int, k: int, packed: bool = False) -> list[list[int]]:
    """Exactly k index groups (count(shapes, budget) <= k <= len(shapes): the count every rank
    agreed on), each within budget, every sample in exactly one, original order inside a group.

    Balanced: the smallest cap that still cuts the sorted samples into at most k runs (bisection;
    the run count never grows with the cap). Where that leaves fewer than k, the costliest run is
    halved (longer half, shorter half) until there are k; a part never costs more than the whole.
    """
    order = _order(shapes)
    lo, hi = 0, budget
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if len(_runs(shapes, order, mid, packed)) <= k else (mid + 1, hi)
    runs = _runs(shapes, order, hi, packed)
    while len(runs) < k:
        j = max(
            (j for j, run in enumerate(runs) if len(run) > 1),
            key=lambda j: tokens([shapes[i] for i in runs[j]], packed),
        )
        half = len(runs[j]) // 2
        runs[j : j + 1] = [runs[j][:half], runs[j][half:]]
    return [sorted(run) for run in runs]


def minibatch_schedule(n: int, cfg: "GRPOConfig", seed: int, rank: int = 0, world: int = 1) -> list[np.ndarray]:
    """This rank's sample indices (into the step's n samples) for each optimizer step: every epoch
    (actor.ppo_epochs) reshuffles the n samples (seeded), cuts them into mini-batches of
    actor.ppo_mini_batch_size x rollout.n samples, and gives each of the `world` data-parallel
    ranks a contiguous share of each one. Shared by every rank and the worker group, so
    mini-batches are the same at any world size."""
    mini = cfg.actor.ppo_mini_batch_size * cfg.rollout.n
    rng = np.random.default_rng(seed)
    steps = []
    for _ in range(cfg.actor.ppo_epochs):
        order = rng.permutation(n)
        steps += [np.array_split(order[s : s + mini], world)[rank] for s in range(0, n, mini)]
    return steps


def on_policy(n: int, cfg: "GRPOConfig") -> bool:
    """True when the step's n samples make exactly one optimizer step (one mini-batch, one PPO
    epoch): the policy that sampled them is the one being updated, so old_log_prob equals the
    current log-probs and the update takes them detached instead of a separate forward pass
    (as verl does when ppo_epochs=1 and the mini-batch is the whole batch)."""
    mini = cfg.actor.ppo_mini_batch_size * cfg.rollout.n
    return cfg.actor.ppo_epochs == 1 and n <= mini
