"""Rollout stage tokens/s vs bare vLLM `LLM.generate`, same engine, same prompts and sampling.

    python benchmarks/rollout_vs_vllm.py [--arch 0.5b] [--mode full] [--out benchmarks/results/rollout.json]

One process, one vLLM engine (two engines with sleep mode cannot share a CUDA process): our
VLLMRollout.generate (wake, per-prompt seeds, log-probs, post-processing, sleep) and the bare
`llm.generate` on the same LLM object are alternated, each round measuring both; the result is
their tokens/s ratio. Target: ours >= 95% of bare. Details: engine_bench.py (part `rollout`).
Extra arguments go to engine_bench.py (e.g. --prompts 64 --max-tokens 512 --rounds 2).
"""

import argparse
import json

import _common as C

p = argparse.ArgumentParser()
p.add_argument("--arch", default="0.5b")
p.add_argument("--mode", default="full", choices=["full", "lora"])
p.add_argument("--out", default=str(C.ROOT / "benchmarks" / "results" / "rollout_vs_vllm.json"))
a, extra = p.parse_known_args()
res = C.run_engine_bench(a.arch, a.mode, "rollout", a.out, extra)
r = res.get("rollout", {})
print(
    json.dumps(
        {"tok_s": r.get("tok_s"), "ratio_ours_vs_bare": r.get("ratio_ours_vs_bare"), "errors": res.get("errors")},
        indent=1,
    )
)
