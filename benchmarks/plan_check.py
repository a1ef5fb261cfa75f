"""`grpo plan` against measured GPU memory: predicted torch.cuda.max_memory_allocated vs measured.

    python benchmarks/plan_check.py [MEMORY_FILE ...]   (default: the H100 and the H200 files)

Each row of the memory file names its recipe, overrides and the commit it was measured on. The
trainer's logits handling changed in 8dc6f9e (row-wise, checkpointed log-probs); rows measured
before it are planned with the logits constants of the trainer they measured, the rest as is.
vLLM runs in the trainer's process, so max_memory_allocated already holds vLLM's reservation
(its sleeping blocks stay counted): the planner's `torch_max_allocated_gib` predicts that sum.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import planner as P  # noqa: E402
from configs.load import load_config  # noqa: E402

BEFORE_ROWWISE = P.LogitBytes(train=26, nograd=10, row=0)  # trainer at 0755f97


def check(path: str) -> tuple[int, int]:
    """Plan every row of one memory file (on the GPU it names); (rows within ±15%, rows)."""
    data = json.loads(Path(path).read_text())
    old_code = any("0755f97" in c for c in data["measured_code"])
    logit_bytes = BEFORE_ROWWISE if old_code else P.LOGIT_BYTES
    # Both files were measured before the trainer offloaded anything (engines/trainer/offload.py);
    # 0755f97's AdamW was foreach.
    feats = P.TrainerFeatures(param_offload=False, optimizer_offload=False, fused_adamw=not old_code)
    ok = 0
    for row in data["rows"]:
        cfg = load_config(row["recipe"], row["overrides"])
        gpu = "H200" if "H200" in row["gpu"] else "H100"
        pred = P.plan(cfg, gpu, features=feats, logit_bytes=logit_bytes)["torch_max_allocated_gib"]
        meas = row["max_memory_allocated_gib"]
        ok += abs(pred / meas - 1) <= 0.15
        print(f"{row['result_file']:26s} {gpu:5s} {row['kind']:15s} {pred:9.2f} {meas:9.2f} {pred / meas:6.3f}")
    print(f"  {path}: code measured {', '.join(data['measured_code'])}")
    return ok, len(data["rows"])


def main(*paths: str) -> None:
    paths = paths or ("benchmarks/results/gpu_memory.json", "benchmarks/results/gpu_memory_h200.json")
    print(f"{'run':26s} {'gpu':5s} {'kind':15s} {'predicted':>9s} {'measured':>9s} {'ratio':>6s}")
    done = [check(p) for p in paths]
    print(f"{sum(o for o, _ in done)}/{sum(n for _, n in done)} within ±15%")


if __name__ == "__main__":
    main(*sys.argv[1:])
