"""`grpo plan` against measured GPU memory: predicted torch.cuda.max_memory_allocated vs measured.

    python benchmarks/plan_check.py [benchmarks/results/gpu_memory.json]

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
from configs.load import load_config  # noqa: E402
from engines import plan as P  # noqa: E402

BEFORE_ROWWISE = {"LOGIT_BYTES_TRAIN": 26, "LOGIT_BYTES_NOGRAD": 10, "ROW_BYTES": 0}  # trainer at 0755f97


def main(path: str = "benchmarks/results/gpu_memory.json") -> None:
    data = json.loads(Path(path).read_text())
    old_code = any("0755f97" in c for c in data["measured_code"])
    now = {k: getattr(P, k) for k in BEFORE_ROWWISE}
    feats = dict(P.TRAINER_IMPLEMENTS)
    if old_code:
        for k, v in BEFORE_ROWWISE.items():
            setattr(P, k, v)
        P.TRAINER_IMPLEMENTS["fused_adamw"] = False  # 0755f97's AdamW was foreach
    print(f"{'run':34s} {'kind':15s} {'predicted':>9s} {'measured':>9s} {'ratio':>6s}")
    ok = 0
    for row in data["rows"]:
        cfg = load_config(row["recipe"], row["overrides"])
        pred = P.plan(cfg, "H100")["torch_max_allocated_gib"]
        meas = row["max_memory_allocated_gib"]
        ok += abs(pred / meas - 1) <= 0.15
        print(f"{row['result_file']:34s} {row['kind']:15s} {pred:9.2f} {meas:9.2f} {pred / meas:6.3f}")
    for k, v in now.items():
        setattr(P, k, v)
    P.TRAINER_IMPLEMENTS.update(feats)
    print(f"{ok}/{len(data['rows'])} within ±15% (code measured: {', '.join(data['measured_code'])})")


if __name__ == "__main__":
    main(*sys.argv[1:])
