"""The sharded trainer's load (engines/trainer/load.py: built on the meta device, each rank's shards
read from the safetensors) gives each rank what loading the whole model there and sharding it gave.

Two gloo ranks build the trainer both ways with the same seed: the meta load, and the load it
replaced (`from_pretrained` on every rank, then `fully_shard`; patched in as `_eager_build`).
Every parameter (policy and reference), each rank's own shard of it, the rotary buffers, the tying
of lm_head to the input embedding and the configs must be equal, bitwise; so must the log-probs
and one update from them. The cases: the tiny model (tied, fp32 file) with its reference; an untied
copy saved in bf16 (the file's dtype cast into the float64 master weights, gradient checkpointing
on); LoRA, whose adapter peft initialises with draws from torch's CPU generator.

Exact equality, not a tolerance: the two trainers hold the same values in the same shards and run
the same kernels on them in the same order (one thread each), so no sum is ordered differently
and nothing rounds differently (float64 throughout, FSDPTrainer(master_dtype=torch.float64)).
"""

import shutil
from contextlib import nullcontext
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import free_port
from tests.test_fsdp import _batch, _cfg


def _eager_build(self, dtype):
    """The load before engines/trainer/load.py: the whole model on every rank, sharded after."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype).to(self.device), None


def _look(t) -> dict:
    """What a trainer holds after its load, and what one update from there gives."""
    from engines.batching import minibatch_schedule
    from engines.trainer.fsdp import full_tensor
    from engines.types import UpdateBatch

    models = {"model": t.model, "ref": t.ref}
    out = {
        f"{m}.{kind}": {k: f(v).clone() for k, v in model.state_dict().items()}
        for m, model in models.items()
        if model is not None
        for kind, f in (("full", full_tensor), ("local", lambda v: v.to_local()))
    }
    out["buffers"] = {k: v.clone() for k, v in t.model.named_buffers()}
    hf = t.model.get_base_model() if t.is_lora else t.model
    out["tied"] = hf.lm_head.weight is hf.model.embed_tokens.weight
    out["configs"] = (t.hf_config.to_dict(), t.model.generation_config.to_dict())
    prompts, responses, adv = _batch()
    ref = t.compute_log_prob(prompts, responses, ref=True)
    old = t.compute_log_prob(prompts, responses)
    batch = UpdateBatch(prompts=prompts, responses=responses, advantages=adv, ref_log_probs=ref, old_log_probs=old)
    metrics = t.update(batch, seed=0, steps=minibatch_schedule(len(prompts), t.cfg, 0, t.dp_rank, t.dp_size))
    out["logp"], out["metrics"] = (ref, old), {k: v for k, v in metrics.items() if k.startswith("actor/")}
    out["updated"] = {k: full_tensor(v).clone() for k, v in t.model.state_dict().items()}
    return out


def _rank_main(rank, port, model_dir, extra, tmp):
    from engines.trainer import init_distributed
    from engines.trainer.fsdp import FSDPTrainer

    torch.set_num_threads(1)
    init_distributed(rank, 2, ("127.0.0.1", port), "cpu")
    cfg = _cfg(2, extra)
    looks = {}
    for way in ("meta", "eager"):
        with patch.object(FSDPTrainer, "_build", _eager_build) if way == "eager" else nullcontext():
            torch.manual_seed(0)
            looks[way] = _look(FSDPTrainer(cfg, model_dir, "cpu", master_dtype=torch.float64))
    torch.save(looks, f"{tmp}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def untied_bf16_dir(model_dir, tmp_path_factory) -> str:
    """The tiny model's shape with an untied lm_head, random, saved in bf16."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    config.tie_word_embeddings = False
    torch.manual_seed(1)
    out = tmp_path_factory.mktemp("untied")
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(f"{model_dir}/{f}", out / f)
    return str(out)


def _equal(a, b, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{what}: {k}"


@pytest.mark.parametrize("case", ["tied", "untied_bf16", "lora"])
def test_meta_load_matches_the_whole_model_load(model_dir, untied_bf16_dir, tmp_path, case):
    src = untied_bf16_dir if case == "untied_bf16" else model_dir
    extra = {
        "tied": [],
        "untied_bf16": ["model.enable_gradient_checkpointing=true"],
        "lora": ["model.lora_rank=8"],
    }[case]
    mp.spawn(_rank_main, args=(free_port(), src, extra, str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        looks = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        meta, eager = looks["meta"], looks["eager"]
        assert meta["tied"] == eager["tied"] == (case != "untied_bf16")
        assert meta["configs"] == eager["configs"]
        kinds = [k for k in eager if k.endswith((".full", ".local"))]
        assert sorted(kinds) == sorted(k for k in meta if k.endswith((".full", ".local")))
        assert ("ref.full" in kinds) == (case != "lora")  # LoRA: the reference is the base, adapter off
        for kind in kinds + ["buffers", "updated"]:
            _equal(meta[kind], eager[kind], f"rank {rank} {kind}")
        assert meta["logp"][0] and all(
            (x == y).all() for m, e in zip(meta["logp"], eager["logp"]) for x, y in zip(m, e, strict=True)
        )
        assert meta["metrics"] == eager["metrics"]
        moved = max((meta["updated"][k] - meta["model.full"][k]).abs().max().item() for k in meta["updated"])
        assert moved > 1e-4, "the update did not move the weights: the comparison would be empty"
        if case == "lora":  # peft's init: lora_A kaiming-uniform, lora_B zeros
            full = meta["model.full"]
            assert all(full[k].abs().max() > 0 for k in full if "lora_A" in k)
            assert all(not full[k].any() for k in full if "lora_B" in k)


def _cuda_main(rank, port, model_dir, tmp):
    from engines.trainer import init_distributed
    from engines.trainer.fsdp import FSDPTrainer

    init_distributed(0, 1, ("127.0.0.1", port), "cuda")
    cfg = _cfg(1, ["trainer.device=cuda", "model.dtype=bfloat16"])
    looks = {}
    for way in ("meta", "eager"):
        with patch.object(FSDPTrainer, "_build", _eager_build) if way == "eager" else nullcontext():
            torch.manual_seed(0)
            t = FSDPTrainer(cfg, model_dir, "cuda", shard=True)
            looks[way] = {k: v.cpu() if torch.is_tensor(v) else v for k, v in _flat(_look(t)).items()}
            del t
            torch.cuda.empty_cache()
    torch.save(looks, f"{tmp}/cuda.pt")
    torch.distributed.destroy_process_group()


def _flat(look: dict) -> dict:
    """_look's nested dicts as one {name: tensor or value} dict (tensors moved to the host later)."""
    out = {}
    for k, v in look.items():
        if isinstance(v, dict) and k not in ("metrics",):
            out.update({f"{k}/{n}": x for n, x in v.items()})
        elif k == "logp":
            out.update({f"logp/{i}/{j}": torch.as_tensor(x) for i, m in enumerate(v) for j, x in enumerate(m)})
        else:
            out[k] = v
    return out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA load: needs a GPU")
def test_meta_load_on_cuda_matches_the_whole_model_load(model_dir, tmp_path):
    """One GPU, a 1-rank NCCL group, FSDP2 forced on (shard=True), fp32 master + bf16 autocast: the
    shards land on the GPU from the meta device (to_empty onto CUDA, dcp.load over the cpu:gloo /
    cuda:nccl group) equal, bitwise, to the whole-model load; the log-probs and the update's
    metrics equal too (the same kernels on the same values in one process)."""
    mp.spawn(_cuda_main, args=(free_port(), model_dir, str(tmp_path)), nprocs=1)
    looks = torch.load(tmp_path / "cuda.pt", weights_only=False)
    meta, eager = looks["meta"], looks["eager"]
    assert meta.keys() == eager.keys() and meta["tied"] and eager["tied"]
    for k in meta:
        a, b = meta[k], eager[k]
        if torch.is_tensor(a):
            assert a.dtype == b.dtype and torch.equal(a, b), k
        else:
            assert a == b, k


def _missing_main(rank, port, model_dir, tmp):
    from engines.trainer import init_distributed
    from engines.trainer.fsdp import FSDPTrainer

    torch.set_num_threads(1)
    init_distributed(rank, 2, ("127.0.0.1", port), "cpu")
    try:
        FSDPTrainer(_cfg(2, []), model_dir, "cpu")
        msg = "no error"
    except ValueError as e:
        msg = str(e)
    (Path(tmp) / f"rank{rank}.txt").write_text(msg)
    torch.distributed.destroy_process_group()


def test_a_tensor_missing_from_the_files_is_one_value_error_naming_the_model(model_dir, tmp_path):
    """DCP's CheckpointException (a BaseException) becomes a ValueError naming the model dir, on
    every rank, so the worker reports it as bad input instead of dying past `except Exception`."""
    from safetensors.torch import load_file, save_file

    cut = tmp_path / "cut"
    shutil.copytree(model_dir, cut)
    (f,) = cut.glob("*.safetensors")
    tensors = load_file(f)
    dropped = "model.layers.1.mlp.down_proj.weight"
    del tensors[dropped]
    save_file(tensors, f, metadata={"format": "pt"})
    mp.spawn(_missing_main, args=(free_port(), str(cut), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        msg = (tmp_path / f"rank{rank}.txt").read_text()
        assert msg.startswith(f"model.path={cut}: its safetensors do not hold the model") and dropped in msg, msg
        assert "\n" not in msg
