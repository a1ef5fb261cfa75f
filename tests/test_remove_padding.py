"""model.use_remove_padding in the trainer: a micro-batch packed into one row gives the padded
layout's log-probs, entropy, losses and update (CPU: SDPA with the block-diagonal mask,
engines/trainer/varlen.py; CUDA: FlashAttention varlen, tests/test_remove_padding_gpu.py).

Both sides run in float64 (master_dtype), where the two layouts differ only by the order of
sums (masked attention scores are exactly 0 after the softmax): the bounds of tests/test_trainer.py
apply (their derivation is there). A row mask that lets samples attend to the ones before them
(the packing mistake) moves log-probs by more than 1e-3: the last test shows it is caught.
"""

import numpy as np
import pytest
import torch

from engines import batching
from tests.test_trainer import LOGP_ATOL, METRIC_REL, W_ATOL, _batch, _params, _trainer, assert_log_probs_match

PACKED = "model.use_remove_padding=true"


def _pair(model_dir, *overrides):
    padded = _trainer(model_dir, *overrides, master_dtype=torch.float64)
    packed = _trainer(model_dir, PACKED, *overrides, master_dtype=torch.float64)
    assert packed.packed and not padded.packed
    return padded, packed


@pytest.mark.parametrize(
    "extra",
    [
        ["actor.ppo_micro_batch_size_per_gpu=4", "actor.loss_agg_mode=seq-mean-token-mean"],
        ["model.lora_rank=8", "actor.ppo_micro_batch_size_per_gpu=8"],
        ["model.enable_gradient_checkpointing=false", "actor.loss_agg_mode=token-mean"],
    ],
    ids=["full", "lora", "no_checkpointing"],
)
def test_packed_equals_padded(model_dir, extra):
    padded, packed = _pair(model_dir, *extra)
    batch = _batch(padded)
    assert_log_probs_match(packed, batch)
    m_pad, m_pack = padded.update(batch, seed=0), packed.update(batch, seed=0)
    for k in ("actor/grad_norm", "actor/pg_loss", "actor/entropy", "actor/kl_loss"):
        assert m_pack[k] == pytest.approx(m_pad[k], rel=METRIC_REL), k
    p_pad, p_pack = _params(padded), _params(packed)
    diff = max((p_pad[k] - p_pack[k]).abs().max().item() for k in p_pad)
    print(f"|packed - padded|: max {diff:.2e} after one step")
    assert diff <= W_ATOL


def test_packed_token_budget_counts_real_tokens(model_dir):
    """With packing a micro-batch within ppo_max_token_len_per_gpu holds that many real tokens
    (padding is not counted): 3 micro-batches where the padded count needs 4; the update is the same."""
    budget = ["actor.use_dynamic_bsz=true", "actor.ppo_max_token_len_per_gpu=36"]
    padded, packed = _pair(model_dir, *budget, "data.max_prompt_length=8", "rollout.max_response_length=6")
    batch = _batch(padded)
    shapes = [(len(p), len(r)) for p, r in zip(batch.prompts, batch.responses)]
    groups = packed._micro_batches(batch.prompts, batch.responses)
    assert all(batching.tokens([shapes[i] for i in g], packed=True) <= 36 for g in groups)
    assert (len(groups), len(padded._micro_batches(batch.prompts, batch.responses))) == (3, 4)
    m_pad, m_pack = padded.update(batch, seed=0), packed.update(batch, seed=0)
    assert m_pack["actor/grad_norm"] == pytest.approx(m_pad["actor/grad_norm"], rel=METRIC_REL)


def test_packed_tokens_by_hand():
    assert batching.tokens([(10, 1), (1, 10)], packed=True) == 22  # padded: 40
    # runs of the samples sorted longest first within 22 real tokens: (10,1)+(1,10) | (5,5); balanced,
    # the smallest cap giving 2 runs (21) regroups them as (10,1) | (1,10)+(5,5)
    assert batching.count([(10, 1), (1, 10), (5, 5)], 22, packed=True) == 2
    assert batching.micro_batches([(10, 1), (1, 10), (5, 5)], 22, 2, packed=True) == [[0], [1, 2]]


def test_a_mask_across_samples_is_caught(model_dir, monkeypatch):
    """The packing mistake: plain causal attention over the whole row (each sample sees the ones
    packed before it) moves the later samples' log-probs by far more than LOGP_ATOL."""
    from engines.trainer import varlen

    padded, packed = _pair(model_dir, "actor.ppo_micro_batch_size_per_gpu=8")
    batch = _batch(padded)
    monkeypatch.setattr(
        varlen, "block_causal_mask", lambda cu, t: torch.ones(t, t, dtype=torch.bool).tril()[None, None]
    )
    got = packed.compute_log_prob(batch.prompts, batch.responses)
    assert max(np.abs(a - b).max() for a, b in zip(got, batch.old_log_probs)) > 1e-3


def test_empty_responses_in_both_layouts(model_dir):
    """A micro-batch whose responses are all empty (R = 0), alone or beside others: empty rows."""
    padded, packed = _pair(model_dir, "actor.ppo_micro_batch_size_per_gpu=2")
    prompts, responses = [[5, 6, 7], [8, 9], [10, 11], [12]], [[], [], [13, 14], []]
    for t in (padded, packed):
        got = t.compute_log_prob(prompts, responses)
        assert [len(x) for x in got] == [0, 0, 2, 0]
    a, b = padded.compute_log_prob(prompts, responses), packed.compute_log_prob(prompts, responses)
    assert np.abs(a[2] - b[2]).max() <= LOGP_ATOL
