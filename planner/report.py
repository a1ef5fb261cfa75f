"""`grpo plan`'s printed table: GPU items and phases, host items, verdict, FLOPs and seconds."""

from __future__ import annotations

from typing import Any

from configs.text import count
from planner.host import RAY_AND_DRIVER_GIB, RAY_MEMORY_THRESHOLD
from planner.timing import ASSUMED_BW_EFF, ASSUMED_MFU


def format_layout(layout: dict[str, Any]) -> str:
    """The Megatron layout line: TP x DP and the switches that change the memory."""
    switches = [
        name
        for name, on in (("bf16 autocast on fp32 weights", layout["autocast"]), ("full recompute", layout["recompute"]))
        if on
    ]
    offloaded = [name for name in ("param", "optimizer") if layout[f"{name}_offload"]]
    return (
        f"trainer: Megatron TP {layout['tensor_parallel']} x DP {layout['data_parallel']}"
        + "".join(f", {switch}" for switch in switches)
        + (f"; offloaded between uses: {', '.join(offloaded)}" if offloaded else "")
    )


def format_plan(result: dict[str, Any], other: dict[str, Any] | None = None) -> str:
    """The itemised table `grpo plan` prints for one plan() result; other: the plan in the other
    mode (current trainer / as configured), summarised in one line."""
    gpu, shape, layout = result["gpu"], result["shape"], result.get("megatron")
    per = "data-parallel rank" if layout else "GPU"  # Megatron: the TP GPUs of a replica share its samples
    lines = [
        f"plan: {result['recipe']} on {result['world_size']} x {gpu['name']} ({gpu['mem_gib']:.1f} GiB each; GPU from "
        f"{result['gpu_source']}), {result['mode']}",
        f"model: {result['n_params'] / 1e9:.3f}B params (hidden {shape['hidden']}, {shape['layers']} layers, "
        f"{shape['heads']}/{shape['kv_heads']} heads, inter {shape['intermediate']}, vocab {shape['vocab']}, "
        f"tied {shape['tie']}) from {result['shape_source']}; trainable {result['n_trainable'] / 1e6:.1f}M",
        f"batch: micro {result['micro_batch']} x {result['seq_len']} tokens (prompt + response, worst case: every sample at full length); "
        f"{result['samples_per_gpu_per_minibatch']} samples/{per} per mini-batch; "
        f"rollout TP {result['tp']}",
        *([format_layout(layout)] if layout else []),
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
        f"KV holds {int(result['kv_full_seqs'])} full-length sequences",  # whole ones, as gen counts them
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
        if result["vllm_awake"]:
            why.append(
                f"vLLM stays awake (rollout.free_cache_engine=false), so its {result['vllm_budget_gib']:.1f} GiB "
                "stay beside the trainer: set rollout.free_cache_engine=true or lower rollout.gpu_memory_utilization"
            )
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
            f" (the largest that also divides the {result['samples_per_gpu_per_minibatch']} samples/{per} per mini-batch: "
            f"{result['largest_valid_micro_batch']})"
            if result["largest_valid_micro_batch"] != result["largest_micro_batch"]
            else ""
        )
    )
    if other is not None:
        lines.append(
            f"  {other['mode']}: peak {other['peak_gib']:.2f} GiB, "
            f"{'fits' if other['fits'] else 'does not fit'}, largest micro-batch {other['largest_micro_batch']}"
            + (
                " (Megatron layout and offload as configured)"
                if layout
                else f" (FSDP shard {other['shard']}, offload/empty_cache as configured)"
            )
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
    for stage, stage_seconds in seconds.items():
        lines.append(f"{stage:16s} {flops.get(stage, 0) / 1e12:17.1f} {stage_seconds:9.3f}")
    lines.append(
        f"gen: {result['gen_concurrency']} sequences at a time per engine, {count(result['gen_waves'], 'wave')}; "
        f"worst case (every response at max length); update MFU as perf/mfu/actor "
        f"~{result['predicted_mfu_update']:.0%}"
    )
    return "\n".join(lines)


def format_host(result: dict[str, Any]) -> list[str]:
    """The host part of `grpo plan`'s table."""
    lines = ["", f"{'host memory, per rank':44s} {'GiB':>9s}  note", "-" * 100]
    for item in result["host_items"]:
        lines.append(f"{item['item']:44s} {item['gib']:9.2f}  {item['note']}")
    lines += [
        "-" * 100,
        f"{'per rank (max of steady / load peak)':44s} {result['host_per_rank_gib']:9.2f}  "
        f"steady {result['host_steady_gib']:.2f}, load {result['host_load_gib']:.2f}",
        f"{'PER NODE':44s} {result['host_node_gib']:9.2f}  {count(result['host_ranks_per_node'], 'rank')} + "
        f"{RAY_AND_DRIVER_GIB:.0f} GiB Ray/driver, of {result['node_ram_gib']:.1f} GiB ({result['node_ram_source']}); "
        f"Ray kills workers past {RAY_MEMORY_THRESHOLD:.0%}",
    ]
    return lines
