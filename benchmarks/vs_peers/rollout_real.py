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

--eval 1 also times the full test-set eval both ways, on the same engine: our eval's generation
(GRPOWorker.generate with SamplingSpec.for_eval: every test prompt, greedy, up to the response
length, stopping at eos, one seed per prompt) against bare `llm.generate` of the same prompts
with the same greedy SamplingParams and no seeds; the rest of our eval (scoring 1,319 strings,
the tables) is timed apart. Issue 14's eval target compares this with verl's full eval.
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
    p.add_argument("--eval", type=int, default=1, help="1: also time the full test-set eval, ours vs bare")
    p.add_argument("--out", required=True)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()

    from configs.load import load_config, with_overrides
    from engines.worker import GRPOWorker

    cfg = load_config(a.recipe, with_overrides([f"model.path={a.model}", f"data.source={a.gsm8k}"], a.overrides))
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
    if a.eval:
        out["eval"] = bench_eval(w, cfg)
        C.write_json(a.out, out)
        print(json.dumps(out["eval"], indent=1))


def bench_eval(w, cfg, rounds: int = 2) -> dict:
    """Seconds of the full test-set eval generation, ours (the flow's call) vs bare vLLM, `rounds`
    times alternating after one warm-up of each; plus the scoring time of our eval's metrics."""
    import numpy as np
    import pandas as pd
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from engines.types import SamplingSpec
    from envs import get_env, reward_fn
    from envs.reward import score_samples
    from tasks.stages import chat_ids, reward_extra_info

    test = pd.read_parquet(Path(cfg.data.dir) / "test.parquet")
    tok = w.trainer.tokenizer
    prompts = [chat_ids(tok, m) for m in test["prompt"]]
    spec = SamplingSpec.for_eval(cfg, [1000 + i for i in range(len(prompts))])
    greedy = SamplingParams(n=1, temperature=0.0, top_p=1.0, max_tokens=spec.max_tokens)
    llm = w.rollout.llm

    def ours():
        return [o["response_text"] for o in sorted(w.generate(prompts, spec), key=lambda o: o["prompt_index"])]

    def bare():
        w.sync.wake()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], greedy, use_tqdm=False)
        w.sync.sleep()
        return [o.outputs[0].text for o in outs]

    def timed(fn):
        engine_bench._sync()
        t = time.perf_counter()
        texts = fn()
        engine_bench._sync()
        return time.perf_counter() - t, texts

    ours(), bare()  # warm both
    res = {"prompts": len(prompts), "max_tokens": spec.max_tokens, "max_num_seqs": cfg.rollout.max_num_seqs}
    res["ours_s"], res["bare_s"] = [], []
    for _ in range(rounds):
        dt, texts = timed(ours)
        res["ours_s"].append(dt)
        dt, bare_texts = timed(bare)
        res["bare_s"].append(dt)
    res["same_texts"] = sum(a == b for a, b in zip(texts, bare_texts))
    toks = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    res["response_tokens_mean"] = float(np.mean(toks))
    t = time.perf_counter()
    env = get_env(cfg.data.data_source)
    truths = [rm["ground_truth"] for rm in test["reward_model"]]
    extra = reward_extra_info(test.get("extra_info"), ["stop"] * len(texts))
    args = (list(test["data_source"]), texts, truths, extra)
    scores, _ = score_samples(reward_fn(cfg, for_eval=True), *args, on_error="raise")
    env.val_metrics(*args, cfg.reward)
    res["scoring_s"] = time.perf_counter() - t
    res["strict_mean"] = float(np.mean(scores))
    res["ratio_ours_vs_bare"] = sum(res["bare_s"]) / sum(res["ours_s"])
    return res


if __name__ == "__main__":
    main()
