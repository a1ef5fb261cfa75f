"""The same flow code learns: on a reward a tiny random policy can learn (share of 'e' characters
in the response), mean reward rises clearly over 20 CPU steps; vLLM and the trainer agree on
log-probs after every weight sync."""
import numpy as np
import pytest

from tests.conftest import VLLM_LOGP_ATOL_CPU, mlflow_run, run_grpo

pytestmark = pytest.mark.slow


def test_mean_reward_rises_over_20_steps(tmp_path, gsm8k):
    run_grpo(tmp_path, "reward.function=tests.toy_reward:letter_e_share", "trainer.total_training_steps=20",
             "trainer.save_freq=-1", "trainer.test_freq=-1", "rollout.n=8", "actor.lr=2e-3",
             "actor.ppo_micro_batch_size_per_gpu=16")
    client, run = mlflow_run(tmp_path)
    hist = lambda key: [m.value for m in sorted(client.get_metric_history(run.info.run_id, key),  # noqa: E731
                                                 key=lambda m: m.step)]
    scores = hist("critic/score/mean")
    assert len(scores) == 20
    first, last = np.mean(scores[:5]), np.mean(scores[-5:])
    print(f"mean reward: first 5 steps {first:.3f}, last 5 steps {last:.3f}")
    assert last > first + 0.03 and last > 1.25 * first, scores
    # Sampling log-probs (vLLM, weights synced after the previous update) vs the trainer's.
    assert max(hist("training/rollout_probs_diff_max")) < VLLM_LOGP_ATOL_CPU
