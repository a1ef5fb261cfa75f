"""Shared helpers of the benchmark scripts (plain Python; no pytest).

Import path: the repo root, or $BENCH_SRC first when set (a snapshot of the repo's code, see
benchmarks/snapshot.sh, so a benchmark measures one committed version even while the working
tree is being edited).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = Path(os.environ.get("BENCH_SRC") or ROOT).resolve()
for p in (str(ROOT), str(SRC)):  # SRC ends up first
    if p in sys.path:
        sys.path.remove(p)
    sys.path.insert(0, p)
if SRC != ROOT:  # child processes (Ray workers, subprocesses) import the same code
    os.environ["PYTHONPATH"] = os.pathsep.join([str(SRC), str(ROOT)] + [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                                 if x and x not in (str(SRC), str(ROOT))])
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Dense bf16 peak (NVIDIA datasheets, as planner/hardware.py GPUS): H100/H800/H200 989 TFLOP/s, H20 148, A100 312.
PEAK_TFLOPS = {"H100": 989.0, "H800": 989.0, "H200": 989.0, "H20": 148.0, "A100": 312.0}
RECIPE_OF_ARCH = {"0.5b": "qwen2-0.5b-lora-1xh100", "1.5b": "qwen2-1.5b-lora-1xh100",
                  "3b": "qwen2-3b-lora-1xh100", "7b": "qwen2-7b-lora-1xh100"}


def default_gsm8k() -> str:
    """A local GSM8K dir (train/test jsonl) if one is known, else the hub id."""
    for cand in (os.environ.get("GSM8K_DIR"), ROOT / ".device" / "gsm8k", ROOT.parent / "shared" / "data" / "gsm8k"):
        if cand and Path(cand).is_dir():
            return str(Path(cand).resolve())
    return "openai/gsm8k"


def default_models_dir() -> str:
    return os.environ.get("BENCH_MODELS_DIR") or str(ROOT / "models")


def model_dir_for(arch: str, models_dir: str | None = None) -> str:
    return str(Path(models_dir or default_models_dir()) / f"random-qwen2-{arch}")


_TOKENIZERS: dict = {}


def ensure_random_model(arch: str, path: str, gsm8k: str, seed: int = 0) -> str:
    """A random-init Qwen2 of preset `arch` at `path`, as engines.models.materialize(source='random')
    builds it (same config, tokenizer trained on GSM8K text, bf16 safetensors), but initialised on
    the GPU when there is one: a 7B initialised on CPU takes minutes. Built once, then reused."""
    from engines import models

    dest = Path(path)
    if models._is_complete(dest):
        return str(dest)
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config

    from tasks.prep import load_raw_gsm8k

    t0 = time.perf_counter()
    preset = dict(models.ARCH_PRESETS[arch])
    tiny = arch == "tiny"
    key = (gsm8k, 1000 if tiny else 8192, preset["max_position_embeddings"])
    if key not in _TOKENIZERS:  # trained once per process: every preset but tiny shares it
        raw = load_raw_gsm8k(gsm8k)["train"]
        texts = [t for t in (raw["question"] + " " + raw["answer"]) if t]
        _TOKENIZERS[key] = models._train_tokenizer(texts, key[1], key[2])
    tok = _TOKENIZERS[key]
    if tiny:
        import math
        preset["vocab_size"] = int(math.ceil(len(tok) / 64) * 64)
    dtype = torch.float32 if tiny else torch.bfloat16
    eos, pad = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    config = Qwen2Config(**preset, hidden_act="silu", bos_token_id=pad, eos_token_id=eos,
                         pad_token_id=pad, use_sliding_window=False)
    models.check_vllm_compatible(config)
    torch.manual_seed(seed)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config = GenerationConfig(bos_token_id=pad, eos_token_id=eos, pad_token_id=pad)
    tmp = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    del model
    if dev == "cuda":
        torch.cuda.empty_cache()
    os.rename(tmp, dest)
    print(f"[model] built random {arch} at {dest} on {dev} in {time.perf_counter() - t0:.1f} s", flush=True)
    return str(dest)


def gpu_info() -> dict:
    info = {"host": platform.node(), "python": platform.python_version(),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info.update(gpu=p.name, gpu_total_gib=p.total_memory / 2**30, sm_count=p.multi_processor_count)
    except Exception as e:  # noqa: BLE001
        info["torch_error"] = repr(e)
    for mod in ("vllm", "transformers", "peft", "ray", "prefect", "mlflow"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            pass
    try:
        info["git_commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                                            text=True, timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001
        pass
    if (SRC / "SNAPSHOT").is_file():
        info["code_snapshot"] = (SRC / "SNAPSHOT").read_text().strip()
    return info


def peak_tflops(name: str | None) -> float | None:
    return next((v for k, v in PEAK_TFLOPS.items() if name and k in name), None)


def train_flops(n_params: int, layers: int, hidden: int, seq_lens: list[int], epochs: int = 1) -> float:
    """planner/hardware.py train_flops: 6*N*tokens (dense fwd+bwd) + 12*L*h*sum(s^2) attention;
    gradient-checkpointing recomputation not counted."""
    tokens = sum(seq_lens)
    return 6.0 * n_params * tokens * epochs + 12.0 * layers * hidden * sum(s * s for s in seq_lens) * epochs


def write_json(path: str | Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_jsonable))
    os.replace(tmp, path)


def _jsonable(x):
    try:
        import numpy as np

        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, np.ndarray):
            return x.tolist()
    except ImportError:
        pass
    return str(x)


class SmiSampler:
    """Peak `nvidia-smi` used memory (all processes on GPU 0) while the block runs."""

    def __init__(self, interval_ms: int = 250):
        self.interval_ms, self.samples, self._proc, self._thread = interval_ms, [], None, None

    def __enter__(self):
        try:
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=memory.used,memory.total", "--format=csv,noheader,nounits",
                 f"-lms={self.interval_ms}", "-i", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self._proc = None
            return self
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self):
        for line in self._proc.stdout:
            try:
                used, total = (float(v) for v in line.strip().split(","))
                self.samples.append((time.time(), used, total))
            except ValueError:
                pass

    def __exit__(self, *exc):
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        return False

    def summary(self) -> dict:
        if not self.samples:
            return {"nvidia_smi_samples": 0}
        used = [s[1] for s in self.samples]
        return {"nvidia_smi_samples": len(used), "nvidia_smi_peak_used_mib": max(used),
                "nvidia_smi_total_mib": self.samples[0][2], "nvidia_smi_peak_used_gib": max(used) / 1024}


def run_engine_bench(arch: str, mode: str, parts: str, out: str | Path, extra: list[str] | None = None,
                     timeout: float | None = None, log: str | Path | None = None) -> dict:
    """benchmarks/engine_bench.py in its own process (one vLLM engine with sleep mode per CUDA
    process; a fresh process also gives each configuration its own peak-memory counters)."""
    cmd = [sys.executable, str(Path(__file__).with_name("engine_bench.py")), "--arch", arch, "--mode", mode,
           "--parts", parts, "--out", str(out), *(extra or [])]
    t = time.perf_counter()
    logf = open(log, "w") if log else None
    try:
        rc = subprocess.run(cmd, timeout=timeout, stdout=logf, stderr=subprocess.STDOUT if logf else None).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    finally:
        if logf:
            logf.close()
    res = json.loads(Path(out).read_text()) if Path(out).is_file() else {"arch": arch, "mode": mode}
    res["returncode"], res["process_wall_s"] = rc, time.perf_counter() - t
    return res
