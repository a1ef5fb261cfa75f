"""The Megatron trainer backend (actor.strategy=megatron): megatron-core's GPT model with tensor
parallelism, trained by the backend-independent GRPO update (engines/trainer/actor.py).

Layout: world_size ranks = tensor_model_parallel_size (tp, consecutive ranks: one copy of the
model, each rank its shard of every layer) x data-parallel ranks (dp). The tp ranks of a group
take the same samples (the worker group hands out shares by `actor.model_parallel_size`); sums
over ranks for the loss normalisation and the metrics run over the dp group only, since every
rank of a tp group computes the same loss. Gradients: megatron-core's layers reduce them within
the tp group in backward; the shares' gradients are summed over the dp group before clipping.

What this build uses, and why:
- Weights: engines/trainer/megatron_weights.py (HF <-> megatron-core local spec), read one HF
  layer at a time from the safetensors files; the model: engines/trainer/megatron_model.py.
- Precision: fp32 parameters (master weights) and torch AdamW over this rank's shards; on CUDA
  the forward runs under bf16 autocast, as the FSDP2 path does. megatron-core's
  DistributedOptimizer (sharded fp32 main params over bf16 weights) needs its CUDA-only
  DistributedDataParallel buffers; it is not used here, so optimizer state is replicated over dp.
- Log-probs: engines/trainer/megatron_logprobs.py, vocab-parallel (no rank holds a row's whole
  logits). megatron-core's vocab_parallel_cross_entropy is not used: it casts to float32 and
  works in place on the logits, and gives no entropy.
- CPU (tests, gloo): megatron-core 0.16 allocates on `torch.cuda.current_device()` in its
  rotary embedding, attention and communication buffers; in a process whose torch has no CUDA,
  `cpu_compat` points that call at the CPU (megatron_model.py). Dropout is 0, so the CUDA RNG
  tracker is the no-op one there.
- Checkpoints: engines/trainer/megatron_checkpoint.py (per-tp-rank torch files, any dp size).
- Not in this build, each refused in one config error line (configs/schema.py): pipeline
  parallelism > 1, sequence parallelism (megatron-core needs Transformer Engine or Apex norms for
  it), LoRA, model.use_remove_padding, Ulysses. Activation recompute
  (model.enable_gradient_checkpointing) is CUDA only (megatron-core saves the CUDA RNG): refused on CPU.
- Untested on GPUs so far: everything above ran on CPU gloo ranks only (tests/test_megatron_trainer.py).
- Open, for the first GPU run: megatron-core's recompute (tensor_parallel.CheckpointFunction) does
  not restore autocast in backward, so with model.enable_gradient_checkpointing each layer is
  recomputed in fp32 while its forward ran in bf16 (gradients of a slightly different forward;
  planner/megatron.py plans that memory). torch.utils.checkpoint per layer would keep autocast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

from configs.schema import GRPOConfig
from engines import batching
from engines.trainer import TRAINERS
from engines.trainer.actor import GRPOActor, _take
from engines.trainer.fsdp import DTYPES, _pad
from engines.trainer.offload import Offloader


@TRAINERS.register("megatron")
class MegatronTrainer(GRPOActor):
    """This rank's shard of the policy (and of the frozen reference), its AdamW and scheduler."""

    def __init__(
        self, cfg: GRPOConfig, model_dir: str, device: str | None = None, master_dtype: torch.dtype = torch.float32
    ):
        """device: "cuda" or "cpu" (default cfg.trainer.device). master_dtype: of the parameters and
        the optimizer state; torch.float64 (CPU only) runs everything in float64, as FSDPTrainer's
        does, so tests comparing two layouts see float64 rounding only.

        Needs torch.distributed initialised over cfg.world_size ranks (init_distributed) when
        world_size > 1; one rank makes its own 1-rank group. Raises ValueError (one line) when
        actor.megatron.tensor_model_parallel_size does not divide the model's heads, intermediate
        size or vocabulary, for a model family the mapping does not know, or float64 on CUDA."""
        from megatron.core import parallel_state as mpu
        from transformers import AutoConfig, AutoTokenizer

        from engines.trainer import megatron_model as mm
        from engines.trainer.megatron_weights import QwenShape

        self.cfg, self.model_dir = cfg, model_dir
        self.device = torch.device(device or ("cuda" if cfg.trainer.device == "cuda" else "cpu"))
        self.world = cfg.world_size
        self.tp = cfg.actor.megatron.tensor_model_parallel_size
        self.compute_dtype = DTYPES[cfg.model.dtype]
        if master_dtype == torch.float64:
            if self.device.type != "cpu":
                raise ValueError("master_dtype=float64 is for CPU numerics checks only")
            self.compute_dtype = torch.float64
        self.hf_config = AutoConfig.from_pretrained(model_dir)
        self.shape = QwenShape.from_hf_config(self.hf_config)
        self.shape.check_tp(self.tp)  # before any group: one line naming the key
        _ensure_process_group(self.world, self.device)
        if self.device.type == "cpu":
            mm.cpu_compat()
        if not mpu.model_parallel_is_initialized():
            mpu.initialize_model_parallel(tensor_model_parallel_size=self.tp)
        self.tp_group, self.dp_group = mpu.get_tensor_model_parallel_group(), mpu.get_data_parallel_group()
        self.tp_rank, self.dp_rank = mpu.get_tensor_model_parallel_rank(), mpu.get_data_parallel_rank()
        self.dp_size = mpu.get_data_parallel_world_size()
        self.rank = dist.get_rank()
        self.sp = 1  # GRPOActor's divisor for ranks sharing rows: _sum already spans dp only
        mm.seed_rng(self.cfg.trainer.seed, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.is_lora, self.tied = False, self.shape.tied

        def build(dtype, recompute):
            conf = mm.transformer_config(
                self.hf_config,
                tp=self.tp,
                params_dtype=dtype,
                recompute=recompute,
                cpu_init=True,
                perform_initialization=False,  # every weight is overwritten from the HF files
            )
            model = mm.build_gpt_model(self.hf_config, conf).to(self.device, dtype)  # torch RMSNorm: fp32 until here
            mm.load_hf_weights(model, model_dir, self.shape, self.tp, self.tp_rank)
            mm.mark_tp_shards(model)  # megatron-core marks them only when it initialises them
            return model

        recompute = cfg.model.enable_gradient_checkpointing and self.device.type == "cuda"  # schema: not on CPU
        self.model = build(master_dtype, recompute)
        self.ref = build(self.compute_dtype, False).eval().requires_grad_(False) if cfg.actor.use_kl_loss else None
        local = [(p.numel(), getattr(p, "tensor_model_parallel", False)) for p in self.model.parameters()]
        self.n_params = sum(n * (self.tp if split else 1) for n, split in local)
        a = cfg.actor
        self.optimizer = torch.optim.AdamW(
            list(self.model.parameters()),
            lr=a.lr,
            betas=a.betas,
            weight_decay=a.weight_decay,
            fused=self.device.type == "cuda",
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

    # ---- sums over ranks: the data-parallel group (a tp group's ranks hold the same values) -----
    def _sum(self, values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
        if self.dp_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op, group=self.dp_group)
        return t.tolist()

    def _max(self, values: list[float]) -> list[float]:
        return self._sum(values, op=dist.ReduceOp.MAX)

    # ---- forward ----------------------------------------------------------------------------
    def _forward(self, model, prompts, responses, with_entropy: bool):
        """Per-token log-probs (and entropy) of responses under `model`: [B, R] tensors, the mask,
        and the rows (all of them: the tp ranks share the samples). Layout as the FSDP2 path's:
        [left-padded prompt | right-padded response], positions counted over real tokens, a
        causal mask that also hides the padding. Logits stay vocab-parallel ([B, T, V/tp] on each rank)."""
        from engines.trainer.megatron_logprobs import vocab_parallel_logprobs

        n = len(prompts)
        p, r = _pad(prompts, self.pad_id, left=True), _pad(responses, self.pad_id, left=False)
        p_mask = _pad([[1] * len(x) for x in prompts], 0, left=True)
        r_mask = _pad([[1] * len(x) for x in responses], 0, left=False)
        ids = torch.cat([p, r], 1).to(self.device)
        attn = torch.cat([p_mask, r_mask], 1).to(self.device).bool()
        pos = (attn.long().cumsum(-1) - 1).clamp(min=0)
        T, R = ids.shape[1], r.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=self.device).triu(1)
        hidden = causal[None, None] | ~attn[:, None, None, :]  # [B, 1, T, T], True: not attended
        with self._autocast():
            logits = model(input_ids=ids, position_ids=pos, attention_mask=hidden)  # [B, T, V/tp]
        logp, ent = vocab_parallel_logprobs(
            logits[:, T - R - 1 : T - 1],
            ids[:, T - R :],
            max(self.cfg.rollout.temperature, 1e-6),
            with_entropy,
            vocab_start=self.tp_rank * (self.shape.vocab_size // self.tp),
        )
        return logp, ent, r_mask.to(self.device, logp.dtype), list(range(n))

    def _micro_batches(self, prompts, responses) -> list[list[int]]:
        """ppo_micro_batch_size_per_gpu samples at a time, or with use_dynamic_bsz groups within
        ppo_max_token_len_per_gpu padded tokens, the count the neediest dp rank needs on every rank
        (engines/batching.py; the same rule as the FSDP2 path)."""
        a, n = self.cfg.actor, len(prompts)
        if not a.use_dynamic_bsz:
            step = a.ppo_micro_batch_size_per_gpu
            return [list(range(i, min(i + step, n))) for i in range(0, n, step)]
        shapes = [(len(p), len(r)) for p, r in zip(prompts, responses)]
        need, minus_fewest = self._max([batching.count(shapes, a.ppo_max_token_len_per_gpu), -n])
        if int(need) > int(-minus_fewest):
            raise ValueError(
                f"use_dynamic_bsz: a rank needs {int(need)} micro-batches within actor.ppo_max_token_len_per_gpu="
                f"{a.ppo_max_token_len_per_gpu} but another has only {int(-minus_fewest)} samples; "
                "give every rank the same number of samples"
            )
        return batching.micro_batches(shapes, a.ppo_max_token_len_per_gpu, int(need))

    @torch.no_grad()
    def compute_log_prob(self, prompts, responses, ref: bool = False) -> list[np.ndarray]:
        """Log-probs of each response under the policy or the reference: float32 arrays (float64
        with master_dtype=torch.float64), in the order given. Every rank of a tp group passes the
        same samples (each forward is a collective)."""
        model = self.ref if (ref and self.ref is not None) else self.model
        model.eval()
        keep = np.float64 if self.compute_dtype == torch.float64 else np.float32
        out: list = [None] * len(prompts)
        for g in self._micro_batches(prompts, responses):
            logp, _, mask, rows = self._forward(model, _take(prompts, g), _take(responses, g), with_entropy=False)
            for i, row, m in zip(rows, logp.cpu().numpy(), mask.cpu().numpy()):
                out[g[i]] = row[: int(m.sum())].astype(keep)
        return out

    # ---- gradients ----------------------------------------------------------------------------
    def _backward(self, loss: torch.Tensor) -> None:
        """loss is this dp rank's share of the global mean (the same on every rank of its tp group);
        megatron-core's layers reduce the gradients within the tp group, _clip_grad_norm sums the
        shares over dp."""
        loss.backward()

    def _clip_grad_norm(self, max_norm: float) -> float:
        """Sums the dp ranks' gradients, then clips to max_norm as torch.nn.utils.clip_grad_norm_ does (coefficient
        max_norm / (norm + 1e-6), at most 1). The norm is global: squares of tensor-parallel shards
        summed over the tp group, each replicated tensor counted once. Returns it before clipping
        (inf or NaN when a gradient is not finite)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.dp_size > 1:
            _all_reduce_coalesced([p.grad for p in params], self.dp_group)
        dtype = torch.promote_types(params[0].grad.dtype, torch.float32)
        sq = torch.zeros((), dtype=dtype, device=self.device)
        for p in params:
            if getattr(p, "tensor_model_parallel", False) or self.tp_rank == 0:
                sq += p.grad.detach().to(dtype).pow(2).sum()
        if self.tp > 1:
            dist.all_reduce(sq, group=self.tp_group)
        norm = float(sq.sqrt())
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:  # NaN compares false: a non-finite norm leaves the gradients for the skip
            for p in params:
                p.grad.mul_(coef)
        return norm

    def _perf(self, tokens: int, elapsed: float, batch) -> dict[str, float]:
        """GRPOActor's, with perf/mfu/actor counting this rank's 1/tp of its group's FLOPs."""
        out = super()._perf(tokens, elapsed, batch)
        if "perf/mfu/actor" in out:
            out["perf/mfu/actor"] /= self.tp
        return out

    # ---- weights out ------------------------------------------------------------------------
    def hf_state(self, dtype: torch.dtype | None = None, files: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """HF-named whole tensors, one megatron-core tensor gathered over the tp group at a time
        (a collective: every rank must drain it). dtype: cast before the gather (None: as held).
        A tied model also yields lm_head.weight (the embedding) unless files (HF files omit it;
        vLLM's in-place reload wants it). A tensor may be a view of the live weights: copy it to keep it."""
        from engines.trainer.megatron_weights import mcore_to_hf, merge_tp_shards

        def gathered():
            for name, t in self.model.state_dict().items():
                if name.endswith("_extra_state"):
                    continue
                t = t.detach() if dtype is None else t.detach().to(dtype)
                if self.tp > 1:
                    parts = [torch.empty_like(t) for _ in range(self.tp)]
                    dist.all_gather(parts, t.contiguous(), group=self.tp_group)
                    t = merge_tp_shards(name, parts)
                yield name, t

        for name, t in mcore_to_hf(gathered(), self.shape, tp=self.tp):
            yield name, t
            if name == "model.embed_tokens.weight" and self.tied and not files:
                yield "lm_head.weight", t

    def weights_for_rollout(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every HF weight in the rollout dtype (model.dtype), whole, one at a time."""
        return self.hf_state(self.compute_dtype)

    def save_adapter(self, out_dir: str) -> None:
        raise ValueError("model.lora_rank>0 is not supported with actor.strategy=megatron: there is no adapter")

    # ---- checkpoint (engines/trainer/megatron_checkpoint.py) -----------------------------------
    def save_state(self, ckpt_dir: str) -> list[Path]:
        from engines.trainer import megatron_checkpoint

        return megatron_checkpoint.save_state(self, ckpt_dir)

    def save_exports(self, ckpt_dir: str, export_hf: bool = True) -> list[Path]:
        from engines.trainer import megatron_checkpoint

        return megatron_checkpoint.save_exports(self, ckpt_dir, export_hf)

    def load(self, ckpt_dir: str) -> None:
        from engines.trainer import megatron_checkpoint

        megatron_checkpoint.load(self, ckpt_dir)


def _ensure_process_group(world: int, device: torch.device) -> None:
    """megatron-core needs torch.distributed even on one rank: a 1-rank group on a free port
    when none exists. Raises RuntimeError for world > 1 without init_distributed."""
    if dist.is_initialized():
        if dist.get_world_size() != world:
            raise RuntimeError(f"world_size={world} but the process group has {dist.get_world_size()} ranks")
        return
    if world > 1:
        raise RuntimeError(f"world_size={world} needs init_distributed() before the trainer")
    import socket

    from engines.trainer.base import init_distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_distributed(0, 1, ("127.0.0.1", port), device.type)


def _all_reduce_coalesced(tensors: list[torch.Tensor], group) -> None:
    """In-place sums over `group`, one flat buffer per dtype (few collectives, not one per tensor)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for ts in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.all_reduce(flat, group=group)
        for t, part in zip(ts, flat.split([t.numel() for t in ts])):
            t.copy_(part.view_as(t))
