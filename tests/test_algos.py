"""Unit tests for engines/algos.py.

Every expected number is worked out by hand in the comments next to it, never by
calling the formula under test a second time.
"""

import math

import pytest
import torch

from engines.algos import (
    KL_ESTIMATORS,
    LOSS_AGG_MODES,
    agg_loss,
    grpo_advantages,
    kl_penalty,
    masked_mean,
    num_valid_seqs,
    policy_loss,
    token_logprobs,
)

LN2 = 0.6931471805599453
LN3 = 1.0986122886681098


# Expected values are worked by hand and written to 6 decimals (+-5e-7); the code computes them in
# float32 through a handful of ops on values <= ~10 (<= ~10 * 2^-24 * 10 = 6e-6 worst case): 1e-5.
def close(actual, expected, tol=1e-5):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        atol=tol,
        rtol=0,
    )


# ----------------------------------------------------------------- grpo_advantages
def test_grpo_group_of_three():
    # scores [1, 0, 0]: mean 1/3; deviations 2/3, -1/3, -1/3;
    # unbiased var = (4/9 + 1/9 + 1/9) / (3 - 1) = 1/3; std = 0.577350
    # adv = (2/3) / 0.577350 = 1.154701, (-1/3) / 0.577350 = -0.577350 (eps negligible)
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 0.0]), [0, 0, 0])
    close(adv, [1.154701, -0.577350, -0.577350])


@pytest.mark.parametrize("as_tensor", [False, True])
def test_grpo_two_interleaved_groups(as_tensor):
    ids = [7, 3, 7, 3, 3]
    if as_tensor:
        ids = torch.tensor(ids)
    scores = torch.tensor([1.0, 0.0, 3.0, 1.0, 2.0])
    # group 7 = [1, 3]: mean 2, var = (1 + 1) / 1 = 2, std 1.414214 -> -/+ 1/1.414214 = -/+0.707107
    # group 3 = [0, 1, 2]: mean 1, var = (1 + 0 + 1) / 2 = 1, std 1 -> -1/(1+1e-6), 0, 1/(1+1e-6)
    adv = grpo_advantages(scores, ids)
    close(adv, [-0.707107, -0.999999, 0.707107, 0.0, 0.999999])


def test_grpo_string_uids():
    # same as group 7 above, keyed by uid strings as a trainer would
    adv = grpo_advantages(torch.tensor([1.0, 3.0]), ["uid-a", "uid-a"])
    close(adv, [-0.707107, 0.707107])


def test_grpo_group_of_one():
    # single sample: mean 0, std 1 -> 0.7 / (1 + 1e-6) = 0.6999993000007
    adv = grpo_advantages(torch.tensor([0.7]), [42])
    close(adv, [0.6999993000007], tol=1e-7)
    # without std normalisation: 0.7 - 0 = 0.7
    close(grpo_advantages(torch.tensor([0.7]), [42], norm_by_std=False), [0.7], tol=1e-7)


def test_grpo_all_equal_group_is_zero():
    # mean 0.5, every deviation 0, std 0 -> 0 / (0 + 1e-6) = 0 exactly, no NaN
    adv = grpo_advantages(torch.tensor([0.5, 0.5, 0.5, 0.5]), [1, 1, 1, 1])
    assert torch.isfinite(adv).all()
    close(adv, [0.0, 0.0, 0.0, 0.0], tol=0)


def test_grpo_no_std_norm():
    # Dr. GRPO: group 7 = [1, 3] mean 2 -> -1, +1; group 3 = [0, 1, 2] mean 1 -> -1, 0, +1
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 3.0, 1.0, 2.0]), [7, 3, 7, 3, 3], norm_by_std=False)
    close(adv, [-1.0, -1.0, 1.0, 0.0, 1.0], tol=1e-7)


def test_grpo_keeps_dtype_and_checks_length():
    adv = grpo_advantages(torch.tensor([1.0, 0.0], dtype=torch.float32), [0, 0])
    assert adv.dtype == torch.float32 and adv.shape == (2,)
    with pytest.raises(ValueError):
        grpo_advantages(torch.tensor([1.0, 0.0]), [0])


# ------------------------------------------------------------------------ kl_penalty
def test_kl_estimators_pair_one():
    logp = torch.tensor([math.log(0.5)])  # -0.693147
    ref = torch.tensor([math.log(0.25)])  # -1.386294
    # logp - ref = 0.693147
    close(kl_penalty(logp, ref, "k1"), [0.693147])
    close(kl_penalty(logp, ref, "abs"), [0.693147])
    # 0.5 * 0.693147^2 = 0.5 * 0.480453 = 0.240227
    close(kl_penalty(logp, ref, "k2"), [0.240227])
    # d = ref - logp = -0.693147; exp(d) = 0.5; 0.5 - (-0.693147) - 1 = 0.193147
    close(kl_penalty(logp, ref, "k3"), [0.193147])


def test_kl_estimators_pair_two():
    logp = torch.tensor([math.log(0.25)])
    ref = torch.tensor([math.log(0.5)])
    # logp - ref = -0.693147 (k1 may be negative)
    close(kl_penalty(logp, ref, "k1"), [-0.693147])
    close(kl_penalty(logp, ref, "abs"), [0.693147])
    close(kl_penalty(logp, ref, "k2"), [0.240227])
    # d = +0.693147; exp(d) = 2; 2 - 0.693147 - 1 = 0.306853
    close(kl_penalty(logp, ref, "k3"), [0.306853])


def test_kl_equal_policies_are_zero():
    x = torch.tensor([-0.3, -2.0])
    for kind in KL_ESTIMATORS:
        close(kl_penalty(x, x.clone(), kind), [0.0, 0.0], tol=1e-7)


def test_kl_aliases():
    logp = torch.tensor([math.log(0.5), math.log(0.25)])
    ref = torch.tensor([math.log(0.25), math.log(0.5)])
    close(kl_penalty(logp, ref, "kl"), [0.693147, -0.693147])
    close(kl_penalty(logp, ref, "mse"), [0.240227, 0.240227])
    close(kl_penalty(logp, ref, "low_var_kl"), [0.193147, 0.306853])
    assert set(KL_ESTIMATORS) == {"k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl"}


def test_k3_clamp():
    # d = ref - logp = 0 - (-30) = 30 -> clamped to 20; exp(20) - 20 - 1 ~ 4.85e8 -> clamped to 10
    # d = -30 - 0 = -30 -> clamped to -20; exp(-20) + 20 - 1 ~ 19.0 -> clamped to 10
    # d = -1e4: without the d clamp exp would underflow but the sum still be huge -> 10
    logp = torch.tensor([-30.0, 0.0, 0.0], requires_grad=True)
    ref = torch.tensor([0.0, -30.0, -1e4])
    out = kl_penalty(logp, ref, "k3")
    close(out, [10.0, 10.0, 10.0], tol=0)
    out.sum().backward()
    assert torch.isfinite(logp.grad).all()


def test_kl_unknown_kind():
    with pytest.raises(ValueError, match="low_var_kl"):
        kl_penalty(torch.zeros(1), torch.zeros(1), "full")


# -------------------------------------------------------------------------- agg_loss
L2x3 = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M2x3 = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def test_agg_token_mean():
    # (1 + 2 + 4) / 3 tokens = 2.333333
    close(agg_loss(L2x3, M2x3, "token-mean"), 2.333333)


def test_agg_seq_mean_token_sum():
    # row sums 3 and 4 -> (3 + 4) / 2 = 3.5
    close(agg_loss(L2x3, M2x3, "seq-mean-token-sum"), 3.5)


def test_agg_seq_mean_token_mean():
    # row means 3/2 = 1.5 and 4/1 = 4 -> (1.5 + 4) / 2 = 2.75
    close(agg_loss(L2x3, M2x3, "seq-mean-token-mean"), 2.75)


def test_agg_seq_mean_token_sum_norm():
    # norm_len defaults to width 3: (3/3 + 4/3) / 2 seqs = 7/6 = 1.166667
    close(agg_loss(L2x3, M2x3, "seq-mean-token-sum-norm"), 1.166667)
    # norm_len 10: (3/10 + 4/10) / 2 = 0.35
    close(agg_loss(L2x3, M2x3, "seq-mean-token-sum-norm", norm_len=10), 0.35)


def test_agg_ignores_garbage_in_padding():
    # inf / NaN under mask 0 must not leak: same 2.333333 as above
    loss = L2x3.clone()
    loss[0, 2] = float("inf")
    loss[1, 1] = float("nan")
    close(agg_loss(loss, M2x3, "token-mean"), 2.333333)


def test_agg_zero_length_sequence():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    # the empty third row counts neither as tokens nor as a sequence:
    # token-mean 7/3 = 2.333333; seq-sum (3 + 4) / 2 = 3.5; seq-token-mean (1.5 + 4) / 2 = 2.75;
    # sum-norm 7 / (3 * 2) = 1.166667
    expected = {
        "token-mean": 2.333333,
        "seq-mean-token-sum": 3.5,
        "seq-mean-token-mean": 2.75,
        "seq-mean-token-sum-norm": 1.166667,
    }
    for mode, value in expected.items():
        out = agg_loss(loss, mask, mode)
        assert torch.isfinite(out)
        close(out, value)
        (grad,) = torch.autograd.grad(out, loss)
        assert torch.isfinite(grad).all()
        close(grad[2], [0.0, 0.0, 0.0], tol=0)


def test_agg_all_padding_is_zero_not_nan():
    for mode in LOSS_AGG_MODES:
        out = agg_loss(torch.ones(2, 3), torch.zeros(2, 3), mode)
        close(out, 0.0, tol=0)


# 4 sequences, one of them empty: 6 tokens, 3 real sequences
LB = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [-1.0, 0.0, 2.0], [3.0, 3.0, 3.0]])
MB = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
# token-mean: (1+2 + 4 + (-1+0+2)) / 6 = 8/6 = 1.333333
# seq-sum:    (3 + 4 + 1) / 3 = 2.666667
# seq-mean:   (1.5 + 4 + 1/3) / 3 = 5.833333 / 3 = 1.944444
# sum-norm:   8 / (3 * 3) = 0.888889
FULL = {
    "token-mean": 1.333333,
    "seq-mean-token-sum": 2.666667,
    "seq-mean-token-mean": 1.944444,
    "seq-mean-token-sum-norm": 0.888889,
}


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_agg_full_batch_values(mode):
    close(agg_loss(LB, MB, mode), FULL[mode])


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("split", [2, 3])
def test_agg_micro_batches_sum_to_full_batch(mode, split):
    g_tok = MB.sum()  # 6
    g_seq = num_valid_seqs(MB)  # 3
    close(g_tok, 6.0, tol=0)
    close(g_seq, 3.0, tol=0)
    parts = [(LB[:split], MB[:split]), (LB[split:], MB[split:])]
    total = sum(agg_loss(loss, m, mode, global_tokens=g_tok, global_seqs=g_seq, norm_len=3) for loss, m in parts)
    close(total, FULL[mode])


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_agg_micro_batches_padded_differently(mode):
    # rows 0-1 only use 2 columns, so that micro-batch is trimmed to width 2;
    # norm_len=3 keeps the Dr. GRPO constant the same for both
    parts = [(LB[:2, :2], MB[:2, :2]), (LB[2:], MB[2:])]
    total = sum(agg_loss(loss, m, mode, global_tokens=6.0, global_seqs=3.0, norm_len=3) for loss, m in parts)
    close(total, FULL[mode])


def test_agg_unknown_mode():
    with pytest.raises(ValueError, match="seq-mean-token-sum-norm"):
        agg_loss(L2x3, M2x3, "token-sum")


def test_masked_mean():
    # (1 + 2 + 4) / 3 = 2.333333; with denom 7: 7 / 7 = 1
    close(masked_mean(L2x3, M2x3), 2.333333)
    close(masked_mean(L2x3, M2x3, denom=7.0), 1.0)
    close(masked_mean(L2x3, torch.zeros(2, 3)), 0.0, tol=0)


# ----------------------------------------------------------------------- policy_loss
def _ppo_case():
    # token: ratio, A
    # t0: 1.1, +1  inside the clip range     -> loss -1.1
    # t1: 1.5, +2  above 1.2, A>0: clipped   -> loss -2 * 1.2 = -2.4
    # t2: 0.5, -1  below 0.8, A<0: clipped   -> max(0.5, 0.8) = 0.8; min(3, 0.8) = 0.8
    # t3: 10,  -0.5 huge ratio, A<0          -> max(5, 0.6) = 5; dual clip min(3*0.5, 5) = 1.5
    # t4: 100, -5   masked out
    ratios = [1.1, 1.5, 0.5, 10.0, 100.0]
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -4.0]])
    logp = (old + torch.log(torch.tensor([ratios]))).requires_grad_(True)
    adv = torch.tensor([[1.0, 2.0, -1.0, -0.5, -5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    return logp, old, adv, mask


def test_policy_loss_clip_and_dual_clip():
    logp, old, adv, mask = _ppo_case()
    out = policy_loss(logp, old, adv, mask)
    # token-mean: (-1.1 - 2.4 + 0.8 + 1.5) / 4 = -1.2 / 4 = -0.3
    close(out["pg_loss"], -0.3)
    # clipped where -A*clip(r) > -A*r: t1 (-2.4 > -3) and t2 (0.8 > 0.5) -> 2/4
    close(out["pg_clipfrac"], 0.5)
    # dual clip only on t3 -> 1/4
    close(out["pg_clipfrac_lower"], 0.25)
    # ppo_kl = mean(old - logp) = -(ln1.1 + ln1.5 + ln0.5 + ln10) / 4 = -ln(8.25) / 4
    #        = -2.110213 / 4 = -0.527553
    close(out["ppo_kl"], -0.527553)
    for key in ("pg_clipfrac", "ppo_kl", "pg_clipfrac_lower"):
        assert not out[key].requires_grad and out[key].dim() == 0
    # gradient: only the unclipped t0 moves; d(-A*r/4)/dlogp = -1 * 1.1 / 4 = -0.275
    out["pg_loss"].backward()
    close(logp.grad, [[-0.275, 0.0, 0.0, 0.0, 0.0]])


def test_policy_loss_clip_higher():
    logp, old, adv, mask = _ppo_case()
    # clip_ratio_high 0.28: t1 -> -2 * 1.28 = -2.56; (-1.1 - 2.56 + 0.8 + 1.5) / 4 = -1.36 / 4 = -0.34
    out = policy_loss(logp, old, adv, mask, clip_ratio_high=0.28)
    close(out["pg_loss"], -0.34)
    # clip_ratio_c 20: t3 -> min(0.5*20 = 10, 5) = 5; (-1.1 - 2.4 + 0.8 + 5) / 4 = 2.3 / 4 = 0.575
    out = policy_loss(logp, old, adv, mask, clip_ratio_c=20.0)
    close(out["pg_loss"], 0.575)
    close(out["pg_clipfrac_lower"], 0.0, tol=0)


def test_policy_loss_sequence_advantages_broadcast():
    # row 0: ratios 1, 1.5 with A=+1 -> -1, -1.2 (clipped); row 1: ratios 1, 0.5 with A=-1 -> 1, 0.8 (clipped)
    # token-mean (-1 - 1.2 + 1 + 0.8) / 4 = -0.1; clipfrac 2/4 = 0.5
    old = torch.zeros(2, 2)
    logp = torch.log(torch.tensor([[1.0, 1.5], [1.0, 0.5]]))
    out = policy_loss(logp, old, torch.tensor([1.0, -1.0]), torch.ones(2, 2))
    close(out["pg_loss"], -0.1)
    close(out["pg_clipfrac"], 0.5)
    # seq-mean-token-sum: row sums -2.2 and 1.8 -> (-2.2 + 1.8) / 2 = -0.2
    out = policy_loss(logp, old, torch.tensor([1.0, -1.0]), torch.ones(2, 2), loss_agg_mode="seq-mean-token-sum")
    close(out["pg_loss"], -0.2)


def test_policy_loss_micro_batches():
    # the _ppo_case row (sum -1.2, 2 clipped) plus a copy with only its first 2 tokens real
    # (-1.1 - 2.4 = -3.5, 1 clipped): 6 tokens -> pg_loss (-1.2 - 3.5) / 6 = -0.783333,
    # clipfrac (2 + 1) / 6 = 0.5; each row is its own micro-batch
    logp, old, adv, _ = _ppo_case()
    logp = logp.detach()
    logp2 = torch.cat([logp, logp])
    old2, adv2 = torch.cat([old, old]), torch.cat([adv, adv])
    mask2 = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0, 0.0]])
    shares = [
        policy_loss(logp2[i : i + 1], old2[i : i + 1], adv2[i : i + 1], mask2[i : i + 1], global_tokens=6.0)
        for i in range(2)
    ]
    close(sum(s["pg_loss"] for s in shares), -0.783333)
    close(sum(s["pg_clipfrac"] for s in shares), 0.5)


def test_policy_loss_bad_args():
    logp, old, adv, mask = _ppo_case()
    with pytest.raises(ValueError, match="token-mean"):
        policy_loss(logp, old, adv, mask, loss_agg_mode="sum")
    with pytest.raises(ValueError):
        policy_loss(logp, old, adv, mask, clip_ratio_c=1.0)


# -------------------------------------------------------------- logprobs and entropy
def test_logprobs_three_token_vocab():
    # logits [0, ln2, ln3] -> exp = [1, 2, 3], sum 6 -> probs [1/6, 2/6, 3/6]
    # log-probs: -ln6 = -1.791759, -ln3 = -1.098612, -ln2 = -0.693147
    logits = torch.tensor([[[0.0, LN2, LN3]] * 3], requires_grad=True)  # [1, 3, 3]
    labels = torch.tensor([[0, 1, 2]])
    lp, _ = token_logprobs(logits, labels)
    assert lp.shape == (1, 3) and lp.dtype == torch.float32
    close(lp, [[-1.791759, -1.098612, -0.693147]])
    # d logp[label] / d logits = onehot - probs; for the label-2 token: [-1/6, -1/3, 1/2]
    lp[0, 2].backward()
    close(logits.grad[0, 2], [-0.166667, -0.333333, 0.5])


def test_entropy_three_token_vocab():
    # H = -(1/6 ln 1/6 + 1/3 ln 1/3 + 1/2 ln 1/2)
    #   = 1.791759/6 + 1.098612/3 + 0.693147/2 = 0.298627 + 0.366204 + 0.346574 = 1.011404
    # uniform over 3 -> ln 3 = 1.098612; adding a constant to the logits changes nothing
    logits = torch.tensor([[[0.0, LN2, LN3], [5.0, 5.0, 5.0], [100.0, 100.0 + LN2, 100.0 + LN3]]])
    _, ent = token_logprobs(logits, torch.zeros(1, 3, dtype=torch.long), with_entropy=True)
    assert ent.shape == (1, 3) and ent.dtype == torch.float32
    close(ent, [[1.011404, 1.098612, 1.011404]])


def test_logprobs_entropy_bf16_rows():
    # logits [0, 1, 2] are exact in bf16: sum exp = 1 + 2.718282 + 7.389056 = 11.107338,
    # lse = ln 11.107338 = 2.407606 -> logp(label 2) = 2 - 2.407606 = -0.407606,
    # logp(label 0) = -2.407606
    # probs = [0.090031, 0.244728, 0.665241]; sum p*l = 0.244728 + 2*0.665241 = 1.575210
    # entropy = 2.407606 - 1.575210 = 0.832396
    logits = torch.tensor([[[0.0, 1.0, 2.0]], [[0.0, 1.0, 2.0]]], dtype=torch.bfloat16)  # [2, 1, 3]
    lp, ent = token_logprobs(logits, torch.tensor([[2], [0]]), with_entropy=True)
    assert lp.dtype == torch.float32 and lp.shape == (2, 1)
    close(lp, [[-0.407606], [-2.407606]])
    assert ent.dtype == torch.float32 and ent.shape == (2, 1)
    close(ent, [[0.832396], [0.832396]])


def test_token_logprobs_temperature_and_checkpointed_grad_match_the_plain_formula():
    # logits / T with T = 2: [0, 2 ln2, 2 ln3] / 2 = [0, ln2, ln3] -> probs [1/6, 1/3, 1/2]
    logits = torch.tensor([[[0.0, 2 * LN2, 2 * LN3]] * 2, [[1.0, 1.0, 1.0]] * 2], requires_grad=True)
    labels = torch.tensor([[2, 0], [1, 1]])
    lp, ent = token_logprobs(logits, labels, temperature=2.0, with_entropy=True)
    close(lp, [[-0.693147, -1.791759], [-1.098612, -1.098612]])
    close(ent, [[1.011404, 1.011404], [1.098612, 1.098612]])
    (lp.sum() + ent.sum()).backward()  # the checkpointed rows recompute in backward
    ref = logits.detach().clone().requires_grad_(True)
    x = ref / 2.0
    plain_lp = torch.log_softmax(x, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    plain_ent = -(torch.softmax(x, -1) * torch.log_softmax(x, -1)).sum(-1)
    (plain_lp.sum() + plain_ent.sum()).backward()
    # Same float32 maths in another order on 3-term rows, gradients <= 1: a few ulps (2^-24 = 6e-8).
    assert torch.allclose(logits.grad, ref.grad, atol=1e-6)


# ---- LR warmup (issue 13 (6)) --------------------------------------------------------------
def test_warmup_of_an_epoch_based_run_counts_the_epochs():
    """qwen2-0.5b-lora-1xh100 with actor.lr_warmup_steps_ratio=0.1: an epoch-based recipe (no
    trainer.total_training_steps). GSM8K train has 7473 rows; 7473 // 116 = 64 steps in its one
    epoch, 116 / 116 = 1 update per step, so W = int(0.1 * 64) = 6: update 0 runs at 1/6 of lr."""
    from configs.load import load_config
    from engines.algos import warmup_lambda
    from tasks.stages import total_steps, with_total_steps

    cfg = load_config("qwen2-0.5b-lora-1xh100", ["actor.lr_warmup_steps_ratio=0.1"])
    assert cfg.trainer.total_training_steps is None and total_steps(cfg, 7473) == 64
    wcfg = with_total_steps(cfg, total_steps(cfg, 7473))  # what the flow gives the workers
    a, t = wcfg.actor, wcfg.trainer
    f = warmup_lambda(a.lr_warmup_steps, a.lr_warmup_steps_ratio, t.total_training_steps, 1)
    assert [f(i) for i in (0, 1, 4, 5, 63)] == [1 / 6, 2 / 6, 5 / 6, 1.0, 1.0]
    with pytest.raises(ValueError, match="trainer.total_training_steps"):
        warmup_lambda(-1, 0.1, None, 1)  # never silently 1.0


def test_warmup_steps_and_updates_per_step():
    from engines.algos import warmup_lambda

    assert warmup_lambda(4, 0.5, None, 3)(0) == 1 / 4  # an explicit length wins over the ratio
    # 10 steps x 4 updates = 40 updates; int(0.25 * 40) = 10
    assert warmup_lambda(-1, 0.25, 10, 4)(0) == 1 / 10
    assert warmup_lambda(-1, 0.0, None, 4)(0) == 1.0  # no warmup needs no length
