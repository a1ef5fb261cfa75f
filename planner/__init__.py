"""`grpo plan`: per-GPU memory, FLOPs and step time of a recipe, and the host RAM of a rank and a
node, from config numbers alone (no CUDA, no weights, no network; never runs on a worker).

    memory.py    what one GPU holds, item by item (trainer state, activations, logits, vLLM)
    host.py      what one rank and one node hold in host RAM (offload, vLLM asleep, load peak)
    timing.py    FLOPs and seconds per stage
    hardware.py  the GPU table and the FLOP count, shared with the trainer's perf/mfu/actor
    shapes.py    the model's shape: config.json, a preset, or a published hub config
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from configs.schema import GRPOConfig
from configs.text import count
from engines.models import head_split_problem
from planner.hardware import gpu_of
from planner.host import RAY_MEMORY_THRESHOLD, format_host, host_memory
from planner.memory import (
    LOGIT_BYTES,
    TRAINER_IMPLEMENTS,
    LogitBytes,
    gpu_memory,
    largest_micro_batch,
)
from planner.shapes import Shape, model_shape
from planner.timing import ASSUMED_BW_EFF, ASSUMED_MFU, step_timing

MODELLED_STRATEGIES = ("fsdp", "fsdp2")
"""The actor.strategy values whose memory the planner models (memory.py shards by FSDP only)."""


def shape_problems(cfg: GRPOConfig, shape: Shape) -> list[str]:
    """Head-count divisibility the config alone cannot check (it needs the model's shape): each
    one a reason the run would be refused at start-up, so the plan's verdict is INVALID."""
    uly = head_split_problem(
        "actor.ulysses_sequence_parallel_size", cfg.actor.ulysses_sequence_parallel_size, shape.heads, shape.kv_heads
    )
    tp = head_split_problem(
        "rollout.tensor_model_parallel_size", cfg.rollout.tensor_model_parallel_size, shape.heads, shape.kv_heads
    )
    return [p for p in (uly, tp and f"{tp} (vLLM refuses it)") if p]


def largest_dividing(limit: int, total: int) -> int:
    """Largest d <= limit that divides total (0 if limit < 1): a micro-batch must divide the
    samples one GPU gets per mini-batch (configs/schema.py)."""
    return next((d for d in range(min(limit, total), 0, -1) if total % d == 0), 0)


def plan(
    cfg: GRPOConfig,
    gpu: str | None = None,
    *,
    as_configured: bool = False,
    micro_batch: int | None = None,
    fsdp: bool | None = None,
    features: dict | None = None,
    logit_bytes: LogitBytes = LOGIT_BYTES,
) -> dict[str, Any]:
    """Every number of the plan, as a dict (GiB, seconds, FLOPs): for tables and for benchmarks.

    gpu: a GPUS name (default: from the recipe's name, else H100). as_configured: every feature on.
    features: what the trainer implements, over TRAINER_IMPLEMENTS (benchmarks/plan_check.py plans
    older trainers so). logit_bytes: the trainer's logits bytes per element (likewise). Raises
    ValueError for a model shape or GPU it does not know."""
    features_now = (
        {k: True for k in TRAINER_IMPLEMENTS} if as_configured else {**TRAINER_IMPLEMENTS, **(features or {})}
    )
    shape, shape_src = model_shape(cfg)
    gpu_spec, gpu_src = gpu_of(cfg, gpu)
    actor = cfg.actor
    micro = micro_batch or actor.ppo_micro_batch_size_per_gpu
    if micro_batch is None and features_now["dynamic_bsz"] and actor.use_dynamic_bsz:
        # The trainer's budget counts padded tokens, rows x (longest prompt + longest response)
        # (engines/batching.py): at full-length samples, as planned here, that many rows (>= 1, the
        # config checks). Shorter prompts let more rows in, so the response logits (rows x R x vocab)
        # of a real micro-batch can exceed this plan's.
        micro = (
            actor.ppo_max_token_len_per_gpu
            * actor.ulysses_sequence_parallel_size
            // (cfg.data.max_prompt_length + cfg.rollout.max_response_length)
        )
    mem = gpu_memory(cfg, shape, gpu_spec, features_now, micro, fsdp, logit_bytes=logit_bytes)
    host = host_memory(cfg, shape, mem["shard"])
    gpu_fits = mem.pop("fits")
    fits = gpu_fits and host["host_fits"]
    problems = shape_problems(cfg, shape)
    modelled = actor.strategy in MODELLED_STRATEGIES
    per_gpu = actor.ppo_mini_batch_size * cfg.rollout.n * actor.ulysses_sequence_parallel_size // cfg.world_size
    largest = largest_micro_batch(cfg, shape, gpu_spec, features_now, logit_bytes=logit_bytes)
    return dict(
        verdict="NOT MODELLED" if not modelled else "INVALID" if problems else "FITS" if fits else "DOES NOT FIT",
        problems=problems,
        modelled=modelled,
        gpu_fits=gpu_fits,
        fits=fits,
        **host,
        recipe=cfg.recipe,
        strategy=actor.strategy,
        requires=cfg.requires,
        mode="as-configured" if as_configured else "current trainer",
        features=features_now,
        gpu=asdict(gpu_spec),
        gpu_source=gpu_src,
        shape=asdict(shape),
        shape_source=shape_src,
        world_size=cfg.world_size,
        tp=cfg.rollout.tensor_model_parallel_size,
        micro_batch=micro,
        samples_per_gpu_per_minibatch=per_gpu,
        largest_micro_batch=largest,
        # What ppo_micro_batch_size_per_gpu may be set to: fits and divides per_gpu (dynamic bsz: by tokens).
        largest_valid_micro_batch=largest if actor.use_dynamic_bsz else largest_dividing(largest, per_gpu),
        **mem,
        **step_timing(cfg, shape, gpu_spec, mem, micro),
    )


def format_plan(result: dict[str, Any], other: dict[str, Any] | None = None) -> str:
    """The itemised table `grpo plan` prints."""
    gpu, shape = result["gpu"], result["shape"]
    lines = [
        f"plan: {result['recipe']} on {result['world_size']} x {gpu['name']} ({gpu['mem_gib']:.1f} GiB each; GPU from "
        f"{result['gpu_source']}), {result['mode']}",
        f"model: {result['n_params'] / 1e9:.3f}B params (hidden {shape['hidden']}, {shape['layers']} layers, "
        f"{shape['heads']}/{shape['kv_heads']} heads, inter {shape['intermediate']}, vocab {shape['vocab']}, "
        f"tied {shape['tie']}) from {result['shape_source']}; trainable {result['n_trainable'] / 1e6:.1f}M",
        f"batch: micro {result['micro_batch']} x {result['seq_len']} tokens (prompt + response, worst case: every sample at full length); "
        f"{result['samples_per_gpu_per_minibatch']} samples/GPU per mini-batch; rollout TP {result['tp']}",
        "",
        f"{'item':44s} {'phase':8s} {'GiB':>9s}  note",
        "-" * 100,
    ]
    for item in result["items"]:
        lines.append(f"{item['item']:44s} {item['phase']:8s} {item['gib']:9.2f}  {item['note']}")
    phases = result["trainer_phases_gib"]
    lines += [
        "-" * 100,
        f"{'trainer peak (max of update / log-prob / step)':53s} {result['trainer_peak_gib']:9.2f}  "
        f"update {phases['update']:.2f}, log-prob {phases['log_prob']:.2f}, optimizer step {phases['optimizer_step']:.2f}",
        f"{'vLLM budget (gpu_memory_utilization x GPU)':53s} {result['vllm_budget_gib']:9.2f}  "
        f"KV holds {result['kv_full_seqs']:.0f} full-length sequences",
        f"{'rollout phase':53s} {result['rollout_phase_gib']:9.2f}",
        f"{'training phase':53s} {result['train_phase_gib']:9.2f}",
        f"{'PEAK per GPU':53s} {result['peak_gib']:9.2f}  of {gpu['mem_gib']:.1f} GiB; "
        f"torch.cuda.max_memory_allocated would read ~{result['torch_max_allocated_gib']:.2f}",
    ]
    lines += format_host(result)
    verdict = result["verdict"]
    why = list(result["problems"])
    if not result["modelled"]:
        why.append(f"actor.strategy={result['strategy']} is not modelled by the planner")
    if not result["vllm_kv_ok"]:
        why.append("vLLM weights + activations exceed its budget: no KV cache")
    if not result["vllm_init_ok"]:
        why.append("vLLM's budget is more than the memory left after the trainer loads")
    if not result["gpu_fits"] and result["vllm_kv_ok"] and result["vllm_init_ok"]:
        why.append("GPU peak over the GPU's memory")
    if not result["host_fits"]:
        why.append(
            f"host: {result['host_node_gib']:.1f} GiB per node over {result['node_ram_gib']:.1f} GiB x "
            f"{RAY_MEMORY_THRESHOLD:.0%}: turn actor.param_offload/optimizer_offload off where the GPU "
            "has room, fewer ranks per node, or a node with more RAM (trainer.node_ram_gb)"
        )
    lines.append(
        f"verdict: {verdict}"
        + (f" ({'; '.join(why)})" if why else "")
        + f"; largest ppo_micro_batch_size_per_gpu that fits: {result['largest_micro_batch']}"
        + (
            f" (the largest that also divides the {result['samples_per_gpu_per_minibatch']} samples/GPU per mini-batch: "
            f"{result['largest_valid_micro_batch']})"
            if result["largest_valid_micro_batch"] != result["largest_micro_batch"]
            else ""
        )
    )
    if other is not None:
        lines.append(
            f"  {other['mode']}: peak {other['peak_gib']:.2f} GiB, "
            f"{'fits' if other['fits'] else 'does not fit'}, largest micro-batch {other['largest_micro_batch']}"
            f" (FSDP shard {other['shard']}, offload/empty_cache as configured)"
        )
    if not result["modelled"]:
        lines.append(
            f"note: actor.strategy={result['strategy']} is not modelled by the planner: the numbers above are an "
            "unsharded replica per GPU (no tensor or pipeline parallelism), not what that backend would hold"
        )
    if result["requires"]:
        lines.append(f"note: this recipe cannot run in this build: {result['requires']}")
    seconds, flops = result["time_s"], result["flops"]
    lines += [
        "",
        f"{'stage':16s} {'TFLOP (all GPUs)':>17s} {'est. s':>9s}   "
        f"(MFU {ASSUMED_MFU:.0%} of {gpu['bf16_tflops']:.0f} TFLOP/s, decode at {ASSUMED_BW_EFF:.0%} of "
        f"{gpu['hbm_tbs']} TB/s)",
    ]
    for k, v in seconds.items():
        lines.append(f"{k:16s} {flops.get(k, 0) / 1e12:17.1f} {v:9.3f}")
    lines.append(
        f"gen: {result['gen_concurrency']} sequences at a time per engine, {count(result['gen_waves'], 'wave')}; "
        f"worst case (every response at max length); update MFU as perf/mfu/actor "
        f"~{result['predicted_mfu_update']:.0%}"
    )
    return "\n".join(lines)
