"""Update tokens/s and MFU of the FSDP trainer, padded against packed (model.use_remove_padding),
back to back on one GPU; no vLLM (the trainer alone, as the update stage runs it).

    python benchmarks/packing_bench.py [--configs 1.5b:full,7b:full,0.5b:lora] [--out DIR] [--liger]

Each configuration x layout runs in its own process (this script with --one), so the two
layouts of a size see the same free GPU: a random-init Qwen2 of the size (benchmarks/_common.py
ensure_random_model), the recipe of that size (RECIPE_OF_ARCH) with offload and the KL reference
off, fp32 master weights + bf16 autocast, gradient checkpointing, fused AdamW. Synthetic batch
(seeded): --samples sequences of --prompt-len-min..max prompt tokens and --response-len-min..max
response tokens (uniform), micro-batches of --micro samples, one mini-batch (one optimizer step);
one warm-up update, then --reps timed updates, and one timed old-log-prob pass.
MFU as the trainer's perf/mfu/actor counts it (planner/hardware.py: train_flops over the GPU's
dense bf16 peak; recomputation not counted), with the same real-token FLOPs for both layouts, so
padding is waste, not work. --liger runs every row with model.use_liger and
model.use_fused_kernels on (liger-kernel installed; engines/trainer/liger.py): against a run
without it, the kernels' share of the update's time and memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import _common as C  # noqa: I001  (sets sys.path first)


def one(a) -> dict:
    import numpy as np
    import torch

    from configs.load import load_config
    from engines.trainer.fsdp import FSDPTrainer
    from engines.types import UpdateBatch
    from planner.hardware import peak_bf16_tflops, train_flops

    arch, mode = a.arch, a.mode
    model_dir = C.ensure_random_model(arch, C.model_dir_for(arch, a.models_dir), a.gsm8k)
    recipe = C.RECIPE_OF_ARCH[arch]
    n = load_config(recipe).rollout.n
    if a.samples % n:
        raise SystemExit(f"--samples {a.samples} must be a multiple of rollout.n={n}")
    lora = 0 if mode == "full" else 32
    ov = [
        f"model.path={model_dir}",
        f"model.lora_rank={lora}",
        "model.lora_alpha=32",
        f"model.use_remove_padding={str(a.packed).lower()}",
        f"data.train_batch_size={a.samples // n}",
        f"actor.ppo_mini_batch_size={a.samples // n}",
        f"actor.ppo_micro_batch_size_per_gpu={a.micro}",
        "actor.use_kl_loss=false",
        "actor.param_offload=false",
        "actor.optimizer_offload=false",
        f"rollout.max_response_length={a.response_len_max}",
        "trainer.total_training_steps=10",
        *(["model.use_liger=true", "model.use_fused_kernels=true"] if a.liger else []),
    ]
    cfg = load_config(recipe, ov)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    tr = FSDPTrainer(cfg, model_dir, "cuda")
    init_s = time.perf_counter() - t0
    vocab = len(tr.tokenizer)
    N = a.samples
    plens = rng.integers(a.prompt_len_min, a.prompt_len_max + 1, size=N)
    rlens = rng.integers(a.response_len_min, a.response_len_max + 1, size=N)
    prompts = [rng.integers(10, vocab - 10, size=int(p)).tolist() for p in plens]
    responses = [rng.integers(10, vocab - 10, size=int(r)).tolist() for r in rlens]
    seqs = [len(p) + len(r) for p, r in zip(prompts, responses)]
    c = tr.hf_config
    flops = train_flops(tr.n_params, sum(seqs), c.num_hidden_layers, c.hidden_size, seqs)
    peak = peak_bf16_tflops(torch.cuda.get_device_name())
    groups = tr._micro_batches(prompts, responses)
    padded = sum(len(g) * (max(plens[i] for i in g) + max(rlens[i] for i in g)) for g in groups)
    res = dict(
        arch=arch,
        mode=mode,
        packed=a.packed,
        liger=a.liger,
        samples=N,
        tokens=sum(seqs),
        padded_layout_tokens=int(padded),
        micro_batch=a.micro,
        micro_batches=len(groups),
        n_params=tr.n_params,
        init_s=init_s,
        gpu=torch.cuda.get_device_name(),
        torch=torch.__version__,
        overrides=ov,
        updates=[],
    )
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    old = tr.compute_log_prob(prompts, responses)
    torch.cuda.synchronize()
    res["log_prob_s"] = time.perf_counter() - t
    res["log_prob_tok_s"] = sum(seqs) / res["log_prob_s"]
    adv = rng.standard_normal(N).astype(np.float32).tolist()
    batch = UpdateBatch(prompts=prompts, responses=responses, old_log_probs=old, advantages=adv)
    for i in range(a.reps + 1):
        torch.cuda.synchronize()
        t = time.perf_counter()
        m = tr.update(batch, seed=i)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        res["updates"].append(
            dict(
                seconds=dt,
                warmup=i == 0,
                grad_norm=m["actor/grad_norm"],
                pg_loss=m["actor/pg_loss"],
                trainer_mfu=m.get("perf/mfu/actor"),
            )
        )
        print(f"[packing] {arch} {mode} packed={a.packed} update {i}: {dt:.2f} s", flush=True)
    timed = [u["seconds"] for u in res["updates"] if not u["warmup"]]
    res["update_s"] = sum(timed) / len(timed)
    res["tok_s"] = sum(seqs) / res["update_s"]
    res["mfu"] = flops / res["update_s"] / (peak * 1e12) if peak else None
    res["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="1.5b:full,7b:full,0.5b:lora")
    p.add_argument("--out", default=str(C.ROOT / "benchmarks" / "results" / "packing"))
    p.add_argument("--models-dir", default=None)
    p.add_argument("--gsm8k", default=C.default_gsm8k())
    p.add_argument("--samples", type=int, default=80)
    p.add_argument("--micro", type=int, default=16)
    p.add_argument("--prompt-len-min", type=int, default=100)
    p.add_argument("--prompt-len-max", type=int, default=200)
    p.add_argument("--response-len-min", type=int, default=64)
    p.add_argument("--response-len-max", type=int, default=512)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--liger", action="store_true", help="model.use_liger + model.use_fused_kernels on")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--arch", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--packed", type=lambda s: s == "true", help=argparse.SUPPRESS)
    a, rest = p.parse_known_args()
    if a.one:
        print("RESULT " + json.dumps(one(a)), flush=True)
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in a.configs.split(","):
        arch, mode = spec.split(":")
        for packed in ("false", "true"):
            cmd = [
                sys.executable,
                __file__,
                "--one",
                "--arch",
                arch,
                "--mode",
                mode,
                "--packed",
                packed,
                *[x for x in sys.argv[1:] if not x.startswith("--configs") and x != a.configs],
            ]
            log = out / f"{arch}-{mode}-packed_{packed}{'-liger' if a.liger else ''}.log"
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
                text, rc = r.stdout + r.stderr, r.returncode
            except subprocess.TimeoutExpired as e:
                text, rc = f"{e.stdout or ''}{e.stderr or ''}\nTIMEOUT", 124
            log.write_text(text if isinstance(text, str) else text.decode())
            found = [json.loads(x[7:]) for x in str(text).splitlines() if x.startswith("RESULT ")]
            row = (
                found[0]
                if found
                else dict(
                    arch=arch,
                    mode=mode,
                    packed=packed == "true",
                    rc=rc,
                    error=str(text).strip().splitlines()[-1:] or "",
                )
            )
            rows.append(row)
            print(
                json.dumps(
                    {
                        k: row.get(k)
                        for k in (
                            "arch",
                            "mode",
                            "packed",
                            "update_s",
                            "tok_s",
                            "mfu",
                            "log_prob_s",
                            "max_memory_allocated_gib",
                            "micro_batches",
                            "error",
                        )
                    }
                ),
                flush=True,
            )
    (out / f"packing_bench{'_liger' if a.liger else ''}.json").write_text(
        json.dumps({"env": C.gpu_info(), "rows": rows}, indent=1)
    )


if __name__ == "__main__":
    main()
