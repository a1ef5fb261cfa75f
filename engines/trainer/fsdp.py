"""The FSDP2 trainer backend (actor.strategy fsdp / fsdp2): a transformers causal LM (+ optional
peft LoRA), sharded with FSDP2 over the ranks, trained by the backend-independent GRPO update
(engines/trainer/actor.py).

One rank's worth of work. Samples arrive as token-id lists; each micro-batch is laid out as
[left-padded prompt | right-padded response] so every response starts at the same column and
only the response logits are materialised (`logits_to_keep`). Micro-batches hold
ppo_micro_batch_size_per_gpu samples, or with actor.use_dynamic_bsz as many as a token budget
allows (engines/batching.py).

With cfg.world_size > 1 the model is sharded with FSDP2 (`fully_shard` per decoder layer and at
the root) over a process group that `init_distributed` made; one rank runs unsharded. Full
tensors leave the trainer one at a time (`DTensor.full_tensor()`), never the whole model at once.
Checkpoints and the HF export: engines/trainer/checkpoint.py; offload: engines/trainer/offload.py.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from configs.schema import GRPOConfig
from engines import algos, batching
from engines.trainer import TRAINERS, checkpoint, liger, load, packing, ulysses, varlen
from engines.trainer.actor import GRPOActor, _take
from engines.trainer.offload import Offloader

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor, in its global shape and dtype, detached: gathered from every rank's shard
    (a DTensor: a collective every rank must join) or as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t.detach()


def _pad(seqs: list[list[int]], pad_id: int, left: bool) -> torch.Tensor:
    """[len(seqs), longest] int64: each sequence padded with pad_id on the left or the right."""
    width = max((len(s) for s in seqs), default=0)
    rows = [([pad_id] * (width - len(s)) + list(s)) if left else (list(s) + [pad_id] * (width - len(s))) for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


@TRAINERS.register("fsdp", "fsdp2")
class FSDPTrainer(GRPOActor):
    """Holds the policy, its optimizer and (for full fine-tuning) a frozen reference copy."""

    def __init__(
        self,
        cfg: GRPOConfig,
        model_dir: str,
        device: str | None = None,
        shard: bool | None = None,
        master_dtype: torch.dtype = torch.float32,
    ):
        """device: "cuda" or "cpu" (default: cfg.trainer.device). shard: FSDP2 even on one rank (to
        test the sharded path on one GPU, in a 1-rank process group); by default exactly when
        cfg.world_size > 1.

        master_dtype: of the trained weights and the optimizer state (float32). torch.float64 (CPU
        only) runs everything in float64 -- master weights, reference, forward, loss -- so that
        tests comparing two summation orders (ranks, micro-batches, Ulysses) see float64 rounding
        (unit roundoff 2^-53) instead of float32's (2^-24), whatever CPU kernels run them.
        Raises ValueError for float64 on CUDA, RuntimeError for world_size > 1 without a process group."""
        from transformers import AutoTokenizer

        self.cfg, self.model_dir = cfg, model_dir
        self.device = torch.device(device or ("cuda" if cfg.trainer.device == "cuda" else "cpu"))
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
        model, slots = self._build(master_dtype)
        if cfg.model.enable_gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        self.hf_config = model.config
        self.packed = cfg.model.use_remove_padding
        self.fused = cfg.model.use_fused_kernels  # log-probs from liger's fused kernel, no entropy
        if self.sp > 1:
            ulysses.check_heads(model.config, self.sp)
            ulysses.new_groups(self.sp)
            ulysses.enable(model)
        elif self.packed:
            varlen.enable(model)
        # Tied output embedding: saved once, under the input embedding's name (as HF does).
        self.tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
        self.is_lora, adapter = cfg.model.lora_rank > 0, None
        if self.is_lora:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(
                r=cfg.model.lora_rank,
                lora_alpha=cfg.model.lora_alpha,
                target_modules=cfg.model.target_modules,
                lora_dropout=0.0,
                bias="none",
                task_type="CAUSAL_LM",
            )
            try:
                model, adapter = load.peft_on_meta(model, lora) if self.sharded else (get_peft_model(model, lora), None)
            except ValueError as e:
                raise ValueError(
                    f"model.target_modules={cfg.model.target_modules!r} does not fit {model_dir}: {e}"
                ) from None
        self.n_params = sum(p.numel() for p in model.parameters())
        self.model = self._shard(model, slots, adapter)
        self.ref = None
        if cfg.actor.use_kl_loss and not self.is_lora:
            # LoRA needs no copy: the reference is the base with the adapter disabled.
            ref, slots = self._build(self.compute_dtype)
            if self.sp > 1:
                ulysses.enable(ref)
            elif self.packed:
                varlen.enable(ref)
            self.ref = self._shard(ref.eval().requires_grad_(False), slots)
        params = [p for p in self.model.parameters() if p.requires_grad]  # LoRA: the adapter only
        a = cfg.actor
        # CUDA: the fused kernel, one pass and no temporaries (foreach AdamW materialises a copy of
        # every moment, 4 B/param: the 7B full fine-tune's OOM on one H200). CPU keeps foreach.
        self.optimizer = torch.optim.AdamW(
            params, lr=a.lr, betas=a.betas, weight_decay=a.weight_decay, fused=self.device.type == "cuda"
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda())
        self.bad_steps = 0
        self._offload = Offloader(
            [m for m in (self.model, self.ref) if m is not None],
            self.optimizer,
            self.device,
            a.param_offload,
            a.optimizer_offload,
        )

    def _build(self, dtype: torch.dtype):
        """The HF model of model_dir in `dtype`, and where its files' tensors go (load.slots).
        Sharded: on the meta device, no storage until `_shard` fills each rank's shards; else
        `from_pretrained` on self.device, and no slots. model.use_liger / use_fused_kernels patch it here."""
        if self.sharded:
            model = load.empty(self.model_dir, dtype)
            slots = load.slots(model)
        else:
            from transformers import AutoModelForCausalLM

            model, slots = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype).to(self.device), None
        m = self.cfg.model  # liger-kernel (engines/trainer/liger.py): before peft and FSDP2
        liger.setup(model, m.use_liger, m.use_fused_kernels)
        return model, slots

    def _shard(self, model, slots, adapter=None):
        """FSDP2: each decoder layer its own unit (gathered just in time), the rest at the root;
        then, for a meta model (`slots` from `_build`), each rank's shards materialised and read
        from model_dir (engines/trainer/load.py fill, with `adapter`, the LoRA's initial values
        from load.peft_on_meta).

        CUDA: bf16 (compute dtype) parameters in forward/backward, gradients reduced in fp32 onto
        fp32 shards; CPU: fp32 throughout."""
        if not self.sharded:
            return model
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = (
            MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)
            if self.device.type == "cuda"
            else MixedPrecisionPolicy()
        )
        hf = model.get_base_model() if hasattr(model, "get_base_model") else model
        layer_types = set(getattr(hf, "_no_split_modules", None) or ())
        layers = [m for m in hf.modules() if type(m).__name__ in layer_types]
        if not layers:
            raise ValueError(f"{self.model_dir}: no decoder layers ({layer_types or '_no_split_modules'}) to shard")
        for layer in layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(hf, mp_policy=mp)
        if slots is not None:  # None: loaded already
            load.fill(model, slots, self.model_dir, self.device, adapter)
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

    # ---- forward ----------------------------------------------------------------------------
    def _forward(self, model, prompts, responses, with_entropy: bool):
        """Per-token log-probs (and entropy) of responses under `model`: [B, R] tensors, the mask,
        and which of the given samples the rows are: all of them, or with Ulysses this rank's
        share of the rows (the micro-batch padded to a multiple of sp with masked-out copies).
        model.use_fused_kernels: the log-probs from liger's kernel (engines/trainer/liger.py), entropy None."""
        rows, n = list(range(len(prompts))), len(prompts)
        if self.sp > 1:
            rows += [0] * (-n % self.sp)
            prompts, responses = _take(prompts, rows), _take(responses, rows)
        if self.packed:
            return self._forward_packed(model, prompts, responses, rows, n, with_entropy)
        p = _pad(prompts, self.pad_id, left=True)
        r = _pad(responses, self.pad_id, left=False)
        p_mask = _pad([[1] * len(x) for x in prompts], 0, left=True)
        r_mask = _pad([[1] * len(x) for x in responses], 0, left=False)
        r_mask[n:] = 0
        if self.sp > 1:  # more left padding: sp equal column slices
            extra = -(p.shape[1] + r.shape[1]) % self.sp
            p, p_mask = F.pad(p, (extra, 0), value=self.pad_id), F.pad(p_mask, (extra, 0))
        ids = torch.cat([p, r], 1).to(self.device)
        attn = torch.cat([p_mask, r_mask], 1).to(self.device)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        R, temp = r.shape[1], max(self.cfg.rollout.temperature, 1e-6)
        if self.fused:  # no Ulysses (configs/kernels.py): the R positions before each response token
            T = ids.shape[1]
            with self._autocast():
                logp = model(
                    input_ids=ids,
                    attention_mask=attn,
                    position_ids=pos,
                    logits_to_keep=torch.arange(T - R - 1, T - 1, device=self.device),
                    use_cache=False,
                    token_labels=ids[:, T - R :],
                    temperature=temp,
                )
            return logp, None, r_mask.to(self.device, logp.dtype), rows
        with self._autocast():
            if self.sp > 1:
                k, cols, b = ulysses.rank(), ids.shape[1] // self.sp, len(rows) // self.sp
                logits = model(
                    input_ids=ids[:, k * cols : (k + 1) * cols],
                    attention_mask=ulysses.full_mask(attn),
                    position_ids=pos[:, k * cols : (k + 1) * cols],
                    logits_to_keep=R + 1,
                    use_cache=False,
                ).logits  # this rank's rows, whole (engines/trainer/ulysses.py)
                ids, r_mask, rows = ids[k * b : (k + 1) * b], r_mask[k * b : (k + 1) * b], rows[k * b : (k + 1) * b]
            else:
                logits = model(
                    input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=R + 1, use_cache=False
                ).logits
        logp, ent = algos.token_logprobs(logits[:, :-1], ids[:, ids.shape[1] - R :], temp, with_entropy)
        return logp, ent, r_mask.to(self.device, logp.dtype), rows

    def _forward_packed(self, model, prompts, responses, rows, n, with_entropy: bool):
        """`_forward` with model.use_remove_padding: the micro-batch as one packed row (no padding,
        engines/trainer/packing.py), attention per sample (engines/trainer/varlen.py). With
        Ulysses each rank feeds 1/sp of the row's columns and, after the final norm, computes the
        logits of its share of the samples from the gathered row (engines/trainer/ulysses.py).
        Same return as `_forward`: the values are scattered back into the [B, R] layout."""
        pk = packing.pack(prompts, responses, pad_id=self.pad_id, multiple_of=self.sp)
        dev, lens = self.device, list(pk.response_lengths)
        width = max(lens, default=0)  # the whole micro-batch's: Ulysses ranks gather equal shapes
        keep, labels, mine = pk.logits_index, pk.labels, slice(None)
        ids, pos = pk.input_ids.to(dev), pk.position_ids.to(dev)
        if self.sp > 1:  # this rank: columns k*T/sp.., and the logits of samples k*b..(k+1)*b
            k, b = ulysses.rank(), len(rows) // self.sp
            cols = ids.shape[1] // self.sp
            ids, pos = ids[:, k * cols : (k + 1) * cols], pos[:, k * cols : (k + 1) * cols]
            start = sum(lens[: k * b])
            mine = slice(k * b, (k + 1) * b)
            keep, labels = keep[start : start + sum(lens[mine])], labels[start : start + sum(lens[mine])]
        labels, temp = labels.to(dev)[None], max(self.cfg.rollout.temperature, 1e-6)
        fused = dict(token_labels=labels, temperature=temp) if self.fused else {}  # liger: [1, N] log-probs
        with self._autocast(), ulysses.packed_rows(self.sp > 1):
            out = model(
                input_ids=ids,
                position_ids=pos,
                attention_mask=None,
                logits_to_keep=keep.to(dev),
                use_cache=False,
                **varlen.model_kwargs(pk.cu_seqlens, pk.max_seqlen, dev),
                **fused,
            )  # logits [1, N, V]: only the positions that predict a response token
        lens, rows = lens[mine], rows[mine]
        if self.fused:
            logp, mask = packing.unpack(out, lens, width)
            return logp, None, mask, rows  # no Ulysses with the fused kernel (configs/kernels.py)
        parts = [  # sample by sample: one [n_i, V] float32 copy at a time (algos.token_logprobs)
            algos.token_logprobs(c, t, temp, with_entropy)
            for c, t in zip(out.logits.split(lens, dim=1), labels.split(lens, dim=1))
        ]
        logp, mask = packing.unpack(torch.cat([lp for lp, _ in parts], 1), lens, width)
        ent = packing.unpack(torch.cat([e for _, e in parts], 1), lens, width)[0] if with_entropy else None
        first = mine.start or 0  # this rank's first row (0 without Ulysses)
        if first + len(rows) > n:  # Ulysses' padding copies weigh nothing
            mask[max(n - first, 0) :] = 0
        return logp, ent, mask, rows

    def _micro_batches(self, prompts, responses) -> list[list[int]]:
        """Sample indices of each forward: ppo_micro_batch_size_per_gpu at a time, in order; or,
        with use_dynamic_bsz, groups within ppo_max_token_len_per_gpu tokens (padded, or with
        model.use_remove_padding real; engines/batching.py). Sharded, every rank runs the count the neediest rank needs, since
        each forward is a collective; a rank with fewer samples than that cannot (no empty forward)."""
        a, n = self.cfg.actor, len(prompts)
        if not a.use_dynamic_bsz:
            return [
                list(range(i, min(i + a.ppo_micro_batch_size_per_gpu, n)))
                for i in range(0, n, a.ppo_micro_batch_size_per_gpu)
            ]
        shapes = [(len(p), len(r)) for p, r in zip(prompts, responses)]
        budget = a.ppo_max_token_len_per_gpu * self.sp  # Ulysses: each GPU holds 1/sp of the columns
        need, minus_fewest = self._max([batching.count(shapes, budget, self.packed), -n])
        k, fewest = int(need), int(-minus_fewest)
        if k > fewest:  # the same verdict on every rank: all raise, none waits
            raise ValueError(
                f"use_dynamic_bsz: a rank needs {k} micro-batches within actor.ppo_max_token_len_per_gpu="
                f"{a.ppo_max_token_len_per_gpu} but another has only {fewest} samples; "
                "give every rank the same number of samples"
            )
        return batching.micro_batches(shapes, budget, k, self.packed)

    @torch.no_grad()
    def compute_log_prob(self, prompts, responses, ref: bool = False) -> list[np.ndarray]:
        """Log-probs (nats) of each response under the current policy (old_log_prob) or the
        reference: one [len(responses[i])] float32 array each (float64 with master_dtype=torch.float64).

        Sharded: every rank must pass the same number of samples (each forward is a collective).
        Returned in the order given, whatever the micro-batches' grouping."""
        self.model.eval()
        out: list = [None] * len(prompts)
        keep = np.float64 if self.compute_dtype == torch.float64 else np.float32  # a float64 check keeps its digits
        ctx = self.model.disable_adapter() if (ref and self.is_lora) else nullcontext()
        model = self.ref if (ref and self.ref is not None) else self.model
        with ctx:
            for g in self._micro_batches(prompts, responses):
                logp, _, mask, rows = self._forward(model, _take(prompts, g), _take(responses, g), with_entropy=False)
                if self.sp > 1:  # every rank's rows, in order: the whole (padded) micro-batch
                    logp, mask, rows = ulysses.gather_rows(logp), ulysses.gather_rows(mask), range(len(g))
                for i, row, m in zip(rows, logp.cpu().numpy(), mask.cpu().numpy()):
                    out[g[i]] = row[: int(m.sum())].astype(keep)
        return out

    def _backward(self, loss: torch.Tensor) -> None:
        """Each rank's loss is its share of the global mean (with Ulysses too: each row is on one
        rank); FSDP averages gradients over ranks, so x world turns that average back into the sum
        of the shares."""
        (loss * self.world if self.world > 1 else loss).backward()

    def _clip_grad_norm(self, max_norm: float) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return float(full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm)))

    # ---- weights out ------------------------------------------------------------------------
    def full_state(
        self, dtype: torch.dtype | None = None, lora_only: bool = False, files: bool = False
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """HF-named full tensors in their HF shapes (a Linear's weight [out, in]), in `dtype`
        (default: as held, fp32), gathered one at a time; every rank must drain it (collectives).
        lora_only: the adapter's tensors only. files: without the tied output embedding (vLLM's in-place reload wants it, files do not)."""
        for name, t in self.model.state_dict().items():
            if (files and name in self.tied) or (lora_only and "lora_" not in name):
                continue
            t = full_tensor(t)
            yield name, (t if dtype is None else t.to(dtype))

    def weights_for_rollout(self) -> Iterator[tuple[str, torch.Tensor]]:
        """HF-named tensors in their HF shapes and the rollout dtype (model.dtype), one at a time
        (full fine-tuning; a collective when sharded: every rank must drain it)."""
        return self.full_state(self.compute_dtype)

    def save_adapter(self, out_dir: str) -> None:
        """The LoRA adapter in peft format, collected tensor by tensor (a collective when sharded)."""
        self.model.save_pretrained(out_dir, state_dict=dict(self.full_state(lora_only=True)))

    # ---- checkpoint (engines/trainer/checkpoint.py) --------------------------------------------
    def save(self, ckpt_dir: str, export_hf: bool = True) -> list[Path]:
        """save_state, then save_exports. Returns the files this rank wrote."""
        return self.save_state(ckpt_dir) + self.save_exports(ckpt_dir, export_hf)

    def save_state(self, ckpt_dir: str) -> list[Path]:
        """TrainerBackend.save_state through engines/trainer/checkpoint.py (a collective when sharded)."""
        return checkpoint.save_state(self, ckpt_dir)

    def save_exports(self, ckpt_dir: str, export_hf: bool = True) -> list[Path]:
        """TrainerBackend.save_exports through engines/trainer/checkpoint.py (a collective when sharded)."""
        return checkpoint.save_exports(self, ckpt_dir, export_hf)

    def load(self, ckpt_dir: str) -> None:
        """TrainerBackend.load through engines/trainer/checkpoint.py. Raises ValueError naming the
        checkpoint and the model when they do not match."""
        checkpoint.load(self, ckpt_dir)
