"""Archived one-off: resume determinism of the flow on one H100 (BENCHMARKS.md section 5, issue 4, 2026-11-23, code 0755f97).

Resume determinism on the GPU (issue 4): N steps straight vs K steps, stop, resume to N.

    python benchmarks/archive/determinism.py --workdir /tmp/det --out benchmarks/results/determinism.json -- \
        qwen2-0.5b-lora-1xh100 model.source=random model.arch=0.5b model.path=... model.lora_rank=0 ...

Three runs of the real flow (benchmarks/flow_breakdown.py, so each also records its step timings
and memory), all with trainer.save_freq=1 and trainer.resume_mode=auto:
  A   --steps steps in one process                      (checkpoint dir <workdir>/A)
  B1  --resume-at steps, then the process ends          (checkpoint dir <workdir>/B)
  B2  --steps steps in a new process on the same dir: restores global_step_<resume-at> and goes on
Then compares the trained weights in the checkpoints (actor/*.safetensors: the fp32 master
weights for full fine-tuning, the adapter for LoRA), tensor by tensor: bitwise-equal count, max
|A-B|, and for scale the largest change one step made (max |A_N - A_{N-1}|). Step <resume-at>
compares two processes that did the same steps (run-to-run noise); step N adds the resume.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _common
import _common as C  # noqa: E402


def load_actor(ckpt: Path) -> dict:
    from safetensors.torch import load_file

    state = {}
    for f in sorted((ckpt / "actor").glob("*.safetensors")):
        state.update(load_file(f))
    return state


def compare(a: dict, b: dict) -> dict:
    import torch

    keys = sorted(set(a) & set(b))
    max_abs, max_ref, n_eq, n_el, n_el_eq, worst = 0.0, 0.0, 0, 0, 0, None
    sum_abs = 0.0
    for k in keys:
        x, y = a[k].float(), b[k].float()
        d = (x - y).abs()
        m = float(d.max()) if d.numel() else 0.0
        if m > max_abs:
            max_abs, worst = m, k
        max_ref = max(max_ref, float(x.abs().max()) if x.numel() else 0.0)
        n_eq += bool(torch.equal(a[k], b[k]))
        n_el += d.numel()
        n_el_eq += int((d == 0).sum())
        sum_abs += float(d.sum())
    return {
        "tensors": len(keys),
        "only_in_one": sorted(set(a) ^ set(b))[:5],
        "tensors_bitwise_equal": n_eq,
        "elements": n_el,
        "elements_equal_share": n_el_eq / max(n_el, 1),
        "max_abs_diff": max_abs,
        "mean_abs_diff": sum_abs / max(n_el, 1),
        "max_abs_weight": max_ref,
        "worst_tensor": worst,
    }


def run_flow(name: str, out_json: Path, recipe: str, overrides: list[str], timeout: float, log: Path) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve().parents[1] / "flow_breakdown.py"),
        "--out",
        str(out_json),
        recipe,
        *overrides,
    ]
    t = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    resumed = [ln.strip()[-200:] for ln in log.read_text(errors="replace").splitlines() if "resumed from" in ln]
    print(f"[determinism] {name}: rc={rc} in {time.perf_counter() - t:.0f} s {resumed[-1:]}", flush=True)
    return {"returncode": rc, "wall_s": time.perf_counter() - t, "resumed_log": resumed[-1:], "json": str(out_json)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--resume-at", type=int, default=2)
    p.add_argument(
        "--keep", type=int, default=2, help="trainer.max_actor_ckpt_to_keep (2: also compare step resume-at)"
    )
    p.add_argument("--timeout", type=float, default=400, help="per run, seconds")
    p.add_argument("--clean", action="store_true", help="delete the checkpoints afterwards")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    work = Path(a.workdir).absolute()
    out = os.path.abspath(a.out)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    common = [
        *a.overrides,
        "trainer.save_freq=1",
        "trainer.resume_mode=auto",
        f"trainer.max_actor_ckpt_to_keep={a.keep}",
        f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}",
    ]
    res = {
        "recipe": a.recipe,
        "overrides": common,
        "steps": a.steps,
        "resume_at": a.resume_at,
        "env": C.gpu_info(),
        "runs": {},
    }
    plan = [("A", "A", a.steps), ("B1", "B", a.resume_at), ("B2", "B", a.steps)]
    for name, d, steps in plan:
        ov = common + [
            f"trainer.default_local_dir={work / d}",
            f"trainer.total_training_steps={steps}",
            f"tracking.run_name=det-{d}",
        ]
        res["runs"][name] = run_flow(name, work / f"flow-{name}.json", a.recipe, ov, a.timeout, work / f"{name}.log")
        C.write_json(out, res)
        if res["runs"][name]["returncode"] != 0:
            break
    cmp = {}
    for step in range(1, a.steps + 1):
        ca, cb = work / "A" / f"global_step_{step}", work / "B" / f"global_step_{step}"
        if ca.is_dir() and cb.is_dir():
            cmp[f"step_{step}"] = compare(load_actor(ca), load_actor(cb))
            print(f"[determinism] step {step}: {cmp[f'step_{step}']}", flush=True)
    last, prev = work / "A" / f"global_step_{a.steps}", work / "A" / f"global_step_{a.steps - 1}"
    if last.is_dir() and prev.is_dir():
        u = compare(load_actor(last), load_actor(prev))
        cmp["one_step_update_A"] = {"max_abs_change": u["max_abs_diff"], "mean_abs_change": u["mean_abs_diff"]}
    res["compare"] = cmp
    C.write_json(out, res)
    if a.clean:
        for d in ("A", "B"):
            shutil.rmtree(work / d, ignore_errors=True)
    print(f"[determinism] wrote {out}", flush=True)


if __name__ == "__main__":
    main()
