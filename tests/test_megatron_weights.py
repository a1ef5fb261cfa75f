"""Qwen2 / Llama weights HF <-> megatron-core (engines/trainer/megatron_weights.py, engines/trainer/megatron_model.py), on CPU.

Two kinds of check, because a round trip alone cannot fail: any bijection maps back to where it
started, a wrong layout included.
- Round trip (tensors only): HF -> every tensor-parallel rank's shards -> merged -> HF is
  bitwise, tied and untied, at tp 1, 2 and 4, and split over two pipeline stages.
- Layout, through megatron-core's own modules (megatron-core 0.16, local layer spec, gloo ranks
  on CPU): the mapped shards load into a real ``GPTModel`` with no missing or unexpected key, and
  each fused or sharded tensor computes what its HF counterparts compute on the same input:
  ``SelfAttention.get_query_key_value_tensors`` gives HF's q/k/v heads of this rank's groups,
  ``linear_proj`` and ``mlp`` (row-parallel, all-reduced over gloo) give HF's o_proj / MLP,
  the vocab-parallel embedding and output layer give HF's rows. Then the model's own
  ``state_dict``, gathered over the ranks, maps back to the HF tensors bitwise. (The whole
  forward does not run on CPU: megatron-core's rotary embedding and attention core allocate on
  CUDA; the GPU test of the backend compares logits.)
  Float64 throughout. Bound: a q/k/v/o/MLP output is a sum of <= 2 x 128 products of terms of
  size <= ~2 (weights N(0, 0.2), inputs N(0, 1)); reordering it (megatron's split GEMMs and the
  all-reduce of partial sums vs one HF GEMM) changes it by <= n u sum|a b| = 256 x 2^-53 x ~50
  = 1.4e-12, so ATOL = 1e-11. A mis-grouped fused qkv moves q by O(1) (test below shows > 0.1).
"""

import os

import pytest
import torch
import torch.multiprocessing as mp

from engines.trainer.megatron_weights import QwenShape, hf_to_mcore, mcore_to_hf, merge_tp_shards
from tests.conftest import free_port

ATOL = 1e-11
SHAPE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
)


def _hf(tied: bool, family: str = "qwen2"):
    """A tiny random HF model: Qwen2 (q/k/v biases) or Llama (none, like SmolLM2)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if family == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    cfg = config_cls(**SHAPE, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = model_cls(cfg).to(torch.float64).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model, cfg


def _hf_tensors(model, tied: bool) -> dict[str, torch.Tensor]:
    sd = dict(model.state_dict())
    if tied:
        sd.pop("lm_head.weight", None)  # HF's state_dict lists the tied head; the files do not
    return sd


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("tied,family", [(True, "qwen2"), (False, "qwen2"), (True, "llama")])
def test_round_trip_is_bitwise(tp, tied, family):
    model, cfg = _hf(tied, family)
    hf = _hf_tensors(model, tied)
    s = QwenShape.from_hf_config(cfg)
    ranks = [hf_to_mcore(hf, s, tp=tp, tp_rank=r) for r in range(tp)]
    names = list(ranks[0])
    assert all(list(r) == names for r in ranks)
    merged = ((n, merge_tp_shards(n, [r[n] for r in ranks])) for n in names)
    back = dict(mcore_to_hf(merged, s, tp=tp))
    assert set(back) == set(hf)
    for n, t in hf.items():
        assert torch.equal(back[n], t), n


def test_two_pipeline_stages_cover_every_layer_once():
    model, cfg = _hf(False)
    hf = _hf_tensors(model, False)
    s = QwenShape.from_hf_config(cfg)
    first = hf_to_mcore(hf, s, layers=range(1), last_stage=False)
    last = hf_to_mcore(hf, s, layers=range(1, 2), first_stage=False)
    assert "embedding.word_embeddings.weight" in first and "output_layer.weight" not in first
    assert "decoder.final_layernorm.weight" in last and "embedding.word_embeddings.weight" not in last
    back = dict(mcore_to_hf(first.items(), s)) | dict(mcore_to_hf(last.items(), s, layer_offset=1))
    assert set(back) == set(hf) and all(torch.equal(back[n], hf[n]) for n in hf)


def test_a_tp_size_that_does_not_divide_the_groups_is_one_error():
    _, cfg = _hf(True)
    with pytest.raises(
        ValueError,
        match=r"tensor_model_parallel_size=8 does not divide the model's "
        r"num_key_value_heads \(4\)",
    ):
        hf_to_mcore({}, QwenShape.from_hf_config(cfg), tp=8)


# ---- through megatron-core's own modules, on gloo ranks ------------------------------------------
def _mcore_model(cfg, tp: int):
    from engines.trainer.megatron_model import build_gpt_model, transformer_config

    return build_gpt_model(cfg, transformer_config(cfg, tp=tp, params_dtype=torch.float64, cpu_init=True))


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _rank_main(rank: int, tp: int, port: int, tied: bool, family: str, wrong_qkv: bool, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=tp)
    from megatron.core import parallel_state as mpu

    mpu.initialize_model_parallel(tensor_model_parallel_size=tp)
    try:
        hf, cfg = _hf(tied, family)
        s = QwenShape.from_hf_config(cfg)
        tensors = _hf_tensors(hf, tied)
        shards = hf_to_mcore(tensors, s, tp=tp, tp_rank=rank)
        if wrong_qkv:  # the mistake the layout check exists for: q, k, v concatenated ungrouped
            for i in range(cfg.num_hidden_layers):
                a = f"model.layers.{i}.self_attn."
                full = torch.cat([tensors[a + f"{p}_proj.weight"] for p in "qkv"])
                shards[f"decoder.layers.{i}.self_attention.linear_qkv.weight"] = full.chunk(tp)[rank]
        model = _mcore_model(cfg, tp)
        missing, unexpected = model.load_state_dict({k: v.clone() for k, v in shards.items()}, strict=False)
        err = {"missing": [k for k in missing if not k.endswith("_extra_state")], "unexpected": list(unexpected)}
        g = torch.Generator().manual_seed(1)
        x = torch.randn(10, 2, cfg.hidden_size, dtype=torch.float64, generator=g)  # [s, b, H], megatron's order
        xb = x.transpose(0, 1)  # [b, s, H], HF's order
        ids = torch.randint(0, cfg.vocab_size, (2, 10), generator=g)
        heads, groups = cfg.num_attention_heads // tp, cfg.num_key_value_heads // tp
        hd = cfg.hidden_size // cfg.num_attention_heads
        with torch.no_grad():
            emb = model.embedding(input_ids=ids, position_ids=torch.arange(10).expand(2, 10))
            err["embedding"] = _diff(emb.transpose(0, 1), hf.model.embed_tokens(ids))
            for i, (ml, hl) in enumerate(zip(model.decoder.layers, hf.model.layers)):
                q, k, v = ml.self_attention.get_query_key_value_tensors(x)[:3]  # [s, b, heads, hd]
                for name, got, proj, n in (
                    ("q", q, hl.self_attn.q_proj, heads),
                    ("k", k, hl.self_attn.k_proj, groups),
                    ("v", v, hl.self_attn.v_proj, groups),
                ):
                    want = proj(xb).view(2, 10, -1, hd).transpose(0, 1)[:, :, rank * n : (rank + 1) * n]
                    err[f"{name}{i}"] = _diff(got, want)
                width = cfg.hidden_size // tp
                o, _ = ml.self_attention.linear_proj(x[:, :, rank * width : (rank + 1) * width])
                err[f"o{i}"] = _diff(o.transpose(0, 1), hl.self_attn.o_proj(xb))
                y, _ = ml.mlp(x)
                err[f"mlp{i}"] = _diff(y.transpose(0, 1), hl.mlp(xb))
            rows = cfg.vocab_size // tp
            head = model.shared_embedding_or_output_weight() if tied else None
            logits, _ = model.output_layer(x, weight=head)  # this rank's vocab rows
            err["lm_head"] = _diff(logits.transpose(0, 1), hf.lm_head(xb)[..., rank * rows : (rank + 1) * rows])
            # The model's own tensors, gathered over the ranks, map back to HF bitwise.
            gathered = []
            for name, t in model.state_dict().items():
                if name.endswith("_extra_state"):
                    continue
                parts = [torch.empty_like(t) for _ in range(tp)]
                torch.distributed.all_gather(parts, t.contiguous())
                gathered.append((name, merge_tp_shards(name, parts)))
            back = dict(mcore_to_hf(gathered, s, tp=tp))
            err["export_names"] = sorted(set(back) ^ set(tensors))
            # megatron-core's torch RMSNorm (no Apex / Transformer Engine) keeps its weight in
            # float32 whatever params_dtype says: those compare after that one cast.
            err["export_not_bitwise"] = [
                n for n in tensors if n in back and not torch.equal(back[n], tensors[n].to(back[n].dtype))
            ]
        torch.save(err, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        mpu.destroy_model_parallel()
        torch.distributed.destroy_process_group()


def _layout_errors(tmp_path, tp: int, tied: bool, family: str = "qwen2", wrong_qkv: bool = False) -> list[dict]:
    pytest.importorskip("megatron.core", reason="megatron-core is not installed")
    mp.spawn(_rank_main, args=(tp, free_port(), tied, family, wrong_qkv, str(tmp_path)), nprocs=tp)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(tp)]


@pytest.mark.parametrize("tp,tied,family", [(1, True, "qwen2"), (2, False, "qwen2"), (2, True, "llama")])
def test_layout_matches_megatron_core(tmp_path, tp, tied, family):
    for rank, err in enumerate(_layout_errors(tmp_path, tp, tied, family)):
        assert err.pop("missing") == [] and err.pop("unexpected") == [], rank
        assert err.pop("export_names") == [] and err.pop("export_not_bitwise") == [], rank
        worst = max(err, key=err.get)
        assert err[worst] < ATOL, f"rank {rank}: {worst} differs by {err[worst]}"


def test_a_wrong_qkv_layout_is_caught(tmp_path):
    err = _layout_errors(tmp_path, 1, True, wrong_qkv=True)[0]
    assert err["k0"] > 0.1 and err["k1"] > 0.1


def test_configs_the_mapping_does_not_reproduce_are_one_error():
    pytest.importorskip("megatron.core", reason="megatron-core is not installed")
    from transformers import GPT2Config, Qwen2Config

    from engines.trainer.megatron_model import transformer_config

    with pytest.raises(ValueError, match="model_type='gpt2': the Megatron backend maps qwen2, llama only"):
        transformer_config(GPT2Config())
    scaled = Qwen2Config(
        **SHAPE,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 1e6,
            "factor": 4.0,
            "original_max_position_embeddings": 32768,
        },
    )
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        transformer_config(scaled)
