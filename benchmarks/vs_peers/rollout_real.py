"""Issue 14 item 4: our rollout stage vs bare vLLM `LLM.generate` at a real model's shape.

    python benchmarks/vs_peers/rollout_real.py --model /root/models/smollm2-135m-instruct \
        --out $OUT/rollout_real.json [--recipe smollm2-135m-1xh200] [key=value overrides ...]

The recipe's own worker (trainer + colocated vLLM engine, built by GRPOWorker from the recipe's
config with its sampling: n, temperature, top_p, response length) over the model dir the flow
built; then engine_bench.bench_rollout alternates our stage (GRPOWorker.generate: sync, wake,
per-prompt seeds, post-processing, sleep where the recipe sleeps) and the bare `llm.generate` on
the same LLM object, same prompts (the first --prompts GSM8K test questions in the chat template)
and sampling, every response `max_tokens` long (ignore_eos on both, so both make the same number
of tokens). Result: their tokens/s ratio; target >= 0.95.
"""

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # benchmarks/: _common, engine_bench
import _common as C  # noqa: E402
import engine_bench  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--recipe", default="smollm2-135m-1xh200")
    p.add_argument("--model", required=True, help="a model dir the flow built (config, tokenizer, safetensors)")
    p.add_argument("--gsm8k", default=C.default_gsm8k())
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--attrib-rounds", type=int, default=1)
    p.add_argument("--out", required=True)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()

    from configs.load import load_config
    from engines.worker import GRPOWorker

    cfg = load_config(a.recipe, [f"model.path={a.model}", f"data.source={a.gsm8k}", *a.overrides])
    a.max_tokens = cfg.rollout.max_response_length
    out = {"recipe": a.recipe, "model": a.model, "overrides": a.overrides, "env": C.gpu_info()}
    t = time.perf_counter()
    w = GRPOWorker(cfg.model_dump_json(), a.model, 0, 1)
    out["worker_init_s"] = time.perf_counter() - t
    out["free_cache_engine"] = cfg.rollout.free_cache_engine
    out["rollout"] = engine_bench.bench_rollout(w, a, cfg)
    C.write_json(a.out, out)
    r = out["rollout"]
    print(json.dumps({"tok_s": r["tok_s"], "ratio_ours_vs_bare": r["ratio_ours_vs_bare"]}, indent=1))


if __name__ == "__main__":
    main()
