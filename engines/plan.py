"""`grpo plan`: per-GPU memory, FLOPs and step time of a recipe, from the model's shape alone.

Pure arithmetic on config numbers: no CUDA, no model weights, no network. It models what the code
in engines/ allocates today (see TRAINER_IMPLEMENTS), so a prediction can be checked against a
measured `perf/max_memory_allocated_gb`; `as_configured=True` models every config knob as the
config states it (FSDP sharding over the world, offload between uses) for the trainer to come.

Peak, the number that must fit on one GPU, is trainer peak + vLLM's budget (util x GPU memory):
- torch.cuda.max_memory_allocated counts vLLM's blocks even while vLLM sleeps (its CuMem pool
  unmaps memory behind torch's back: vllm-project/vllm#17117, #33625), so it reads the same sum;
- physically, nothing in engines/ calls torch.cuda.empty_cache(), so the trainer's cached
  blocks stay reserved when vLLM wakes for the next rollout: the same sum must fit.
In as-configured mode the trainer is assumed to release its cache and offload between uses, so
peak = max(rollout phase, training phase).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from configs.schema import GRPOConfig
from engines.plan_host import RAY_MEMORY_THRESHOLD, format_host, host_memory

GIB = 2**30

# What engines/trainer.py does today with the knobs the schema has. Flip an entry when the trainer
# implements it; `--as-configured` sets all to True.
TRAINER_IMPLEMENTS = {"fsdp_shard": True, "fused_adamw": True, "param_offload": True, "optimizer_offload": True,
                      "dynamic_bsz": True, "empty_cache_between_phases": False}

ASSUMED_MFU = 0.40
"""Share of dense bf16 peak a training/prefill matmul pass reaches (stated, not measured)."""
ASSUMED_BW_EFF = 0.70
"""Share of HBM bandwidth a vLLM decode step reaches (stated, not measured)."""
VLLM_NON_TORCH_GIB = 0.5
"""CUDA graphs, cuBLAS/NCCL workspaces inside vLLM's budget, not counted by torch (rough)."""


@dataclass(frozen=True)
class GPU:
    name: str
    mem_gib: float  # total memory torch (and vLLM's budget) sees
    hbm_tbs: float  # HBM bandwidth, TB/s (datasheet)
    bf16_tflops: float  # dense bf16 peak (recipes.md)



def _mib(smi_mib: int) -> float:
    """torch's total_memory from nvidia-smi's total: 481 MiB less on an H100 (85017493504 B seen)."""
    return (smi_mib - 481) / 1024


# Memory: nvidia-smi totals (H100/H800 80GB HBM3 81559 MiB, H200 143771 MiB, H20 97871 MiB,
# A100 80GB 81920 MiB). Bandwidth: NVIDIA datasheets (SXM parts). Peak: recipes.md.
GPUS = {
    "H100": GPU("H100", _mib(81559), 3.35, 989.0),
    "H800": GPU("H800", _mib(81559), 3.35, 989.0),
    "H200": GPU("H200", _mib(143771), 4.8, 989.0),
    "H20": GPU("H20", _mib(97871), 4.0, 148.0),
    "A100": GPU("A100", _mib(81920), 2.039, 312.0),
}


@dataclass(frozen=True)
class Shape:
    """The config.json fields that size a Qwen2/Llama decoder."""
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tie: bool
    head_dim: int = 0  # 0: hidden // heads
    qkv_bias: bool = True  # Qwen2: q/k/v projections carry a bias; Llama: attention_bias

    @property
    def d(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each Linear in one decoder layer, named as in transformers."""
        h, q, kv, i = self.hidden, self.heads * self.d, self.kv_heads * self.d, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def n_params(self) -> int:
        per_layer = sum(a * b for a, b in self.linears().values()) + 2 * self.hidden  # + 2 RMSNorms
        if self.qkv_bias:
            per_layer += (self.heads + 2 * self.kv_heads) * self.d
        emb = self.vocab * self.hidden
        return emb * (1 if self.tie else 2) + self.layers * per_layer + self.hidden

    def n_linear(self) -> int:
        """Parameters autocast casts to bf16 in a forward: every Linear, lm_head included."""
        return self.layers * sum(a * b for a, b in self.linears().values()) + self.vocab * self.hidden

    def lora_params(self, rank: int, targets: str | list[str]) -> int:
        if rank == 0:
            return 0
        lin = self.linears()
        names = list(lin) if targets == "all-linear" else ([targets] if isinstance(targets, str) else targets)
        return self.layers * sum(rank * (lin[n][0] + lin[n][1]) for n in names if n in lin)

    def kv_bytes_per_token(self, tp: int = 1, dtype_bytes: int = 2) -> int:
        """K and V of one token, all layers, on one GPU of a TP group (KV heads replicate past TP)."""
        return 2 * self.layers * max(1, self.kv_heads // tp) * self.d * dtype_bytes


def shape_from_hf(c: dict) -> Shape:
    heads = c["num_attention_heads"]
    return Shape(hidden=c["hidden_size"], layers=c["num_hidden_layers"], heads=heads,
                 kv_heads=c.get("num_key_value_heads") or heads, intermediate=c["intermediate_size"],
                 vocab=c["vocab_size"], tie=bool(c.get("tie_word_embeddings", False)),
                 head_dim=c.get("head_dim") or 0,
                 qkv_bias=c.get("model_type") == "qwen2" or bool(c.get("attention_bias", False)))


def _cfg(hidden, layers, heads, kv, inter, vocab, tie, model_type="qwen2", **kw) -> dict:
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                tie_word_embeddings=tie, model_type=model_type, **kw)


# PUBLISHED_HUB_CONFIGS: the fields of each hub model's own config.json (hidden_size,
# num_hidden_layers, num_attention_heads, num_key_value_heads, intermediate_size, vocab_size,
# tie_word_embeddings), for the hub ids the reference recipes name; no network needed.
PUBLISHED_HUB_CONFIGS: dict[str, dict] = {
    "Qwen/Qwen2.5-0.5B-Instruct": _cfg(896, 24, 14, 2, 4864, 151936, True),
    "Qwen/Qwen2.5-1.5B-Instruct": _cfg(1536, 28, 12, 2, 8960, 151936, True),
    "Qwen/Qwen2.5-3B-Instruct": _cfg(2048, 36, 16, 2, 11008, 151936, True),
    "Qwen/Qwen2.5-7B-Instruct": _cfg(3584, 28, 28, 4, 18944, 152064, False),
    "Qwen/Qwen2.5-14B-Instruct": _cfg(5120, 48, 40, 8, 13824, 152064, False),
    "Qwen/Qwen2.5-32B-Instruct": _cfg(5120, 64, 40, 8, 27648, 152064, False),
    "Qwen/Qwen2.5-32B": _cfg(5120, 64, 40, 8, 27648, 152064, False),
    "Qwen/Qwen2.5-72B-Instruct": _cfg(8192, 80, 64, 8, 29568, 152064, False),
    "Qwen/Qwen2-7B-Instruct": _cfg(3584, 28, 28, 4, 18944, 152064, False),
    "Qwen/Qwen2-72B-Instruct": _cfg(8192, 80, 64, 8, 29568, 152064, False),
    # model.source=gguf builds this one (configs/smollm2-135m-cpu.yaml).
    "HuggingFaceTB/SmolLM2-135M-Instruct": _cfg(576, 30, 9, 3, 1536, 49152, True, model_type="llama"),
}


def model_shape(cfg: GRPOConfig) -> tuple[Shape, str]:
    """The policy's shape and where it came from: a local config.json, a preset, or the table."""
    m = cfg.model
    local = Path(m.path) / "config.json"
    if local.is_file():
        return shape_from_hf(json.loads(local.read_text())), str(local)
    if m.source == "random":
        from engines.models import ARCH_PRESETS

        if m.arch not in ARCH_PRESETS:
            raise ValueError(f"model.arch={m.arch!r} is not a preset; choose one of {sorted(ARCH_PRESETS)}")
        # tiny's vocab is the trained tokenizer's size rounded to 64, known only after the build.
        preset = {"vocab_size": 1024, "model_type": "qwen2", **ARCH_PRESETS[m.arch]}
        return shape_from_hf(preset), f"engines.models.ARCH_PRESETS[{m.arch!r}]"
    if m.source == "gguf":
        return shape_from_hf(PUBLISHED_HUB_CONFIGS["HuggingFaceTB/SmolLM2-135M-Instruct"]), "SmolLM2 table"
    if m.path in PUBLISHED_HUB_CONFIGS:
        return shape_from_hf(PUBLISHED_HUB_CONFIGS[m.path]), "PUBLISHED_HUB_CONFIGS"
    raise ValueError(f"model.path={m.path}: no config.json there and not a known hub id; give a local "
                     f"HF dir or one of: {', '.join(PUBLISHED_HUB_CONFIGS)}")


def gpu_of(cfg: GRPOConfig, name: str | None = None) -> tuple[GPU, str]:
    """The GPU from an explicit name, else from the recipe name (`...-4xh800`), else H100."""
    if name:
        key = name.upper()
        if key not in GPUS:
            raise ValueError(f"unknown GPU {name!r}; choose one of {', '.join(GPUS)}")
        return GPUS[key], "given"
    hit = re.search(r"\d+x(h200|h100|h800|h20|a100)\b", cfg.recipe, re.IGNORECASE)
    if hit:
        return GPUS[hit.group(1).upper()], f"recipe name '{cfg.recipe}'"
    why = "a CPU recipe, planned as if on a GPU" if cfg.trainer.device == "cpu" else "recipe names no GPU"
    return GPUS["H100"], f"default ({why}; --gpu to choose)"


# ---- activations -------------------------------------------------------------------------------
def layer_act_bytes_per_token(s: Shape) -> int:
    """Tensors one decoder layer keeps for backward, per token, under bf16 autocast on fp32 weights.

    The residual stream stays fp32 (fp32 embedding + bf16 branch outputs promote), RMSNorm keeps
    fp32 normed + output, Linear inputs are cast to bf16, SDPA with a padding mask runs on
    repeat_kv-expanded K/V (transformers' sdpa path), the MLP keeps gate, up, silu(gate), product.
    """
    h, q, kv, i = s.hidden, s.heads * s.d, s.kv_heads * s.d, s.intermediate
    fp32_h = 4 * (1 + 2 + 1 + 2)  # residual in, norm1 (normed + out), residual mid, norm2
    bf16_h = 2 * (1 + 1 + 1 + 1)  # casts into qkv and mlp, o_proj out, down_proj out
    attn = 2 * (q + 2 * kv + q + kv + 2 * q + q + q) + 4 * s.heads  # q,k,v, rope q/k, repeat k/v, out, o_in; lse
    mlp = 2 * 4 * i
    return fp32_h * h + bf16_h * h + attn + mlp


def activation_bytes(s: Shape, tokens: int, checkpointing: bool, input_bytes: int = 4) -> int:
    """Saved activations of the decoder stack for `tokens` (micro-batch x padded length).
    input_bytes: of each kept layer input, fp32 on autocast (4) or bf16 under FSDP2's bf16 params (2)."""
    per_layer = layer_act_bytes_per_token(s) * tokens
    if checkpointing:  # layer inputs kept; one layer's tensors live while it is recomputed
        return s.layers * input_bytes * s.hidden * tokens + per_layer
    return s.layers * per_layer


# Bytes per response-logit element (b x (R+1) x vocab) at the peak of a training micro-batch:
# the bf16 lm_head output and its bf16 gradient; log-probs and entropy are computed one row at a
# time and recomputed in backward (algos.token_logprobs), so their fp32 temporaries exist for one
# row only (ROW_BYTES per element of one row). A no-grad pass holds the bf16 logits and one row.
# Checked on one H100 (tests/test_plan.py lists the measured runs).
LOGIT_BYTES_TRAIN = 4
LOGIT_BYTES_NOGRAD = 2
ROW_BYTES = 20


def logits_elems(s: Shape, batch: int, resp: int) -> int:
    """Only response logits exist (trainer.py's logits_to_keep = R + 1)."""
    return batch * (resp + 1) * s.vocab


# ---- memory ------------------------------------------------------------------------------------
def _memory(cfg: GRPOConfig, s: Shape, g: GPU, feats: dict, b: int, fsdp: bool | None = None) -> dict[str, Any]:
    """Itemised per-GPU bytes for micro-batch b, the phase totals and the peak. fsdp: the trainer
    runs FSDP2 (default: when sharded over several GPUs; True also plans FSDP2 on one GPU)."""
    a, r, m = cfg.actor, cfg.rollout, cfg.model
    ws, tp = cfg.world_size, r.tensor_model_parallel_size
    shard = ws if (feats["fsdp_shard"] and a.strategy in ("fsdp", "fsdp2")) else 1
    fsdp = shard > 1 if fsdp is None else fsdp
    lora = m.lora_rank > 0
    P, P_lin = s.n_params(), s.n_linear()
    P_lora = s.lora_params(m.lora_rank, m.target_modules)
    P_train = P_lora if lora else P
    has_ref = a.use_kl_loss and not lora
    prompt, resp = cfg.data.max_prompt_length, r.max_response_length
    seq = prompt + resp
    items: list[dict] = []

    def add(item: str, phase: str, nbytes: float, note: str) -> float:
        items.append(dict(item=item, phase=phase, gib=nbytes / GIB, note=note))
        return nbytes

    sh = f" / {shard} (FSDP shard)" if shard > 1 else ""
    # Resident trainer state: fp32 master weights whatever model.dtype (trainer.py loads float32).
    w = add("actor weights (fp32 master)", "both", 4 * P / shard, f"{P / 1e9:.3f}B params x 4 B{sh}")
    lw = add("LoRA adapter (fp32)", "both", 4 * P_lora / shard,
             f"r={m.lora_rank} on {m.target_modules}: {P_lora / 1e6:.1f}M params") if lora else 0
    gr = add("gradients (fp32)", "both", 4 * P_train / shard, "kept between steps (zero_grad at next step)")
    opt = add("AdamW states (exp_avg, exp_avg_sq)", "both", 8 * P_train / shard, f"2 x 4 B x {P_train / 1e6:.1f}M")
    ref = add("reference model (bf16 copy)", "both", 2 * P / shard, "full FT with KL loss") if has_ref else 0
    if not has_ref:
        add("reference model", "both", 0, "base with adapter disabled (LoRA)" if lora else "no KL loss")
    resident = w + lw + gr + opt + ref
    off_p = feats["param_offload"] and a.param_offload
    off_o = feats["optimizer_offload"] and a.optimizer_offload
    # Offload between uses (recipes.md): gone while vLLM generates, back on the GPU for compute.
    offloaded = (w + lw + ref if off_p else 0) + (gr + opt if off_o else 0)

    tokens = b * seq
    ck = m.enable_gradient_checkpointing
    lm_cast = 2 * s.vocab * s.hidden
    if fsdp:  # one layer's bf16 unit gathered, one prefetched; the root's: its own item below
        cast_fwd = 2 * 2 * (P_lin - s.vocab * s.hidden) // s.layers
        cast_note = "FSDP2 all-gathered bf16 layer units (current + prefetched)"
    elif lora:  # frozen base weights are cast per op; saved for backward only without checkpointing
        cast_fwd = saved_cast = lm_cast if ck else 2 * P_lin
        cast_note = "frozen base cast per op" + ("; lm_head's kept for backward" if ck else ", all saved")
    else:  # autocast caches bf16 copies of every trainable Linear until the forward returns
        cast_fwd, saved_cast = 2 * P_lin, (lm_cast if ck else 2 * P_lin)
        cast_note = "autocast cache of every Linear during the forward"
    # Ulysses: a GPU holds 1/sp of every sequence's columns in the decoder, 1/sp of the rows' logits.
    sp = a.ulysses_sequence_parallel_size
    act = activation_bytes(s, tokens // sp, ck, input_bytes=2 if fsdp else 4)  # FSDP2: bf16 residual stream
    el = logits_elems(s, -(-b // sp), resp)
    add("bf16 weight copies", "train", cast_fwd, cast_note)
    # FSDP2 does not reshard the root after the forward: embedding + lm_head stay gathered (bf16).
    root = add("FSDP2 root unit (bf16, gathered)", "train", 2 * s.vocab * s.hidden * (1 if s.tie else 2),
               "embedding + lm_head, kept gathered after the forward") if fsdp else 0
    add(f"activations, checkpointing {'on' if ck else 'off'}", "train", act, f"micro-batch {b} x {seq} tokens" + (f" / Ulysses {sp}" if sp > 1 else ""))
    add(f"(activations if checkpointing {'off' if ck else 'on'})", "-", activation_bytes(s, tokens // sp, not ck),
        "for comparison only")
    mask = add("attention mask", "train", 3 * b * seq * seq, "[B,1,T,T] bool + bf16 SDPA bias (padded batch)")
    c, row = LOGIT_BYTES_TRAIN, ROW_BYTES * (resp + 1) * s.vocab
    lg = add("logits (fwd+bwd) + one row's fp32", "train", c * el + row,
             f"{b} x {resp + 1} x vocab {s.vocab} x {c} B + {ROW_BYTES} B x one row")
    tmp = add("optimizer step temporary", "train", 0 if feats["fused_adamw"] else 4 * P_train / shard,
              "none: fused AdamW" if feats["fused_adamw"] else "foreach AdamW sqrt(exp_avg_sq)")

    in_update = resident - (ref if off_p else 0)  # offload between uses: the ref leaves during the update
    # zero_grad(set_to_none) opens each update: while the logits peak, only lm_head's grad exists.
    head_grad = 0 if lora else 4 * s.vocab * s.hidden / shard
    if fsdp:
        # Measured on one H200 under FSDP2 (benchmarks/BENCHMARKS.md, section 11): the logits stage
        # is the peak, over the kept layer inputs and the final norm's bf16 output; one layer's
        # recompute (with its gathered units) comes after the logits are freed.
        per_layer = layer_act_bytes_per_token(s) * tokens // sp if ck else 0
        hid = 2 * s.hidden * tokens // sp
        upd = in_update - gr + root + mask + act - per_layer + hid + max(lg + head_grad, per_layer + cast_fwd)
        logp = resident + root + mask + max(2 * el + hid, LOGIT_BYTES_NOGRAD * el + row)
    else:
        # forward end (weight casts + bf16 logits) vs logits stage (casts freed, fp32 logits and grads)
        upd = in_update - gr + mask + act + max(cast_fwd + 2 * el, saved_cast + lg + head_grad)
        nograd_cast = 0 if lora else cast_fwd  # trainable weights are cached under no_grad too
        logp = resident + mask + max(nograd_cast + 2 * el + 4 * s.hidden * tokens // sp, LOGIT_BYTES_NOGRAD * el + row)
    step = in_update + tmp
    trainer_peak = max(upd, logp, step)

    # vLLM on this GPU: it may hold util x total (weights + profiled activations + KV cache).
    budget = r.gpu_memory_utilization * g.mem_gib * GIB
    v_w = 2 * P / tp
    if lora:  # one adapter slot at vLLM's rank ladder (max_lora_rank), every linear layer
        rank = next(x for x in (8, 16, 32, 64, 128, 256, 320, 512, 10**9) if m.lora_rank <= x)
        v_w += 2 * s.lora_params(rank, "all-linear") / tp
    max_tok = r.max_num_batched_tokens or max(r.max_model_len or seq, 8192)
    v_act = max_tok * (4 * s.intermediate // tp + 8 * s.hidden) + 8 * r.max_num_seqs * s.vocab
    other = v_act + VLLM_NON_TORCH_GIB * GIB
    kv = budget - v_w - other
    add("vLLM weights (bf16)", "rollout", v_w, f"/ TP {tp}" if tp > 1 else "whole model")
    add("vLLM activations + CUDA graphs", "rollout", other, f"profiled at {max_tok} tokens")
    add("vLLM KV cache", "rollout", max(kv, 0), f"rest of util {r.gpu_memory_utilization} x {g.mem_gib:.1f} GiB")

    if feats["empty_cache_between_phases"] or offloaded:  # engines/offload.py empties the cache
        rollout_phase = resident - offloaded + budget
        train_phase = trainer_peak + VLLM_NON_TORCH_GIB * GIB  # level-1 sleep: weights to host, KV freed
    else:  # the trainer's cached blocks stay reserved when vLLM wakes: both share the GPU
        rollout_phase, train_phase = resident + budget, trainer_peak + budget
    peak = max(rollout_phase, train_phase)
    # vLLM starts after the trainer loads (and offloads), before any gradient or AdamW state exists
    at_init = resident - gr - opt - (w + lw + ref if off_p else 0)
    total = g.mem_gib * GIB
    return dict(items=items, shard=shard, n_params=P, n_trainable=P_train, seq_len=seq,
                trainer_phases_gib=dict(update=upd / GIB, log_prob=logp / GIB, optimizer_step=step / GIB),
                trainer_resident_gib=resident / GIB, trainer_peak_gib=trainer_peak / GIB,
                vllm_budget_gib=budget / GIB, vllm_weights_gib=v_w / GIB, vllm_kv_gib=max(kv, 0) / GIB,
                rollout_phase_gib=rollout_phase / GIB, train_phase_gib=train_phase / GIB, peak_gib=peak / GIB,
                torch_max_allocated_gib=(trainer_peak + budget - other + v_act) / GIB,
                vllm_init_ok=at_init + budget <= total, vllm_kv_ok=kv > 0,
                fits=peak <= total and kv > 0 and at_init + budget <= total)


def largest_micro_batch(cfg: GRPOConfig, s: Shape, g: GPU, feats: dict, cap: int = 1 << 16) -> int:
    """Largest b whose plan fits (0: not even 1). Memory grows with b, so bisect."""
    if not _memory(cfg, s, g, feats, 1)["fits"]:
        return 0
    lo, hi = 1, cap
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if _memory(cfg, s, g, feats, mid)["fits"] else (lo, mid - 1)
    return lo


# ---- FLOPs and time ----------------------------------------------------------------------------
def _timing(cfg: GRPOConfig, s: Shape, g: GPU, mem: dict, b: int) -> dict[str, Any]:
    """FLOPs (whole step, all GPUs) and seconds per stage (per GPU, all GPUs in parallel)."""
    a, r, m = cfg.actor, cfg.rollout, cfg.model
    ws, tp = cfg.world_size, r.tensor_model_parallel_size
    P, L, h = mem["n_params"], s.layers, s.hidden
    prompt, resp = cfg.data.max_prompt_length, r.max_response_length
    seq = prompt + resp
    samples = cfg.data.train_batch_size * r.n
    peak = g.bf16_tflops * 1e12
    fwd = samples * (2 * P * seq + 4 * L * h * seq * seq)  # dense + attention (trainer.py's convention)
    flops = {"gen": fwd, "old_log_prob": fwd, "ref": fwd,
             "update_actor": a.ppo_epochs * 3 * fwd}  # 6 N T + 12 L h S^2 (perf/mfu/actor)
    # gen: prefill is compute-bound; decode re-reads weights and the live KV cache each token.
    engines = ws // tp
    per_engine = math.ceil(samples / engines)
    kv_seqs = mem["vllm_kv_gib"] * GIB / s.kv_bytes_per_token(tp) / (r.max_model_len or seq)
    conc = max(1, min(per_engine, r.max_num_seqs, int(kv_seqs)))
    waves = math.ceil(per_engine / conc)
    step_bytes = mem["vllm_weights_gib"] * GIB + conc * (prompt + resp / 2) * s.kv_bytes_per_token(tp)
    step_s = max(step_bytes / (g.hbm_tbs * 1e12 * ASSUMED_BW_EFF),
                 2 * P / tp * conc / (peak * ASSUMED_MFU))
    prefill_s = 2 * P * per_engine * prompt / tp / (peak * ASSUMED_MFU)
    lora, ck = m.lora_rank > 0, m.enable_gradient_checkpointing
    # hardware passes per token relative to one forward: LoRA skips weight grads; checkpointing recomputes
    passes = (2 if lora else 3) + (1 if ck else 0)
    t = {"gen": prefill_s + waves * resp * step_s,
         "old_log_prob": fwd / ws / (peak * ASSUMED_MFU),
         "ref": fwd / ws / (peak * ASSUMED_MFU) if a.use_kl_loss else 0.0,
         "update_actor": a.ppo_epochs * passes * fwd / ws / (peak * ASSUMED_MFU)}
    if not lora:  # bf16 copy of each weight into vLLM: read fp32 + write bf16 on the GPU
        t["update_weights"] = 6 * P / tp / (g.hbm_tbs * 1e12 * ASSUMED_BW_EFF)
    t["step"] = sum(t.values())
    flops["step"] = sum(flops.values())
    return dict(flops=flops, time_s=t, gen_concurrency=conc, gen_waves=waves, kv_full_seqs=kv_seqs,
                predicted_mfu_update=flops["update_actor"] / ws / t["update_actor"] / peak)


# ---- the plan ----------------------------------------------------------------------------------
def plan(cfg: GRPOConfig, gpu: str | None = None, *, as_configured: bool = False,
         micro_batch: int | None = None, fsdp: bool | None = None) -> dict[str, Any]:
    """Every number of the plan, as a dict (GiB, seconds, FLOPs): for tables and for benchmarks."""
    feats = {k: True for k in TRAINER_IMPLEMENTS} if as_configured else dict(TRAINER_IMPLEMENTS)
    s, shape_src = model_shape(cfg)
    g, gpu_src = gpu_of(cfg, gpu)
    a = cfg.actor
    b = micro_batch or a.ppo_micro_batch_size_per_gpu
    if micro_batch is None and feats["dynamic_bsz"] and a.use_dynamic_bsz:
        # The trainer's budget counts padded tokens, rows x (longest prompt + longest response)
        # (engines/batching.py): at full-length samples, as planned here, that many rows (>= 1, the
        # config checks). Shorter prompts let more rows in, so the response logits (rows x R x vocab)
        # of a real micro-batch can exceed this plan's.
        b = (a.ppo_max_token_len_per_gpu * a.ulysses_sequence_parallel_size
             // (cfg.data.max_prompt_length + cfg.rollout.max_response_length))
    mem = _memory(cfg, s, g, feats, b, fsdp)
    host = host_memory(cfg, s, mem["shard"])
    gpu_fits = mem.pop("fits")
    return dict(gpu_fits=gpu_fits, fits=gpu_fits and host["host_fits"], **host,
                recipe=cfg.recipe, mode="as-configured" if as_configured else "current trainer",
                features=feats, gpu=asdict(g), gpu_source=gpu_src, shape=asdict(s), shape_source=shape_src,
                world_size=cfg.world_size, tp=cfg.rollout.tensor_model_parallel_size, micro_batch=b,
                samples_per_gpu_per_minibatch=(a.ppo_mini_batch_size * cfg.rollout.n * a.ulysses_sequence_parallel_size
                                               // cfg.world_size),
                largest_micro_batch=largest_micro_batch(cfg, s, g, feats),
                **mem, **_timing(cfg, s, g, mem, b))


def format_plan(p: dict[str, Any], other: dict[str, Any] | None = None) -> str:
    """The itemised table `grpo plan` prints."""
    g, sh = p["gpu"], p["shape"]
    lines = [
        f"plan: {p['recipe']} on {p['world_size']} x {g['name']} ({g['mem_gib']:.1f} GiB each; GPU from "
        f"{p['gpu_source']}), {p['mode']}",
        f"model: {p['n_params'] / 1e9:.3f}B params (hidden {sh['hidden']}, {sh['layers']} layers, "
        f"{sh['heads']}/{sh['kv_heads']} heads, inter {sh['intermediate']}, vocab {sh['vocab']}, "
        f"tied {sh['tie']}) from {p['shape_source']}; trainable {p['n_trainable'] / 1e6:.1f}M",
        f"batch: micro {p['micro_batch']} x {p['seq_len']} tokens (prompt + response, padded worst case); "
        f"{p['samples_per_gpu_per_minibatch']} samples/GPU per mini-batch; rollout TP {p['tp']}",
        "", f"{'item':44s} {'phase':8s} {'GiB':>9s}  note", "-" * 100]
    for it in p["items"]:
        lines.append(f"{it['item']:44s} {it['phase']:8s} {it['gib']:9.2f}  {it['note']}")
    ph = p["trainer_phases_gib"]
    lines += ["-" * 100,
              f"{'trainer peak (max of update / log-prob / step)':53s} {p['trainer_peak_gib']:9.2f}  "
              f"update {ph['update']:.2f}, log-prob {ph['log_prob']:.2f}, optimizer step {ph['optimizer_step']:.2f}",
              f"{'vLLM budget (gpu_memory_utilization x GPU)':53s} {p['vllm_budget_gib']:9.2f}  "
              f"KV holds {p['kv_full_seqs']:.0f} full-length sequences",
              f"{'rollout phase':53s} {p['rollout_phase_gib']:9.2f}",
              f"{'training phase':53s} {p['train_phase_gib']:9.2f}",
              f"{'PEAK per GPU':53s} {p['peak_gib']:9.2f}  of {g['mem_gib']:.1f} GiB; "
              f"torch.cuda.max_memory_allocated would read ~{p['torch_max_allocated_gib']:.2f}"]
    lines += format_host(p)
    verdict = "FITS" if p["fits"] else "DOES NOT FIT"
    why = [] if p["vllm_kv_ok"] else ["vLLM weights + activations exceed its budget: no KV cache"]
    if not p["vllm_init_ok"]:
        why.append("vLLM's budget is more than the memory left after the trainer loads")
    if not p["gpu_fits"] and p["vllm_kv_ok"] and p["vllm_init_ok"]:
        why.append("GPU peak over the GPU's memory")
    if not p["host_fits"]:
        why.append(f"host: {p['host_node_gib']:.1f} GiB per node over {p['node_ram_gib']:.1f} GiB x "
                   f"{RAY_MEMORY_THRESHOLD:.0%}: turn actor.param_offload/optimizer_offload off where the GPU "
                   "has room, fewer ranks per node, or a node with more RAM (trainer.node_ram_gb)")
    lines.append(f"verdict: {verdict}" + (f" ({'; '.join(why)})" if why else "") +
                 f"; largest ppo_micro_batch_size_per_gpu that fits: {p['largest_micro_batch']}")
    if other is not None:
        lines.append(f"  {other['mode']}: peak {other['peak_gib']:.2f} GiB, "
                     f"{'fits' if other['fits'] else 'does not fit'}, largest micro-batch {other['largest_micro_batch']}"
                     f" (FSDP shard {other['shard']}, offload/empty_cache as configured)")
    t, f = p["time_s"], p["flops"]
    lines += ["", f"{'stage':16s} {'TFLOP (all GPUs)':>17s} {'est. s':>9s}   "
              f"(MFU {ASSUMED_MFU:.0%} of {g['bf16_tflops']:.0f} TFLOP/s, decode at {ASSUMED_BW_EFF:.0%} of "
              f"{g['hbm_tbs']} TB/s)"]
    for k, v in t.items():
        lines.append(f"{k:16s} {f.get(k, 0) / 1e12:17.1f} {v:9.3f}")
    lines.append(f"gen: {p['gen_concurrency']} sequences at a time per engine, {p['gen_waves']} wave(s); "
                 f"worst case (every response at max length); update MFU as perf/mfu/actor "
                 f"~{p['predicted_mfu_update']:.0%}")
    return "\n".join(lines)
