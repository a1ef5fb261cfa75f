"""verl custom_reward_function for the smollm2-135m-1xh200 comparison: the reference GSM8K scorer
with format_score 0.1 (our envs/gsm8k.py built-in, the same rule), so both sides train on one reward.
verl calls compute_score(data_source, solution_str, ground_truth, extra_info). It returns a dict:
verl trains on "score" and logs every other key of the validation set as
`val-aux/<data_source>/<key>/mean@1`, with "acc" as `val-core/.../acc/mean@1` (verl's
process_validation_metrics): "acc" is the strict accuracy (no format credit) and "flexible" the
flexible one, the same two numbers our eval logs as `val-core/openai/gsm8k/reward{,_flexible}/mean@1`.
verl passes the row's extra_info without the sample's finish_reason, so a response cut at the length
limit is scored as written (ours applies the reference's cut rule); the difference is in the noise
at this shape (clip ratio 0.002 after step 10 of our run)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from configs.schema import RewardConfig  # noqa: E402
from envs.gsm8k import GSM8K, flexible_compute_score  # noqa: E402
from envs.gsm8k import compute_score as strict

_FN = GSM8K().reward(RewardConfig(format_score=0.1))


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kw):
    args = (data_source, solution_str, ground_truth, extra_info)
    return {"score": _FN(*args), "acc": strict(*args), "flexible": flexible_compute_score(*args)}
