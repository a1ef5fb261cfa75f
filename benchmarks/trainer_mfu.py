"""Trainer tokens/s and MFU of ActorTrainer.update, random-init Qwen2 0.5B / 1.5B / 7B, full and LoRA.

    python benchmarks/trainer_mfu.py [--configs 0.5b:full,0.5b:lora,...] [--out benchmarks/results/trainer_mfu.json]

Each configuration runs in its own process (engine_bench.py, part `train`): the worker's trainer
(fp32 master weights, bf16 autocast, gradient checkpointing, AdamW) with its vLLM engine asleep,
one warm-up update and --train-reps timed updates of a synthetic batch (--samples sequences of
100-200 prompt + --response-len response tokens). MFU = (6*N*tokens + 12*L*h*sum(s^2)) / time /
989 TFLOP/s (H100/H200 dense bf16, planner/hardware.py). Peak torch.cuda.max_memory_allocated per
configuration. A CUDA OOM is a result (7B full fine-tuning: 16 bytes/parameter of fp32 weights,
gradients and Adam moments = 122 GB > 80 GB).
"""
import argparse
import json
from pathlib import Path

import _common as C

DEFAULT = "0.5b:full,0.5b:lora,1.5b:full,1.5b:lora,7b:lora,7b:full"
p = argparse.ArgumentParser()
p.add_argument("--configs", default=DEFAULT)
p.add_argument("--out", default=str(C.ROOT / "benchmarks" / "results" / "trainer_mfu.json"))
p.add_argument("--timeout", type=float, default=900)
a, extra = p.parse_known_args()
rows = []
for spec in a.configs.split(","):
    arch, mode = spec.split(":")
    one = Path(a.out).with_name(f"engine-{arch}-{mode}-train.json")
    res = C.run_engine_bench(arch, mode, "train", one, extra, timeout=a.timeout)
    t = res.get("train", {})
    rows.append({"arch": arch, "mode": mode, "tok_s": t.get("tok_s"), "mfu": t.get("mfu"),
                 "max_memory_allocated_gib": t.get("max_memory_allocated_gib"), "oom": t.get("oom"),
                 "returncode": res["returncode"], "detail": str(one)})
    print(json.dumps(rows[-1]), flush=True)
C.write_json(a.out, {"env": C.gpu_info(), "rows": rows})
