"""The policy trainer: a transformers causal LM (+ optional peft LoRA) updated with the GRPO loss.

One rank's worth of work. Samples arrive as token-id lists; we lay each micro-batch out as
[left-padded prompt | right-padded response] so every response starts at the same column and
only the response logits are materialised (`logits_to_keep`).
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from configs.schema import GRPOConfig
from engines import algos

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Dense bf16 peak of the GPUs the recipes name (recipes.md), for perf/mfu/actor.
PEAK_TFLOPS = {"H100": 989.0, "H800": 989.0, "H200": 989.0, "H20": 148.0, "A100": 312.0}


def _pad(seqs: list[list[int]], pad_id: int, left: bool) -> torch.Tensor:
    width = max((len(s) for s in seqs), default=0)
    rows = [([pad_id] * (width - len(s)) + list(s)) if left else (list(s) + [pad_id] * (width - len(s)))
            for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


class ActorTrainer:
    """Holds the policy, its optimizer and (for full fine-tuning) a frozen reference copy."""

    def __init__(self, cfg: GRPOConfig, model_dir: str, device: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg, self.model_dir = cfg, model_dir
        self.device = torch.device(device)
        self.compute_dtype = DTYPES[cfg.model.dtype]
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # fp32 master weights; forward passes autocast to the compute dtype on GPU.
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(self.device)
        if cfg.model.enable_gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        self.is_lora = cfg.model.lora_rank > 0
        if self.is_lora:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=cfg.model.lora_rank, lora_alpha=cfg.model.lora_alpha,
                              target_modules=cfg.model.target_modules, lora_dropout=0.0,
                              bias="none", task_type="CAUSAL_LM")
            try:
                model = get_peft_model(model, lora)
            except ValueError as e:
                raise ValueError(f"model.target_modules={cfg.model.target_modules!r} does not fit "
                                 f"{model_dir}: {e}") from None
        self.model = model
        self.ref = None
        if cfg.actor.use_kl_loss and not self.is_lora:
            # LoRA needs no copy: the reference is the base with the adapter disabled.
            self.ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.compute_dtype).to(self.device)
            self.ref.eval().requires_grad_(False)
        params = [p for p in self.model.parameters() if p.requires_grad]
        a = cfg.actor
        self.optimizer = torch.optim.AdamW(params, lr=a.lr, betas=a.betas, weight_decay=a.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda())
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.bad_steps = 0

    # ---- schedule -------------------------------------------------------------------------
    def _lr_lambda(self):
        a, c = self.cfg.actor, self.cfg
        updates_per_step = (c.data.train_batch_size // a.ppo_mini_batch_size) * a.ppo_epochs
        warmup = a.lr_warmup_steps
        if warmup < 0:
            total = (c.trainer.total_training_steps or 1) * updates_per_step
            warmup = int(a.lr_warmup_steps_ratio * total)
        return lambda i: min(1.0, (i + 1) / warmup) if warmup > 0 else 1.0

    # ---- forward ----------------------------------------------------------------------------
    def _autocast(self):
        if self.device.type == "cuda" and self.compute_dtype != torch.float32:
            return torch.autocast("cuda", dtype=self.compute_dtype)
        return nullcontext()

    def _forward(self, model, prompts, responses, with_entropy: bool):
        """Per-token log-probs (and entropy) of each response under `model`: [B, R] tensors + mask."""
        p = _pad(prompts, self.pad_id, left=True)
        r = _pad(responses, self.pad_id, left=False)
        p_mask = (_pad([[1] * len(x) for x in prompts], 0, left=True))
        r_mask = (_pad([[1] * len(x) for x in responses], 0, left=False))
        ids = torch.cat([p, r], 1).to(self.device)
        attn = torch.cat([p_mask, r_mask], 1).to(self.device)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        R = r.shape[1]
        with self._autocast():
            logits = model(input_ids=ids, attention_mask=attn, position_ids=pos,
                           logits_to_keep=R + 1, use_cache=False).logits
        logits = logits[:, :-1].float() / max(self.cfg.rollout.temperature, 1e-6)
        labels = ids[:, -R:]
        logp = algos.logprobs_from_logits(logits, labels)
        ent = algos.entropy_from_logits(logits) if with_entropy else None
        return logp, ent, r_mask.to(self.device, torch.float32)

    def _micro_batches(self, n: int) -> Iterator[slice]:
        mb = self.cfg.actor.ppo_micro_batch_size_per_gpu
        for i in range(0, n, mb):
            yield slice(i, min(i + mb, n))

    @torch.no_grad()
    def compute_log_prob(self, prompts, responses, ref: bool = False) -> list[np.ndarray]:
        """Log-probs of each response under the current policy (old_log_prob) or the reference."""
        self.model.eval()
        out: list[np.ndarray] = []
        ctx = self.model.disable_adapter() if (ref and self.is_lora) else nullcontext()
        model = self.ref if (ref and self.ref is not None) else self.model
        with ctx:
            for s in self._micro_batches(len(prompts)):
                logp, _, mask = self._forward(model, prompts[s], responses[s], with_entropy=False)
                for row, m in zip(logp.cpu().numpy(), mask.cpu().numpy()):
                    out.append(row[: int(m.sum())].astype(np.float32))
        return out

    # ---- update -----------------------------------------------------------------------------
    def update(self, batch: dict, seed: int) -> dict[str, float]:
        """PPO epochs over mini-batches; one optimizer step per mini-batch.

        batch: prompts, responses (token-id lists), old_log_probs, ref_log_probs (ragged arrays
        or None), advantages ([N]). Losses are normalised over the whole mini-batch, so the
        result does not depend on how it is cut into micro-batches.
        """
        a = self.cfg.actor
        n = len(batch["prompts"])
        mini = a.ppo_mini_batch_size * self.cfg.rollout.n // self.cfg.world_size
        rng = np.random.default_rng(seed)
        sums: dict[str, list[float]] = {}
        t0 = time.perf_counter()
        tokens = 0
        self.model.train()
        for _ in range(a.ppo_epochs):
            order = rng.permutation(n)
            for start in range(0, n, mini):
                idx = order[start:start + mini]
                stats = self._optimizer_step(batch, idx)
                for k, v in stats.items():
                    sums.setdefault(k, []).append(v)
                tokens += sum(len(batch["prompts"][i]) + len(batch["responses"][i]) for i in idx)
        elapsed = time.perf_counter() - t0
        metrics = {k: float(np.mean(v)) for k, v in sums.items()}
        metrics["actor/lr"] = self.scheduler.get_last_lr()[0]
        metrics["actor/skipped_steps"] = float(self.bad_steps)
        metrics.update(self._perf(tokens, elapsed, batch))
        return metrics

    def _optimizer_step(self, batch: dict, idx: np.ndarray) -> dict[str, float]:
        a = self.cfg.actor
        pick = lambda key: [batch[key][i] for i in idx]  # noqa: E731
        prompts, responses = pick("prompts"), pick("responses")
        old = pick("old_log_probs")
        ref = pick("ref_log_probs") if batch.get("ref_log_probs") is not None else None
        adv = torch.tensor(np.asarray(batch["advantages"], np.float32)[idx], device=self.device)
        glob = dict(global_tokens=float(sum(len(r) for r in responses)), global_seqs=float(len(idx)),
                    norm_len=self.cfg.rollout.max_response_length)
        agg = dict(loss_agg_mode=a.loss_agg_mode, **glob)
        self.optimizer.zero_grad(set_to_none=True)
        acc: dict[str, float] = {}
        for s in self._micro_batches(len(idx)):
            logp, ent, mask = self._forward(self.model, prompts[s], responses[s], with_entropy=True)
            old_t = _pad_float(old[s], logp.shape[1], self.device)
            out = algos.policy_loss(logp, old_t, adv[s], mask, clip_ratio_low=a.clip_ratio_low,
                                    clip_ratio_high=a.clip_ratio_high, clip_ratio_c=a.clip_ratio_c, **agg)
            entropy = algos.agg_loss(ent, mask, a.loss_agg_mode, **glob)
            loss = out["pg_loss"] - a.entropy_coeff * entropy
            share = {"actor/pg_loss": out["pg_loss"], "actor/entropy": entropy,
                     "actor/pg_clipfrac": out["pg_clipfrac"], "actor/ppo_kl": out["ppo_kl"],
                     "actor/pg_clipfrac_lower": out["pg_clipfrac_lower"]}
            if ref is not None:
                kl = algos.kl_penalty(logp, _pad_float(ref[s], logp.shape[1], self.device), a.kl_loss_type)
                kl_loss = algos.agg_loss(kl, mask, a.loss_agg_mode, **glob)
                loss = loss + a.kl_loss_coef * kl_loss
                share["actor/kl_loss"] = kl_loss
            loss.backward()
            for k, v in share.items():
                acc[k] = acc.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, a.grad_clip))
        if math.isfinite(grad_norm):
            self.optimizer.step()
        else:
            # A NaN/inf gradient would poison the weights and Adam's moments: skip and count.
            self.bad_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        acc["actor/grad_norm"] = grad_norm
        acc.setdefault("actor/kl_loss", 0.0)
        return acc

    def _perf(self, tokens: int, elapsed: float, batch: dict) -> dict[str, float]:
        out = {"perf/update_tokens": float(tokens)}
        if self.device.type != "cuda":
            return out
        out["perf/max_memory_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        if peak and elapsed > 0:
            c = self.model.config
            layers, hidden = c.num_hidden_layers, c.hidden_size
            seq2 = sum((len(p) + len(r)) ** 2 for p, r in zip(batch["prompts"], batch["responses"]))
            # 6 N T dense + 12 L h S^2 attention (fwd+bwd), per epoch; +1 fwd for recomputation ignored.
            flops = (6 * self.n_params * tokens + 12 * layers * hidden * seq2 * self.cfg.actor.ppo_epochs)
            out["perf/mfu/actor"] = flops / elapsed / (peak * 1e12)
        return out

    # ---- weights out ------------------------------------------------------------------------
    def full_state_for_rollout(self) -> Iterator[tuple[str, torch.Tensor]]:
        """HF-named tensors in the rollout dtype, one at a time (full fine-tuning)."""
        for name, t in self.model.state_dict().items():
            yield name, t.detach().to(self.compute_dtype)

    def save_adapter(self, out_dir: str) -> None:
        self.model.save_pretrained(out_dir)

    # ---- checkpoint -------------------------------------------------------------------------
    def save(self, ckpt_dir: str) -> None:
        """Model (or adapter) + optimizer + scheduler + RNG in ckpt_dir/actor, HF export in ckpt_dir/huggingface."""
        actor = Path(ckpt_dir) / "actor"
        actor.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(actor)  # safetensors; for LoRA only the adapter
        torch.save(self.optimizer.state_dict(), actor / "optim.pt")
        torch.save({"scheduler": self.scheduler.state_dict(), "bad_steps": self.bad_steps,
                    "torch_rng": torch.get_rng_state()},
                   actor / "extra_state.pt")
        self.export_hf(str(Path(ckpt_dir) / "huggingface"))

    def export_hf(self, out_dir: str) -> None:
        """A plain HF model dir (LoRA merged into the base) loadable by from_pretrained and vLLM."""
        if self.is_lora:
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            tmp = Path(out_dir).parent / "adapter_tmp"
            self.model.save_pretrained(tmp)
            base = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=self.compute_dtype)
            merged = PeftModel.from_pretrained(base, tmp).merge_and_unload()
            merged.save_pretrained(out_dir)
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()
        else:
            self.model.to(self.compute_dtype)
            try:
                self.model.save_pretrained(out_dir)
            finally:
                self.model.to(torch.float32)
        self.tokenizer.save_pretrained(out_dir)

    def load(self, ckpt_dir: str) -> None:
        from safetensors.torch import load_file

        actor = Path(ckpt_dir) / "actor"
        if self.is_lora:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.model, load_file(actor / "adapter_model.safetensors"))
        else:
            state = {}
            for f in sorted(actor.glob("*.safetensors")):
                state.update(load_file(f))
            missing, unexpected = self.model.load_state_dict(state, strict=False)
            missing = [m for m in missing if not m.endswith("lm_head.weight")]
            if missing or unexpected:
                raise ValueError(f"checkpoint {actor} does not match model {self.model_dir}: "
                                 f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        self.optimizer.load_state_dict(torch.load(actor / "optim.pt", weights_only=True))
        extra = torch.load(actor / "extra_state.pt", weights_only=True)
        self.scheduler.load_state_dict(extra["scheduler"])
        self.bad_steps = extra["bad_steps"]
        torch.set_rng_state(extra["torch_rng"])


def _pad_float(rows: list[np.ndarray], width: int, device) -> torch.Tensor:
    out = np.zeros((len(rows), width), np.float32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return torch.from_numpy(out).to(device)
