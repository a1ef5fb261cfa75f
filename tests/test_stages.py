"""Pure pieces of the stages: which rows a step trains on, which failures are retried, when persisted
rollouts are reused, what a reward function gets."""

import copy

import numpy as np
from prefect.states import Failed

from configs.load import load_config
from tasks.stages import step_rows, transient


def test_step_rows_cover_each_epoch_once_and_are_reproducible():
    cfg = load_config("tiny-cpu", ["data.train_batch_size=4"])
    n = 10  # 2 full batches per epoch; the 2 leftover rows of each epoch are dropped
    epoch1 = np.concatenate([step_rows(n, cfg, s) for s in (1, 2)])
    epoch2 = np.concatenate([step_rows(n, cfg, s) for s in (3, 4)])
    assert len(set(epoch1)) == 8 and len(set(epoch2)) == 8
    assert not np.array_equal(epoch1, epoch2)  # reshuffled each epoch
    assert np.array_equal(step_rows(n, cfg, 3), step_rows(n, cfg, 3))  # a resumed step sees the same rows
    off = load_config("tiny-cpu", ["data.train_batch_size=4", "data.shuffle=false"])
    assert step_rows(n, off, 2).tolist() == [4, 5, 6, 7] and step_rows(n, off, 3).tolist() == [0, 1, 2, 3]


def test_only_infrastructure_failures_are_retried():
    assert transient(None, None, Failed(data=RuntimeError("actor died"))) is True
    assert transient(None, None, Failed(data=ValueError("data.source=x: path does not exist"))) is False


# ---- persisted rollouts are reused only if made the same way (issue 13 (7)) -------------------
import logging  # noqa: E402

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from tasks import stages  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _samples(prompts, rows, n):
    return pd.DataFrame(
        {
            "prompt_index": [i for i in range(len(prompts)) for _ in range(n)],
            "row": [r for r in rows for _ in range(n)],
            "response_ids": [[5, 6, 7]] * (len(prompts) * n),
            "response_text": ["#### 1"] * (len(prompts) * n),
            "finish_reason": ["stop"] * (len(prompts) * n),
            "extra_info": [{"index": int(r), "split": "train"} for r in rows for _ in range(n)],
        }
    )


@pytest.mark.parametrize(
    "change, named",
    [
        ([], None),
        (["model.path=models/other"], "model.path"),
        (["rollout.temperature=0.7"], "rollout.temperature"),
        (["rollout.top_p=0.9"], "rollout.top_p"),
        (["rollout.top_k=20"], "rollout.top_k"),
        (["rollout.max_response_length=16"], "rollout.max_response_length"),
        (["trainer.seed=2"], "trainer.seed"),
        (["rollout.n=2"], "rollout.n"),
        ("prompts", "prompt_ids"),
        ("tokenizer", "tokenizer"),
    ],
)
def test_persisted_rollouts_are_reused_only_if_made_the_same_way(tmp_path, tokenizer, caplog, change, named):
    cfg = load_config("tiny-cpu")
    rows = [3, 8]
    prompts = [stages.chat_ids(tokenizer, [{"role": "user", "content": f"question {r}"}]) for r in rows]
    path = tmp_path / "rollouts" / "step_000001.parquet"
    stages.write_rollouts(
        path, _samples(prompts, rows, cfg.rollout.n), stages.rollout_fingerprint(cfg, tokenizer, prompts, rows)
    )
    now_cfg, now_prompts, now_tok = cfg, prompts, tokenizer
    if change == "prompts":
        now_prompts = [prompts[0], prompts[1][:-1] + [prompts[1][-1] + 1]]  # one token differs
    elif change == "tokenizer":
        now_tok = copy.deepcopy(tokenizer)
        now_tok.chat_template = tokenizer.chat_template + " "
    elif change:
        now_cfg = load_config("tiny-cpu", change)
    log = logging.getLogger("test-rollouts")
    with caplog.at_level(logging.WARNING, logger="test-rollouts"):
        done = stages.reusable_rollouts(
            path, stages.rollout_fingerprint(now_cfg, now_tok, now_prompts, rows), len(rows) * cfg.rollout.n, log
        )
    if named is None:
        assert done is not None and len(done) == 8 and done["extra_info"][0] == {"index": 3, "split": "train"}
        assert not caplog.records and path.exists()
        return
    assert done is None  # the caller generates again
    assert len(caplog.records) == 1 and named in caplog.text and "generating the step again" in caplog.text
    assert not path.exists() and len(list((path.parent / "superseded").glob("step_000001-*.parquet"))) == 1


def test_rollouts_without_a_fingerprint_are_not_reused(tmp_path, tokenizer, caplog):
    cfg = load_config("tiny-cpu")
    path = tmp_path / "step_000001.parquet"
    _samples([[1]], [0], cfg.rollout.n).to_parquet(path)  # written before fingerprints existed
    fp = stages.rollout_fingerprint(cfg, tokenizer, [[1]], [0])
    assert stages.reusable_rollouts(path, fp, cfg.rollout.n, logging.getLogger("t")) is None
    assert "model.path (unrecorded)" in caplog.text


# ---- reward functions get the row's extra_info (issue 13 (11)) ----------------------------------
def reads_extra_info(data_source, solution_str, ground_truth, extra_info):
    """Scores the row's extra_info.index, and 0.5 more for a cut response."""
    return extra_info["index"] + (0.5 if extra_info["finish_reason"] == "length" else 0.0)


def test_reward_functions_get_the_rows_extra_info():
    cfg = load_config("tiny-cpu", ["reward.function=tests.test_stages:reads_extra_info", "rollout.n=2"])
    samples = _samples([[1], [2]], [3, 8], 2).assign(
        data_source="openai/gsm8k", ground_truth="1", finish_reason=["stop", "length", "stop", "stop"]
    )
    scored = stages.score.fn(samples, cfg)
    assert scored["score"].tolist() == [3.0, 3.5, 8.0, 8.0]
    # groups [3, 3.5] and [8, 8]: mean 3.25, unbiased std sqrt(0.125); the second group is all 0
    std = 0.125**0.5
    assert np.allclose(scored["advantage"], [-0.25 / (std + 1e-6), 0.25 / (std + 1e-6), 0.0, 0.0])


def test_a_fresh_start_sets_an_earlier_runs_rollouts_aside(tmp_path):
    """resume_mode=disable in a directory an earlier run used: its step files go to superseded/ (so a
    later resume of the new run cannot reuse another policy's samples), nothing is deleted."""
    import logging

    from tasks.stages import set_aside_rollouts

    ro = tmp_path / "rollouts"
    ro.mkdir()
    for step in (1, 2, 3):
        (ro / f"step_{step:06d}.parquet").write_bytes(b"x" * step)
    assert set_aside_rollouts(tmp_path, logging.getLogger("t")) == 3
    assert not list(ro.glob("step_*.parquet"))
    assert sorted(p.stat().st_size for p in (ro / "superseded").glob("step_*.parquet")) == [1, 2, 3]
    assert set_aside_rollouts(tmp_path / "none", logging.getLogger("t")) == 0
