"""verl custom_reward_function for the smollm2-135m-1xh200 comparison: the reference GSM8K scorer
with format_score 0.1 (our envs/gsm8k.py built-in, the same rule), so both sides train on one reward.
verl calls compute_score(data_source, solution_str, ground_truth, extra_info)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from configs.schema import RewardConfig  # noqa: E402
from envs.gsm8k import GSM8K  # noqa: E402

_FN = GSM8K().reward(RewardConfig(format_score=0.1))


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kw):
    return _FN(data_source, solution_str, ground_truth, extra_info)
