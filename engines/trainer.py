"""The policy trainer: a transformers causal LM (+ optional peft LoRA) updated with the GRPO loss.

One rank's worth of work. Samples arrive as token-id lists; we lay each micro-batch out as
[left-padded prompt | right-padded response] so every response starts at the same column and
only the response logits are materialised (`logits_to_keep`). Micro-batches hold
ppo_micro_batch_size_per_gpu samples, or with actor.use_dynamic_bsz as many as a token budget
allows (engines/batching.py).

With cfg.world_size > 1 the model is sharded with FSDP2 (`fully_shard` per decoder layer and at
the root) over a process group that `init_distributed` made; one rank runs unsharded, as before.
Losses are normalised by mini-batch counts summed over ranks, so the update is the same whatever
the world size. Full tensors leave the trainer one at a time (`DTensor.full_tensor()`), never
the whole model at once.
"""
from __future__ import annotations

import copy
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from configs.schema import GRPOConfig
from engines import algos, batching, ulysses
from engines.ckpt_files import RecordingWriter, write_safetensors

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Dense bf16 peak of the GPUs the recipes name (recipes.md), for perf/mfu/actor.
PEAK_TFLOPS = {"H100": 989.0, "H800": 989.0, "H200": 989.0, "H20": 148.0, "A100": 312.0}


SHARD_BYTES = 4 << 30  # largest safetensors file written by a checkpoint or export


def init_distributed(rank: int, world_size: int, master: tuple[str, int], device: str,
                     timeout_s: float = 300.0) -> None:
    """The trainer's process group: gloo on CPU; on CUDA nccl, with gloo for CPU-side counts.

    Made before vLLM starts, so each colocated engine sees it as an external data-parallel rank.
    timeout_s (trainer.collective_timeout_s): how long a collective waits for a missing rank before
    it fails (gloo raises; NCCL's watchdog ends the process), instead of NCCL's 10 min or more.
    """
    from datetime import timedelta

    backend = "cpu:gloo,cuda:nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(0)  # Ray shows each actor only its own GPU
    dist.init_process_group(backend, init_method=f"tcp://{master[0]}:{master[1]}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=timeout_s))


def minibatch_schedule(n: int, cfg: GRPOConfig, seed: int, rank: int = 0, world: int = 1) -> list[np.ndarray]:
    """This rank's sample indices for each optimizer step: every epoch reshuffles the n samples
    (seeded), cuts them into mini-batches, and gives each rank a contiguous share of each one.
    Shared by every rank and the worker group, so mini-batches are the same at any world size."""
    mini = cfg.actor.ppo_mini_batch_size * cfg.rollout.n
    rng = np.random.default_rng(seed)
    steps = []
    for _ in range(cfg.actor.ppo_epochs):
        order = rng.permutation(n)
        steps += [np.array_split(order[s:s + mini], world)[rank] for s in range(0, n, mini)]
    return steps


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every rank's shard (a collective) or as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t.detach()


def _take(xs: list, idx: list[int]) -> list:
    return [xs[i] for i in idx]


def _pad(seqs: list[list[int]], pad_id: int, left: bool) -> torch.Tensor:
    width = max((len(s) for s in seqs), default=0)
    rows = [([pad_id] * (width - len(s)) + list(s)) if left else (list(s) + [pad_id] * (width - len(s)))
            for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


class ActorTrainer:
    """Holds the policy, its optimizer and (for full fine-tuning) a frozen reference copy."""

    def __init__(self, cfg: GRPOConfig, model_dir: str, device: str, shard: bool | None = None,
                 master_dtype: torch.dtype = torch.float32):
        """shard: FSDP2 even on one rank (to test the sharded path on one GPU, in a 1-rank process
        group); by default exactly when cfg.world_size > 1.

        master_dtype: of the trained weights and the optimizer state (float32). torch.float64 (CPU
        only) runs everything in float64 -- master weights, reference, forward, loss -- so that
        tests comparing two summation orders (ranks, micro-batches, Ulysses) see float64 rounding
        (unit roundoff 2^-53) instead of float32's (2^-24), whatever CPU kernels run them.
        Raises ValueError for float64 on CUDA."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg, self.model_dir = cfg, model_dir
        self.device = torch.device(device)
        self.world = cfg.world_size
        if self.world > 1 and not (dist.is_initialized() and dist.get_world_size() == self.world):
            raise RuntimeError(f"world_size={self.world} needs init_distributed() before the trainer")
        self.rank = dist.get_rank() if self.world > 1 else 0
        self.sharded = self.world > 1 if shard is None else shard
        # Ulysses: groups of sp consecutive ranks take the same samples (one data-parallel rank).
        self.sp = cfg.actor.ulysses_sequence_parallel_size
        self.dp_rank, self.dp_size = self.rank // self.sp, self.world // self.sp
        self.compute_dtype = DTYPES[cfg.model.dtype]
        if master_dtype == torch.float64:
            if self.device.type != "cpu":
                raise ValueError("master_dtype=float64 is for CPU numerics checks only")
            self.compute_dtype = torch.float64
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # fp32 master weights; forward passes autocast to the compute dtype on GPU.
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=master_dtype).to(self.device)
        if cfg.model.enable_gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        self.hf_config = model.config
        if self.sp > 1:
            ulysses.check_heads(model.config, self.sp)
            ulysses.new_groups(self.sp)
            ulysses.enable(model)
        # Tied output embedding: saved once, under the input embedding's name (as HF does).
        self.tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
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
        self.n_params = sum(p.numel() for p in model.parameters())
        self.model = self._shard(model)
        self.ref = None
        if cfg.actor.use_kl_loss and not self.is_lora:
            # LoRA needs no copy: the reference is the base with the adapter disabled.
            ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.compute_dtype).to(self.device)
            if self.sp > 1:
                ulysses.enable(ref)
            self.ref = self._shard(ref.eval().requires_grad_(False))
        params = [p for p in self.model.parameters() if p.requires_grad]  # LoRA: the adapter only
        a = cfg.actor
        # CUDA: the fused kernel, one pass and no temporaries (foreach AdamW materialises a copy of
        # every moment, 4 B/param: the 7B full fine-tune's OOM on one H200). CPU keeps foreach.
        self.optimizer = torch.optim.AdamW(params, lr=a.lr, betas=a.betas, weight_decay=a.weight_decay,
                                           fused=self.device.type == "cuda")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda())
        self.bad_steps = 0

    def _shard(self, model):
        """FSDP2: each decoder layer its own unit (gathered just in time), the rest at the root.

        CUDA: bf16 (compute dtype) parameters in forward/backward, gradients reduced in fp32 onto
        fp32 shards; CPU: fp32 throughout."""
        if not self.sharded:
            return model
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = (MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)
              if self.device.type == "cuda" else MixedPrecisionPolicy())
        hf = model.get_base_model() if hasattr(model, "get_base_model") else model
        layer_types = set(getattr(hf, "_no_split_modules", None) or ())
        layers = [m for m in hf.modules() if type(m).__name__ in layer_types]
        if not layers:
            raise ValueError(f"{self.model_dir}: no decoder layers ({layer_types or '_no_split_modules'}) to shard")
        for layer in layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(hf, mp_policy=mp)
        return model

    def _sum(self, values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
        """Sums (or another all_reduce op) over ranks (identity on one rank)."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def _max(self, values: list[float]) -> list[float]:
        """Maxima over ranks (identity on one rank)."""
        return self._sum(values, op=dist.ReduceOp.MAX)

    # ---- schedule -------------------------------------------------------------------------
    def _lr_lambda(self):
        a, c = self.cfg.actor, self.cfg
        return algos.warmup_lambda(a.lr_warmup_steps, a.lr_warmup_steps_ratio, c.trainer.total_training_steps,
                                   (c.data.train_batch_size // a.ppo_mini_batch_size) * a.ppo_epochs)

    # ---- forward ----------------------------------------------------------------------------
    def _autocast(self):
        if self.device.type == "cuda" and self.compute_dtype != torch.float32:
            return torch.autocast("cuda", dtype=self.compute_dtype)
        return nullcontext()

    def _forward(self, model, prompts, responses, with_entropy: bool):
        """Per-token log-probs (and entropy) of responses under `model`: [B, R] tensors, the mask,
        and which of the given samples the rows are: all of them, or with Ulysses this rank's
        share of the rows (the micro-batch padded to a multiple of sp with masked-out copies)."""
        rows, n = list(range(len(prompts))), len(prompts)
        if self.sp > 1:
            rows += [0] * (-n % self.sp)
            prompts, responses = _take(prompts, rows), _take(responses, rows)
        p = _pad(prompts, self.pad_id, left=True)
        r = _pad(responses, self.pad_id, left=False)
        p_mask = (_pad([[1] * len(x) for x in prompts], 0, left=True))
        r_mask = (_pad([[1] * len(x) for x in responses], 0, left=False))
        r_mask[n:] = 0
        if self.sp > 1:  # more left padding: sp equal column slices
            extra = -(p.shape[1] + r.shape[1]) % self.sp
            p, p_mask = F.pad(p, (extra, 0), value=self.pad_id), F.pad(p_mask, (extra, 0))
        ids = torch.cat([p, r], 1).to(self.device)
        attn = torch.cat([p_mask, r_mask], 1).to(self.device)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        R = r.shape[1]
        with self._autocast():
            if self.sp > 1:
                k, cols, b = ulysses.rank(), ids.shape[1] // self.sp, len(rows) // self.sp
                logits = model(input_ids=ids[:, k * cols:(k + 1) * cols], attention_mask=ulysses.full_mask(attn),
                               position_ids=pos[:, k * cols:(k + 1) * cols], logits_to_keep=R + 1,
                               use_cache=False).logits  # this rank's rows, whole (engines/ulysses.py)
                ids, r_mask, rows = ids[k * b:(k + 1) * b], r_mask[k * b:(k + 1) * b], rows[k * b:(k + 1) * b]
            else:
                logits = model(input_ids=ids, attention_mask=attn, position_ids=pos,
                               logits_to_keep=R + 1, use_cache=False).logits
        logp, ent = algos.token_logprobs(logits[:, :-1], ids[:, -R:], max(self.cfg.rollout.temperature, 1e-6),
                                         with_entropy)
        return logp, ent, r_mask.to(self.device, logp.dtype), rows

    def _micro_batches(self, prompts, responses) -> list[list[int]]:
        """Sample indices of each forward: ppo_micro_batch_size_per_gpu at a time, in order; or,
        with use_dynamic_bsz, groups within ppo_max_token_len_per_gpu padded tokens
        (engines/batching.py). Sharded, every rank runs the count the neediest rank needs, since
        each forward is a collective; a rank with fewer samples than that cannot (no empty forward)."""
        a, n = self.cfg.actor, len(prompts)
        if not a.use_dynamic_bsz:
            return [list(range(i, min(i + a.ppo_micro_batch_size_per_gpu, n)))
                    for i in range(0, n, a.ppo_micro_batch_size_per_gpu)]
        shapes = [(len(p), len(r)) for p, r in zip(prompts, responses)]
        budget = a.ppo_max_token_len_per_gpu * self.sp  # Ulysses: each GPU holds 1/sp of the columns
        need, minus_fewest = self._max([batching.count(shapes, budget), -n])
        k, fewest = int(need), int(-minus_fewest)
        if k > fewest:  # the same verdict on every rank: all raise, none waits
            raise ValueError(f"use_dynamic_bsz: a rank needs {k} micro-batches within actor.ppo_max_token_len_per_gpu="
                             f"{a.ppo_max_token_len_per_gpu} but another has only {fewest} samples; "
                             "give every rank the same number of samples")
        return batching.micro_batches(shapes, budget, k)

    @torch.no_grad()
    def compute_log_prob(self, prompts, responses, ref: bool = False) -> list[np.ndarray]:
        """Log-probs of each response under the current policy (old_log_prob) or the reference.

        Sharded: every rank must pass the same number of samples (each forward is a collective).
        Returned in the order given, whatever the micro-batches' grouping."""
        self.model.eval()
        out: list = [None] * len(prompts)
        ctx = self.model.disable_adapter() if (ref and self.is_lora) else nullcontext()
        model = self.ref if (ref and self.ref is not None) else self.model
        with ctx:
            for g in self._micro_batches(prompts, responses):
                logp, _, mask, rows = self._forward(model, _take(prompts, g), _take(responses, g), with_entropy=False)
                if self.sp > 1:  # every rank's rows, in order: the whole (padded) micro-batch
                    logp, mask, rows = ulysses.gather_rows(logp), ulysses.gather_rows(mask), range(len(g))
                for i, row, m in zip(rows, logp.cpu().numpy(), mask.cpu().numpy()):
                    out[g[i]] = row[: int(m.sum())].astype(np.float32)
        return out

    # ---- update -----------------------------------------------------------------------------
    def update(self, batch: dict, seed: int, steps: list | None = None) -> dict[str, float]:
        """PPO epochs over mini-batches; one optimizer step per mini-batch.

        batch: prompts, responses (token-id lists), old_log_probs, ref_log_probs (ragged arrays
        or None), advantages ([N]). steps: the indices into batch of this rank's share of each
        optimizer step (minibatch_schedule; the default is the one-rank schedule of the whole
        batch). Losses are normalised over the whole mini-batch, all ranks together, so the
        result depends neither on the micro-batch size nor on the world size.
        """
        if steps is None:
            steps = minibatch_schedule(len(batch["prompts"]), self.cfg, seed)
        sums: dict[str, list[float]] = {}
        t0 = time.perf_counter()
        tokens = 0
        self.model.train()
        for idx in steps:
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
        # actor.mask_truncated_completions: a response cut at max_response_length weighs 0 and is
        # left out of the counts below, as if it were not in the mini-batch (TRL's completion mask).
        keep = [1.0] * len(idx)
        if a.mask_truncated_completions and batch.get("truncated") is not None:
            keep = [0.0 if t else 1.0 for t in pick("truncated")]
        keep_t = torch.tensor(keep, dtype=torch.float32, device=self.device)
        # Global counts; the sp ranks of a Ulysses group hold the same samples.
        n_tokens, n_seqs = (x / self.sp for x in self._sum([float(sum(len(r) * k for r, k in zip(responses, keep))),
                                                           float(sum(keep))]))
        glob = dict(global_tokens=n_tokens, global_seqs=n_seqs, norm_len=self.cfg.rollout.max_response_length)
        agg = dict(loss_agg_mode=a.loss_agg_mode, **glob)
        self.optimizer.zero_grad(set_to_none=True)
        acc: dict[str, float] = {}
        for g in self._micro_batches(prompts, responses):
            logp, ent, mask, rows = self._forward(self.model, _take(prompts, g), _take(responses, g), with_entropy=True)
            g = [g[i] for i in rows]  # the samples of this rank's rows
            mask = mask * keep_t[g].unsqueeze(1)
            old_t = _pad_float(_take(old, g), logp.shape[1], self.device)
            out = algos.policy_loss(logp, old_t, adv[g], mask, clip_ratio_low=a.clip_ratio_low,
                                    clip_ratio_high=a.clip_ratio_high, clip_ratio_c=a.clip_ratio_c, **agg)
            entropy = algos.agg_loss(ent, mask, a.loss_agg_mode, **glob)
            loss = out["pg_loss"] - a.entropy_coeff * entropy
            share = {"actor/pg_loss": out["pg_loss"], "actor/entropy": entropy,
                     "actor/pg_clipfrac": out["pg_clipfrac"], "actor/ppo_kl": out["ppo_kl"],
                     "actor/pg_clipfrac_lower": out["pg_clipfrac_lower"]}
            if ref is not None:
                kl = algos.kl_penalty(logp, _pad_float(_take(ref, g), logp.shape[1], self.device), a.kl_loss_type)
                kl_loss = algos.agg_loss(kl, mask, a.loss_agg_mode, **glob)
                loss = loss + a.kl_loss_coef * kl_loss
                share["actor/kl_loss"] = kl_loss
            # Each rank's loss is its share of the global mean (with Ulysses too: each row is on
            # one rank); FSDP averages gradients over ranks, so x world turns that average back
            # into the sum of the shares.
            (loss * self.world if self.world > 1 else loss).backward()
            for k, v in share.items():
                acc[k] = acc.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
        acc = dict(zip(acc, self._sum(list(acc.values()))))  # the shares of all ranks: global values
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = float(_full(torch.nn.utils.clip_grad_norm_(params, a.grad_clip)))
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
        """tokens: of this rank's samples; with Ulysses its group shares them, 1/sp each."""
        out = {"perf/update_tokens": self._sum([float(tokens)])[0] / self.sp}
        if self.device.type != "cuda":
            return out
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        if peak and elapsed > 0:
            c = self.hf_config
            layers, hidden = c.num_hidden_layers, c.hidden_size
            seq2 = sum((len(p) + len(r)) ** 2 for p, r in zip(batch["prompts"], batch["responses"]))
            # This rank's tokens: 6 N T dense + 12 L h S^2 attention (fwd+bwd), per epoch;
            # +1 fwd for recomputation ignored.
            flops = (6 * self.n_params * tokens + 12 * layers * hidden * seq2 * self.cfg.actor.ppo_epochs) / self.sp
            out["perf/mfu/actor"] = flops / elapsed / (peak * 1e12)
        return out

    # ---- weights out ------------------------------------------------------------------------
    def _full_state(self, dtype: torch.dtype | None = None, lora_only: bool = False,
                    files: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """HF-named full tensors, gathered one at a time; every rank must drain it (collectives).
        files: without the tied output embedding (vLLM's in-place reload wants it, files do not)."""
        for name, t in self.model.state_dict().items():
            if (files and name in self.tied) or (lora_only and "lora_" not in name):
                continue
            t = _full(t)
            yield name, (t if dtype is None else t.to(dtype))

    def full_state_for_rollout(self) -> Iterator[tuple[str, torch.Tensor]]:
        """HF-named tensors in the rollout dtype, one at a time (full fine-tuning)."""
        return self._full_state(self.compute_dtype)

    def save_adapter(self, out_dir: str) -> None:
        """The LoRA adapter in peft format, collected tensor by tensor (a collective when sharded)."""
        self.model.save_pretrained(out_dir, state_dict=dict(self._full_state(lora_only=True)))

    # ---- checkpoint -------------------------------------------------------------------------
    def _train_state(self) -> dict:
        """Weights (LoRA: the adapter) and AdamW state as this rank holds them: its shards when
        sharded, keyed by parameter name. A fresh optimizer gets zero moments first, as a template."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model, optim = get_state_dict(self.model, self.optimizer,
                                      options=StateDictOptions(ignore_frozen_params=self.is_lora))
        return {"model": model, "optim": optim}

    def save(self, ckpt_dir: str, export_hf: bool = True) -> list[Path]:
        """save_state, then save_exports: the training state in ckpt_dir/actor, the LoRA adapter and
        (export_hf) the HF export in ckpt_dir/huggingface. Returns the files this rank wrote."""
        return self.save_state(ckpt_dir) + self.save_exports(ckpt_dir, export_hf)

    def save_state(self, ckpt_dir: str) -> list[Path]:
        """Training state in ckpt_dir/actor: a torch.distributed.checkpoint, every rank writing its own
        shards in parallel, so nothing is gathered (a 72B optimizer state does not fit one host), and a
        load at another world size reshards from its metadata; rank 0 adds the scheduler, RNG and skip
        count (extra_state.pt). No collective beyond DCP's planning, so it may run with the state
        offloaded: DCP holds a host copy of every GPU tensor of a file until the file is closed (a
        rank's whole shard: +48 GB per rank at 7B, Ray's OOM kill at the save in issue 12), and none
        of a tensor already in host memory. Returns the files this rank wrote, for their checksums."""
        import torch.distributed.checkpoint as dcp

        actor = Path(ckpt_dir) / "actor"
        writer = RecordingWriter(actor)
        dcp.save(self._train_state(), storage_writer=writer, no_dist=not dist.is_initialized())
        written = [actor / f for f in writer.written]
        if self.rank == 0:
            torch.save({"scheduler": self.scheduler.state_dict(), "bad_steps": self.bad_steps,
                        "torch_rng": torch.get_rng_state()}, actor / "extra_state.pt")
            written += [actor / ".metadata", actor / "extra_state.pt"]
        return written

    def save_exports(self, ckpt_dir: str, export_hf: bool = True) -> list[Path]:
        """LoRA: the adapter in peft format (actor/lora_adapter); with export_hf the HF export
        (huggingface/). Tensors are gathered one at a time (collectives: every rank calls it, with
        its weights on the GPU); rank 0 writes. Returns the files this rank wrote."""
        root, actor = Path(ckpt_dir), Path(ckpt_dir) / "actor"
        if self.is_lora:
            adapter = dict(self._full_state(lora_only=True))
            if self.rank == 0:
                self.model.save_pretrained(actor / "lora_adapter", state_dict=adapter)
        if export_hf:
            self.export_hf(str(root / "huggingface"), adapter_dir=actor / "lora_adapter")
        if self.rank != 0:
            return []
        return sorted(p for d in (actor / "lora_adapter", root / "huggingface") if d.is_dir()
                      for p in d.rglob("*") if p.is_file())

    def export_hf(self, out_dir: str, adapter_dir: Path) -> None:
        """A plain HF model dir in the compute dtype, loadable by from_pretrained and vLLM. LoRA: the
        peft adapter rank 0 wrote to adapter_dir, merged into the base in fp32 and then cast (a bf16
        merge rounds the base first: small early deltas were lost twice; any delta under half a
        compute-dtype ulp of its weight is still lost by a bf16 export, the adapter keeps it).
        Rank 0 holds the fp32 base on the host meanwhile. Every rank takes part; rank 0 writes."""
        if self.is_lora:
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            if self.rank == 0:
                base = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
                merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
                merged.to(self.compute_dtype).save_pretrained(out_dir)
        else:
            write_safetensors(Path(out_dir), self._full_state(self.compute_dtype, files=True),
                              write=self.rank == 0, shard_bytes=SHARD_BYTES)
            if self.rank == 0:
                conf = copy.deepcopy(self.hf_config)
                conf.dtype, conf.use_cache = self.compute_dtype, True
                conf.save_pretrained(out_dir)
                self.model.generation_config.save_pretrained(out_dir)
        if self.rank == 0:
            self.tokenizer.save_pretrained(out_dir)

    def load(self, ckpt_dir: str) -> None:
        """Restore save()'s checkpoint, written at this or any other world size."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import CheckpointException
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        actor = Path(ckpt_dir) / "actor"
        if not (actor / ".metadata").is_file():
            raise ValueError(f"{actor} is not a checkpoint this build can resume (no DCP .metadata; earlier "
                             f"builds wrote optim.pt). Its weights are in {Path(ckpt_dir) / 'huggingface'}: "
                             "start from them with model.path=<that dir> trainer.resume_mode=disable")
        state = self._train_state()
        try:
            dcp.load(state, checkpoint_id=actor, no_dist=not dist.is_initialized())
        except CheckpointException as e:  # a BaseException: name the checkpoint and the model
            raise ValueError(f"checkpoint {actor} does not match model {self.model_dir} "
                             f"(lora_rank={self.cfg.model.lora_rank}): {str(e)[:500]}") from None
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       # LoRA: the frozen base stays as loaded from model_dir (dcp.load checked the adapter)
                       options=StateDictOptions(ignore_frozen_params=self.is_lora, strict=not self.is_lora))
        extra = torch.load(actor / "extra_state.pt", weights_only=True)
        self.scheduler.load_state_dict(extra["scheduler"])
        self.bad_steps = extra["bad_steps"]
        torch.set_rng_state(extra["torch_rng"])


def _pad_float(rows: list[np.ndarray], width: int, device) -> torch.Tensor:
    out = np.zeros((len(rows), width), np.float32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return torch.from_numpy(out).to(device)
