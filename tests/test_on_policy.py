"""An on-policy step (one mini-batch, one PPO epoch) skips the old_log_prob pass: the update
takes its own log-probs, detached, as old (engines/batching.on_policy, engines/trainer/actor.py).

In float64 the two are the same update: the recomputed old log-probs equal the update's own
forward to rounding (tests/test_trainer.py derives the bounds), so the PPO ratio is 1 either way.
"""

import dataclasses

import numpy as np
import pytest
import torch

from configs.load import load_config
from engines import batching
from tests.test_trainer import METRIC_REL, W_ATOL, _batch, _params, _trainer


def test_on_policy_by_the_config():
    cfg = lambda *o: load_config("tiny-cpu", ["rollout.n=2", *o])  # noqa: E731
    one = cfg("data.train_batch_size=4", "actor.ppo_mini_batch_size=4")
    assert batching.on_policy(8, one) and len(batching.minibatch_schedule(8, one, 0)) == 1
    two_minis = cfg("data.train_batch_size=4", "actor.ppo_mini_batch_size=2", "actor.ppo_micro_batch_size_per_gpu=2")
    assert not batching.on_policy(8, two_minis) and len(batching.minibatch_schedule(8, two_minis, 0)) == 2
    two_epochs = cfg("data.train_batch_size=4", "actor.ppo_mini_batch_size=4", "actor.ppo_epochs=2")
    assert not batching.on_policy(8, two_epochs)


def test_update_without_old_log_probs_is_the_same_update(model_dir):
    with_old = _trainer(model_dir, master_dtype=torch.float64)  # mini-batch 4 prompts x n 2 = the 8 samples
    batch = _batch(with_old)
    without = _trainer(model_dir, master_dtype=torch.float64)
    rollout = [lp + 0.25 for lp in batch.old_log_probs]  # an engine 0.25 nats off everywhere
    m_old = with_old.update(batch, seed=0)
    m_new = without.update(dataclasses.replace(batch, old_log_probs=None, rollout_log_probs=rollout), seed=0)
    for k in ("actor/grad_norm", "actor/pg_loss", "actor/entropy", "actor/kl_loss"):
        assert m_new[k] == pytest.approx(m_old[k], rel=METRIC_REL), k
    assert m_new["actor/ppo_kl"] == 0.0 and m_new["actor/pg_clipfrac"] == 0.0
    assert m_new["training/rollout_probs_diff_mean"] == pytest.approx(0.25, abs=1e-6)  # float32 rollout values
    assert m_new["training/rollout_probs_diff_max"] == pytest.approx(0.25, abs=1e-6)
    p_old, p_new = _params(with_old), _params(without)
    assert max((p_old[k] - p_new[k]).abs().max().item() for k in p_old) <= W_ATOL


def test_no_old_log_probs_for_several_optimizer_steps_is_refused(model_dir):
    t = _trainer(model_dir, "actor.ppo_mini_batch_size=2", "actor.ppo_micro_batch_size_per_gpu=2")
    batch = dataclasses.replace(_batch(t), old_log_probs=None)
    with pytest.raises(ValueError, match="on-policy step .*not 2.*compute_log_prob"):
        t.update(batch, seed=0)
    assert np.isfinite(
        t.update(dataclasses.replace(batch, old_log_probs=t.compute_log_prob(batch.prompts, batch.responses)), seed=0)[
            "actor/grad_norm"
        ]
    )
