"""Tables from the benchmark JSONs, and the memory file the planner check reads.

    python benchmarks/summarize.py RESULTS_DIR [--brief] [--memory-out benchmarks/results/gpu_memory.json]

Reads every engine-*.json (engine_bench.py), flow-*.json (flow_breakdown.py) and
determinism.json under RESULTS_DIR (any depth) and prints one table per benchmark.
--memory-out writes, per measured configuration, the settings the planner needs and the measured
peaks: torch.cuda.max_memory_allocated of the worker process (trainer + in-process vLLM),
vLLM's reservation (gpu_memory_utilization x total) and nvidia-smi's peak used memory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ARCH_SIZE = {"tiny": 0, "0.5b": 1, "1.5b": 2, "3b": 3, "7b": 4, "14b": 5}


def load(root: Path, pattern: str) -> list[tuple[Path, dict]]:
    out = []
    for f in sorted(root.rglob(pattern)):
        try:
            out.append((f, json.loads(f.read_text())))
        except (ValueError, OSError):
            pass
    return out


def f(x, spec=".3g", none="-"):
    if x is None:
        return none
    try:
        return format(x, spec)
    except (TypeError, ValueError):
        return str(x)


def engine_rows(root: Path):
    rows = {}
    for path, d in load(root, "engine-*.json"):
        key = (d.get("arch"), d.get("mode"))
        old = rows.get(key)
        # several runs of one configuration (p1, then p3): keep the one with the most parts
        score = sum(p in d for p in ("rollout", "sync", "train"))
        if old is None or score >= old[0]:
            rows[key] = (score, path, d)
    return [v[1:] for k, v in sorted(rows.items(), key=lambda kv: (ARCH_SIZE.get(kv[0][0], 9), kv[0][1]))]


def safe(items, body):
    """Run body(path, data) per item; a malformed file prints its error instead of ending the summary."""
    for pth, d in items:
        try:
            body(pth, d)
        except Exception as e:  # noqa: BLE001
            print(f"   ({pth.name}: cannot summarise: {type(e).__name__}: {e})")


def _physical_peak(t: dict):
    b = t.get("mem_before") or {}
    if "max_memory_allocated_gib" not in t or "allocated_gib" not in b:
        return None
    return t["max_memory_allocated_gib"] - b["allocated_gib"] + b["device_used_gib"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("--brief", action="store_true")
    p.add_argument("--memory-out")
    a = p.parse_args()
    root = Path(a.root)
    engines = engine_rows(root)
    flows = [(pth, d) for pth, d in load(root, "flow-*.json") if "det" not in pth.parent.name]
    dets = load(root, "determinism.json")

    def rollout(pth, d):
        r = d.get("rollout")
        if not r:
            return
        t = r["tok_s"]
        print(
            f"{d['arch']} {d['mode']}: prompts {r['prompts']} x n {r['n']} x {r['max_tokens']} tok; "
            + ", ".join(f"{k} {v:.0f}" for k, v in t.items())
            + f"; ours/bare {r['ratio_ours_vs_bare']:.3f} (rounds {[round(x, 3) for x in r['ratio_per_round']]})"
        )
        for i, rnd in enumerate(r["rounds"]):
            o = rnd["ours"]
            print(
                f"   round {i}: ours {o['seconds']:.2f} s = "
                + ", ".join(f"{k} {v:.3f}" for k, v in o["pieces_s"].items())
                + "; "
                + ", ".join(f"{k} {v['seconds']:.2f} s" for k, v in rnd.items() if k != "ours")
            )

    def sync(pth, d):
        s = d.get("sync")
        if not s:
            return
        reps = s["reps"]
        if s["mode"] == "full":
            for lv in sorted({r.get("level", 1) for r in reps}):
                rs = [r for r in reps if r.get("level", 1) == lv]
                split = "".join(
                    f" | {k} " + " ".join(f(r[k]) for r in rs)
                    for k in ("wake_weights_s", "reload_s")
                    if all(k in r for r in rs)
                )
                print(
                    f"{d['arch']} full, sleep level {lv}: sync "
                    + " ".join(f(r["sync_s"]) for r in rs)
                    + split
                    + " | sleep "
                    + " ".join(f(r.get("sleep_s", r.get("sleep_offload_s"))) for r in rs)
                    + f" | {s['state_bytes_bf16'] / 1e9:.2f} GB bf16"
                )
        else:
            print(
                f"{d['arch']} lora: save "
                + " ".join(f(r["save_adapter_s"]) for r in reps)
                + " | vllm load "
                + " ".join(f(r["vllm_adapter_load_s"]) for r in reps)
                + " | total "
                + " ".join(f(r["total_s"]) for r in reps)
                + f" | adapter {s['adapter_params'] / 1e6:.1f} M params"
            )

    def train(pth, d):
        t = d.get("train")
        if not t:
            errs = [e["error"][:120] for e in d.get("errors", []) if e.get("part") == "train"]
            if "train" in d.get("parts", []):
                print(
                    f"{d['arch']} {d['mode']}: no train result (rc {d.get('returncode')}, {errs or d.get('init_oom')})"
                )
            return
        ups = [u for u in t["updates"] if not u["warmup"]]
        print(
            f"{d['arch']} {d['mode']}: {t['samples']} seqs, {t['tokens']} tok/update, N={t['n_params'] / 1e9:.3f} B "
            f"(trainable {t['trainable_params'] / 1e6:.1f} M); tok/s {f(t.get('tok_s'), '.0f')}; MFU {f(t.get('mfu'), '.3f')}"
            f" (per update {[round(u['mfu'] or 0, 3) for u in ups]}, trainer's own {[round(u['trainer_mfu'] or 0, 3) for u in ups]});"
            f" log-prob fwd {f(t.get('log_prob', {}).get('tok_s'), '.0f')} tok/s; peak alloc {f(t.get('max_memory_allocated_gib'), '.1f')} GiB"
            + (f"; OOM at {t['oom']['stage']}: {t['oom']['message'][:150]}" if t.get("oom") else "")
        )

    def flow(pth, d):
        c = d.get("config", {})
        print(
            f"{pth.name}: {c.get('arch')} lora_rank {c.get('lora_rank')} batch {c.get('train_batch_size')}x{c.get('n')} "
            f"resp {c.get('max_response_length')} micro {c.get('ppo_micro_batch_size_per_gpu')} rc {d.get('returncode')} "
            f"wall {f(d.get('flow_wall_s'), '.0f')} s; peak alloc {f(d.get('max_memory_allocated_gib'), '.1f')} GiB; "
            f"smi peak {f(d.get('nvidia_smi_peak_used_gib'), '.1f')} GiB; vLLM reservation {f(d.get('vllm_reservation_gib'), '.1f')} GiB"
        )
        for s in d.get("steps", []):
            m = s["metrics"]
            keys = sorted(k for k in m if k.startswith("timing_s/"))
            print(
                f"   step {s['step']}: "
                + ", ".join(f"{k[9:]} {m[k]:.2f}" for k in keys)
                + f"; throughput {f(m.get('perf/throughput'), '.0f')} tok/s; mfu {f(m.get('perf/mfu/actor'), '.3f')};"
                f" overhead {s['overhead_ms']:.0f} ms = {100 * s['overhead_share_of_step']:.2f}% "
                f"(prefect {1000 * s['prefect_task_overhead_s']:.0f} ms, mlflow {1000 * s['tracker_log_s']:.0f} ms)"
            )
        if d.get("error"):
            print(f"   error: {d['error'][:300]}")

    def det(pth, d):
        print(
            f"{pth}: runs "
            + ", ".join(f"{k} rc={v['returncode']} {v.get('resumed_log')}" for k, v in d.get("runs", {}).items())
        )
        for k, v in d.get("compare", {}).items():
            print(f"   {k}: {v}")

    for title, items, body in (
        ("rollout vs bare vLLM (tok/s)", engines, rollout),
        ("weight sync (s)", engines, sync),
        ("trainer (ActorTrainer.update)", engines, train),
        ("flow step breakdown", flows, flow),
        ("determinism", dets, det),
    ):
        print(f"## {title}")
        safe(items, body)

    if a.memory_out:
        rows = []
        for pth, d in flows:
            if not d.get("steps"):
                continue
            rows.append(
                {
                    "kind": "flow",
                    **d.get("config", {}),
                    "result_file": pth.name,
                    "recipe": d["recipe"],
                    "overrides": d["overrides"],
                    "gpu": d.get("env", {}).get("gpu"),
                    "gpu_total_gib": d.get("gpu_total_gib"),
                    "vllm_reservation_gib": d.get("vllm_reservation_gib"),
                    "steps_done": len(d["steps"]),
                    "finished": d.get("returncode") == 0,
                    "max_memory_allocated_gib": max(
                        s["metrics"].get("perf/max_memory_allocated_gb", 0) for s in d["steps"]
                    ),
                    "nvidia_smi_peak_used_gib": d.get("nvidia_smi_peak_used_gib"),
                    "note": "max_memory_allocated of the Ray worker (trainer + in-process vLLM), max over the "
                    "run's steps (perf/max_memory_allocated_gb); it already counts vLLM's pool (weights + KV "
                    "cache, about the reservation) whether awake or asleep: do not add the reservation again",
                }
            )
        for pth, d in dets:
            for name, run in d.get("runs", {}).items():
                fj = Path(run["json"])
                alt = pth.parent / "det" / fj.name
                fj = fj if fj.is_file() else alt
                if fj.is_file():
                    fd = json.loads(fj.read_text())
                    if fd.get("steps"):
                        rows.append(
                            {
                                "kind": "flow",
                                **fd.get("config", {}),
                                "result_file": f"{pth.parent.name}/det/{fj.name}",
                                "recipe": fd["recipe"],
                                "overrides": fd["overrides"],
                                "gpu": fd.get("env", {}).get("gpu"),
                                "gpu_total_gib": fd.get("gpu_total_gib"),
                                "vllm_reservation_gib": fd.get("vllm_reservation_gib"),
                                "max_memory_allocated_gib": fd.get("max_memory_allocated_gib"),
                                "nvidia_smi_peak_used_gib": fd.get("nvidia_smi_peak_used_gib"),
                            }
                        )
        for pth, d in engines:
            t = d.get("train")
            if not t:
                continue
            rows.append(
                {
                    "kind": "trainer_update",
                    "result_file": pth.name,
                    "recipe": d.get("recipe"),
                    "overrides": d.get("overrides"),
                    "arch": d["arch"],
                    "lora_rank": 0 if d["mode"] == "full" else 32,
                    "samples": t["samples"],
                    "response_len": t["response_len"],
                    "prompt_len_mean": t["prompt_len_mean"],
                    "ppo_micro_batch_size_per_gpu": t["micro_batch"],
                    "gradient_checkpointing": t["gradient_checkpointing"],
                    "use_kl_loss": False,
                    "n_params": t["n_params"],
                    "trainable_params": t["trainable_params"],
                    "gpu": d.get("env", {}).get("gpu"),
                    "gpu_memory_utilization": d.get("gpu_memory_utilization"),
                    "vllm_reservation_gib": d.get("vllm_reservation_gib"),
                    "max_memory_allocated_gib": t.get("max_memory_allocated_gib"),
                    "memory_allocated_before_update_gib": t.get("mem_before", {}).get("allocated_gib"),
                    "device_used_before_update_gib": t.get("mem_before", {}).get("device_used_gib"),
                    "trainer_peak_physical_est_gib": _physical_peak(t),
                    "oom": t.get("oom"),
                    "nvidia_smi_peak_used_gib": d.get("nvidia_smi_peak_used_gib"),
                    "note": "peak counters reset just before compute_log_prob + updates, vLLM asleep (level 1: "
                    "weights offloaded, KV cache freed). torch still counts the sleeping vLLM pool "
                    "(its tensors keep their virtual addresses) in memory_allocated, so "
                    "max_memory_allocated = trainer peak + that pool; trainer_peak_physical_est_gib = "
                    "max_memory_allocated - memory_allocated_before + device_used_before (CUDA context "
                    "and the vLLM residue included), close to nvidia_smi_peak_used_gib",
                }
            )
        Path(a.memory_out).parent.mkdir(parents=True, exist_ok=True)
        envs = [d.get("env", {}) for _, d in engines + flows + dets]
        meta = {
            "about": __doc__.splitlines()[0],
            "measured_code": sorted({e.get("code_snapshot") or e.get("git_commit") or "?" for e in envs}),
            "gpus": sorted({e.get("gpu") or "?" for e in envs}),
            "dates_utc": sorted({(e.get("date_utc") or "?")[:10] for e in envs}),
            "how": "python benchmarks/summarize.py RESULTS_DIR --memory-out FILE (RESULTS_DIR from tools/device/gpu_suite.sh)",
        }
        Path(a.memory_out).write_text(json.dumps({**meta, "rows": rows}, indent=1))
        print(f"wrote {a.memory_out} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
