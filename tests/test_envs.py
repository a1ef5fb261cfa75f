"""The dataset registry (envs/): a second dataset is one class registered by its `data_source`,
found by the prep task, preflight and the reward stage without an edit to any product file; an
unknown data source is one error line listing the known ones; GSM8K's eval metric names."""

import json

import numpy as np
import pandas as pd
import pytest

from configs.load import load_config, with_overrides
from envs import ENVS, get_env, reward_fn
from envs.base import ROW_COLUMNS, Env
from flows.preflight import preflight
from tasks import stages

ARITH = "test/arith"
PROBLEMS = [(f"What is {a} + {b}?", a + b) for a, b in ((2, 3), (10, 7), (41, 1), (5, 5))]


@ENVS.register(ARITH)
class Arith(Env):
    """Sums, answered by the response's last word: a dataset with its own columns, rows and reward."""

    data_source = ARITH
    name = "Arith"
    raw_columns = ("problem", "solution")

    def check_rows(self, raw, split, where):
        for i, solution in enumerate(raw["solution"]):
            if not isinstance(solution, int):
                raise ValueError(f"{where}: {split} row {i} (0-based): solution {solution!r} is not an integer")

    def to_rows(self, raw, split):
        records = [
            {
                "data_source": ARITH,
                "prompt": [{"role": "user", "content": problem}],
                "ability": "arithmetic",
                "reward_model": {"style": "rule", "ground_truth": str(solution)},
                "extra_info": {"split": split, "index": i},
            }
            for i, (problem, solution) in enumerate(zip(raw["problem"], raw["solution"]))
        ]
        return pd.DataFrame(records, columns=list(ROW_COLUMNS))

    def tokenizer_corpus(self, raw_train):
        return list(raw_train["problem"])

    def compute_score(self, data_source, solution_str, ground_truth, extra_info=None):
        words = solution_str.split()
        return 1.0 if words and words[-1] == ground_truth else 0.0


def _arith_config(tmp_path, model_dir, *overrides):
    src = tmp_path / "arith"
    src.mkdir()
    for split in ("train", "test"):
        lines = [json.dumps({"problem": p, "solution": s, "source": "hand"}) for p, s in PROBLEMS]
        (src / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return load_config(
        "tiny-cpu",
        with_overrides(
            [
                f"data.data_source={ARITH}",
                f"data.source={src}",
                f"data.dir={tmp_path / 'data'}",
                "model.source=hf",
                f"model.path={model_dir}",
                f"trainer.default_local_dir={tmp_path / 'ckpt'}",
                f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            ],
            overrides,
        ),
    )


def test_a_second_dataset_is_one_registered_class(tmp_path, model_dir):
    cfg = _arith_config(tmp_path, model_dir)
    preflight(cfg)  # its files are read and checked through the env
    _, _, train, test = stages.prepare(cfg)  # the prep task
    assert list(train.columns) == list(ROW_COLUMNS) and len(train) == len(test) == len(PROBLEMS)
    assert set(train["data_source"]) == {ARITH}
    assert [rm["ground_truth"] for rm in test["reward_model"]] == ["5", "17", "42", "10"]
    assert list(train["prompt"].iloc[1]) == [{"role": "user", "content": "What is 10 + 7?"}]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [
        "prep_manifest.json",
        "test.parquet",
        "train.parquet",
    ]
    assert json.loads((tmp_path / "data" / "prep_manifest.json").read_text())["data_source"] == ARITH

    # The reward stage scores with the env's own reward (reward.function unset).
    samples = pd.DataFrame(
        {
            "prompt_index": [0, 0, 1, 1],
            "data_source": [ARITH] * 4,
            "response_text": ["so 5", "it is 6", "17", "seventeen"],
            "ground_truth": ["5", "5", "17", "17"],
            "finish_reason": ["stop"] * 4,
            "extra_info": [{"index": 0}, {"index": 0}, {"index": 1}, {"index": 1}],
        }
    )
    scored = stages.score.fn(samples, cfg)
    assert scored["score"].tolist() == [1.0, 0.0, 1.0, 0.0]
    # groups [1, 0] and [1, 0]: mean 0.5, unbiased std sqrt(0.5); (r - mean) / (std + 1e-6)
    adv = 0.5 / (0.5**0.5 + 1e-6)
    # float32 (algos): ~10 roundings of 2^-24 on values <= 1, so 1e-6 bounds it (6e-7)
    assert np.allclose(scored["advantage"], [adv, -adv, adv, -adv], rtol=0, atol=1e-6)
    assert reward_fn(cfg, for_eval=True)(ARITH, "so 5", "5", None) == 1.0
    assert get_env(ARITH).val_key() == "val-core/test/arith/reward/mean@1"


def test_a_bad_row_of_the_second_dataset_is_its_own_error_line(tmp_path, model_dir):
    cfg = _arith_config(tmp_path, model_dir)
    (tmp_path / "arith" / "test.jsonl").write_text(json.dumps({"problem": "1 + 1?", "solution": "two"}) + "\n")
    with pytest.raises(ValueError) as e:
        preflight(cfg)
    assert (
        str(e.value) == f"{tmp_path / 'arith' / 'test.jsonl'}: test row 0 (0-based): solution 'two' is not an integer"
    )


@pytest.mark.parametrize(
    "key, value, default", [("format_score", "0.1", "0.0"), ("gsm8k_scorer", "lenient", "reference")]
)
def test_gsm8k_reward_options_are_refused_for_another_dataset(tmp_path, model_dir, key, value, default):
    cfg = _arith_config(tmp_path, model_dir, f"reward.{key}={value}")
    with pytest.raises(ValueError) as e:
        preflight(cfg)
    assert str(e.value) == (
        f"reward.{key}={value} is not read by data.data_source={ARITH}'s built-in reward; set reward.{key}={default}"
    )


def test_an_unknown_data_source_is_one_error_line_listing_the_known_ones():
    cfg = load_config("tiny-cpu", ["data.data_source=my/dataset"])
    with pytest.raises(ValueError) as e:
        preflight(cfg)
    assert "openai/gsm8k" in ENVS.names()
    assert str(e.value) == (
        f"data.data_source=my/dataset is not supported in this build (have: {', '.join(ENVS.names())}); "
        "a new one is a module in envs/ that registers it"
    )


@pytest.mark.parametrize("scorer", ["reference", "lenient"])
def test_gsm8k_eval_metric_names(scorer):
    """The keys the eval logs to MLflow (published runs and tests/test_kill.py read them)."""
    env = get_env("openai/gsm8k")
    responses = ["so #### 18", "it is 18", "#### 18.0"]
    metrics, table = env.val_metrics(
        ["openai/gsm8k"] * 3,
        responses,
        ["18"] * 3,
        [{}] * 3,
        load_config("tiny-cpu", [f"reward.gsm8k_scorer={scorer}"]).reward,
    )
    expected = {
        "val-core/openai/gsm8k/reward_flexible/mean@1": 2 / 3,  # "18", "18" (flexible keeps "18.0" as text)
        "val-aux/openai/gsm8k/format/mean@1": 2 / 3,
    }
    if scorer == "lenient":
        expected["val-core/openai/gsm8k/reward_lenient/mean@1"] = 2 / 3  # "18.0" counts, "it is 18" has no ####
    assert metrics == expected  # np.mean of [1, 1, 0]: an exact sum, one rounded division, as 2 / 3
    assert list(table) == ["score_flexible"] + (["score_lenient"] if scorer == "lenient" else [])
    assert env.val_key() == "val-core/openai/gsm8k/reward/mean@1"
