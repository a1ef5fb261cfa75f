"""What a save writes and what reads it: the LoRA export merged in fp32 (issue 13 fault 8) and
streamed from the base files (equal to peft's merge_and_unload export; unsupported adapter
features refused), a save without the HF export whose ranks checksum their own files, `grpo eval`
of a checkpoint without an export, and the per-step host memory peak."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from configs.load import load_config, with_overrides
from engines.trainer.checkpoint import write_hf_export
from engines.trainer.fsdp import FSDPTrainer
from engines.trainer.lora_merge import merged_state
from engines.worker import host_peak_gb
from runtime import checkpoints as ck
from tests.conftest import free_port

RANK, ALPHA = 8, 16
Q = "model.layers.0.self_attn.q_proj.weight"


def _trainer(model_dir, *overrides):
    cfg = load_config(
        "tiny-cpu", with_overrides(["rollout.n=2", "actor.ppo_mini_batch_size=4", "trainer.device=cpu"], overrides)
    )
    torch.manual_seed(0)
    return FSDPTrainer(cfg, model_dir, "cpu")


def _base_weight(model_dir) -> torch.Tensor:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    return next(load_file(f)[Q] for f in files if Q in load_file(f)).to(torch.float64)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_lora_export_merges_a_small_delta_in_fp32(model_dir, tmp_path, dtype):
    """An adapter whose delta is 1e-4 of the weights' scale: the export is base + B@A*alpha/r
    computed in fp64 and rounded once to the export dtype."""
    t = _trainer(model_dir, f"model.lora_rank={RANK}", f"model.lora_alpha={ALPHA}", f"model.dtype={dtype}")
    w = _base_weight(model_dir)
    q = t.model.get_base_model().model.layers[0].self_attn.q_proj
    g = torch.Generator().manual_seed(0)
    a = torch.randn(q.lora_A["default"].weight.shape, generator=g, dtype=torch.float64)
    # (B@A)_ij ~ N(0, r s^2): s so that scale * sqrt(r) * s = 1e-4 * std(W).
    s = 1e-4 * w.std().item() / (ALPHA / RANK * RANK**0.5)
    b = torch.randn(q.lora_B["default"].weight.shape, generator=g, dtype=torch.float64) * s
    with torch.no_grad():
        q.lora_A["default"].weight.copy_(a)
        q.lora_B["default"].weight.copy_(b)
    a, b = q.lora_A["default"].weight.double(), q.lora_B["default"].weight.double()  # as stored (fp32)
    want = w + b @ a * (ALPHA / RANK)
    t.save(str(tmp_path / "ck"))
    got = load_file(tmp_path / "ck" / "huggingface" / "model.safetensors")[Q]
    assert got.dtype == getattr(torch, dtype)
    if dtype == "float32":
        # fp32 product and sum: each rounds by at most 2^-24 relative; 2^-22 |W| leaves room for
        # the r=8-term dot product's own rounding (8 * 2^-24 * |delta| << 2^-22 |W|).
        err = (got.double() - want).abs()
        assert (err <= 2.0**-22 * want.abs() + 1e-12).all(), err.max()
        delta = got.double() - w
        assert (delta - (want - w)).abs().max() < 0.01 * (want - w).abs().mean()  # the delta survived
        return
    # bf16: one rounding of the exact merge. Elements within fp32 error (2^-22 relative) of a bf16
    # rounding midpoint may round either way; all the others must equal round(want) exactly.
    lo, hi = (want * (1 - 2.0**-22)).to(torch.bfloat16), (want * (1 + 2.0**-22)).to(torch.bfloat16)
    sure = lo == hi
    assert sure.float().mean() > 0.999
    assert torch.equal(got[sure], want.to(torch.bfloat16)[sure])
    # The delta (1e-4) is under half a bf16 ulp (2^-9 relative) of most weights, yet the weights it
    # pushes over a midpoint (about 1e-4 / 2^-8 = 2.6% of them) do move.
    moved = (got != w.to(torch.bfloat16)).float().mean().item()
    assert 0.005 < moved < 0.1, moved


@pytest.fixture(scope="module")
def untied_dir(model_dir, tmp_path_factory) -> str:
    """The tiny Qwen2 with its own output embedding, random, stored in bfloat16 (as real checkpoints
    are; the tiny one is float32 and tied)."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path_factory.mktemp("untied")
    conf = AutoConfig.from_pretrained(model_dir)
    conf.tie_word_embeddings = False
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(conf, dtype=torch.bfloat16).save_pretrained(out)
    for f in Path(model_dir).iterdir():
        if f.suffix != ".safetensors" and not (out / f.name).exists():
            shutil.copy(f, out)
    return str(out)


def _lora_trainer(base_dir, dtype):
    """A LoRA trainer whose every lora_B is random (a fresh adapter's B is zero: no merge to see)."""
    t = _trainer(base_dir, f"model.lora_rank={RANK}", f"model.lora_alpha={ALPHA}", f"model.dtype={dtype}")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in t.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return t


def _peft_export(base_dir, adapter_dir, dtype, tokenizer, out):
    """The reference, the LoRA export before it was streamed: the whole base in fp32, peft's
    merge_and_unload, cast and save_pretrained, + the tokenizer. Returns the merged model in `dtype`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().to(dtype)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return merged


def _files(d: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}


def _exports(tmp_path, base_dir, dtype, rslora=False):
    """(streamed export dir, reference export dir, the reference's merged model, the trainer)."""
    t = _lora_trainer(base_dir, dtype)
    adapter = tmp_path / "adapter"
    t.save_adapter(str(adapter))
    if rslora:
        conf = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**conf, "use_rslora": True}))
    write_hf_export(t, str(tmp_path / "streamed"), adapter)
    merged = _peft_export(base_dir, adapter, getattr(torch, dtype), t.tokenizer, tmp_path / "ref")
    return tmp_path / "streamed", tmp_path / "ref", merged, t


@pytest.mark.parametrize(
    "tied, dtype, rslora",
    [(True, "bfloat16", False), (True, "float32", False), (False, "bfloat16", False), (False, "float32", True)],
)
def test_streamed_lora_export_equals_peft_merge(request, tied, dtype, rslora, tmp_path):
    """Same keys (a tied output embedding left out, as save_pretrained does), dtypes and bits as
    peft's fp32 merge_and_unload then cast: the same fp32 operations in the same order (B @ A, times
    the scaling, plus W), so no rounding bound is needed. Same config and generation config."""
    base_dir = request.getfixturevalue("model_dir" if tied else "untied_dir")
    streamed, ref, _, _ = _exports(tmp_path, base_dir, dtype, rslora)
    got, want, base = _files(streamed), _files(ref), _files(Path(base_dir))
    assert got.keys() == want.keys() and ("lm_head.weight" in got) != tied
    for k, v in got.items():
        assert v.dtype == want[k].dtype == getattr(torch, dtype) and torch.equal(v, want[k]), k
    merged = [k for k in got if not torch.equal(got[k], base[k].to(got[k].dtype))]
    assert len(merged) == 7 * 2, merged  # q k v o gate up down, 2 layers: every LoRA pair moved its weight
    for f in ("config.json", "generation_config.json"):
        mine, theirs = (json.loads((d / f).read_text()) for d in (streamed, ref))
        assert mine == theirs, f
    assert {f.name for f in streamed.iterdir()} == {f.name for f in ref.iterdir()}


@pytest.mark.parametrize("tied, dtype", [(True, "bfloat16"), (False, "float32")])
def test_streamed_lora_export_loads_with_the_merged_logits(request, tied, dtype, tmp_path):
    """from_pretrained of the streamed export: the compute dtype, and the logits of today's export
    loaded the same way, bit for bit; float32: also those of the merged model peft returned. (Not
    in bf16: its `.to(bfloat16)` also casts the rotary inv_freq buffer, which from_pretrained
    keeps in float32, so that in-memory model is not what any reader of an export runs.)"""
    from transformers import AutoModelForCausalLM

    base_dir = request.getfixturevalue("model_dir" if tied else "untied_dir")
    streamed, ref, merged, t = _exports(tmp_path, base_dir, dtype)
    hf = AutoModelForCausalLM.from_pretrained(streamed)
    assert hf.dtype == getattr(torch, dtype)
    ids = torch.tensor([t.tokenizer("Tom has 3 apples and buys 6 more.")["input_ids"]])
    with torch.no_grad():
        got = hf(ids).logits
        assert torch.equal(got, AutoModelForCausalLM.from_pretrained(ref)(ids).logits)
        if dtype == "float32":
            assert torch.equal(got, merged(ids).logits)


@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory) -> Path:
    """A peft LoRA adapter (r=8, all-linear) of the tiny model, saved as peft saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("adapter")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear")).save_pretrained(out)
    return out


@pytest.mark.parametrize(
    "conf, tensors, named",
    [
        ({"use_dora": True}, {}, "use_dora=True"),
        ({"bias": "all"}, {}, "bias='all'"),
        ({"lora_bias": True}, {}, "lora_bias=True"),
        ({"modules_to_save": ["lm_head"]}, {}, "modules_to_save=['lm_head']"),
        ({"rank_pattern": {"q_proj": 4}}, {}, "rank_pattern={'q_proj': 4}"),
        ({"init_lora_weights": "pissa"}, {}, "init_lora_weights='pissa'"),
        ({"kasa_config": {"k": 1}}, {}, "kasa_config={'k': 1}"),  # any key peft may add, when set
        ({}, {"base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector": [128]}, "lora_magnitude_vector"),
        ({}, {"base_model.model.model.embed_tokens.lora_embedding_A": [8, 1024]}, "embed_tokens.lora_embedding_A"),
        (
            {},
            {"base_model.model.lm_head.lora_A.weight": [8, 128], "base_model.model.lm_head.lora_B.weight": [1024, 8]},
            "LoRA on lm_head, whose weight is not in",
        ),
        (
            {},
            {
                "base_model.model.model.embed_tokens.lora_A.weight": [8, 1024],
                "base_model.model.model.embed_tokens.lora_B.weight": [128, 8],
            },
            "LoRA on model.embed_tokens, a Embedding",
        ),
        ({}, {"base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": [64, 8]}, "B @ A is [64, 128]"),
    ],
)
def test_streamed_lora_merge_refuses_an_unsupported_adapter_in_one_line(
    model_dir, adapter_dir, tmp_path, conf, tensors, named
):
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(adapter_dir, tmp_path / "a")
    f = tmp_path / "a" / "adapter_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **conf}))
    weights = load_file(tmp_path / "a" / "adapter_model.safetensors")
    save_file(
        {**weights, **{k: torch.zeros(s) for k, s in tensors.items()}}, tmp_path / "a" / "adapter_model.safetensors"
    )
    with pytest.raises(ValueError) as e:
        merged_state(model_dir, tmp_path / "a", torch.bfloat16)
    assert "\n" not in str(e.value) and named in str(e.value), str(e.value)
    assert "streamed LoRA merge" in str(e.value)


def test_save_without_export_checksums_every_file_on_the_writing_rank(model_dir, tmp_path):
    """export_hf=False: no huggingface/; the files save() reports are every file it wrote, so the
    manifest's digests all come from the writer (none is read again) and verify."""
    t = _trainer(model_dir, "model.lora_rank=8")
    reported = {}

    def fill(tmp):
        reported.update(ck.describe(t.save(str(tmp), export_hf=False), tmp))
        return reported

    ckpt = ck.write(tmp_path / "ckpt", 1, fill)
    assert not (ckpt / "huggingface").exists()
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert (
        set(reported)
        == set(manifest["files"])
        >= {
            "actor/.metadata",
            "actor/__0_0.distcp",
            "actor/extra_state.pt",
            "actor/lora_adapter/adapter_model.safetensors",
        }
    )
    assert ck.verify(ckpt) is None


def test_eval_of_a_checkpoint_without_export_is_one_line_naming_the_key(tmp_path, capsys):
    from flows.cli import main

    step = tmp_path / "ckpt" / "global_step_2"
    (step / "actor").mkdir(parents=True)
    with pytest.raises(SystemExit) as e:
        main(["eval", str(step)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert str(step) in err and "trainer.export_hf=every_save" in err


def test_host_peak_is_the_peak_since_the_last_reading():
    host_peak_gb(reset=True)
    before = host_peak_gb(reset=True)
    x = np.ones(512 * 2**20 // 8)  # 512 MiB, touched
    peak = host_peak_gb(reset=True)
    del x
    host_peak_gb(reset=True)
    after = host_peak_gb()
    assert peak - before > 0.45 and peak - after > 0.45, (before, peak, after)


def _save_on_rank(rank, port, tmp, model_dir):
    from engines.trainer import init_distributed

    init_distributed(rank, 2, ("127.0.0.1", port), "cpu")
    t = _trainer(model_dir, "trainer.n_gpus_per_node=2", "actor.ppo_micro_batch_size_per_gpu=2")
    entries = ck.describe(t.save(f"{tmp}/ck"), Path(f"{tmp}/ck"))
    Path(f"{tmp}/rank{rank}.json").write_text(json.dumps(entries))


@pytest.mark.slow  # two processes, each loading torch and a model: ~45 s on 2 cores
def test_two_ranks_each_digest_exactly_the_files_they_wrote(model_dir, tmp_path):
    """Two gloo ranks save: rank 1 reports its DCP shard only, rank 0 the rest; together every file."""
    import torch.multiprocessing as mp

    mp.spawn(_save_on_rank, args=(free_port(), str(tmp_path), model_dir), nprocs=2)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert set(r1) == {"actor/__1_0.distcp"} and not set(r0) & set(r1)
    on_disk = {str(p.relative_to(tmp_path / "ck")) for p in (tmp_path / "ck").rglob("*") if p.is_file()}
    assert set(r0) | set(r1) == on_disk and "huggingface/model.safetensors" in r0
