"""model.use_liger / model.use_fused_kernels on CUDA (GRPO_TEST_DEVICE=cuda, liger-kernel installed):
per-token log-probs and the gradients of a GRPO-style loss match the plain bf16 path within bf16
rounding, padded and packed (model.use_remove_padding), on a tiny random Qwen2 at temperature 0.7.

Tolerance, from the arithmetic. Reference: the plain path in float32 (model.dtype=float32). The
plain bf16 path's distance to it, e, is the bf16 rounding of the run (unit 2^-8, relative): its
logits are one bf16 rounding of a bf16-input, fp32-accumulate matmul. The variants add terms of
that same size and no more:
- use_fused_kernels: liger's chunked logits are again one bf16 rounding of the same matmul (its
  cross entropy then works in fp32, as ours), plus one bf16 rounding of h / T (temperature applied
  to the hidden states, engines/trainer/liger.py): 2 roundings where plain has 1, each within e's
  size, so <= (1 + 2) e;
- use_liger: RMSNorm in fp32 as transformers', SwiGLU's silu(gate) x up and the rotary output in
  bf16 where transformers also rounds to bf16 (autocast) before the next matmul: the same number of
  roundings in another order, <= 2 e;
- both: <= (2 + 2) e.
Each bound is taken with one more relative bf16 unit, x (1 + 2^-8), for the rounding of e itself;
for the log-probs on the max |error| over tokens, for the gradient on the relative L2 error over
all parameters. The GRPO-style loss weighs each token by its sample's advantage (per-token
upstream gradients of both signs: what liger's reduction="none" backward must honour).
"""

import numpy as np
import pytest
import torch

from tests import test_remove_padding_gpu as remove_padding_gpu
from tests.conftest import DEVICE

pytestmark = pytest.mark.skipif(DEVICE != "cuda", reason="liger-kernel's Triton kernels: GRPO_TEST_DEVICE=cuda")

ROUNDINGS = {  # bf16 roundings of the logits relative to the plain path's one (module docstring)
    ("model.use_fused_kernels=true",): 3,
    ("model.use_liger=true",): 2,
    ("model.use_liger=true", "model.use_fused_kernels=true"): 4,
}


def _trainer(model_dir, *overrides):
    """test_remove_padding_gpu's tiny bf16 CUDA trainer with its sharper-than-init weights, at
    temperature 0.7 (the fused path scales the hidden states by it)."""
    return remove_padding_gpu._trainer(model_dir, "rollout.temperature=0.7", *overrides)


def _batch(n=8):
    """test_remove_padding_gpu's prompts and responses, and one advantage of either sign per sample."""
    prompts, responses = remove_padding_gpu._batch(n)
    adv = torch.tensor(np.random.default_rng(1).standard_normal(n), dtype=torch.float32, device="cuda")
    return prompts, responses, adv


def _logp_and_grad(t, prompts, responses, adv):
    t.model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        logp, _, mask, _ = t._forward(t.model, prompts, responses, with_entropy=False)
        (-(adv[:, None] * logp * mask).sum() / mask.sum()).backward()  # GRPO's pg term at ratio 1
    grad = torch.cat([p.grad.float().flatten() for p in t.model.parameters() if p.grad is not None])
    return (logp * mask).detach().float().cpu(), grad.cpu()


@pytest.mark.parametrize("layout", [[], ["model.use_remove_padding=true"]], ids=["padded", "packed"])
def test_liger_matches_plain_within_bf16(model_dir, layout):
    pytest.importorskip("liger_kernel")
    prompts, responses, adv = _batch()
    ref_lp, ref_g = _logp_and_grad(_trainer(model_dir, "model.dtype=float32", *layout), prompts, responses, adv)
    lp, g = _logp_and_grad(_trainer(model_dir, *layout), prompts, responses, adv)
    e, ge = (lp - ref_lp).abs().max().item(), ((g - ref_g).norm() / ref_g.norm()).item()
    assert e > 0 and ge > 0
    for flags, k in ROUNDINGS.items():
        t = _trainer(model_dir, *layout, *flags)
        v_lp, v_g = _logp_and_grad(t, prompts, responses, adv)
        v_e, v_ge = (v_lp - ref_lp).abs().max().item(), ((v_g - ref_g).norm() / ref_g.norm()).item()
        print(f"{layout} {flags}: log-prob max err {v_e:.2e} (plain {e:.2e}); grad rel err {v_ge:.2e} (plain {ge:.2e})")
        assert v_e <= k * e * (1 + 2**-8), flags
        assert v_ge <= k * ge * (1 + 2**-8), flags
        if "model.use_fused_kernels=true" in flags:  # old_log_prob through the no-grad fused pass
            got = t.compute_log_prob(prompts, responses)
            assert max(np.abs(a - v_lp[i, : len(a)].numpy()).max() for i, a in enumerate(got)) <= k * e
