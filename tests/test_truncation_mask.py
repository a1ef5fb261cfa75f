"""actor.mask_truncated_completions (issue 13 (3)): a response cut at max_response_length is left
out of the loss as if it were not in the mini-batch; off, the flags change nothing."""

import numpy as np
import pytest
import torch

from configs.load import load_config
from engines.trainer.fsdp import FSDPTrainer
from engines.types import UpdateBatch

TRUNCATED = [False, True, False, False, True, False, False, False]


def _grads(model_dir, batch, steps, mask: bool, mode: str):
    cfg = load_config(
        "tiny-cpu",
        [
            f"actor.loss_agg_mode={mode}",
            "rollout.n=2",
            "actor.ppo_mini_batch_size=4",
            "actor.ppo_micro_batch_size_per_gpu=2",
            "actor.entropy_coeff=0.01",
            f"actor.mask_truncated_completions={str(mask).lower()}",
        ],
    )
    torch.manual_seed(0)
    trainer = FSDPTrainer(cfg, model_dir, "cpu")
    metrics = trainer.update(batch, seed=0, steps=steps)
    # clip_grad_norm_ scaled the .grad it left by the same factor in both runs if the grads agree
    return metrics, {k: p.grad.clone() for k, p in trainer.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["token-mean"])  # the default; seq modes share the counts
def test_truncated_samples_weigh_nothing(model_dir, mode):
    rng = np.random.default_rng(0)
    n = len(TRUNCATED)
    prompts = [rng.integers(5, 200, size=rng.integers(4, 9)).tolist() for _ in range(n)]
    responses = [rng.integers(5, 200, size=rng.integers(2, 7)).tolist() for _ in range(n)]
    old = [rng.normal(-5, 0.1, size=len(r)).astype(np.float32) for r in responses]
    batch = UpdateBatch(
        prompts=prompts,
        responses=responses,
        old_log_probs=old,
        ref_log_probs=old,
        advantages=rng.normal(size=n).astype(np.float32).tolist(),
        truncated=TRUNCATED,
    )
    kept = [i for i in range(n) if not TRUNCATED[i]]
    masked, g_masked = _grads(model_dir, batch, [np.arange(n)], mask=True, mode=mode)
    without, g_without = _grads(model_dir, batch, [np.array(kept)], mask=False, mode=mode)  # the cut ones left out
    unmasked, g_unmasked = _grads(model_dir, batch, [np.arange(n)], mask=False, mode=mode)
    # fp32 sums of <= 8 x 6 terms in another order: relative error <= 48 * 2^-24 ~ 3e-6 of the largest
    for k in ("actor/pg_loss", "actor/kl_loss", "actor/entropy"):
        assert masked[k] == pytest.approx(without[k], rel=1e-5, abs=1e-7)
    for k, g in g_masked.items():
        torch.testing.assert_close(g, g_without[k], rtol=1e-5, atol=1e-5 * float(g.abs().max()) + 1e-12)
    # the flags alone change nothing while the option is off, and the cut samples did count then
    assert unmasked["actor/pg_loss"] != pytest.approx(masked["actor/pg_loss"], rel=1e-2)
    assert (
        max(float((g - g_unmasked[k]).abs().max() / g.abs().max()) for k, g in g_masked.items()) > 1e-4
    )  # 30x the rounding bound
