"""What a save writes and what reads it: the LoRA export merged in fp32 (issue 13 fault 8), a save
without the HF export whose ranks checksum their own files, `grpo eval` of a checkpoint without
an export, and the per-step host memory peak."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from configs.load import load_config
from engines.trainer.fsdp import FSDPTrainer
from engines.worker import host_peak_gb
from runtime import checkpoints as ck
from tests.conftest import free_port

RANK, ALPHA = 8, 16
Q = "model.layers.0.self_attn.q_proj.weight"


def _trainer(model_dir, *overrides):
    cfg = load_config("tiny-cpu", ["rollout.n=2", "actor.ppo_mini_batch_size=4", "trainer.device=cpu", *overrides])
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
