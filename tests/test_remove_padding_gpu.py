"""model.use_remove_padding on CUDA (skipped without a GPU): the packed row through PyTorch's
FlashAttention varlen kernel gives the padded layout's log-probs and gradients within bf16 rounding.

Reference: the padded layout in float32 (model.dtype=float32, SDPA). Both bf16 layouts run the
same bf16-input, fp32-accumulate matmuls on the same tokens and differ only in the attention
kernel (FlashAttention varlen on the packed row, SDPA with a padding mask on the padded one), so
their distance to the float32 reference is the same bf16 rounding: the bound is packed's error
<= 2x padded's (max |log-prob| error; relative L2 error of the gradient) plus one bf16 unit
roundoff (2^-8) of the padded error's own scale. The mistake the test is for, attention leaking
across the samples of the row, is shown to break that bound.
"""

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _trainer(model_dir, *overrides):
    from configs.load import load_config, with_overrides
    from engines.trainer.fsdp import FSDPTrainer

    cfg = load_config(
        "tiny-cpu",
        with_overrides(
            [
                "trainer.device=cuda",
                "rollout.n=2",
                "actor.ppo_mini_batch_size=4",
                "actor.ppo_micro_batch_size_per_gpu=8",
                "actor.use_kl_loss=false",
                "model.dtype=bfloat16",
            ],
            overrides,
        ),
    )
    torch.manual_seed(0)
    t = FSDPTrainer(cfg, model_dir, "cuda")
    g = torch.Generator(device="cuda").manual_seed(1)
    with torch.no_grad():  # sharper than the init's near-uniform attention, so a leak shows
        for p in t.model.parameters():
            p.normal_(0, 0.1, generator=g)
    return t


def _batch(n=8):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(5, 200, size=rng.integers(20, 90)).tolist() for _ in range(n)]
    responses = [rng.integers(5, 200, size=rng.integers(5, 120)).tolist() for _ in range(n)]
    return prompts, responses


def _logp_and_grad(t, prompts, responses):
    t.model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        logp, _, mask, _ = t._forward(t.model, prompts, responses, with_entropy=False)
        ((logp * mask).sum() / mask.sum()).backward()
    grad = torch.cat([p.grad.float().flatten() for p in t.model.parameters() if p.grad is not None])
    return (logp * mask).detach().float().cpu(), grad.cpu()


def test_packed_matches_padded_within_bf16(model_dir, monkeypatch):
    prompts, responses = _batch()
    ref_lp, ref_g = _logp_and_grad(_trainer(model_dir, "model.dtype=float32"), prompts, responses)
    pad_lp, pad_g = _logp_and_grad(_trainer(model_dir), prompts, responses)
    packed = _trainer(model_dir, "model.use_remove_padding=true")
    pk_lp, pk_g = _logp_and_grad(packed, prompts, responses)

    def errs(lp, g):
        return (lp - ref_lp).abs().max().item(), ((g - ref_g).norm() / ref_g.norm()).item()

    (pad_e, pad_ge), (pk_e, pk_ge) = errs(pad_lp, pad_g), errs(pk_lp, pk_g)
    print(
        f"log-prob max err: padded {pad_e:.2e} packed {pk_e:.2e}; grad rel err: padded {pad_ge:.2e} packed {pk_ge:.2e}"
    )
    assert pad_e > 0 and pk_e <= 2 * pad_e * (1 + 2**-8)
    assert pk_ge <= 2 * pad_ge * (1 + 2**-8)
    # old_log_prob through compute_log_prob: the same values, in order
    got = packed.compute_log_prob(prompts, responses)
    assert max(np.abs(a - pk_lp[i, : len(a)].numpy()).max() for i, a in enumerate(got)) <= 2 * pad_e

    # The mistake: one causal segment for the whole row (every sample sees those before it).
    from engines.trainer import varlen

    real = varlen.attend
    monkeypatch.setattr(varlen, "attend", lambda q, k, v, cu, m, s=None: real(q, k, v, cu[[0, -1]], q.shape[2], s))
    leak_lp, _ = _logp_and_grad(packed, prompts, responses)
    leak_e = (leak_lp - ref_lp).abs().max().item()
    print(f"log-prob max err with attention across samples: {leak_e:.2e}")
    assert leak_e > 2 * pad_e * (1 + 2**-8)
