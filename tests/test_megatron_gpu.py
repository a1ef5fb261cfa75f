"""megatron-core's whole forward against HF's, on one GPU (skipped without CUDA or megatron-core).

The CPU tests (tests/test_megatron_weights.py) check each mapped tensor through megatron-core's
modules; its rotary embedding and attention core run on CUDA only, so the whole chain (RoPE
convention, GQA, causal mask, tied head) is checked here: a tiny random Qwen2 / Llama in float32
(TF32 off), the same token ids, logits of the megatron-core GPTModel filled by hf_to_mcore
against HF's. Bound: a logit ends a chain of ~600 multiply-adds (2 layers, hidden 64, MLP 128,
softmax over 16 positions, vocabulary 256), so the worst-case reordering error is
600 x 2^-24 = 3.6e-5 of the logits' scale; RTOL 1e-4. A mis-grouped qkv is off by O(1).
"""

import os

import pytest
import torch

from engines.trainer.megatron_weights import QwenShape, hf_to_mcore
from tests.conftest import free_port
from tests.test_megatron_weights import SHAPE

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
RTOL = 1e-4


@pytest.fixture(scope="module")
def megatron_tp1():
    pytest.importorskip("megatron.core", reason="megatron-core is not installed")
    from megatron.core import parallel_state as mpu
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    torch.cuda.set_device(0)
    torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    mpu.initialize_model_parallel(tensor_model_parallel_size=1)
    model_parallel_cuda_manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    mpu.destroy_model_parallel()
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize(
    "family,tied,wrong",
    [("qwen2", True, False), ("qwen2", False, False), ("llama", True, False), ("qwen2", True, True)],
)
def test_megatron_logits_match_hf(megatron_tp1, family, tied, wrong):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from engines.trainer.megatron_model import build_gpt_model, transformer_config

    config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if family == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    cfg = config_cls(**SHAPE, tie_word_embeddings=tied)
    torch.manual_seed(0)
    hf = model_cls(cfg).float().cuda().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    tensors = {k: v for k, v in hf.state_dict().items() if not (tied and k == "lm_head.weight")}
    shards = hf_to_mcore(tensors, QwenShape.from_hf_config(cfg))
    if wrong:  # q, k, v concatenated without grouping: must be caught
        for i in range(cfg.num_hidden_layers):
            a = f"model.layers.{i}.self_attn."
            shards[f"decoder.layers.{i}.self_attention.linear_qkv.weight"] = torch.cat(
                [tensors[a + f"{p}_proj.weight"] for p in "qkv"]
            )
    model = build_gpt_model(cfg, transformer_config(cfg)).cuda().eval()
    missing, unexpected = model.load_state_dict({k: v.clone() for k, v in shards.items()}, strict=False)
    assert [k for k in missing if not k.endswith("_extra_state")] == [] and list(unexpected) == []
    ids = torch.randint(0, cfg.vocab_size, (2, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    pos = torch.arange(16, device="cuda").expand(2, 16)
    causal = torch.triu(torch.ones(16, 16, dtype=torch.bool, device="cuda"), 1)[None, None]  # True: masked
    with torch.no_grad():
        ref = hf(input_ids=ids, use_cache=False).logits
        got = model(input_ids=ids, position_ids=pos, attention_mask=causal)  # [b, s, V]
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    assert (rel > 0.05) if wrong else (rel < RTOL), rel
