"""A group of GRPOWorker Ray actors, one per rank, placed together; dispatch a batch, gather results.

The controller calls these methods as if there were one worker: lists are cut into contiguous,
equal shares (one per rank, or per rollout engine), sent out, and gathered back in order.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from configs.schema import GRPOConfig


def split(items: list, parts: int) -> list[list]:
    """Contiguous shares, sizes differing by at most one, order kept."""
    k, m = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + k + (1 if i < m else 0)
        out.append(items[start:end])
        start = end
    return out


def init_ray() -> None:
    """Local Ray by default; an existing cluster when RAY_ADDRESS is set."""
    import ray

    if ray.is_initialized():
        return
    env = {"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false",
                        # vLLM's per-call INFO lines drown the step summaries; set it to INFO to see them.
                        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=env, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, runtime_env=env, log_to_driver=True,
                 num_cpus=max(2, os.cpu_count() or 1))


def local_gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def check_resources(cfg: GRPOConfig) -> None:
    """Fail within seconds, naming both numbers, when the cluster is smaller than the recipe."""
    import ray

    if cfg.trainer.device != "cuda":
        return
    have = int(ray.cluster_resources().get("GPU", 0))
    need = cfg.world_size
    if have < need:
        raise RuntimeError(
            f"recipe '{cfg.recipe}' needs {need} GPUs (trainer.n_gpus_per_node={cfg.trainer.n_gpus_per_node} x "
            f"trainer.nnodes={cfg.trainer.nnodes}) but the Ray cluster has {have}; run it on a larger cluster "
            f"(RAY_ADDRESS) or lower trainer.n_gpus_per_node")


class WorkerGroup:
    def __init__(self, cfg: GRPOConfig, model_dir: str):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from engines.worker import GRPOWorker

        init_ray()
        check_resources(cfg)
        self.cfg, self.world_size = cfg, cfg.world_size
        gpu = cfg.trainer.device == "cuda"
        bundle = {"GPU": 1, "CPU": 1} if gpu else {"CPU": 1}
        self.pg = placement_group([bundle] * self.world_size,
                                  strategy="PACK" if cfg.trainer.nnodes == 1 else "SPREAD")
        ray.get(self.pg.ready(), timeout=120)
        actor_cls = ray.remote(GRPOWorker)
        self.workers = [
            actor_cls.options(
                num_cpus=1, num_gpus=1 if gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=rank),
            ).remote(cfg.model_dump_json(), model_dir, rank, self.world_size)
            for rank in range(self.world_size)
        ]
        ray.get([w.ready.remote() for w in self.workers])  # surfaces a failed start here, by rank

    # ---- helpers ----------------------------------------------------------------------------
    def _all(self, method: str, *args, **kwargs) -> list[Any]:
        import ray

        return ray.get([getattr(w, method).remote(*args, **kwargs) for w in self.workers])

    def _scatter(self, method: str, shares: list[tuple], **kwargs) -> list[Any]:
        import ray

        return ray.get([getattr(w, method).remote(*args, **kwargs) for w, args in zip(self.workers, shares)])

    # ---- what the flow asks for ---------------------------------------------------------------
    def generate(self, prompts: list[list[int]], sampling: dict) -> list[dict]:
        """Data-parallel rollout: one share of prompts per engine, results in prompt order."""
        engines = self.world_size // self.cfg.rollout.tensor_model_parallel_size
        shares = split(list(range(len(prompts))), engines)
        seeds = sampling["seeds"]
        outs = self._scatter("generate", [([prompts[i] for i in s], {**sampling, "seeds": [seeds[i] for i in s]})
                                          for s in shares])
        merged = []
        for share, out in zip(shares, outs):
            for row in out:
                merged.append({**row, "prompt_index": share[row["prompt_index"]]})
        return merged

    def compute_log_prob(self, prompts, responses, ref: bool = False) -> list[np.ndarray]:
        idx = split(list(range(len(prompts))), self.world_size)
        outs = self._scatter("compute_log_prob",
                             [([prompts[i] for i in s], [responses[i] for i in s]) for s in idx], ref=ref)
        return [x for out in outs for x in out]

    def update_actor(self, batch: dict, seed: int) -> dict[str, float]:
        idx = split(list(range(len(batch["prompts"]))), self.world_size)
        shares = [({k: (None if v is None else [v[i] for i in s]) for k, v in batch.items()},) for s in idx]
        metrics = self._scatter("update_actor", shares, seed=seed)
        return {k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]}

    def sync_weights(self) -> float:
        return max(self._all("sync_weights"))

    def save_checkpoint(self, ckpt_dir: str) -> None:
        self._all("save_checkpoint", ckpt_dir)

    def load_checkpoint(self, ckpt_dir: str) -> None:
        self._all("load_checkpoint", ckpt_dir)

    def memory_gb(self) -> float:
        return max(self._all("memory_gb"))

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for w in self.workers:
            ray.kill(w)
        remove_placement_group(self.pg)
