"""The GRPO actor update, whatever the backend: PPO epochs over mini-batches, the loss of each
micro-batch (PPO clip + KL to the reference - entropy bonus), the skip of a non-finite step, and
the step's metrics.

A backend (engines/trainer/fsdp.py) subclasses GRPOActor and supplies the parts that depend on
how the model is laid out: `_forward` (per-token log-probs of a micro-batch), `_micro_batches`,
`_sum`/`_max` (over ranks), `_backward` and `_clip_grad_norm`. Losses are normalised by counts
over the whole mini-batch, all ranks together, so the result depends neither on the micro-batch
size nor on the world size.
"""

from __future__ import annotations

import math
import time
from abc import abstractmethod
from contextlib import nullcontext

import numpy as np
import torch

from engines import algos
from engines.batching import minibatch_schedule
from engines.trainer.base import TrainerBackend
from engines.types import UpdateBatch
from planner.hardware import peak_bf16_tflops, train_flops


class GRPOActor(TrainerBackend):
    """Backend-independent GRPO update. Subclasses set: cfg, model, optimizer, scheduler, device
    (torch.device), compute_dtype (the autocast dtype), world (ranks), sp (Ulysses group size; 1 without), n_params, hf_config (the HF
    model config: layers, hidden size), bad_steps (int, skipped steps so far) and _offload (an
    engines/trainer/offload.py Offloader over their model, reference and optimizer)."""

    def _autocast(self):
        """bf16 (model.dtype) autocast for the forward on CUDA; a no-op on CPU or in fp32."""
        if self.device.type == "cuda" and self.compute_dtype != torch.float32:
            return torch.autocast("cuda", dtype=self.compute_dtype)
        return nullcontext()

    # ---- memory between uses (engines/trainer/offload.py) -------------------------------------
    def to_host(self) -> None:
        """TrainerBackend.to_host: the Offloader moves what the config offloads."""
        self._offload.to_host()

    def to_device(self, optimizer: bool = False) -> None:
        """TrainerBackend.to_device: the weights back on the GPU; with optimizer, the AdamW state too."""
        self._offload.to_device(optimizer=optimizer)

    @property
    def weights_on_host(self) -> bool:
        """TrainerBackend.weights_on_host: the weights are in host memory now."""
        return self._offload.params_on_host

    # ---- what a backend supplies -------------------------------------------------------------
    @abstractmethod
    def _forward(self, model, prompts: list[list[int]], responses: list[list[int]], with_entropy: bool):
        """(logp [B, R], entropy [B, R] or None, mask [B, R], rows): per-token log-probs of the
        responses (R: the longest), 1 where a token exists, and which of the given samples the B
        rows are (a backend that splits rows over ranks returns its share). Entropy is None when
        not asked for, or when the backend's forward cannot give it (then actor.entropy_coeff is 0
        and actor/entropy is not logged)."""

    @abstractmethod
    def _micro_batches(self, prompts: list[list[int]], responses: list[list[int]]) -> list[list[int]]:
        """Sample indices of each forward, covering every sample once."""

    @abstractmethod
    def _sum(self, values: list[float]) -> list[float]:
        """Sums over ranks (identity on one rank)."""

    @abstractmethod
    def _max(self, values: list[float]) -> list[float]:
        """Maxima over ranks (identity on one rank)."""

    @abstractmethod
    def _backward(self, loss: torch.Tensor) -> None:
        """Gradients of this rank's share of the global loss, summed over ranks."""

    @abstractmethod
    def _clip_grad_norm(self, max_norm: float) -> float:
        """Clip the trained parameters' gradients to max_norm (global L2); returns the norm before."""

    # ---- the update ---------------------------------------------------------------------------
    def _lr_lambda(self):
        """LR multiplier per optimizer step: linear warmup (algos.warmup_lambda) over the run's
        updates, steps x train_batch_size / ppo_mini_batch_size x ppo_epochs."""
        a, c = self.cfg.actor, self.cfg
        return algos.warmup_lambda(
            a.lr_warmup_steps,
            a.lr_warmup_steps_ratio,
            c.trainer.total_training_steps,
            (c.data.train_batch_size // a.ppo_mini_batch_size) * a.ppo_epochs,
        )

    def update(self, batch: UpdateBatch, seed: int, steps: list | None = None) -> dict[str, float]:
        """PPO epochs over mini-batches; one optimizer step per mini-batch.

        steps: the indices into batch of this rank's share of each optimizer step
        (minibatch_schedule; the default is the one-rank schedule of the whole batch); seed: the
        schedule's shuffle seed. Returns the `actor/*` metrics averaged over the optimizer steps
        (losses per token, actor/lr, actor/skipped_steps) and `perf/*` (update tokens, MFU on CUDA).
        Raises ValueError when batch.old_log_probs is None for more than one optimizer step."""
        if steps is None:
            steps = minibatch_schedule(len(batch.prompts), self.cfg, seed)
        if batch.old_log_probs is None and len(steps) != 1:
            raise ValueError(
                f"old_log_probs=None is for an on-policy step (one optimizer step), not {len(steps)}: "
                "compute them first (compute_log_prob)"
            )
        sums: dict[str, list[float]] = {}
        t0 = time.perf_counter()
        tokens = 0
        self.model.train()
        for idx in steps:
            stats = self._optimizer_step(batch, idx)
            for k, v in stats.items():
                sums.setdefault(k, []).append(v)
            tokens += sum(len(batch.prompts[i]) + len(batch.responses[i]) for i in idx)
        elapsed = time.perf_counter() - t0
        metrics = {k: float(np.mean(v)) for k, v in sums.items()}
        metrics["actor/lr"] = self.scheduler.get_last_lr()[0]
        metrics["actor/skipped_steps"] = float(self.bad_steps)
        metrics.update(self._perf(tokens, elapsed, batch))
        return metrics

    def _optimizer_step(self, batch: UpdateBatch, idx: np.ndarray) -> dict[str, float]:
        a = self.cfg.actor
        mini = batch.take([int(i) for i in idx])
        prompts, responses, old, ref = mini.prompts, mini.responses, mini.old_log_probs, mini.ref_log_probs
        adv = torch.tensor(np.asarray(batch.advantages, np.float32)[idx], device=self.device)
        # actor.mask_truncated_completions: a response cut at max_response_length weighs 0 and is
        # left out of the counts below, as if it were not in the mini-batch (TRL's completion mask).
        keep = [1.0] * len(idx)
        if a.mask_truncated_completions and mini.truncated is not None:
            keep = [0.0 if t else 1.0 for t in mini.truncated]
        keep_t = torch.tensor(keep, dtype=torch.float32, device=self.device)
        # Global counts; the sp ranks of a Ulysses group hold the same samples.
        n_tokens, n_seqs = (
            x / self.sp for x in self._sum([float(sum(len(r) * k for r, k in zip(responses, keep))), float(sum(keep))])
        )
        glob = dict(global_tokens=n_tokens, global_seqs=n_seqs, norm_len=self.cfg.rollout.max_response_length)
        agg = dict(loss_agg_mode=a.loss_agg_mode, **glob)
        self.optimizer.zero_grad(set_to_none=True)
        acc: dict[str, float] = {}
        diff = [0.0, 0.0, 0.0]  # on-policy: |rollout - trainer| log-prob sum, count, max
        for g in self._micro_batches(prompts, responses):
            logp, ent, mask, rows = self._forward(self.model, _take(prompts, g), _take(responses, g), with_entropy=True)
            g = [g[i] for i in rows]  # the samples of this rank's rows
            if old is None:  # on-policy: old_log_prob is this forward's, detached (ratio 1)
                old_t = logp.detach()
                if mini.rollout_log_probs is not None:
                    self._rollout_diff(
                        diff, logp, mask, [mini.rollout_log_probs[i] for i in g], [responses[i] for i in g]
                    )
            else:
                old_t = _pad_float(_take(old, g), logp)
            mask = mask * keep_t[g].unsqueeze(1)
            out = algos.policy_loss(
                logp,
                old_t,
                adv[g],
                mask,
                clip_ratio_low=a.clip_ratio_low,
                clip_ratio_high=a.clip_ratio_high,
                clip_ratio_c=a.clip_ratio_c,
                **agg,
            )
            share = {
                "actor/pg_loss": out["pg_loss"],
                "actor/pg_clipfrac": out["pg_clipfrac"],
                "actor/ppo_kl": out["ppo_kl"],
                "actor/pg_clipfrac_lower": out["pg_clipfrac_lower"],
            }
            loss = out["pg_loss"]
            if ent is not None:  # None: a forward without entropy (model.use_fused_kernels, entropy_coeff 0)
                share["actor/entropy"] = entropy = algos.agg_loss(ent, mask, a.loss_agg_mode, **glob)
                loss = loss - a.entropy_coeff * entropy
            if ref is not None:
                kl = algos.kl_penalty(logp, _pad_float(_take(ref, g), logp), a.kl_loss_type)
                kl_loss = algos.agg_loss(kl, mask, a.loss_agg_mode, **glob)
                loss = loss + a.kl_loss_coef * kl_loss
                share["actor/kl_loss"] = kl_loss
            self._backward(loss)
            for k, v in share.items():
                acc[k] = acc.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
        acc = dict(zip(acc, self._sum(list(acc.values()))))  # the shares of all ranks: global values
        if old is None and mini.rollout_log_probs is not None:
            (total, count), (peak,) = self._sum(diff[:2]), self._max(diff[2:])
            if count:
                acc["training/rollout_probs_diff_mean"] = total / count
                acc["training/rollout_probs_diff_max"] = peak
        grad_norm = self._clip_grad_norm(a.grad_clip)
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

    def _rollout_diff(self, acc: list[float], logp: torch.Tensor, mask: torch.Tensor, rollout, responses) -> None:
        """Adds |rollout - trainer| log-probs of the rows whose engine log-probs cover the response
        (rollout.calculate_log_probs) to acc = [sum, count, max]. logp, mask: [B, R]."""
        covered = [lp is not None and len(lp) == len(r) > 0 for lp, r in zip(rollout, responses)]
        keep = mask * torch.tensor(covered, dtype=mask.dtype, device=mask.device).unsqueeze(1)
        count = float(keep.sum())
        if not count:
            return
        engine = _pad_float([lp if c else [] for lp, c in zip(rollout, covered)], logp)
        d = (logp.detach() - engine).abs() * keep
        acc[0], acc[1], acc[2] = acc[0] + float(d.sum()), acc[1] + count, max(acc[2], float(d.max()))

    def _perf(self, tokens: int, elapsed: float, batch: UpdateBatch) -> dict[str, float]:
        """perf/update_tokens (prompt + response tokens of the update, all ranks; with Ulysses a
        group shares its samples, 1/sp each) and on CUDA perf/mfu/actor: this rank's training
        FLOPs (planner/hardware.train_flops) / elapsed seconds / the GPU's dense bf16 peak."""
        out = {"perf/update_tokens": self._sum([float(tokens)])[0] / self.sp}
        if self.device.type != "cuda":
            return out
        peak = peak_bf16_tflops(torch.cuda.get_device_name())
        if peak and elapsed > 0:
            c = self.hf_config
            seq_lens = [len(p) + len(r) for p, r in zip(batch.prompts, batch.responses)]
            flops = (
                train_flops(
                    self.n_params, tokens, c.num_hidden_layers, c.hidden_size, seq_lens, self.cfg.actor.ppo_epochs
                )
                / self.sp
            )
            out["perf/mfu/actor"] = flops / elapsed / (peak * 1e12)
        return out


def _take(xs: list, idx: list[int]) -> list:
    return [xs[i] for i in idx]


def _pad_float(rows: list[np.ndarray], like: torch.Tensor) -> torch.Tensor:
    """Tensor shaped, typed and placed like `like` ([B, W]): each row's values, zeros after."""
    out = np.zeros(tuple(like.shape), np.float64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return torch.from_numpy(out).to(like.device, like.dtype)
