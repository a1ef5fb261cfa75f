"""The reward hook, dataset-independent: the signature every reward has, loading a user's
`reward.function` by dotted path, and scoring a batch.

Every reward function has the field-standard ``compute_score`` signature
``fn(data_source, solution_str, ground_truth, extra_info) -> float`` so that users can bring the
functions they already wrote for other GRPO stacks. The built-in rewards are the envs' own (their
`Env.reward`, `Env.compute_score`). Pure Python: reward workers must not pay for importing torch
or the orchestration layer.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
from typing import Callable, Literal, Optional, Sequence

logger = logging.getLogger(__name__)

RewardFn = Callable[[str, str, str, Optional[dict]], float]
REWARD_SIGNATURE = "fn(data_source, solution_str, ground_truth, extra_info) -> float"
"""How score_samples calls a reward: four positional arguments."""


def import_reward_fn(dotted: str) -> RewardFn:
    """Import ``reward.function``: ``package.module:function`` or ``package.module.function``.
    Raises ValueError (one line naming the path) for a path that is not dotted, a module that does
    not import, a missing or non-callable attribute, or a function that cannot take the four
    positional arguments of REWARD_SIGNATURE."""
    path = dotted.strip()
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"reward function {dotted!r} is not a dotted path; write 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        # err.name tells a missing target module apart from a missing dependency of it.
        if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise ValueError(
                f"reward function {dotted!r}: module {module_name!r} not found "
                "(is its package installed or on PYTHONPATH?)"
            ) from err
        raise ValueError(f"reward function {dotted!r}: importing {module_name!r} failed: {err}") from err
    except Exception as err:
        raise ValueError(f"reward function {dotted!r}: importing {module_name!r} failed: {err!r}") from err
    if not hasattr(module, attr):
        have = sorted(
            n
            for n, v in vars(module).items()
            if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module.__name__
        )[:12]
        raise ValueError(
            f"reward function {dotted!r}: module {module_name!r} has no attribute {attr!r}; set "
            f"reward.function to module:function, one of its callables ({', '.join(have)})"
        )
    fn = getattr(module, attr)
    if not callable(fn):
        raise ValueError(f"reward function {dotted!r}: {module_name}.{attr} is a {type(fn).__name__}, not callable")
    _check_signature(fn, dotted, f"{module_name}.{attr}")
    return fn


def _check_signature(fn: Callable, dotted: str, name: str) -> None:
    """A function that cannot take score_samples' four positional arguments is refused here (in
    preflight, before any work), not at the first reward stage."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or C callable without a readable signature
        return
    try:
        sig.bind("", "", "", None)
    except TypeError as err:
        raise ValueError(
            f"reward function {dotted!r}: {name}{sig} cannot be called as {REWARD_SIGNATURE} ({err}); "
            "give it those four positional parameters"
        ) from None


def score_samples(
    fn: RewardFn,
    data_sources: Sequence[str],
    responses: Sequence[str],
    ground_truths: Sequence[str],
    extra_infos: Sequence[dict | None] | None,
    on_error: Literal["raise", "zero"] = "raise",
) -> tuple[list[float], int]:
    """Score a batch: ([N] scores, number of failed samples).

    A sample fails when the function raises or returns something that is not a finite number
    (NaN or inf would make its whole group's advantages NaN). on_error="raise": RuntimeError naming
    the sample; on_error="zero": it scores 0.0 and is counted, so one bad user reward does not kill
    a long run but stays visible (``reward/errors``)."""
    if on_error not in ("raise", "zero"):
        raise ValueError(f"on_error must be 'raise' or 'zero', got {on_error!r}")
    n = len(responses)
    if extra_infos is None:
        extra_infos = [None] * n
    lengths = {len(data_sources), n, len(ground_truths), len(extra_infos)}
    if len(lengths) != 1:
        raise ValueError(
            f"score_samples got sequences of different lengths: data_sources={len(data_sources)}, "
            f"responses={n}, ground_truths={len(ground_truths)}, extra_infos={len(extra_infos)}"
        )
    scores: list[float] = []
    n_errors = 0
    for i, (source, response, truth, extra) in enumerate(zip(data_sources, responses, ground_truths, extra_infos)):
        try:
            value = float(fn(source, response, truth, extra))
            if not math.isfinite(value):
                raise ValueError(f"the reward is {value}, not a finite number")
            scores.append(value)
        except Exception as err:
            if on_error == "raise":
                raise RuntimeError(
                    f"reward function failed on sample {i} (data_source={source!r}, "
                    f"response starts {response[:80]!r}): {type(err).__name__}: {err}"
                ) from err
            if n_errors == 0:
                logger.warning(
                    "reward function failed on sample %d (data_source=%r); scoring it 0.0: %r", i, source, err
                )
            scores.append(0.0)
            n_errors += 1
    return scores, n_errors
