"""model.use_liger / model.use_fused_kernels on CPU: the config's refusals, the trainer's fused
forward wiring, and the planner's fused logits term. liger-kernel's own kernels are Triton and run
only in tests/test_liger_gpu.py (CUDA); nothing here imports liger-kernel.

The wiring test routes the trainer's fused branches (padded and packed, engines/trainer/fsdp.py)
through `liger.enable_fused` with `logprobs=` the plain log-softmax of hidden @ weight.T / T in
float64, not liger's kernel: it checks which positions, labels and temperature reach the kernel
and that the values come back in the [B, R] layout, against the plain logits path.
"""

import numpy as np
import pytest
import torch

from configs.load import load_config
from engines.trainer import liger


def _err(overrides, recipe="tiny-cpu") -> str:
    with pytest.raises(Exception) as e:
        load_config(recipe, overrides)
    return str(e.value)


@pytest.mark.parametrize("key", ["use_liger", "use_fused_kernels"])
def test_either_key_on_cpu_is_one_error_line(key):
    msg = _err([f"model.{key}=true"])
    assert f"model.{key} needs trainer.device=cuda: liger-kernel's kernels are Triton" in msg
    assert msg.count("\n") <= 1


def test_fused_kernels_refuse_entropy_naming_both_keys_and_the_fix():
    msg = _err(["trainer.device=cuda", "model.use_fused_kernels=true", "actor.entropy_coeff=0.01"])
    line = next(x for x in msg.splitlines() if "use_fused_kernels" in x)
    assert "actor.entropy_coeff=0.01" in line and "set actor.entropy_coeff=0 or model.use_fused_kernels=false" in line


def test_fused_kernels_refuse_ulysses_and_megatron():
    assert "actor.ulysses_sequence_parallel_size=2" in _err(
        ["model.use_fused_kernels=true", "actor.ulysses_sequence_parallel_size=2"], "qwen2-14b-lora-2xh100"
    )
    assert "actor.strategy=megatron" in _err(["model.use_liger=true"], "qwen2-32b-megatron-8xh20")


def test_on_cuda_both_keys_validate():
    cfg = load_config("tiny-cpu", ["trainer.device=cuda", "model.use_liger=true", "model.use_fused_kernels=true"])
    assert cfg.model.use_liger and cfg.model.use_fused_kernels


def _plain_logprobs(hidden, weight, labels, temperature):
    logits = hidden.double() @ weight.double().T / temperature  # [N, V]
    return torch.log_softmax(logits, -1).gather(-1, labels[:, None])[:, 0].float()


def _trainer(model_dir, *overrides):
    from engines.trainer.fsdp import FSDPTrainer

    cfg = load_config(
        "tiny-cpu",
        [
            "rollout.n=2",
            "actor.ppo_mini_batch_size=4",
            "actor.use_kl_loss=false",
            "rollout.temperature=0.7",
            *overrides,
        ],
    )
    return FSDPTrainer(cfg, model_dir, "cpu")


@pytest.mark.parametrize("extra", [[], ["model.use_remove_padding=true"], ["model.lora_rank=4"]])
def test_fused_branches_feed_the_kernel_the_right_positions(model_dir, extra):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(5, 200, size=rng.integers(3, 12)).tolist() for _ in range(5)]
    responses = [rng.integers(5, 200, size=rng.integers(1, 9)).tolist() for _ in range(5)]
    t = _trainer(model_dir, *extra)
    want, _, mask, _ = t._forward(t.model, prompts, responses, with_entropy=False)
    hf = t.model.get_base_model() if t.is_lora else t.model
    liger.enable_fused(hf, logprobs=_plain_logprobs)  # the trainer's model, patched after peft here
    t.fused = True
    got, ent, got_mask, _ = t._forward(t.model, prompts, responses, with_entropy=True)
    assert ent is None and torch.equal(mask, got_mask) and got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-5  # float32 logits vs float64: a few float32 roundings
    (got * got_mask).sum().backward()  # the gradient reaches the model through the fused forward
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in t.model.parameters() if p.requires_grad)
    if not t.packed:  # without token_labels the forward is the model's own
        out = t.model(input_ids=torch.tensor([prompts[0]]), logits_to_keep=1, use_cache=False)
        assert out.logits.shape[:2] == (1, 1)


def test_unsupported_model_type_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16))
    with pytest.raises(ValueError, match="applies liger-kernel to qwen2, llama models, not 'gpt2'"):
        liger.setup(m, use_liger=True, use_fused_kernels=False)


def test_planner_drops_the_logits_term_with_fused_kernels():
    from planner import plan
    from planner.fsdp import fused_chunk_elems
    from planner.shapes import Shape

    base = plan(load_config("qwen2-7b-2xh800"))
    fused = plan(load_config("qwen2-7b-2xh800", ["model.use_fused_kernels=true"]))
    items = {i["item"]: i for i in fused["items"]}
    assert "logits (fwd+bwd) + one row's fp32" not in items
    cfg = load_config("qwen2-7b-2xh800")
    s = Shape(**fused["shape"])
    micro, resp = fused["micro_batch"], cfg.rollout.max_response_length
    n = micro * resp  # response positions of one micro-batch (no Ulysses in this recipe)
    # by hand: rows per chunk = next_pow2(ceil(n / ceil(V / h))), capped at n
    inc = -(-s.vocab // s.hidden)
    rows = min(2 ** int(np.ceil(np.log2(-(-n // inc)))), n)
    assert fused_chunk_elems(s, n) == rows * s.vocab
    by_hand = 2 * rows * s.vocab + 8 * n * s.hidden + 4 * s.vocab * s.hidden
    assert items["logits (fused, liger chunks)"]["gib"] * 2**30 == pytest.approx(by_hand)
    assert fused["trainer_peak_gib"] < base["trainer_peak_gib"]
    assert fused["largest_micro_batch"] >= base["largest_micro_batch"]
