"""Packed micro-batches (engines/trainer/packing.py): the index arithmetic by hand, then a real Qwen2.

Parity: a tiny random Qwen2 (transformers, sdpa, float64, CPU) gives the same per-token response
log-probs, and the same gradients, from the packed row (position ids restarting per sample, no
attention mask: transformers builds the block-diagonal causal mask from the position ids) as
from the padded layout the trainer uses ([left-padded prompt | right-padded response] with an
attention mask). Masked scores are exactly 0 after the softmax in both, so the two differ only by
the order of sums: a log-prob ends a chain of ~600 multiply-adds (2 layers of 64-wide attention
and 128-wide MLP, softmax over <= 20 positions and a 256-word vocabulary) of terms <= ~10, so
<= 600 x 2^-53 x 10 = 6.7e-13; ATOL 1e-10. Position ids that do not restart (a packing mistake:
every sample then attends to the ones before it) move log-probs by far more than 1e-3.
"""

import pytest
import torch

from engines.trainer.packing import pack, unpack

ATOL = 1e-10


def test_pack_by_hand():
    p = pack([[1, 2, 3], [4, 5]], [[6, 7], [8]])
    assert p.input_ids.tolist() == [[1, 2, 3, 6, 7, 4, 5, 8]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]]
    assert p.cu_seqlens.tolist() == [0, 5, 8] and p.cu_seqlens.dtype == torch.int32 and p.max_seqlen == 5
    # sample 0's response starts at row position 3, predicted by the logit at 2; sample 1's at 7, by 6
    assert p.logits_index.tolist() == [2, 3, 6] and p.labels.tolist() == [6, 7, 8]
    assert p.response_lengths == (2, 1)


def test_pack_pads_the_tail_as_its_own_segment():
    p = pack([[1, 2, 3], [4, 5]], [[6, 7], [8]], pad_id=9, multiple_of=3)
    assert p.input_ids.tolist() == [[1, 2, 3, 6, 7, 4, 5, 8, 9]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0]]
    assert p.cu_seqlens.tolist() == [0, 5, 8, 9] and p.logits_index.tolist() == [2, 3, 6]
    assert pack([[1]], [[2, 3, 4]], multiple_of=4).cu_seqlens.tolist() == [0, 4]  # already a multiple


def test_pack_errors():
    with pytest.raises(ValueError, match="sample 1 has an empty prompt"):
        pack([[1], []], [[2], [3]])
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        pack([[1], [2]], [[3]])


def test_unpack_by_hand():
    vals, mask = unpack(torch.tensor([1.0, 2.0, 3.0, 4.0]), (2, 0, 2))
    assert vals.tolist() == [[1.0, 2.0], [0.0, 0.0], [3.0, 4.0]] and mask.tolist() == [[1, 1], [0, 0], [1, 1]]
    vals, _ = unpack(torch.tensor([[5.0]]), [1], width=3)
    assert vals.tolist() == [[5.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="3 values for responses of 4 tokens"):
        unpack(torch.ones(3), (2, 2))
    with pytest.raises(ValueError, match="does not fit width 1"):
        unpack(torch.ones(2), (2,), width=1)


# ---- a real model ----------------------------------------------------------------------------
def _model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # far from uniform logits, so a leak across samples shows
    return model


def _samples():
    g = torch.Generator().manual_seed(1)
    lens = [(5, 3), (2, 7), (6, 1), (3, 4)]
    return (
        [torch.randint(1, 256, (p,), generator=g).tolist() for p, _ in lens],
        [torch.randint(1, 256, (r,), generator=g).tolist() for _, r in lens],
    )


def _padded_logprobs(model, prompts, responses):
    """The trainer's layout: [left-padded prompt | right-padded response], positions from the mask."""
    P, R = max(map(len, prompts)), max(map(len, responses))
    ids = torch.tensor([[0] * (P - len(p)) + p + r + [0] * (R - len(r)) for p, r in zip(prompts, responses)])
    attn = torch.tensor(
        [[0] * (P - len(p)) + [1] * (len(p) + len(r)) + [0] * (R - len(r)) for p, r in zip(prompts, responses)]
    )
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=R + 1, use_cache=False).logits[
        :, :-1
    ]
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, -R:, None])[..., 0]
    mask = attn[:, -R:].to(logp.dtype)
    return logp * mask, mask


def _packed_logprobs(model, prompts, responses, restart: bool = True):
    p = pack(prompts, responses)
    pos = p.position_ids if restart else torch.arange(p.input_ids.shape[1])[None]
    logits = model(
        input_ids=p.input_ids, position_ids=pos, attention_mask=None, logits_to_keep=p.logits_index, use_cache=False
    ).logits[0]  # [N, V]
    logp = torch.log_softmax(logits, -1).gather(-1, p.labels[:, None])[:, 0]  # [N]
    return unpack(logp, p.response_lengths)


def test_packed_matches_padded_logprobs_and_gradients():
    model = _model()
    prompts, responses = _samples()
    weights = torch.linspace(-1, 1, 7, dtype=torch.float64)[None].expand(4, 7)  # a loss that weighs tokens
    grads = []
    for fn in (_padded_logprobs, _packed_logprobs):
        model.zero_grad()
        logp, mask = fn(model, prompts, responses)
        (logp * weights[:, : logp.shape[1]] * mask).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        if fn is _padded_logprobs:
            ref, ref_mask = logp.detach(), mask
    got, mask = _packed_logprobs(model, prompts, responses)
    assert torch.equal(mask, ref_mask)
    assert (got.detach() - ref).abs().max().item() < ATOL
    worst = max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0])
    assert worst < ATOL, worst


def test_positions_that_do_not_restart_are_caught():
    model = _model()
    prompts, responses = _samples()
    with torch.no_grad():
        ref, _ = _padded_logprobs(model, prompts, responses)
        leaked, _ = _packed_logprobs(model, prompts, responses, restart=False)
    assert (leaked - ref).abs().max().item() > 1e-3


def test_a_cache_object_defeats_the_packed_mask():
    """Why engines/trainer/packing.py asks for use_cache=False: with a (new, empty) cache transformers
    does not look for packed sequences, and later samples attend to earlier ones."""
    model = _model()
    prompts, responses = _samples()
    p = pack(prompts, responses)
    with torch.no_grad():
        ref, _ = _padded_logprobs(model, prompts, responses)
        logits = model(
            input_ids=p.input_ids, position_ids=p.position_ids, logits_to_keep=p.logits_index, use_cache=True
        ).logits[0]
        leaked, _ = unpack(torch.log_softmax(logits, -1).gather(-1, p.labels[:, None])[:, 0], p.response_lengths)
    assert (leaked - ref).abs().max().item() > 1e-3
