"""Peak CUDA memory of ActorTrainer (log-prob, ref, update) on random Qwen2 shapes vs `grpo plan`.

    python benchmarks/trainer_memory.py [CASE ...]     (on a GPU; OUT=dir for calib.json)
    CUT=1 [FSDP=1] python benchmarks/trainer_memory.py [CASE ...]

CUT=1: the widths of the 14B/32B/72B LoRA recipes cut to a few layers (the decoder's activations
grow by one layer input per layer). A micro-batch of b/2 whole rows holds what Ulysses 2 leaves
each GPU of a micro-batch of b. FSDP=1: the trainer runs FSDP2 in a one-rank process group
(ActorTrainer(shard=True)), as each rank of a sharded run does; the plan is FSDP2's (fsdp=True).

Needs torch, transformers, peft and pydantic only (no vLLM): the trainer-side check of planner/.
"""

import gc
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.getcwd())
import numpy as np
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from configs.load import load_config
from engines.models import ARCH_PRESETS
from engines.trainer.fsdp import FSDPTrainer as ActorTrainer
from planner import plan

OUT = os.environ.get("OUT", "/tmp")
props = torch.cuda.get_device_properties(0)
print("device", props.name, "total_memory", props.total_memory, props.total_memory / 2**30, flush=True)


def build(arch, layers=None):
    d = f"/tmp/m-{arch}-{layers}"
    if os.path.exists(d):
        return d
    preset = dict(ARCH_PRESETS[arch], **({"num_hidden_layers": layers} if layers else {}))
    c = Qwen2Config(
        **preset, hidden_act="silu", use_sliding_window=False, pad_token_id=0, bos_token_id=0, eos_token_id=2
    )
    with torch.device("cuda"):
        m = AutoModelForCausalLM.from_config(c, dtype=torch.bfloat16)
    m.save_pretrained(d)
    del m
    torch.cuda.empty_cache()
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(os.path.join(os.path.dirname(__file__), "assets", "tokenizer", f), d)
    return d


CASES = [  # arch, lora rank, micro, prompt, response, ckpt
    ("0.5b", 0, 4, 512, 1024, True),
    ("0.5b", 32, 8, 512, 1024, True),
    ("0.5b", 32, 4, 512, 1024, False),
    ("1.5b", 0, 4, 512, 512, True),
    ("1.5b", 32, 16, 256, 512, True),
    ("3b", 32, 8, 512, 512, True),
]
FSDP = os.environ.get("FSDP") == "1"
if os.environ.get("CUT") == "1":  # arch, lora rank, micro, prompt, response, ckpt, layers
    CASES = [
        ("14b", 32, 8, 512, 1024, True, 8),
        ("14b", 32, 29, 512, 1024, True, 8),  # qwen2-14b-lora-2xh100: micro 58 / Ulysses 2
        ("32b", 32, 23, 512, 1024, True, 6),  # qwen2-32b-lora-4xh100: micro 45 / Ulysses 2 (rounded up)
        ("72b", 32, 11, 512, 1024, True, 3),  # qwen2-72b-lora-8xh100: micro 22 / Ulysses 2
    ]
if FSDP:
    import socket

    import torch.distributed as dist

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    dist.init_process_group("cpu:gloo,cuda:nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    torch.cuda.set_device(0)
if len(sys.argv) > 1:
    CASES = [CASES[int(i)] for i in sys.argv[1:]]
rows = []
for arch, rank, b, P, R, ck, *depth in CASES:
    layers = depth[0] if depth else None
    d = build(arch, layers)
    ov = [
        f"model.path={d}",
        "model.source=hf",
        f"model.lora_rank={rank}",
        f"data.max_prompt_length={P}",
        f"rollout.max_response_length={R}",
        f"data.train_batch_size={b}",
        f"actor.ppo_mini_batch_size={b}",
        f"actor.ppo_micro_batch_size_per_gpu={b}",
        "rollout.n=1",
        "trainer.n_gpus_per_node=1",
        f"model.enable_gradient_checkpointing={str(ck).lower()}",
        "rollout.gpu_memory_utilization=0.1",
        "rollout.tensor_model_parallel_size=1",
        "rollout.max_model_len=null",
        "rollout.max_num_batched_tokens=null",
    ]
    cfg = load_config("qwen2-0.5b-lora-1xh100" if rank else "qwen2-7b-2xh800", ov)
    pl = plan(cfg, "H100", fsdp=FSDP or None)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.time()
    tr = ActorTrainer(cfg, d, "cuda", shard=FSDP or None)
    init = torch.cuda.memory_allocated() - base
    g = torch.Generator().manual_seed(0)
    prompts = [list(torch.randint(3, 1000, (P,), generator=g).tolist()) for _ in range(b)]
    resps = [list(torch.randint(3, 1000, (R,), generator=g).tolist()) for _ in range(b)]
    meas = {}
    torch.cuda.reset_peak_memory_stats()
    old = tr.compute_log_prob(prompts, resps)
    meas["log_prob"] = torch.cuda.max_memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    ref = tr.compute_log_prob(prompts, resps, ref=True)
    meas["ref"] = torch.cuda.max_memory_allocated() - base
    batch = dict(
        prompts=prompts,
        responses=resps,
        old_log_probs=old,
        ref_log_probs=ref,
        advantages=np.random.default_rng(0).standard_normal(b).astype(np.float32),
    )
    tr.update(batch, seed=0)
    torch.cuda.reset_peak_memory_stats()
    tr.update(batch, seed=1)
    meas["update2"] = torch.cuda.max_memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    old = tr.compute_log_prob(prompts, resps)
    meas["log_prob2"] = torch.cuda.max_memory_allocated() - base
    meas["resident_after"] = torch.cuda.memory_allocated() - base
    meas["reserved"] = torch.cuda.max_memory_reserved()
    row = dict(
        arch=arch,
        layers=layers,
        fsdp=FSDP,
        lora=rank,
        micro=b,
        prompt=P,
        resp=R,
        ckpt=ck,
        init_gib=init / 2**30,
        pred_items={i["item"]: round(i["gib"], 3) for i in pl["items"]},
        **{k + "_gib": v / 2**30 for k, v in meas.items()},
        pred_trainer_peak=pl["trainer_peak_gib"],
        pred_phases=pl["trainer_phases_gib"],
        pred_resident=pl["trainer_resident_gib"],
        secs=time.time() - t0,
    )
    row["ratio_peak"] = row["pred_trainer_peak"] / max(meas["update2"], meas["log_prob2"]) * 2**30
    print(json.dumps(row), flush=True)
    rows.append(row)
    del tr, old, ref, batch
    gc.collect()
    torch.cuda.empty_cache()
json.dump(rows, open(f"{OUT}/calib{'_fsdp' if FSDP else ''}.json", "w"), indent=1)
