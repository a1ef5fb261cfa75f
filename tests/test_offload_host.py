"""engines/trainer/offload.py's host buffers, on CPU: every offload cycle copies into the same exact-size
buffers (no new host memory per cycle, none rounded up), through the `Module._apply` path FSDP2
follows, and every weight, gradient and AdamW moment comes back bit for bit. The CUDA side (pinned
buffers, resident memory over 5 cycles) is tests/test_offload.py's, with GRPO_TEST_DEVICE=cuda."""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from engines.trainer.offload import (
    HostPool,
    module_to_device,
    module_to_host,
    optimizer_to_device,
    optimizer_to_host,
)
from tests.conftest import free_port


def _model():
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    # Sizes chosen off powers of two: a power-of-two allocator would hold visibly more.
    cfg = Qwen2Config(
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        tie_word_embeddings=False,
    )
    return AutoModelForCausalLM.from_config(cfg)


def _train_once(model, opt):
    ids = torch.randint(0, 300, (2, 7))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    return ids


def _local(t):
    return (t.to_local() if isinstance(t, DTensor) else t).detach().clone()


def _state(model, opt):
    out = [_local(p) for p in model.parameters()] + [_local(p.grad) for p in model.parameters()]
    return out + [_local(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]


def _ptrs(tensors):
    return {(t.to_local() if isinstance(t, DTensor) else t).data_ptr() for t in tensors}


def _fsdp2_main(rank: int, port: int) -> None:
    """One gloo rank in its own process (a process group left in pytest's process breaks the
    in-process vLLM engines of later tests): the sharded code path, DTensor parameters."""
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        model = _model()
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        _offload_cycles(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["plain", "fsdp2"])
def test_offload_cycles_reuse_exact_size_buffers_and_change_no_number(mode):
    if mode == "fsdp2":
        import torch.multiprocessing as mp

        mp.spawn(_fsdp2_main, args=(free_port(),), nprocs=1)
    else:
        model = _model()
        _offload_cycles(model, torch.optim.AdamW(model.parameters(), lr=1e-3))


def _offload_cycles(model, opt) -> None:
    ids = _train_once(model, opt)
    before = _state(model, opt)
    # weights + grads + AdamW (step counters included) + module buffers (rotary inv_freq)
    exact = sum(t.nbytes for t in before) + sum(b.nbytes for b in model.buffers())
    pools, seen = (HostPool(pin=False), HostPool(pin=False)), None
    for cycle in range(5):
        module_to_host(model, pools[0])
        optimizer_to_host(opt, pools[1])
        params = list(model.parameters())
        moments = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
        lent = {b.data_ptr() for p in pools for _, b in p._lent}
        on_host = _ptrs(params) | _ptrs([p.grad for p in params]) | _ptrs(moments)
        assert on_host <= lent, "a weight, gradient or moment is not in a pool buffer while offloaded"
        if seen is None:
            seen = lent
        assert lent == seen, f"cycle {cycle}: new host buffers were made (they must be reused)"
        assert pools[0].nbytes + pools[1].nbytes == exact, "the buffers are not exactly the tensors' size"
        module_to_device(model, "cpu")
        optimizer_to_device(opt, "cpu")
        for p in pools:
            p.release_all()
        assert not (_ptrs(model.parameters()) & seen), "the trainer computes on a pool buffer"
        after = _state(model, opt)
        assert all(torch.equal(a, b) for a, b in zip(before, after))
    # The model still trains after five round trips (FSDP2 re-registered its shards each time).
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
