"""One model size and mode (full / LoRA) in one process, through the worker the flow uses.

Builds engines.worker.GRPOWorker in-process (trainer + colocated vLLM engine with sleep mode, as
each Ray worker holds them) on a random-init Qwen2 of the given shape, then measures any of:

  rollout  our rollout stage (VLLMRollout.generate as the worker calls it: wake, SamplingParams as
           the config asks, generate, post-process, sleep; started, as in the flow, right after
           a weight sync) against bare vLLM `LLM.generate` on the same LLM object, same prompts,
           same n / temperature / max_tokens, ignore_eos=True for both, alternated in the same
           process. Variants: ours with log-probs (rollout.calculate_log_probs, the default before
           688dc48), and bare + per-prompt seeds.
  sync     weight sync trainer -> vLLM: full = worker.sync_weights() (wake weights + reload_weights
           of trainer.weights_for_rollout()) after the sleep that ends each generate, for both
           sleep levels (1: weights offloaded to host and copied back on wake; 2: dropped, as the
           worker now does for full fine-tuning), with the level-1 wake / reload split; LoRA = the
           adapter save (sync_weights) + vLLM's load of the new adapter at the next generate
           (first call with the new adapter minus a second call with the same).
  train    trainer tokens/s and MFU (planner/hardware.py's FLOP count and GPU peak, as the trainer's
           perf/mfu/actor) of the trainer's update on a synthetic
           batch (random token ids, fixed lengths), peak torch.cuda.max_memory_allocated; a CUDA
           out-of-memory error is recorded as a result (7B full fine-tuning on one 80 GB GPU).

    python benchmarks/engine_bench.py --arch 0.5b --mode full --parts rollout,sync,train --out r.json

Writes the JSON after each part, so a part that hangs or crashes leaves the earlier ones.
"""

from __future__ import annotations

import argparse
import gc
import time
import traceback

import _common as C  # noqa: I001  (sets sys.path first)
import numpy as np
import torch

from planner.hardware import peak_bf16_tflops, train_flops


def build_cfg(a, model_dir: str):
    from configs.load import load_config

    cuda = a.device == "cuda"
    recipe = C.RECIPE_OF_ARCH[a.arch] if cuda else "tiny-cpu"
    base = load_config(recipe)
    n = base.rollout.n
    if a.samples % n:
        raise SystemExit(f"--samples {a.samples} must be a multiple of rollout.n={n}")
    mini = a.samples // n
    lora_rank = 0 if a.mode == "full" else (base.model.lora_rank or 8)
    eager = a.eager if a.eager is not None else ("rollout" not in a.parts)
    ov = [
        "model.source=random",
        f"model.arch={a.arch}",
        f"model.path={model_dir}",
        f"model.lora_rank={lora_rank}",
        f"data.source={a.gsm8k}",
        f"data.train_batch_size={mini}",
        f"actor.ppo_mini_batch_size={mini}",
        f"actor.ppo_micro_batch_size_per_gpu={a.micro}",
        "actor.use_kl_loss=false",
        f"rollout.gpu_memory_utilization={a.gpu_mem_util}",
        f"rollout.enforce_eager={str(eager).lower()}",
        f"rollout.max_response_length={max(a.max_tokens, a.response_len)}",
        "trainer.total_training_steps=10",
        f"trainer.device={a.device}",
    ]
    if lora_rank and not base.model.lora_rank:
        ov.append("model.lora_alpha=16")
    if not cuda:
        ov.append("rollout.max_num_seqs=64")
    return load_config(recipe, ov), recipe, ov


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _gib(x: float) -> float:
    return x / 2**30


def mem_now() -> dict:
    if not torch.cuda.is_available():
        return {}
    free, total = torch.cuda.mem_get_info()
    return {
        "allocated_gib": _gib(torch.cuda.memory_allocated()),
        "reserved_gib": _gib(torch.cuda.memory_reserved()),
        "device_used_gib": _gib(total - free),
        "max_allocated_gib": _gib(torch.cuda.max_memory_allocated()),
    }


# ---------------------------------------------------------------- rollout
def bench_rollout(w, a, cfg) -> dict:
    import vllm
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from envs.gsm8k import GSM8K, INSTRUCTION
    from envs.prep import load_raw
    from tasks.stages import chat_ids

    tok = w.trainer.tokenizer
    qs = list(load_raw(GSM8K(), a.gsm8k)["test"]["question"][: a.prompts])
    prompts = [chat_ids(tok, [{"role": "user", "content": q + INSTRUCTION}]) for q in qs]
    r = cfg.rollout
    seeds = list(range(1000, 1000 + len(prompts)))
    ro = w.rollout
    llm = ro.llm
    if ro.is_lora and ro.lora_version == 0:
        w.sync_weights()  # an adapter to generate with, as from step 2 on
    lora = ro._lora_request()

    # Our stage's pieces, timed from outside (instance attributes shadow the methods).
    pieces: dict[str, float] = {}
    orig_wake, orig_sleep, orig_gen = ro.wake_up, ro.sleep, llm.generate

    def timed(name, fn):
        def inner(*args, **kw):
            _sync()
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                _sync()
                pieces[name] = pieces.get(name, 0.0) + time.perf_counter() - t

        return inner

    orig_sp = vllm.SamplingParams

    def sp_ignore_eos(*args, **kw):
        kw.setdefault("ignore_eos", True)
        return orig_sp(*args, **kw)

    def ours(max_tokens, **rollout_cfg):
        pieces.clear()
        saved = {k: getattr(r, k) for k in rollout_cfg}
        for k, v in rollout_cfg.items():
            setattr(r, k, v)
        sampling = dict(
            n=r.n,
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            max_tokens=max_tokens,
            seeds=seeds,
            logprobs=r.calculate_log_probs,
        )
        w.sync_weights()  # as in the flow: the update's sync comes right before the next rollout
        ro.wake_up, ro.sleep, llm.generate = (
            timed("wake", orig_wake),
            timed("sleep", orig_sleep),
            timed("llm_generate", orig_gen),
        )
        vllm.SamplingParams = sp_ignore_eos
        try:
            _sync()
            t = time.perf_counter()
            out = w.generate(prompts, sampling)
            _sync()
            dt = time.perf_counter() - t
        finally:
            vllm.SamplingParams = orig_sp
            del ro.wake_up, ro.sleep, llm.generate
            for k, v in saved.items():
                setattr(r, k, v)
        toks = sum(len(o["response_ids"]) for o in out)
        rest = dt - sum(pieces.values())
        return dict(
            seconds=dt, tokens=toks, tok_s=toks / dt, samples=len(out), pieces_s={**pieces, "python_rest": rest}
        )

    def bare(max_tokens, seeded=False, logprobs=None, after_sync=False):
        common = dict(
            n=r.n,
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            max_tokens=max_tokens,
            ignore_eos=True,
            logprobs=logprobs,
        )
        params = [SamplingParams(**common, seed=s) for s in seeds] if seeded else SamplingParams(**common)
        if after_sync:  # right after a weight sync, as our stage runs (is the first generate after it slower?)
            w.sync_weights()
        w.sync.wake()  # a standalone engine is always awake: waking is not timed here
        _sync()
        t = time.perf_counter()
        outs = llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts], params, lora_request=lora, use_tqdm=False
        )
        _sync()
        dt = time.perf_counter() - t
        w.sync.sleep()  # back to the state our stage starts from
        toks = sum(len(c.token_ids) for o in outs for c in o.outputs)
        return dict(seconds=dt, tokens=toks, tok_s=toks / dt, samples=sum(len(o.outputs) for o in outs))

    variants = {
        "bare": lambda m: bare(m),
        "ours": lambda m: ours(m),
        "ours_logprobs": lambda m: ours(m, calculate_log_probs=True),
        "bare_seeded": lambda m: bare(m, seeded=True),
        "bare_after_sync": lambda m: bare(m, seeded=True, after_sync=True),
    }
    res = {
        "prompts": len(prompts),
        "n": r.n,
        "max_tokens": a.max_tokens,
        "temperature": r.temperature,
        "top_p": r.top_p,
        "top_k": r.top_k,
        "prompt_tokens_mean": float(np.mean([len(p) for p in prompts])),
        "lora": lora is not None,
        "enforce_eager": r.enforce_eager,
        "gpu_memory_utilization": r.gpu_memory_utilization,
        "max_num_seqs": r.max_num_seqs,
        "rounds": [],
    }
    try:
        vc = llm.llm_engine.vllm_config
        res["kv_cache_blocks"] = vc.cache_config.num_gpu_blocks
        res["kv_block_size"] = vc.cache_config.block_size
    except Exception:  # noqa: BLE001
        pass
    t = time.perf_counter()
    for name in variants:  # warm every path (sampler with generators, log-probs, LoRA) once
        variants[name](min(16, a.max_tokens))
    res["warmup_s"] = time.perf_counter() - t
    for i in range(a.rounds):
        names = list(variants) if i < a.attrib_rounds else ["bare", "ours"]
        row = {}
        for name in names:
            row[name] = variants[name](a.max_tokens)
            print(
                f"[rollout] round {i} {name}: {row[name]['tok_s']:.0f} tok/s ({row[name]['seconds']:.2f} s)", flush=True
            )
        res["rounds"].append(row)
    tot = {}
    for name in variants:
        rows = [rw[name] for rw in res["rounds"] if name in rw]
        if rows:
            tot[name] = sum(x["tokens"] for x in rows) / sum(x["seconds"] for x in rows)
    res["tok_s"] = tot
    res["ratio_ours_vs_bare"] = tot["ours"] / tot["bare"]
    res["ratio_per_round"] = [rw["ours"]["tok_s"] / rw["bare"]["tok_s"] for rw in res["rounds"]]
    res["ratios_vs_bare"] = {k: v / tot["bare"] for k, v in tot.items()}
    return res


# ---------------------------------------------------------------- weight sync
def bench_sync(w, a, cfg) -> dict:
    ro, tr = w.rollout, w.trainer
    res = {"mode": "lora" if tr.is_lora else "full", "reps": []}
    nbytes = 0
    if tr.is_lora:
        for p in tr.model.parameters():
            if p.requires_grad:
                nbytes += p.numel() * p.element_size()
        res["adapter_params"] = sum(p.numel() for p in tr.model.parameters() if p.requires_grad)
        res["adapter_bytes_fp32"] = nbytes
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        probe = [TokensPrompt(prompt_token_ids=list(range(10, 42)))]
        one = SamplingParams(n=1, temperature=1.0, max_tokens=1, seed=0)

        def gen_once():
            _sync()
            t = time.perf_counter()
            ro.llm.generate(probe, one, lora_request=ro._lora_request(), use_tqdm=False)
            _sync()
            return time.perf_counter() - t

        for i in range(a.sync_reps):
            w.sync.wake()
            w.sync.sleep()  # as after a generate
            with torch.no_grad():  # a changed adapter each time, as after an update
                for name, p in tr.model.named_parameters():
                    if "lora_B" in name:
                        p.add_(1e-4)
            save_s = w.sync_weights()  # = timing_s/update_weights in the flow
            w.sync.wake()  # (the next generate wakes it; not part of the adapter's cost)
            first = gen_once()  # vLLM loads the new adapter (from the saved files) + 1 token
            again = gen_once()  # same adapter, already loaded
            w.sync.sleep()
            rep = dict(
                save_adapter_s=save_s,
                first_generate_s=first,
                second_generate_s=again,
                vllm_adapter_load_s=first - again,
                total_s=save_s + first - again,
            )
            res["reps"].append(rep)
            print(f"[sync] lora rep {i}: {rep}", flush=True)
    else:
        uniq = {t.data_ptr(): t.numel() for t in tr.model.state_dict().values()}  # tied embeddings once
        res["state_bytes_bf16"] = sum(uniq.values()) * 2
        level0 = w.sync.level  # engines/weight_sync.py: 1 keeps the engine's weights asleep, 2 drops them
        for level in (1, 2):
            w.sync.level = level
            for i in range(a.sync_reps):
                w.sync.wake()  # a level-2 sleep's weights refilled from the trainer, as before each generate
                _sync()
                t = time.perf_counter()
                w.sync.sleep()  # what the end of each generate does
                _sync()
                sleep_s = time.perf_counter() - t
                sync_s = w.sync_weights()  # wake weights + reload (= timing_s/update_weights in the flow)
                rep = dict(level=level, sleep_s=sleep_s, sync_s=sync_s)
                if level == 1:  # the same, split: wake weights (host -> GPU copy) vs reload
                    w.sync.wake()
                    w.sync.sleep()
                    _sync()
                    t = time.perf_counter()
                    ro.wake_up(("weights",))
                    _sync()
                    rep["wake_weights_s"] = time.perf_counter() - t
                    t = time.perf_counter()
                    ro.load_weights(tr.weights_for_rollout())
                    _sync()
                    rep["reload_s"] = time.perf_counter() - t
                res["reps"].append(rep)
                print(f"[sync] full rep {i}: {rep}", flush=True)
        w.sync.level = level0
        for level in (1, 2):
            vals = [r["sync_s"] for r in res["reps"] if r["level"] == level][1:]
            res[f"sync_s_median_level{level}"] = float(np.median(vals)) if vals else None
        res["GB_per_s_reload"] = [res["state_bytes_bf16"] / r["reload_s"] / 1e9 for r in res["reps"] if "reload_s" in r]
    w.sync.wake()
    w.sync.sleep()  # fully asleep again, as during the trainer's work
    key = "total_s" if tr.is_lora else "sync_s"
    reps = [r for r in res["reps"] if r.get("level", 2) == 2]  # full: the level the worker uses
    vals = [r[key] for r in reps[1:]] or [r[key] for r in reps]
    res["sync_s_median_after_first"] = float(np.median(vals))
    return res


# ---------------------------------------------------------------- trainer
def bench_train(w, a, cfg) -> dict:
    tr = w.trainer
    rng = np.random.default_rng(0)
    vocab = len(tr.tokenizer)
    N = a.samples
    plens = rng.integers(a.prompt_len_min, a.prompt_len_max + 1, size=N)
    prompts = [rng.integers(10, vocab - 10, size=int(p)).tolist() for p in plens]
    responses = [rng.integers(10, vocab - 10, size=a.response_len).tolist() for _ in range(N)]
    seqs = [len(p) + len(r) for p, r in zip(prompts, responses)]
    c = tr.model.config
    n_params = tr.n_params
    trainable = sum(p.numel() for p in tr.model.parameters() if p.requires_grad)
    epochs = cfg.actor.ppo_epochs
    flops = train_flops(n_params, sum(seqs) * epochs, c.num_hidden_layers, c.hidden_size, seqs, epochs)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = peak_bf16_tflops(name)
    res = dict(
        samples=N,
        tokens=sum(seqs),
        response_len=a.response_len,
        prompt_len_mean=float(np.mean(plens)),
        micro_batch=cfg.actor.ppo_micro_batch_size_per_gpu,
        n_params=n_params,
        trainable_params=trainable,
        gradient_checkpointing=cfg.model.enable_gradient_checkpointing,
        flops_per_update=flops,
        peak_tflops=peak,
        gpu=name,
        updates=[],
    )
    if torch.cuda.is_available():
        _sync()
        torch.cuda.reset_peak_memory_stats()
        res["mem_before"] = mem_now()
    stage = "old_log_prob"
    try:
        _sync()
        t = time.perf_counter()
        old = w.compute_log_prob(prompts, responses)
        _sync()
        dt = time.perf_counter() - t
        res["log_prob"] = dict(seconds=dt, tok_s=sum(seqs) / dt)
        adv = rng.standard_normal(N).astype(np.float32).tolist()
        batch = dict(prompts=prompts, responses=responses, old_log_probs=old, ref_log_probs=None, advantages=adv)
        for i in range(a.train_reps + 1):
            stage = "warmup update" if i == 0 else f"update {i}"
            _sync()
            t = time.perf_counter()
            m = w.update_actor(batch, seed=i)
            _sync()
            dt = time.perf_counter() - t
            u = dict(
                seconds=dt,
                tok_s=sum(seqs) / dt,
                warmup=i == 0,
                mfu=(flops / dt / (peak * 1e12)) if peak else None,
                trainer_mfu=m.get("perf/mfu/actor"),
                grad_norm=m.get("actor/grad_norm"),
            )
            res["updates"].append(u)
            print(f"[train] {stage}: {u}", flush=True)
    except torch.OutOfMemoryError as e:
        res["oom"] = dict(stage=stage, message=str(e).splitlines()[0][:400])
        print(f"[train] OOM at {stage}: {res['oom']['message']}", flush=True)
    timed = [u for u in res["updates"] if not u["warmup"]]
    if timed:
        dt = sum(u["seconds"] for u in timed)
        res["tok_s"] = sum(seqs) * len(timed) / dt
        res["mfu"] = (flops * len(timed) / dt / (peak * 1e12)) if peak else None
    if torch.cuda.is_available():
        res["max_memory_allocated_gib"] = _gib(torch.cuda.max_memory_allocated())
        res["max_memory_reserved_gib"] = _gib(torch.cuda.max_memory_reserved())
        res["mem_after"] = mem_now()
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="0.5b")
    p.add_argument("--mode", choices=["full", "lora"], default="full")
    p.add_argument("--parts", default="rollout,sync,train")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--models-dir", default=None)
    p.add_argument("--gsm8k", default=C.default_gsm8k())
    p.add_argument("--gpu-mem-util", type=float, default=0.4)
    p.add_argument(
        "--eager",
        type=lambda s: s.lower() in ("1", "true", "yes"),
        default=None,
        help="vLLM enforce_eager (default: false with the rollout part, true without)",
    )
    # rollout
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--attrib-rounds", type=int, default=1, help="rounds that also run the two attribution variants")
    # sync
    p.add_argument("--sync-reps", type=int, default=3)
    # train
    p.add_argument("--samples", type=int, default=80)
    p.add_argument("--micro", type=int, default=16)
    p.add_argument("--response-len", type=int, default=512)
    p.add_argument("--prompt-len-min", type=int, default=100)
    p.add_argument("--prompt-len-max", type=int, default=200)
    p.add_argument("--train-reps", type=int, default=2)
    a = p.parse_args()
    a.parts = [x for x in a.parts.split(",") if x]

    model_dir = C.model_dir_for(a.arch, a.models_dir)
    out = {"arch": a.arch, "mode": a.mode, "parts": a.parts, "env": C.gpu_info(), "errors": []}
    t = time.perf_counter()
    C.ensure_random_model(a.arch, model_dir, a.gsm8k)
    out["model_build_s"] = time.perf_counter() - t
    cfg, recipe, ov = build_cfg(a, model_dir)
    out.update(recipe=recipe, overrides=ov, gpu_memory_utilization=cfg.rollout.gpu_memory_utilization)
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        out["vllm_reservation_gib"] = cfg.rollout.gpu_memory_utilization * total / 2**30
    C.write_json(a.out, out)

    from engines.worker import GRPOWorker

    with C.SmiSampler() as smi:
        t = time.perf_counter()
        try:
            w = GRPOWorker(cfg.model_dump_json(), model_dir, 0, 1)
        except torch.OutOfMemoryError as e:
            out["init_oom"] = str(e).splitlines()[0][:400]
            C.write_json(a.out, out)
            raise
        out["worker_init_s"] = time.perf_counter() - t
        out["mem_after_init"] = mem_now()
        out["n_params"] = w.trainer.n_params
        C.write_json(a.out, out)
        for part, fn in (("rollout", bench_rollout), ("sync", bench_sync), ("train", bench_train)):
            if part not in a.parts:
                continue
            t = time.perf_counter()
            try:
                out[part] = fn(w, a, cfg)
            except Exception as e:  # noqa: BLE001  (one part failing must not lose the others)
                out["errors"].append(
                    {"part": part, "error": repr(e)[:800], "traceback": traceback.format_exc()[-3000:]}
                )
                print(f"[{part}] FAILED: {e!r}", flush=True)
                traceback.print_exc()
                if isinstance(e, torch.OutOfMemoryError):
                    gc.collect()
                    torch.cuda.empty_cache()
            out[f"{part}_wall_s"] = time.perf_counter() - t
            out.update(smi.summary())
            C.write_json(a.out, out)
    out.update(smi.summary())
    C.write_json(a.out, out)
    print(f"[done] {a.arch} {a.mode}: wrote {a.out}", flush=True)


if __name__ == "__main__":
    main()
