"""One GPU (or CPU) rank: trainer backend + colocated rollout engine, for the whole run.

The controller never sees tensors or devices: it sends token-id lists and numbers, and gets
back the same. Every method here is one thing the flow asks for; with several ranks the worker
group calls it on every rank at once (the sharded trainer's methods are collectives).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import resource
import socket
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from configs.schema import GRPOConfig
from engines.types import SamplingSpec, UpdateBatch


def master_address() -> tuple[str, int]:
    """This node's IP and a free port: where rank 0 hosts the process group's rendezvous."""
    import ray

    with socket.socket() as s:
        s.bind(("", 0))
        return ray.util.get_node_ip_address(), s.getsockname()[1]


def gpu_stage(method):
    """Run a GRPOWorker method inside its _gpu_stage (the GPU peak tracking); nested calls count once."""

    @functools.wraps(method)
    def tracked(self, *args, **kwargs):
        if self._in_stage:
            return method(self, *args, **kwargs)
        with self._gpu_stage():
            return method(self, *args, **kwargs)

    return tracked


# vLLM lines that say nothing about this run, by the logger that writes them, each with why it is
# harmless here. Matched on the message's start, so every other warning (and every error) shows.
KNOWN_VLLM_NOISE = {
    # After every weight sync: rotary layers hold only their computed cos/sin cache, which no
    # checkpoint has; vLLM puts the cache back. A layer with real weights missing still warns.
    "vllm.model_executor.model_loader.reload.layerwise": [r"\w*RotaryEmbedding: Failed to load weights"],
    # vLLM-CPU on a machine without triton-cpu / tcmalloc / iomp: notes on speed, not on results.
    "vllm.triton_utils.importing": [r"Triton is installed, but doesn't include CPU backend"],
    "vllm.platforms.cpu": [r"Triton is not installed", r"Reset SSM cache type"],
    "vllm.v1.worker.cpu_worker": [
        r"lib(tcmalloc|iomp) is not found in LD_PRELOAD",
        r"CPU backend doesn't allow to use `torch.set_num_threads`",
    ],
    # What the recipe asked for (enforce_eager) and what the flow does (a seed per request).
    "vllm.config.vllm": [
        r"Model Runner V2 requires Triton",
        r"Enforce eager set",
        r"Inductor compilation was disabled",
    ],
    "vllm.engine.arg_utils": [r"The global random seed is set"],
}


class KnownNoise(logging.Filter):
    """Drops records whose message starts with one of `patterns` (regexes)."""

    def __init__(self, patterns: list[str]):
        """patterns: regexes matched at the start of a record's message."""
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        """False (drop) when the message matches one of the patterns."""
        return not self.pattern.match(record.getMessage())


def quiet_known_noise() -> None:
    """In a worker process, before vLLM starts: filter KNOWN_VLLM_NOISE on the loggers that write
    it (logger filters survive vLLM's logging setup, which replaces its handlers when an engine
    starts), drop the deprecation warning vLLM's own imports raise and transformers' load bars."""
    for name, patterns in KNOWN_VLLM_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, KnownNoise) for f in logger.filters):
            logger.addFilter(KnownNoise(patterns))
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.reduce_op` is deprecated", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars of every model load, through Ray's log


class GRPOWorker:
    """One rank: a trainer backend (build_trainer, actor.strategy), a rollout engine (build_rollout,
    rollout.name) and the weight sync between them. Called by the worker group on every rank at
    once; no tensor crosses this interface."""

    def __init__(
        self, cfg_json: str, model_dir: str, rank: int, world_size: int, master: tuple[str, int] | None = None
    ):
        """cfg_json: the GRPOConfig as JSON; model_dir: the HF model dir every rank loads; rank,
        world_size: this rank's place; master: rank 0's (address, port) for the process group
        (master_address), None on one rank. Joins the process group, builds the trainer (offloaded
        before vLLM sizes its share of the GPU), then the rollout engine, asleep. Raises what the
        factories raise (ValueError for an unknown actor.strategy or rollout.name)."""
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        quiet_known_noise()
        self.cfg = GRPOConfig.model_validate_json(cfg_json)
        self.rank, self.world_size = rank, world_size
        device = self.cfg.trainer.device
        if device == "cpu":
            # Ray pins actors to one thread; the trainer and vLLM-CPU want their share of the
            # node's cores (vLLM-CPU freezes the thread count once it starts).
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.cfg.trainer.n_gpus_per_node))
        from engines.rollout import build_rollout
        from engines.trainer import build_trainer, init_distributed
        from engines.weight_sync import WeightSync

        if world_size > 1:  # before vLLM, which then runs as one external data-parallel rank
            init_distributed(rank, world_size, master, device, self.cfg.trainer.collective_timeout_s)
        torch.manual_seed(self.cfg.trainer.seed)  # the same on every rank: LoRA inits must agree
        self.trainer = build_trainer(self.cfg, model_dir)
        self.trainer.to_host()  # before vLLM sizes its share of the GPU
        # vLLM first reserves its share of memory, then sleeps while the trainer works.
        self.rollout = build_rollout(self.cfg, model_dir, rank)
        self.sync = WeightSync(self.trainer, self.rollout)
        self.sync.sleep()
        self._gpu_peak, self._in_stage = 0.0, False
        host_peak_gb(reset=True)

    def ready(self) -> dict:
        """Once built: rank, parameter count, process id and Ray node id (the group's start check)."""
        import ray

        return {
            "rank": self.rank,
            "n_params": self.trainer.n_params,
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
        }

    @gpu_stage
    def generate(self, prompts: list[list[int]], sampling: SamplingSpec | dict) -> list[dict]:
        """prompts: token ids; sampling: a SamplingSpec (a dict of its fields is taken too). Rows
        as RolloutEngine.generate returns them (engines/types.py GENERATED)."""
        spec = sampling if isinstance(sampling, SamplingSpec) else SamplingSpec(**sampling)
        self.sync.wake()  # the trainer's idle state makes room for the KV cache
        out = self.rollout.generate(prompts, **spec.as_kwargs())
        self.sync.sleep()
        return out

    @gpu_stage
    def compute_log_prob(self, prompts, responses, ref: bool = False) -> list[np.ndarray]:
        """TrainerBackend.compute_log_prob: per-token log-probs (nats), one float32 array per response."""
        self.trainer.to_device()
        return self.trainer.compute_log_prob(prompts, responses, ref=ref)

    @gpu_stage
    def update_actor(self, batch: UpdateBatch | dict, seed: int, steps: list | None = None) -> dict[str, float]:
        """TrainerBackend.update of this rank's share (a dict of UpdateBatch's fields is taken too)."""
        from runtime.killpoints import hang_point

        hang_point("update_actor", self.rank)  # fault injection (GRPO_HANG_AT), a no-op unless set
        self.trainer.to_device(optimizer=True)
        return self.trainer.update(batch if isinstance(batch, UpdateBatch) else UpdateBatch(**batch), seed, steps)

    @gpu_stage
    def sync_weights(self) -> float:
        """Push the trainer's new weights (or LoRA adapter) into the rollout engine; returns seconds taken."""
        t0 = time.perf_counter()
        self.sync.push()
        if self.cfg.trainer.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def save_checkpoint(self, ckpt_dir: str, export_hf: bool = True) -> dict[str, dict]:
        """Every rank writes its shards, rank 0 the rest (ckpt_dir must be on a filesystem every rank
        shares with the controller); each then fsyncs and checksums the files it wrote, in parallel
        with the others. Returns runtime/checkpoints.describe() of them: {path under ckpt_dir: {size,
        digest}}."""
        from runtime.checkpoints import describe

        with self._gpu_stage():
            # Offloaded state is written from its host copy (DCP would otherwise stage a second one
            # of the whole shard: engines/trainer/checkpoint.py); the gathers of the exports run on the GPU.
            self.trainer.to_host()
            files = self.trainer.save_state(ckpt_dir)
            self.trainer.to_device()
            files += self.trainer.save_exports(ckpt_dir, export_hf=export_hf)
        return describe(files, Path(ckpt_dir))

    @gpu_stage
    def load_checkpoint(self, ckpt_dir: str) -> None:
        """Restore the trainer from ckpt_dir (TrainerBackend.load), then push its weights to the engine."""
        self.trainer.to_device(optimizer=True)
        self.trainer.load(ckpt_dir)
        self.sync_weights()

    def close(self) -> None:
        """Before the actor is killed: remove what the engine left on disk (LoRA adapters)."""
        self.rollout.close()

    @contextmanager
    def _gpu_stage(self):
        """Track this GPU's peak over a stage: the device's used memory (torch.cuda.mem_get_info: every
        process and allocator on it, vLLM's CuMem pool and the CUDA context included) at the start plus
        the growth of torch's reserved memory during the stage, capped at the device's capacity; and
        the used memory at the end. torch's own counters are not used alone: they keep counting vLLM's
        pool while vLLM sleeps (167 GB read on a 141 GB H200, issue 12)."""
        if self.cfg.trainer.device != "cuda":
            yield
            return
        free, total = torch.cuda.mem_get_info()
        reserved = torch.cuda.memory_reserved()
        torch.cuda.reset_peak_memory_stats()
        self._in_stage = True
        try:
            yield
        finally:
            self._in_stage = False
            grown = torch.cuda.max_memory_reserved() - reserved
            free_end, _ = torch.cuda.mem_get_info()
            self._gpu_peak = max(self._gpu_peak, min(total, total - free + grown), total - free_end)

    def memory(self) -> dict[str, float]:
        """This rank's peaks since the previous call (then reset), in GiB: `gpu`, the device peak of
        _gpu_stage (on CPU the device is the host: the host peak), and `host`, this process's peak
        resident memory (trainer and in-process vLLM)."""
        host = host_peak_gb(reset=True)
        gpu, self._gpu_peak = self._gpu_peak / 2**30, 0.0
        return {"gpu": gpu if self.cfg.trainer.device == "cuda" else host, "host": host}


def host_peak_gb(reset: bool = False) -> float:
    """Peak resident memory of this process in GiB: Linux's VmHWM since the last reset (reset writes
    5 to /proc/self/clear_refs, proc(5)); where /proc lacks either, the lifetime peak (getrusage)."""
    try:
        with open("/proc/self/status") as f:
            hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
        if reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        return hwm / 2**30
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
