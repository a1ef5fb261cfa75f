"""Archived one-off: trainer vs vLLM log-probs of SmolLM2-135M on CPU (BENCHMARKS.md issue 14 section, 2026-12-06).

Do the trainer and vLLM compute the same distribution for SmolLM2-135M-Instruct? (issue 14)

One GRPOWorker in-process (trainer + colocated vLLM), the smollm2 recipe's model, real GSM8K test
prompts through the model's chat template, temperature 1, 128 new tokens. Prints, per token, the
|vLLM - trainer| log-prob of the sampled tokens: on the fresh engine, after a weight perturbation
(stale), after the weight sync; that the engine's lm_head is its embed_tokens (tied) and equals the
trainer's; the prompt/eos tokens; and, with plain transformers on the same responses, how far a
bf16 forward is from an fp32 one (the share of the GPU's diff that bf16 alone explains).

  python benchmarks/archive/smollm2_parity.py [--device cpu|cuda] [--dtype float32|bfloat16] [--n 16]
Writes one JSON line to stdout (last line).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from configs.load import load_config  # noqa: E402
from engines.models import materialize  # noqa: E402
from engines.worker import GRPOWorker  # noqa: E402
from envs.gsm8k import GSM8K, INSTRUCTION  # noqa: E402
from envs.prep import load_raw  # noqa: E402
from tasks.stages import chat_ids  # noqa: E402


def token_logps(model, prompt, response, dtype):
    ids = torch.tensor([prompt + response])
    with torch.no_grad(), torch.autocast(model.device.type, dtype=dtype, enabled=dtype != torch.float32):
        logits = model(ids).logits.float()[0, len(prompt) - 1 : -1]
    return (
        torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None].to(logits.device))[:, 0].cpu().numpy()
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[3] / "shared" / "data" / "gsm8k"))
    ap.add_argument("--model", default="models/smollm2-135m-instruct")
    a = ap.parse_args()
    over = [
        f"trainer.device={a.device}",
        f"model.dtype={a.dtype}",
        f"model.path={a.model}",
        f"data.source={a.data}",
        "rollout.temperature=1.0",
        "rollout.calculate_log_probs=true",
    ]
    if a.device == "cuda":
        over += ["rollout.gpu_memory_utilization=0.3"]
    cfg = load_config("smollm2-135m-cpu", over)
    model_dir = materialize("gguf", cfg.model.path)
    w = GRPOWorker(cfg.model_dump_json(), model_dir, rank=0, world_size=1)
    tok = w.trainer.tokenizer
    qs = list(load_raw(GSM8K(), a.data)["test"]["question"][: a.n])
    prompts = [chat_ids(tok, [{"role": "user", "content": q + INSTRUCTION}]) for q in qs]  # as the flow
    sampling = dict(n=1, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=128, seeds=list(range(len(prompts))))

    def diff():
        out = sorted(w.generate(prompts, sampling), key=lambda o: o["prompt_index"])
        resp = [list(o["response_ids"]) for o in out]
        tr = w.compute_log_prob(prompts, resp)
        d = np.concatenate([np.abs(np.asarray(o["rollout_log_probs"]) - t) for o, t in zip(out, tr)])
        return d, out, resp

    fresh, out, resp = diff()
    res = {
        "device": a.device,
        "dtype": a.dtype,
        "prompts": len(prompts),
        "tokens": int(fresh.size),
        "fresh_mean": float(fresh.mean()),
        "fresh_max": float(fresh.max()),
        "eos_id": tok.eos_token_id,
        "eos": tok.eos_token,
        "pad": tok.pad_token,
        "finish": {r: sum(o["finish_reason"] == r for o in out) for r in ("stop", "length")},
        "prompt_head": tok.decode(prompts[0][:40]),
        "response_0": out[0]["response_text"][:200],
        "tied_config": bool(w.trainer.model.config.tie_word_embeddings),
    }
    # The engine's output head: the same storage as its embedding, and equal to the trainer's.
    try:
        m = w.rollout.llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
    except AttributeError:
        m = None
    if m is not None:
        res["vllm_lm_head_is_embed"] = m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
        emb = dict(w.trainer.model.named_parameters())
        key = next(k for k in emb if k.endswith("embed_tokens.weight"))
        res["vllm_embed_vs_trainer_maxabs"] = float(
            (m.model.embed_tokens.weight.float().cpu() - emb[key].detach().float().cpu()).abs().max()
        )
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in w.trainer.model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    stale, _, _ = diff()
    w.sync_weights()
    after, _, _ = diff()
    res.update(stale_mean=float(stale.mean()), after_sync_mean=float(after.mean()), after_sync_max=float(after.max()))
    # Plain transformers on the fresh responses: bf16 vs fp32 forward (the dtype alone).
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(a.device).eval()
    d16 = np.concatenate(
        [
            np.abs(token_logps(hf, p, r, torch.bfloat16) - token_logps(hf, p, r, torch.float32))
            for p, r in zip(prompts, resp)
            if r
        ]
    )
    res.update(hf_bf16_vs_fp32_mean=float(d16.mean()), hf_bf16_vs_fp32_max=float(d16.max()))
    fp32_vs_vllm = np.concatenate(
        [
            np.abs(token_logps(hf, p, r, torch.float32) - np.asarray(o["rollout_log_probs"]))
            for p, r, o in zip(prompts, resp, out)
            if r
        ]
    )
    res.update(hf_fp32_vs_vllm_mean=float(fp32_vs_vllm.mean()), hf_fp32_vs_vllm_max=float(fp32_vs_vllm.max()))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
