"""What a dataset (an RL environment) supplies: `Env`, the interface one file per dataset fills in.

An env owns everything that knows its data: where the raw splits come from (hub repository,
file names, required columns), how each raw row is checked and turned into the standard row every
stage reads (`ROW_COLUMNS`: the reference framework's parquet layout), the prompt, the built-in
reward and the eval's metric names. The machinery around it (reading files, the prep cache, the
reward hook) is dataset-independent: envs/prep.py, envs/reward.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar, Sequence

if TYPE_CHECKING:
    import pandas as pd

    from configs.schema import RewardConfig
    from envs.reward import RewardFn

ROW_COLUMNS = ("data_source", "prompt", "ability", "reward_model", "extra_info")
"""The prepared parquet's columns, in this order (the rollout, reward and eval stages read them):
data_source (str, the env's name), prompt (chat messages, [{"role", "content"}]), ability (str),
reward_model ({"style", "ground_truth"}), extra_info (dict, passed to the reward function)."""


class Env(ABC):
    """One dataset. Subclass it in a module of envs/ and decorate the class with
    `@ENVS.register(data_source)` (envs/__init__.py); `data.data_source` picks it."""

    data_source: ClassVar[str]
    """The reference framework's `data_source` string (e.g. "openai/gsm8k"): the registry key,
    the rows' data_source column and the middle of the eval's metric names."""
    name: ClassVar[str]
    """How messages name the dataset ("GSM8K")."""
    hub_repo: ClassVar[str | None] = None
    """Hugging Face dataset repository that `data.source=<hub_repo>` downloads; None: local only."""
    hub_files: ClassVar[dict[str, str]] = {}
    """Split -> file in hub_repo (a parquet file), for "train" and "test"."""
    local_example: ClassVar[str] = ""
    """A local directory to suggest in errors (e.g. "../shared/data/gsm8k"); "" for none."""
    raw_columns: ClassVar[tuple[str, ...]]
    """Columns every raw split must have; prep keeps these, in this order, and drops the rest."""
    prep_version: ClassVar[str] = "1"
    """Bump when the rows this env writes change, so that prep caches made before are not reused."""

    @abstractmethod
    def check_rows(self, raw: pd.DataFrame, split: str, where: str) -> None:
        """Raise ValueError naming `where` (the file), the split, the 0-based row and the fix for
        the first row `to_rows` could not turn into a standard row; `raw` has `raw_columns`."""

    @abstractmethod
    def to_rows(self, raw: pd.DataFrame, split: str) -> pd.DataFrame:
        """The standard rows (columns ROW_COLUMNS, one per raw row, in order) of a checked split."""

    @abstractmethod
    def tokenizer_corpus(self, raw_train: pd.DataFrame) -> list[str]:
        """Texts of the raw train split that a random-init model's tokenizer is trained on
        (model.source=random)."""

    @abstractmethod
    def compute_score(
        self, data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None
    ) -> float:
        """The env's accuracy: the eval's headline metric with reward.function unset. Same
        signature as any reward function (envs/reward.py: REWARD_SIGNATURE)."""

    def reward(self, options: RewardConfig) -> RewardFn:
        """The built-in training reward under the `reward.*` options (reward.function unset).
        Raises ValueError (one line naming the key) for an option this env does not read.
        Default: compute_score, with GSM8K's options refused."""
        for key, value, default in (
            ("format_score", options.format_score, 0.0),
            ("gsm8k_scorer", options.gsm8k_scorer, "reference"),
        ):
            if value != default:
                raise ValueError(
                    f"reward.{key}={value} is not read by data.data_source={self.data_source}'s built-in "
                    f"reward; set reward.{key}={default}"
                )
        return self.compute_score

    def val_metrics(
        self,
        data_sources: Sequence[str],
        responses: Sequence[str],
        ground_truths: Sequence[str],
        extra_infos: Sequence[dict],
        options: RewardConfig,
        on_error: str = "raise",
    ) -> tuple[dict[str, float], dict[str, list]]:
        """Eval metrics besides the headline (`val_key()`), with reward.function unset: ({metric
        key: value}, {sample-table column: [one value per response]}); `on_error` as in
        envs/reward.score_samples. Default: none."""
        return {}, {}

    def val_key(self, var: str = "reward", kind: str = "core") -> str:
        """An eval metric's name, the reference framework's `val-{core|aux}/{data_source}/{var}/mean@1`;
        `val_key()` is the headline (MLflow logs it with `@` as `_at_`)."""
        return f"val-{kind}/{self.data_source}/{var}/mean@1"
