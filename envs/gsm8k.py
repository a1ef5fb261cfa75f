"""GSM8K (`data_source` "openai/gsm8k"): the raw splits, the prompt, the reference scorer and the
eval's metrics, registered as an env (envs/base.py: Env).

Raw data: the hub dataset openai/gsm8k (config `main`) or a local directory of train/test
.jsonl/.parquet with columns question and answer; the ground truth is the number after the
answer's last `####`. The prompt is the question plus INSTRUCTION as one user message. The reward
is the reference framework's GSM8K scorer (verl `utils/reward_score/gsm8k.py`: strict `#### N`,
flexible last number, `format_score`), or our lenient variant (`reward.gsm8k_scorer`). The scorers
are pure Python: reward workers must not pay for importing torch.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from functools import partial
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np
import pandas as pd

from envs import ENVS
from envs.base import ROW_COLUMNS, Env
from envs.reward import REWARD_SIGNATURE, RewardFn, score_samples

if TYPE_CHECKING:
    from configs.schema import RewardConfig

DATA_SOURCE = "openai/gsm8k"
INSTRUCTION = ' Let\'s think step by step and output the final answer after "####".'
"""Appended to each question (the reference framework's GSM8K preprocessing)."""
_GROUND_TRUTH_RE = re.compile(r"-?[0-9]+(\.[0-9]+)?")


def ground_truth(answer: object) -> str:
    """The number after the last ``####`` of a GSM8K answer, commas removed. Raises ValueError if
    there is none."""
    if not isinstance(answer, str) or "####" not in answer:
        raise ValueError("answer has no '#### <number>' line")
    truth = answer.rsplit("####", 1)[1].strip().replace(",", "")
    if not _GROUND_TRUTH_RE.fullmatch(truth):
        raise ValueError(f"the text after '####' is {truth!r}, not a number")
    return truth


def _ground_truths(df: pd.DataFrame, split: str, where: str) -> list[str]:
    truths = []
    for i, answer in enumerate(df["answer"]):
        try:
            truths.append(ground_truth(answer))
        except ValueError as err:
            raise ValueError(f"{where}: {split} row {i} (0-based): {err}; fix or remove that row") from None
    return truths


# ---- scorers ------------------------------------------------------------------------------------
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


def _score(
    data_source, solution_str, ground_truth, extra_info, scorer, method: str = "strict", format_score: float = 0.0
) -> float:
    if data_source != DATA_SOURCE:
        raise ValueError(
            f"the built-in GSM8K reward got data_source {data_source!r}, not {DATA_SOURCE!r}; set "
            f"data.data_source to the rows' dataset (have: {', '.join(ENVS.names())}), or reward.function "
            f"to 'package.module:function' with the signature {REWARD_SIGNATURE}"
        )
    return gsm8k_score(
        solution_str,
        ground_truth,
        method=method,
        format_score=format_score,
        scorer=scorer,
        truncated=_truncated(extra_info),
    )


def compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None) -> float:
    """The reference scorer, strict (`#### N`): the built-in training reward and the eval's headline.
    ``extra_info`` is the dataset row's extra_info plus the sample's ``finish_reason`` (see
    ``gsm8k_score(truncated=)``). Raises ValueError for another data_source."""
    return _score(data_source, solution_str, ground_truth, extra_info, "reference")


def lenient_compute_score(
    data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None
) -> float:
    """As ``compute_score`` with the lenient scorer (reward.gsm8k_scorer=lenient)."""
    return _score(data_source, solution_str, ground_truth, extra_info, "lenient")


def flexible_compute_score(
    data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None
) -> float:
    """As ``compute_score`` with the reference scorer's flexible extraction (the last number in the
    response's last 300 characters, no ``####`` needed): the eval's ``reward_flexible`` metric, so
    that accuracy is seen apart from the answer format."""
    return _score(data_source, solution_str, ground_truth, extra_info, "reference", method="flexible")


_ANSWER_CHARS = frozenset("#0123456789")


def gsm8k_format_reward(
    data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None
) -> float:
    """GSM8K with partial credit for the answer format, a reward a tiny random policy can earn
    (the demo's `reward.function`): 1.0 for a right answer (``compute_score``, cut rule included);
    else 0.5 for a final ``#### <number>``; else 0.5 x the share of the response's non-space
    characters that belong to that format (``#`` and digits), a dense signal toward it. In [0, 1].
    Raises ValueError for another data_source."""
    right = compute_score(data_source, solution_str, ground_truth, extra_info)
    if right == 1.0:
        return 1.0
    if extract_solution(solution_str, "strict") is not None:
        return 0.5
    text = "".join(solution_str.split())
    return 0.5 * sum(ch in _ANSWER_CHARS for ch in text) / max(len(text), 1)


# ---- the env ------------------------------------------------------------------------------------
@ENVS.register(DATA_SOURCE)
class GSM8K(Env):
    """openai/gsm8k: 7473 train / 1319 test grade-school word problems with numeric answers."""

    data_source = DATA_SOURCE
    name = "GSM8K"
    hub_repo = DATA_SOURCE
    hub_files = {split: f"main/{split}-00000-of-00001.parquet" for split in ("train", "test")}
    local_example = "../shared/data/gsm8k"
    raw_columns = ("question", "answer")
    prep_version = "1"

    def check_rows(self, raw: pd.DataFrame, split: str, where: str) -> None:
        """Each question non-empty text, each answer ending in `#### <number>`."""
        for i, question in enumerate(raw["question"]):
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f"{where}: {split} row {i} (0-based) has an empty or non-text question")
        _ground_truths(raw, split, where)

    def to_rows(self, raw: pd.DataFrame, split: str) -> pd.DataFrame:
        """One user message (question + INSTRUCTION), ability "math", a rule reward on the
        ground truth; extra_info: split, index (the row's position in the raw split), answer, question."""
        truths = _ground_truths(raw, split, "to_rows")
        records = [
            {
                "data_source": DATA_SOURCE,
                "prompt": [{"role": "user", "content": question + INSTRUCTION}],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": truth},
                "extra_info": {"split": split, "index": i, "answer": answer, "question": question},
            }
            for i, (question, answer, truth) in enumerate(zip(raw["question"], raw["answer"], truths))
        ]
        return pd.DataFrame(records, columns=list(ROW_COLUMNS))

    def tokenizer_corpus(self, raw_train: pd.DataFrame) -> list[str]:
        """Question and worked answer of each train row (digits, `<<calc>>` markers and `####`)."""
        return list(raw_train["question"] + " " + raw_train["answer"])

    compute_score = staticmethod(compute_score)

    def reward(self, options: RewardConfig) -> RewardFn:
        """reward.gsm8k_scorer picks the scorer; reward.format_score (in [0, 1), configs/schema.py
        checks it) is the reference scorer's argument: the reward of a well-formed `#### <number>`
        that is wrong."""
        if options.format_score:
            return partial(_score, scorer=options.gsm8k_scorer, format_score=options.format_score)
        return compute_score if options.gsm8k_scorer == "reference" else lenient_compute_score

    def val_metrics(
        self,
        data_sources: Sequence[str],
        responses: Sequence[str],
        ground_truths: Sequence[str],
        extra_infos: Sequence[dict],
        options: RewardConfig,
        on_error: str = "raise",
    ) -> tuple[dict[str, float], dict[str, list]]:
        """`reward_flexible` (the reference's flexible extraction) and `format` (val-aux: share of
        responses whose last 300 characters hold a `#### <number>`), so that format learning shows
        apart from accuracy; with reward.gsm8k_scorer=lenient also `reward_lenient`. Table columns
        score_flexible (and score_lenient)."""
        args = (data_sources, responses, ground_truths, extra_infos)
        table = {"score_flexible": score_samples(flexible_compute_score, *args, on_error=on_error)[0]}
        metrics = {
            self.val_key("reward_flexible"): float(np.mean(table["score_flexible"])),
            self.val_key("format", kind="aux"): float(
                np.mean([extract_solution(t, "strict") is not None for t in responses])
            ),
        }
        if options.gsm8k_scorer == "lenient":
            table["score_lenient"] = score_samples(lenient_compute_score, *args, on_error=on_error)[0]
            metrics[self.val_key("reward_lenient")] = float(np.mean(table["score_lenient"]))
        return metrics, table
