"""TRL's GRPOTrainer (vLLM colocate) on the work of recipe smollm2-135m-1xh200, on one GPU (issue 14).

Same model dir (the recipe's SmolLM2-135M-Instruct build), the same prompts in the same order (the
rows our flow draws for steps 1..S of data/<recipe>/train.parquet), n, response length, sampling
(temperature 1, top_p 1), lr (constant), AdamW (betas, weight decay 0.01, clip 1.0), KL to the
reference (TRL's beta = our kl_loss_coef; TRL's estimator is k3, our low_var_kl), clip 0.2, the
reward (our built-in GSM8K scorer with the recipe's format_score: envs/gsm8k.py, i.e. the
reference scorer), one PPO epoch as train_batch_size / ppo_mini_batch_size optimizer steps per
generation (TRL's steps_per_generation), bf16. Loss: TRL "dapo" (tokens summed over the optimizer
step's samples / their count), the closest to our token-mean.

Step time = wall time between the optimizer steps that close one generation (on_step_end), i.e.
generation + reward + log-probs + both updates + weight sync; tokens = prompt + completion tokens.
Full-test eval: greedy, max_completion_length tokens, all test prompts through TRL's own colocated
vLLM engine (TRL has no built-in greedy mean@1 eval), scored strict and flexible, timed.

  python benchmarks/vs_peers/trl_grpo.py --steps 6 --out $OUT/trl.json
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--recipe", default="smollm2-135m-1xh200")
    p.add_argument("--eval", type=int, default=1, help="1: time a full test-set greedy eval after training")
    p.add_argument("--out", default="trl.json")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533").items():
        os.environ.setdefault(k, v)  # vLLM colocate = external_launcher inside this process group

    import pandas as pd
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from configs.load import load_config
    from envs import gsm8k as R
    from envs import reward_fn
    from tasks import stages

    cfg = load_config(a.recipe, a.overrides)
    d = Path(cfg.data.dir)
    train, test = pd.read_parquet(d / "train.parquet"), pd.read_parquet(d / "test.parquet")
    n = cfg.rollout.n
    rows = [int(i) for s in range(1, a.steps + 1) for i in stages.step_rows(len(train), cfg, s)]
    ds = Dataset.from_list(
        [
            {
                "prompt": [dict(m) for m in train["prompt"].iloc[i]],
                "ground_truth": train["reward_model"].iloc[i]["ground_truth"],
            }
            for i in rows
        ]
    )
    fn = reward_fn(cfg)

    def gsm8k_reward(completions, ground_truth, **kw):
        return [
            fn("openai/gsm8k", c[0]["content"] if isinstance(c, list) else c, g, None)
            for c, g in zip(completions, ground_truth)
        ]

    res = {
        "trl": trl.__version__,
        "torch": torch.__version__,
        "steps": [],
        "recipe": a.recipe,
        "device": torch.cuda.get_device_name(0),
    }
    upd = cfg.data.train_batch_size // cfg.actor.ppo_mini_batch_size  # optimizer steps per generation

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.t, self.tok = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % upd:
                return
            now = time.perf_counter()
            s = {
                "step": state.global_step // upd,
                "seconds": now - self.t,
                "tokens": int(state.num_input_tokens_seen - self.tok),
            }
            res["steps"].append(s)
            print(f"[trl] step {s['step']}: {s['seconds']:.2f} s, {s['tokens']} tok", flush=True)
            self.t, self.tok = now, state.num_input_tokens_seen

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and res["steps"] and "reward" in logs:
                res["steps"][-1].setdefault("logs", []).append(
                    {
                        k: logs[k]
                        for k in logs
                        if k in ("reward", "completions/mean_length", "kl", "completions/clipped_ratio")
                    }
                )

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(cfg.model.path)
    mb = cfg.actor.ppo_mini_batch_size * n  # samples per optimizer step
    micro = min(cfg.actor.ppo_micro_batch_size_per_gpu, mb)
    args = GRPOConfig(
        output_dir="/tmp/trl-out",
        bf16=True,
        gradient_checkpointing=cfg.model.enable_gradient_checkpointing,
        seed=cfg.trainer.seed,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=mb // micro,
        steps_per_generation=upd * (mb // micro),
        num_generations=n,
        max_completion_length=cfg.rollout.max_response_length,
        temperature=cfg.rollout.temperature,
        top_p=1.0,
        learning_rate=cfg.actor.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=cfg.actor.weight_decay,
        adam_beta1=0.9,
        adam_beta2=0.999,
        max_grad_norm=cfg.actor.grad_clip,
        beta=cfg.actor.kl_loss_coef,
        num_iterations=1,
        epsilon=0.2,
        loss_type="dapo",
        scale_rewards="group",
        max_steps=a.steps * upd,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        shuffle_dataset=False,
        log_completions=False,
        use_vllm=True,
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
        vllm_max_model_length=cfg.data.max_prompt_length + cfg.rollout.max_response_length,
    )
    trainer = GRPOTrainer(
        model=model, processing_class=tok, reward_funcs=gsm8k_reward, args=args, train_dataset=ds, callbacks=[Timer()]
    )
    res["init_s"] = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    res["train_s"] = time.perf_counter() - t0 - res["init_s"]
    res["torch_max_memory_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
    if a.eval:
        from vllm import SamplingParams

        llm = getattr(getattr(trainer, "vllm_generation", None), "llm", None) or getattr(trainer, "llm", None)
        prompts = [
            tok.apply_chat_template([dict(m) for m in msgs], add_generation_prompt=True, tokenize=False)
            for msgs in test["prompt"]
        ]
        t = time.perf_counter()
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=cfg.rollout.max_response_length))
        texts = [o.outputs[0].text for o in outs]
        fin = [o.outputs[0].finish_reason for o in outs]
        truths = [r["ground_truth"] for r in test["reward_model"]]
        strict = [R.compute_score("openai/gsm8k", x, g, {"finish_reason": f}) for x, g, f in zip(texts, truths, fin)]
        flex = [
            R.flexible_compute_score("openai/gsm8k", x, g, {"finish_reason": f}) for x, g, f in zip(texts, truths, fin)
        ]
        res["eval"] = {
            "prompts": len(texts),
            "seconds": time.perf_counter() - t,
            "strict": sum(strict) / len(strict),
            "flexible": sum(flex) / len(flex),
        }
        print(f"[trl] eval after {a.steps} steps: {res['eval']}", flush=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "steps"}))


if __name__ == "__main__":
    main()
