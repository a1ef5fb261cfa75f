"""Rule-based rewards and the pluggable reward-function hook.

Every reward function has the field-standard ``compute_score`` signature
``fn(data_source, solution_str, ground_truth, extra_info) -> float`` so that
users can bring the functions they already wrote for other GRPO stacks.
This module is pure Python: it runs inside reward workers that must not pay
for importing torch or the orchestration layer.
"""

from __future__ import annotations

import importlib
import logging
import re
from decimal import Decimal, InvalidOperation
from typing import Callable, Literal, Optional, Sequence

logger = logging.getLogger(__name__)

RewardFn = Callable[[str, str, str, Optional[dict]], float]

# Only the tail is searched: a model that rambles on after its answer, or that
# quotes the prompt's numbers early on, should not get credit by accident.
_TAIL_CHARS = 300
_STRICT_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
_NUMBER_RE = re.compile(r"(\-?[0-9\.\,]+)")


def _normalise(token: str) -> str | None:
    """Drop thousands separators and a sentence-ending period; None if no digit is left."""
    token = token.replace(",", "").rstrip(".")
    return token if any(ch.isdigit() for ch in token) else None


def extract_solution(text: str, method: Literal["strict", "flexible"] = "strict") -> str | None:
    """Pull the final numeric answer out of the last 300 characters of a response.

    strict: the last ``#### <number>``; if that last match holds no digit
    (e.g. ``#### .``) the answer counts as missing rather than falling back to
    an earlier one. flexible: the last token that contains a digit.
    """
    tail = text[-_TAIL_CHARS:]
    if method == "strict":
        matches = _STRICT_RE.findall(tail)
        return _normalise(matches[-1]) if matches else None
    if method == "flexible":
        for token in reversed(_NUMBER_RE.findall(tail)):
            answer = _normalise(token)
            if answer is not None:
                return answer
        return None
    raise ValueError(f"unknown extraction method {method!r}; use 'strict' or 'flexible'")


def _same_number(a: str, b: str) -> bool:
    """Exact text match, or equal as decimals so "72.0" matches "72" (Decimal avoids float rounding)."""
    if a == b:
        return True
    try:
        return Decimal(a) == Decimal(b)
    except InvalidOperation:
        return False


def gsm8k_score(
    solution_str: str,
    ground_truth: str,
    method: Literal["strict", "flexible"] = "strict",
    format_score: float = 0.0,
    score: float = 1.0,
) -> float:
    """GSM8K outcome reward: ``score`` if right, ``format_score`` if a wrong number was given, 0.0 if none.

    The ground truth is normalised like the answer (commas removed), and
    numerically equal decimals count as equal; this is slightly more lenient
    than a pure string compare, which would reject "#### 72.0" for 72.
    """
    answer = extract_solution(solution_str, method)
    if answer is None:
        return 0.0
    truth = ground_truth.strip().replace(",", "")
    return score if _same_number(answer, truth) else format_score


_BUILTIN: dict[str, RewardFn] = {
    "openai/gsm8k": lambda _ds, solution, truth, _extra: gsm8k_score(solution, truth),
}


def default_compute_score(
    data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None
) -> float:
    """Dispatch to the built-in reward for ``data_source``."""
    fn = _BUILTIN.get(data_source)
    if fn is None:
        raise ValueError(
            f"no built-in reward for data_source {data_source!r} (built-in: {sorted(_BUILTIN)}); "
            "set reward.function to 'package.module:function' with the signature "
            "fn(data_source, solution_str, ground_truth, extra_info) -> float"
        )
    return fn(data_source, solution_str, ground_truth, extra_info)


def load_reward_fn(dotted: str | None) -> RewardFn:
    """Resolve ``reward.function``: empty means the built-in dispatcher, else
    ``package.module:function`` or ``package.module.function``."""
    if dotted is None or not dotted.strip():
        return default_compute_score
    path = dotted.strip()
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(
            f"reward function {dotted!r} is not a dotted path; write 'package.module:function'"
        )
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
        raise ValueError(f"reward function {dotted!r}: module {module_name!r} has no attribute {attr!r}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise ValueError(
            f"reward function {dotted!r}: {module_name}.{attr} is a {type(fn).__name__}, not callable"
        )
    return fn


def score_samples(
    fn: RewardFn,
    data_sources: Sequence[str],
    responses: Sequence[str],
    ground_truths: Sequence[str],
    extra_infos: Sequence[dict | None] | None,
    on_error: Literal["raise", "zero"] = "raise",
) -> tuple[list[float], int]:
    """Score a batch; with on_error="zero" a failing sample scores 0.0 and is counted,
    so one bad user reward does not kill a long run but stays visible."""
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
    for i, (source, response, truth, extra) in enumerate(
        zip(data_sources, responses, ground_truths, extra_infos)
    ):
        try:
            scores.append(float(fn(source, response, truth, extra)))
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
