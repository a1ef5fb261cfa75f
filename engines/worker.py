"""One GPU (or CPU) rank: trainer + colocated vLLM engine, for the whole run.

The controller never sees tensors or devices: it sends token-id lists and numbers, and gets
back the same. Every method here is one thing the flow asks for.
"""
from __future__ import annotations

import os
import resource
import time

import numpy as np
import torch

from configs.schema import GRPOConfig


class GRPOWorker:
    def __init__(self, cfg_json: str, model_dir: str, rank: int, world_size: int):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self.cfg = GRPOConfig.model_validate_json(cfg_json)
        self.rank, self.world_size = rank, world_size
        device = self.cfg.trainer.device
        if device == "cpu":
            # Ray pins actors to one thread; the trainer and vLLM-CPU want every core they have.
            torch.set_num_threads(max(1, os.cpu_count() or 1))
        torch.manual_seed(self.cfg.trainer.seed + rank)
        from engines.rollout import VLLMRollout
        from engines.trainer import ActorTrainer

        self.trainer = ActorTrainer(self.cfg, model_dir, "cuda" if device == "cuda" else "cpu")
        # vLLM first reserves its share of memory, then sleeps while the trainer works.
        self.rollout = VLLMRollout(self.cfg, model_dir, device)
        self.rollout.sleep()

    def ready(self) -> dict:
        return {"rank": self.rank, "n_params": self.trainer.n_params, "pid": os.getpid()}

    def generate(self, prompts: list[list[int]], sampling: dict) -> list[dict]:
        return self.rollout.generate(prompts, **sampling)

    def compute_log_prob(self, prompts, responses, ref: bool = False) -> list[np.ndarray]:
        return self.trainer.compute_log_prob(prompts, responses, ref=ref)

    def update_actor(self, batch: dict, seed: int) -> dict[str, float]:
        return self.trainer.update(batch, seed)

    def sync_weights(self) -> float:
        """Push the trainer's new weights (or LoRA adapter) into vLLM; returns seconds taken."""
        t0 = time.perf_counter()
        if self.trainer.is_lora:
            self.rollout.load_adapter(self.trainer.save_adapter)
        else:
            self.rollout.load_weights(self.trainer.full_state_for_rollout())
        if self.cfg.trainer.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def save_checkpoint(self, ckpt_dir: str) -> None:
        if self.rank == 0:
            self.trainer.save(ckpt_dir)

    def load_checkpoint(self, ckpt_dir: str) -> None:
        self.trainer.load(ckpt_dir)
        self.sync_weights()

    def memory_gb(self) -> float:
        """Peak accelerator memory (CUDA) or peak resident memory of this process (CPU)."""
        if self.cfg.trainer.device == "cuda":
            return torch.cuda.max_memory_allocated() / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
