"""Archived one-off: weight sync trainer -> vLLM at 0.5B/1.5B/7B on one H100 (BENCHMARKS.md section 3, 2026-11-23, code 0755f97).

Weight sync time trainer -> vLLM vs model size (0.5B / 1.5B / 7B), full weights and LoRA adapter.

    python benchmarks/archive/weight_sync.py [--configs 0.5b:full,...] [--out benchmarks/results/weight_sync.json]

The worker's own path (engine_bench.py, part `sync`): full fine-tuning = GRPOWorker.sync_weights()
= wake vLLM's weights + reload_weights(trainer.full_state_for_rollout()), i.e. the flow's
timing_s/update_weights, after the sleep that ends every generate; LoRA = save the adapter
(sync_weights) + vLLM loading it at the next generate. Target: 7B full sync <= 1 s.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _common
import _common as C  # noqa: E402

DEFAULT = "0.5b:full,0.5b:lora,1.5b:full,1.5b:lora,7b:full,7b:lora"
p = argparse.ArgumentParser()
p.add_argument("--configs", default=DEFAULT)
p.add_argument("--out", default=str(C.ROOT / "benchmarks" / "results" / "weight_sync.json"))
p.add_argument("--timeout", type=float, default=900)
a, extra = p.parse_known_args()
rows = []
for spec in a.configs.split(","):
    arch, mode = spec.split(":")
    one = Path(a.out).with_name(f"engine-{arch}-{mode}-sync.json")
    res = C.run_engine_bench(arch, mode, "sync", one, extra, timeout=a.timeout)
    s = res.get("sync", {})
    rows.append(
        {
            "arch": arch,
            "mode": mode,
            "sync_s_median_after_first": s.get("sync_s_median_after_first"),
            "reps": s.get("reps"),
            "returncode": res["returncode"],
            "detail": str(one),
        }
    )
    print(json.dumps(rows[-1]), flush=True)
C.write_json(a.out, {"env": C.gpu_info(), "rows": rows})
