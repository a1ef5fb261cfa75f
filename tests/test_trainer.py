"""The trainer engine on CPU without vLLM: micro-batching does not change the update, a
non-finite gradient skips the step, LoRA trains only the adapter, checkpoints round-trip."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

from configs.load import load_config, with_overrides
from engines import batching
from engines.trainer.fsdp import FSDPTrainer
from engines.types import UpdateBatch


def _trainer(model_dir, *overrides, master_dtype=torch.float32):
    cfg = load_config(
        "tiny-cpu",
        with_overrides(
            ["rollout.n=2", "actor.ppo_mini_batch_size=4", "actor.lr=1e-3", "trainer.device=cpu"], overrides
        ),
    )
    torch.manual_seed(0)
    return FSDPTrainer(cfg, model_dir, "cpu", master_dtype=master_dtype)


# Micro-batching (fixed sizes or a token budget) changes only the order of sums. The comparisons
# run in float64 (master_dtype), so they hold on any CPU kernel path and thread count:
# - weights after one AdamW step (lr 1e-3): float32 moved them by up to 6e-5 (measured; Adam's
#   g / (sqrt(v) + eps) magnifies the rounding of the ~20 gradients near eps = 1e-8); float64's
#   unit roundoff is 2^29 = 5.4e8 times smaller, so <= 1e-4 / 5.4e8 = 2e-13; W_ATOL = 1e-10
#   leaves 500x for the magnification not being linear (measured: see the printed max).
# - losses and the grad norm: sums of <= ~100 token terms up to ~100x their cancelling total:
#   <= 100 * 2^-53 * 100 = 1.1e-12 relative; METRIC_REL = 1e-10.
# - log-probs: a row's log-softmax over V = ~400 logits, itself a 64-term dot product each:
#   <= (400 + 64) * 2^-53 * |logit| (<= ~10) = 5e-13; LOGP_ATOL = 1e-10. (The returned arrays are
#   float32, rounded from equal float64 values: equal unless a value sits within ~1e-13 of a
#   float32 rounding boundary: about 1e-14 / 5e-7, one in 1e7.)
# A normalisation per micro-batch instead of per mini-batch is off by up to 4x (2 against 8
# samples): test_a_per_micro_batch_normalisation_is_caught shows these bounds catch it.
W_ATOL, METRIC_REL, LOGP_ATOL = 1e-10, 1e-10, 1e-10


def _batch(trainer, n=8):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(5, 200, size=rng.integers(4, 9)).tolist() for _ in range(n)]
    responses = [rng.integers(5, 200, size=rng.integers(2, 7)).tolist() for _ in range(n)]
    old = trainer.compute_log_prob(prompts, responses)
    ref = trainer.compute_log_prob(prompts, responses, ref=True)
    return UpdateBatch(
        prompts=prompts,
        responses=responses,
        old_log_probs=old,
        ref_log_probs=ref,
        advantages=rng.normal(size=n).astype(np.float32).tolist(),
    )


def assert_log_probs_match(trainer, batch) -> None:
    """trainer's policy and reference log-probs of batch equal the batch's, to LOGP_ATOL."""
    for ref in (False, True):
        got = trainer.compute_log_prob(batch.prompts, batch.responses, ref=ref)
        want = batch.ref_log_probs if ref else batch.old_log_probs
        for a, b in zip(got, want, strict=True):
            assert a.shape == b.shape and np.abs(a - b).max() <= LOGP_ATOL


def _params(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad}


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batch_size_does_not_change_the_update(model_dir, mode):
    (p8, m8), (p2, m2) = _micro_8_and_2(model_dir, mode)
    assert m8["actor/grad_norm"] == pytest.approx(m2["actor/grad_norm"], rel=METRIC_REL)
    assert m8["actor/pg_loss"] == pytest.approx(m2["actor/pg_loss"], rel=METRIC_REL)
    diff = max((p8[k] - p2[k]).abs().max().item() for k in p8)
    print(f"|micro 8 - micro 2|: max {diff:.2e} after one step")
    assert diff <= W_ATOL


def _micro_8_and_2(model_dir, mode):
    results = []
    for micro in (8, 2):
        t = _trainer(
            model_dir,
            f"actor.ppo_micro_batch_size_per_gpu={micro}",
            f"actor.loss_agg_mode={mode}",
            master_dtype=torch.float64,
        )
        metrics = t.update(_batch(t), seed=0)
        results.append((_params(t), metrics))
    return results


def test_a_per_micro_batch_normalisation_is_caught(model_dir, monkeypatch):
    """The mistake the bounds above are for: each micro-batch normalised by its own counts (the
    global counts not passed to the loss) moves the update far outside them."""
    import engines.algos as algos

    for name in ("policy_loss", "agg_loss"):
        real = getattr(algos, name)
        monkeypatch.setattr(
            algos, name, lambda *a, _real=real, global_tokens=None, global_seqs=None, **k: _real(*a, **k)
        )
    (p8, m8), (p2, m2) = _micro_8_and_2(model_dir, "token-mean")
    assert abs(m8["actor/grad_norm"] / m2["actor/grad_norm"] - 1) > 1e4 * METRIC_REL
    assert max((p8[k] - p2[k]).abs().max().item() for k in p8) > 1e4 * W_ATOL


def test_non_finite_grad_skips_the_step_and_counts_it(model_dir):
    t = _trainer(model_dir)
    batch = _batch(t)
    before = _params(t)
    batch.advantages[0] = float("nan")
    metrics = t.update(batch, seed=0)
    assert not np.isfinite(metrics["actor/grad_norm"]) and metrics["actor/skipped_steps"] == 1
    for k, v in _params(t).items():
        assert torch.equal(v, before[k]), f"{k} changed on a skipped step"


def test_lora_trains_only_the_adapter_and_ref_is_the_base(model_dir, tmp_path):
    t = _trainer(model_dir, "model.lora_rank=8", "model.lora_alpha=16")
    assert t.ref is None and all("lora_" in k for k in _params(t))
    base = {k: v.clone() for k, v in t.model.named_parameters() if not v.requires_grad}
    batch = _batch(t)
    t.update(batch, seed=0)
    t.update(dataclasses.replace(batch, old_log_probs=t.compute_log_prob(batch.prompts, batch.responses)), seed=1)
    for k, v in t.model.named_parameters():
        if not v.requires_grad:
            assert torch.equal(v, base[k])
    ref_now = t.compute_log_prob(batch.prompts, batch.responses, ref=True)
    for a, b in zip(ref_now, batch.ref_log_probs):  # adapter disabled = the untouched base
        np.testing.assert_allclose(a, b, atol=1e-6)
    pol = t.compute_log_prob(batch.prompts, batch.responses)
    assert max(np.abs(a - b).max() for a, b in zip(pol, ref_now)) > 1e-4  # the adapter did move


def test_checkpoint_round_trip_restores_weights_and_optimizer(model_dir, tmp_path):
    t = _trainer(model_dir)
    batch = _batch(t)
    t.update(batch, seed=0)
    t.save(str(tmp_path / "ck"))
    saved, opt = _params(t), copy.deepcopy(t.optimizer.state_dict())
    t2 = _trainer(model_dir)
    t2.load(str(tmp_path / "ck"))
    for k, v in _params(t2).items():
        assert torch.equal(v, saved[k])
    for a, b in zip(opt["state"].values(), t2.optimizer.state_dict()["state"].values(), strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
        assert float(a["step"]) == float(b["step"]) == 1.0
    assert t2.scheduler.last_epoch == t.scheduler.last_epoch > 0
    assert (tmp_path / "ck" / "huggingface" / "config.json").exists()
    # The next update is the one the first trainer would make.
    t.update(batch, seed=1)
    t2.update(batch, seed=1)
    for k, v in _params(t2).items():
        assert torch.equal(v, _params(t)[k]), k


def test_lora_checkpoint_holds_the_adapter_and_refuses_a_full_model(model_dir, tmp_path):
    t = _trainer(model_dir, "model.lora_rank=8")
    t.update(_batch(t), seed=0)
    t.save(str(tmp_path / "ck"))
    assert (tmp_path / "ck" / "actor" / "lora_adapter" / "adapter_model.safetensors").exists()
    t2 = _trainer(model_dir, "model.lora_rank=8")
    t2.load(str(tmp_path / "ck"))
    for k, v in _params(t2).items():
        assert "lora_" in k and torch.equal(v, _params(t)[k]), k
    with pytest.raises(ValueError, match="does not match model .*lora_rank=0"):
        _trainer(model_dir).load(str(tmp_path / "ck"))  # the base weights are not in it
    # The HF export is the base with the checkpoint's adapter merged in.
    from safetensors.torch import load_file

    q = t.model.get_base_model().model.layers[0].self_attn.q_proj
    merged = (q.base_layer.weight + q.get_delta_weight("default")).detach()
    exported = load_file(tmp_path / "ck" / "huggingface" / "model.safetensors")[
        "model.layers.0.self_attn.q_proj.weight"
    ]
    assert not torch.equal(merged, q.base_layer.weight) and torch.allclose(exported, merged, atol=1e-6)


def test_checkpoint_of_an_earlier_build_is_named_with_the_way_out(model_dir, tmp_path):
    (tmp_path / "ck" / "actor").mkdir(parents=True)
    (tmp_path / "ck" / "actor" / "optim.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"earlier builds wrote optim.pt.*model.path=.*resume_mode=disable"):
        _trainer(model_dir).load(str(tmp_path / "ck"))


def test_token_budget_micro_batches_by_hand():
    # (prompt, response) tokens; a micro-batch costs rows x (longest prompt + longest response).
    # Sorted by length: A=1 (12) B=4 (12) C=5 (6) D=7 (6) E=2 (5) F=0 (4) G=6 (3) H=3 (2).
    shapes = [(2, 2), (10, 2), (3, 2), (1, 1), (9, 3), (4, 2), (2, 1), (3, 3)]
    assert batching.padded_tokens([(10, 1), (1, 10)]) == 40  # padding counted: not 22
    assert batching.count([(10, 1), (1, 10)], 30) == 2
    # Runs of the sorted samples within 24: A | B C | D E F G | H, so 4 and no fewer; balanced,
    # the smallest cap giving 4 runs (20) regroups them as A | B | C D | E F G H.
    assert batching.count(shapes, 24) == 4
    groups = batching.micro_batches(shapes, 24, 4)
    assert groups == [[1], [4], [5, 7], [0, 2, 3, 6]]
    assert [batching.padded_tokens([shapes[i] for i in g]) for g in groups] == [12, 12, 14, 20]
    # More micro-batches than this rank needs (another rank needs them): still exactly k groups,
    # each within budget, each sample once, original order inside a group.
    for k in range(4, len(shapes) + 1):
        groups = batching.micro_batches(shapes, 24, k)
        assert len(groups) == k and sorted(i for g in groups for i in g) == list(range(len(shapes)))
        assert all(g == sorted(g) and batching.padded_tokens([shapes[i] for i in g]) <= 24 for g in groups)
    assert batching.micro_batches(shapes, 24, 5) == [[1], [4], [5], [2, 7], [0, 3, 6]]
    assert batching.count([], 24) == 0 and batching.micro_batches([], 24, 0) == []


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_dynamic_bsz_does_not_change_log_probs_or_the_update(model_dir, mode):
    """A token budget of 24 cuts the 8 samples into 5 micro-batches of 1, 1, 2, 2, 2 by length, out
    of order; the log-probs come back in order and the update equals one micro-batch of 8."""
    lengths = ["data.max_prompt_length=8", "rollout.max_response_length=6", f"actor.loss_agg_mode={mode}"]
    plain = _trainer(model_dir, "actor.ppo_micro_batch_size_per_gpu=8", *lengths, master_dtype=torch.float64)
    batch = _batch(plain)
    dyn = _trainer(
        model_dir,
        "actor.use_dynamic_bsz=true",
        "actor.ppo_max_token_len_per_gpu=24",
        *lengths,
        master_dtype=torch.float64,
    )
    groups = dyn._micro_batches(batch.prompts, batch.responses)
    assert sorted(len(g) for g in groups) == [1, 1, 2, 2, 2] and sum(groups, []) != list(range(8))
    assert_log_probs_match(dyn, batch)
    m_plain, m_dyn = plain.update(batch, seed=0), dyn.update(batch, seed=0)
    assert m_dyn["actor/grad_norm"] == pytest.approx(m_plain["actor/grad_norm"], rel=METRIC_REL)
    assert m_dyn["actor/pg_loss"] == pytest.approx(m_plain["actor/pg_loss"], rel=METRIC_REL)
    # Adam's first moment is 0.1 x the gradient: equal to summation order, like the weights. A
    # wrong normalisation or a lost sample moves most weights by ~lr = 1e-3.
    for a, b in zip(plain.optimizer.state.values(), dyn.optimizer.state.values(), strict=True):
        assert (a["exp_avg"] - b["exp_avg"]).abs().max() <= W_ATOL
    p_plain, p_dyn = _params(plain), _params(dyn)
    diff = max((p_plain[k] - p_dyn[k]).abs().max().item() for k in p_plain)
    print(f"|dynamic - fixed micro-batches|: max {diff:.2e} after one step")
    assert diff <= W_ATOL
