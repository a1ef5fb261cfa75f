"""How a step's samples are cut for the update: mini-batches (one optimizer step each, shared out
over the ranks: `minibatch_schedule`) and, inside a rank's share, token-budget micro-batches
(one forward/backward each: `actor.use_dynamic_bsz`, `actor.ppo_max_token_len_per_gpu`).

A sample is its (prompt length, response length). The trainer lays a micro-batch out as
[left-padded prompt | right-padded response], so what a forward holds is rows x (longest
prompt + longest response): `padded_tokens`, the cost the budget bounds here. verl bounds the
sum of sequence lengths instead, because it packs sequences without padding; with padding that
sum under-counts (samples of 10+1 and 1+10 tokens lay out 2 x 20, not 22). The padded count is
never below the sum, so a micro-batch within this budget is within verl's too.

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


def _order(shapes: list[Shape]) -> list[int]:
    return sorted(range(len(shapes)), key=lambda i: -sum(shapes[i]))  # longest first, stable


def _runs(shapes: list[Shape], order: list[int], cap: int) -> list[list[int]]:
    """Next fit along `order`: each run as long as cap allows (a lone sample always makes a run).
    For a fixed order this is the fewest runs within cap, and their count never grows with cap."""
    runs: list[list[int]] = []
    rows = longest_p = longest_r = 0
    for i in order:
        p, r = shapes[i]
        if runs and (rows + 1) * (max(longest_p, p) + max(longest_r, r)) <= cap:
            runs[-1].append(i)
            rows, longest_p, longest_r = rows + 1, max(longest_p, p), max(longest_r, r)
        else:
            runs.append([i])
            rows, longest_p, longest_r = 1, p, r
    return runs


def count(shapes: list[Shape], budget: int) -> int:
    """The fewest micro-batches within budget (0 for no samples): this rank's need."""
    return len(_runs(shapes, _order(shapes), budget))


def micro_batches(shapes: list[Shape], budget: int, k: int) -> list[list[int]]:
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
        lo, hi = (lo, mid) if len(_runs(shapes, order, mid)) <= k else (mid + 1, hi)
    runs = _runs(shapes, order, hi)
    while len(runs) < k:
        j = max(
            (j for j, run in enumerate(runs) if len(run) > 1), key=lambda j: padded_tokens([shapes[i] for i in runs[j]])
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
