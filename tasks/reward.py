"""Rule-based rewards and the pluggable reward-function hook.

Every reward function has the field-standard ``compute_score`` signature
``fn(data_source, solution_str, ground_truth, extra_info) -> float`` so that
users can bring the functions they already wrote for other GRPO stacks.
This module is pure Python: it runs inside reward workers that must not pay
for importing torch or the orchestration layer.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import re
from decimal import Decimal, InvalidOperation
from functools import partial
from typing import Callable, Literal, Optional, Sequence

logger = logging.getLogger(__name__)

RewardFn = Callable[[str, str, str, Optional[dict]], float]
REWARD_SIGNATURE = "fn(data_source, solution_str, ground_truth, extra_info) -> float"
"""How score_samples calls a reward: four positional arguments."""

# Only the tail is searched: a model that rambles on after its answer, or that
# quotes the prompt's numbers early on, should not get credit by accident.
_TAIL_CHARS = 300
_STRICT_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
_NUMBER_RE = re.compile(r"(\-?[0-9\.\,]+)")

GSM8K_SCORERS = ("reference", "lenient")
"""reference: the reference framework's GSM8K scorer, exactly (what published
``val-core/openai/gsm8k/reward/mean@1`` numbers use); lenient: ours, which also
credits ``#### 72.`` / ``#### 72.0`` for 72 and ``1,234`` for 1234 in flexible mode
(see ``extract_solution``)."""


def _normalise(token: str) -> str | None:
    """Lenient: drop thousands separators and a sentence-ending period; None if no digit is left."""
    token = token.replace(",", "").rstrip(".")
    return token if any(ch.isdigit() for ch in token) else None


def _extract(text: str, method: str, scorer: str) -> tuple[str | None, bool]:
    """(answer, whether the answer's text runs to the very end of ``text``)."""
    if method not in ("strict", "flexible"):
        raise ValueError(f"unknown extraction method {method!r}; use 'strict' or 'flexible'")
    if scorer not in GSM8K_SCORERS:
        raise ValueError(f"unknown GSM8K scorer {scorer!r}; use one of {GSM8K_SCORERS}")
    tail = text[-_TAIL_CHARS:]
    found = list((_STRICT_RE if method == "strict" else _NUMBER_RE).finditer(tail))
    if not found:
        return None, False
    if scorer == "reference":
        if method == "strict":  # the last match, commas removed, nothing else
            m = found[-1]
            return m.group(1).replace(",", ""), m.end() == len(tail)
        # flexible: the last match that is not a lone "."; taken as is (commas and a trailing
        # period stay). If every match is ".", the reference's loop leaves the first one.
        m = next((m for m in reversed(found) if m.group(1) != "."), found[0])
        return m.group(1), m.end() == len(tail)
    if method == "strict":  # the last match; one without a digit counts as missing
        m = found[-1]
        return _normalise(m.group(1)), m.end() == len(tail)
    for m in reversed(found):
        answer = _normalise(m.group(1))
        if answer is not None:
            return answer, m.end() == len(tail)
    return None, False


def extract_solution(
    text: str, method: Literal["strict", "flexible"] = "strict", scorer: Literal["reference", "lenient"] = "reference"
) -> str | None:
    """Pull the final numeric answer out of the last 300 characters of a response.

    strict: the last ``#### <number>`` (regex ``#### (\\-?[0-9\\.\\,]+)``); flexible: the last
    number-like token (``(\\-?[0-9\\.\\,]+)``).
    scorer="reference" behaves as the reference framework's GSM8K scorer
    (verl ``utils/reward_score/gsm8k.py``): strict removes commas and keeps everything else
    (``#### 72.`` gives ``72.``, ``#### .`` gives ``.``); flexible skips lone ``.`` tokens and
    keeps commas and periods (``42,``).
    scorer="lenient": commas and a trailing period are dropped in both methods, and a token
    without a digit counts as no answer (a strict ``#### .`` does not fall back to an earlier one).
    Raises ValueError for an unknown method or scorer.
    """
    return _extract(text, method, scorer)[0]


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
    scorer: Literal["reference", "lenient"] = "reference",
    truncated: bool = False,
) -> float:
    """GSM8K outcome reward: ``score`` if right, ``format_score`` if a wrong answer was given, 0.0 if none.

    scorer="reference": the answer must equal ``ground_truth`` as text (the reference's rule:
    ``72.0`` or ``72.`` is wrong for 72). scorer="lenient": the ground truth is normalised like the
    answer (commas removed) and numerically equal decimals count as equal (Decimal, exact).
    truncated: the response was cut by max_tokens (finish_reason "length"); an answer whose text
    runs to the cut may be a prefix of a longer number (``#### 10`` of ``#### 100``) and scores 0.0.
    This is the one departure from the reference, and it only touches responses cut exactly there.
    """
    answer, at_end = _extract(solution_str, method, scorer)
    if answer is None or (truncated and at_end):
        return 0.0
    if scorer == "reference":
        return score if answer == ground_truth else format_score
    truth = ground_truth.strip().replace(",", "")
    return score if _same_number(answer, truth) else format_score


def _truncated(extra_info: dict | None) -> bool:
    return bool(extra_info) and extra_info.get("finish_reason") == "length"


def default_compute_score(
    data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None
) -> float:
    """The built-in reward for ``data_source`` (GSM8K: the reference scorer). ``extra_info`` is the
    dataset row's extra_info plus the sample's ``finish_reason`` (see ``gsm8k_score(truncated=)``).
    Raises ValueError for a data_source without a built-in reward."""
    return _dispatch(data_source, solution_str, ground_truth, extra_info, "reference")


def lenient_compute_score(
    data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None
) -> float:
    """As ``default_compute_score`` with the lenient GSM8K scorer (reward.gsm8k_scorer=lenient)."""
    return _dispatch(data_source, solution_str, ground_truth, extra_info, "lenient")


def flexible_compute_score(
    data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None
) -> float:
    """As ``default_compute_score`` with the reference scorer's flexible extraction (the last
    number in the response's last 300 characters, no ``####`` needed): the eval's
    ``reward_flexible`` metric, so that accuracy is seen apart from the answer format."""
    return _dispatch(data_source, solution_str, ground_truth, extra_info, "reference", method="flexible")


def _dispatch(
    data_source, solution_str, ground_truth, extra_info, scorer, method: str = "strict", format_score: float = 0.0
) -> float:
    if data_source != "openai/gsm8k":
        raise ValueError(
            f"no built-in reward for data_source {data_source!r} (built-in: ['openai/gsm8k']); "
            f"set reward.function to 'package.module:function' with the signature {REWARD_SIGNATURE}"
        )
    return gsm8k_score(
        solution_str,
        ground_truth,
        method=method,
        format_score=format_score,
        scorer=scorer,
        truncated=_truncated(extra_info),
    )


_ANSWER_CHARS = frozenset("#0123456789")


def gsm8k_format_reward(
    data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None
) -> float:
    """GSM8K with partial credit for the answer format, a reward a tiny random policy can earn
    (the demo's): 1.0 for a right answer (the built-in reference scorer, cut rule included); else
    0.5 for a final ``#### <number>``; else 0.5 x the share of the response's non-space characters
    that belong to that format (``#`` and digits), a dense signal toward it. In [0, 1].
    Raises ValueError for a data_source without a built-in reward."""
    right = _dispatch(data_source, solution_str, ground_truth, extra_info, "reference")
    if right == 1.0:
        return 1.0
    if extract_solution(solution_str, "strict") is not None:
        return 0.5
    text = "".join(solution_str.split())
    return 0.5 * sum(ch in _ANSWER_CHARS for ch in text) / max(len(text), 1)


def load_reward_fn(dotted: str | None, gsm8k_scorer: str = "reference", format_score: float = 0.0) -> RewardFn:
    """Resolve ``reward.function``: empty means the built-in dispatcher (with the
    ``reward.gsm8k_scorer`` GSM8K scorer, and ``format_score`` for a well-formed ``#### <number>``
    that is wrong, as the reference scorer's argument of that name), else
    ``package.module:function`` or ``package.module.function``. Raises ValueError for an unknown
    scorer, a format_score outside [0, 1), a format_score with a user function, or a path that
    does not import."""
    if not 0.0 <= format_score < 1.0:
        raise ValueError(f"reward.format_score={format_score}: use a value in [0, 1) (a right answer scores 1)")
    if dotted is None or not dotted.strip():
        if gsm8k_scorer not in GSM8K_SCORERS:
            raise ValueError(f"reward.gsm8k_scorer={gsm8k_scorer!r}: use one of {GSM8K_SCORERS}")
        if format_score:
            return partial(_dispatch, scorer=gsm8k_scorer, format_score=format_score)
        return default_compute_score if gsm8k_scorer == "reference" else lenient_compute_score
    if format_score:
        raise ValueError(
            f"reward.format_score={format_score} applies to the built-in GSM8K reward only; "
            f"unset reward.function or set reward.format_score=0"
        )
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
        raise ValueError(f"reward function {dotted!r}: module {module_name!r} has no attribute {attr!r}")
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
        sig.bind("openai/gsm8k", "", "", None)
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
