"""FSDP2 across ranks: two gloo ranks on CPU train the tiny model exactly as one rank does.

Reference: the unsharded one-rank trainer (tests/test_trainer.py checks it; one rank runs
without FSDP). Two processes (torch.multiprocessing, gloo) shard the same model with
`fully_shard`, each takes a contiguous half of every mini-batch, and after 3 updates of 2
mini-batches each the gathered parameters must equal the one-rank run's. Responses have
different lengths, so a per-rank loss normalisation (instead of the global token count) would
be off by far more than the tolerance. Checkpoints written at one world size load at the other.
With use_dynamic_bsz the micro-batches follow a token budget instead, and in some steps one
rank needs two of them and the other one: both must run two (each forward is a collective).

The e2e test (slow) runs `grpo run tiny-cpu trainer.n_gpus_per_node=2`: two Ray CPU actors, two
vLLM engines, one MLflow run with the same metric keys as one rank.
"""

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from configs.load import load_config, with_overrides
from tests.conftest import free_port

# 3 updates x 2 mini-batches of 4 samples (2 per rank), micro-batches of 1; lr 1e-3 moves each
# weight by ~1e-3 per step.
OVERRIDES = [
    "rollout.n=2",
    "data.train_batch_size=4",
    "actor.ppo_mini_batch_size=2",
    "actor.ppo_micro_batch_size_per_gpu=1",
    "actor.lr=1e-3",
    "trainer.device=cpu",
]
# Both sides train in float64 (FSDPTrainer(master_dtype=torch.float64): weights, reference,
# forward and loss), so the comparison does not depend on which CPU kernels ran it (AVX512, AVX2,
# ATEN_CPU_CAPABILITY=default) or on the thread count. Sharding, dynamic micro-batches and Ulysses
# change only the order of sums, so 2 ranks differ from 1 by rounding alone. The bound:
# - in float32 the same comparisons (3 AdamW steps, lr 1e-3) moved weights by up to 1.9e-5
#   (measured; the float32 bound was 1e-4): Adam's g / (sqrt(v) + eps) magnifies the rounding of
#   the few gradients near eps = 1e-8 (no sum here has more than ~1e3 terms). The arithmetic is the
#   same with unit roundoff 2^-53 instead of 2^-24, i.e. 2^29 = 5.4e8 times smaller: <= 1e-4 /
#   5.4e8 = 2e-13. ATOL = 1e-10 leaves 500x for Adam's magnification not being linear in the
#   rounding (measured: max 8e-15 on every case here).
# - a wrong normalisation (per-rank instead of global token counts) moves most weights by ~lr =
#   1e-3: 7 orders above ATOL (test_a_per_rank_normalisation_is_caught shows it).
ATOL = 1e-10
# Metrics are sums over <= ~100 tokens of terms up to ~100x the (cancelling) total: reordering
# changes them by <= 100 * 2^-53 * 100 = 1.1e-12 relative at the first update, and later ones by
# the weights' ~1e-14 difference (measured <= 1.5e-14). A wrong normalisation is off by >1e-2.
METRIC_REL = 1e-10
STEPS = 3


def _cfg(world: int, extra: list[str]):
    return load_config("tiny-cpu", with_overrides(OVERRIDES + [f"trainer.n_gpus_per_node={world}"], extra))


def _batch(n=8):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(5, 200, size=rng.integers(4, 9)).tolist() for _ in range(n)]
    responses = [rng.integers(5, 200, size=rng.integers(1, 12)).tolist() for _ in range(n)]
    return prompts, responses, rng.normal(size=n).astype(np.float32).tolist()


def _train(trainer, cfg) -> list[dict]:
    """STEPS GRPO updates on fixed data; this data-parallel rank's share of every mini-batch only."""
    from engines.batching import minibatch_schedule
    from engines.types import UpdateBatch

    prompts, responses, adv = _batch()
    ref = trainer.compute_log_prob(prompts, responses, ref=True)
    metrics = []
    for step in range(STEPS):
        batch = UpdateBatch(
            prompts=prompts,
            responses=responses,
            advantages=adv,
            ref_log_probs=ref,
            old_log_probs=trainer.compute_log_prob(prompts, responses),
        )
        steps = minibatch_schedule(len(prompts), cfg, step, trainer.dp_rank, trainer.dp_size)
        metrics.append(trainer.update(batch, seed=step, steps=steps))
    return metrics


def _state(trainer) -> dict[str, torch.Tensor]:
    from engines.trainer.fsdp import full_tensor

    return {k: full_tensor(v).clone() for k, v in trainer.model.state_dict().items()}


def _rank_main(rank, world, port, model_dir, extra, tmp, per_rank_counts=False):
    """One gloo rank: train, save a checkpoint, then load the one-rank run's checkpoint.
    per_rank_counts: the mistake the tolerances must catch, each rank normalising its loss by its
    own token and sequence counts (the trainer's all-reduce of the counts skipped)."""
    from engines.trainer import init_distributed
    from engines.trainer.fsdp import FSDPTrainer

    torch.set_num_threads(1)
    init_distributed(rank, world, ("127.0.0.1", port), "cpu")
    cfg = _cfg(world, extra)
    torch.manual_seed(0)
    t = FSDPTrainer(cfg, model_dir, "cpu", master_dtype=torch.float64)
    if per_rank_counts:
        t._sum = lambda values, op=None: values
    metrics = _train(t, cfg)
    trained = _state(t)
    t.save(f"{tmp}/ck{world}")
    t.load(f"{tmp}/ck1")
    loaded = _state(t)
    if rank == 0:
        torch.save({"metrics": metrics, "trained": trained, "loaded": loaded}, f"{tmp}/out{world}.pt")
    torch.distributed.destroy_process_group()


# Budget 30 padded tokens for samples of 5..19 (max_prompt_length 8 + max_response_length 11):
# log-prob passes of 1, 1, 2, 2, 2 samples; one rank's 4 samples per step in 2 or 3 micro-batches.
DYNAMIC = [
    "actor.use_dynamic_bsz=true",
    "actor.ppo_max_token_len_per_gpu=30",
    "data.max_prompt_length=8",
    "rollout.max_response_length=11",
]


def _rank_needs(cfg, world: int) -> list[list[int]]:
    """Micro-batches each rank's share of each optimizer step needs on its own."""
    from engines import batching
    from engines.batching import minibatch_schedule

    prompts, responses, _ = _batch()
    shapes = [(len(p), len(r)) for p, r in zip(prompts, responses)]
    b = cfg.actor.ppo_max_token_len_per_gpu
    return [
        [batching.count([shapes[i] for i in share], b) for share in shares]
        for step in range(STEPS)
        for shares in zip(*(minibatch_schedule(len(prompts), cfg, step, r, world) for r in range(world)))
    ]


# Ulysses: both ranks take every sample, each holds half of every sequence's columns (an odd
# micro-batch of 1 is padded to 2 rows, one per rank); seq-mean-token-mean checks that each row's
# tokens stay on one rank for the loss; checkpointing (as the recipes) recomputes through the all-to-alls.
ULYSSES = [
    "actor.ulysses_sequence_parallel_size=2",
    "actor.loss_agg_mode=seq-mean-token-mean",
    "model.enable_gradient_checkpointing=true",
]


# Packed (model.use_remove_padding) with Ulysses: each rank feeds half the packed row's columns
# and computes the logits of half the samples from the gathered row; checked against the padded
# one-rank reference (packing changes only the order of sums, like sharding). Micro-batch 1: the
# second rank's sample is a padding copy; micro-batch 2: the ranks' samples have responses of
# different lengths (their log-prob rows are gathered at the micro-batch's width).
PACKED = "model.use_remove_padding=true"

METRICS = ("actor/pg_loss", "actor/kl_loss", "actor/entropy", "actor/ppo_kl", "actor/grad_norm")


def _reference(extra: list[str]) -> list[str]:
    """The one-rank reference's overrides: no Ulysses, padded."""
    return [e for e in extra if "ulysses" not in e and e != PACKED]


def _one_rank(model_dir, extra, tmp_path):
    """The reference: one plain rank (no Ulysses), one thread as each rank, float64."""
    from engines.trainer.fsdp import FSDPTrainer

    cfg = _cfg(1, _reference(extra))
    torch.manual_seed(0)
    one = FSDPTrainer(cfg, model_dir, "cpu", master_dtype=torch.float64)
    before = _state(one)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        metrics = _train(one, cfg)
    finally:
        torch.set_num_threads(threads)
    one.save(str(tmp_path / "ck1"))
    return one, before, _state(one), metrics


def _two_ranks(model_dir, extra, tmp_path, per_rank_counts=False):
    mp.spawn(_rank_main, args=(2, free_port(), model_dir, extra, str(tmp_path), per_rank_counts), nprocs=2)
    out = torch.load(tmp_path / "out2.pt", weights_only=False)
    return out["trained"], out["metrics"], out


def _weight_diff(p1, p2, before) -> torch.Tensor:
    assert p1.keys() == p2.keys()
    moved = max((p1[k] - before[k]).abs().max().item() for k in p1)
    assert moved > 1e-3, "training did not move the weights: the comparison would be empty"
    diff = torch.cat([(p1[k] - p2[k]).abs().flatten() for k in p1])
    print(f"|2 ranks - 1 rank|: max {diff.max():.2e} mean {diff.mean():.2e} (weights moved up to {moved:.2e})")
    return diff


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["model.lora_rank=8", "actor.loss_agg_mode=seq-mean-token-mean"],
        DYNAMIC,
        ULYSSES,
        ULYSSES + ["model.lora_rank=8"],
        ULYSSES + [PACKED],
        ULYSSES + [PACKED, "actor.ppo_micro_batch_size_per_gpu=2", "model.lora_rank=8"],
        [PACKED, "model.lora_rank=8"],
    ],
    ids=[
        "full",
        "lora",
        "dynamic_bsz",
        "ulysses",
        "ulysses_lora",
        "ulysses_packed",
        "ulysses_packed_micro2_lora",
        "packed_lora",
    ],
)
def test_two_gloo_ranks_match_one_rank(model_dir, tmp_path, extra):
    if extra is DYNAMIC:  # the case under test: ranks that need different counts in one step
        assert any(len(set(needs)) > 1 for needs in _rank_needs(_cfg(2, extra), 2))
    one, before, p1, m1 = _one_rank(model_dir, extra, tmp_path)
    p2, m2, out = _two_ranks(model_dir, extra, tmp_path)

    diff = _weight_diff(p1, p2, before)
    assert diff.max() <= ATOL
    for a, b in zip(m1, m2, strict=True):  # metrics are global: the ranks' shares summed
        for k in METRICS:
            assert b[k] == pytest.approx(a[k], rel=METRIC_REL), k
        assert b["perf/update_tokens"] == a["perf/update_tokens"]

    # DCP checkpoints reshard on load: each world size loads the other's.
    for k, v in out["loaded"].items():
        assert torch.equal(v, p1[k]), f"2 ranks loading the 1-rank checkpoint: {k} differs"
    from engines.trainer.fsdp import FSDPTrainer

    fresh = FSDPTrainer(_cfg(1, _reference(extra)), model_dir, "cpu", master_dtype=torch.float64)
    fresh.load(str(tmp_path / "ck2"))
    for k, v in _state(fresh).items():
        assert torch.equal(v, p2[k]), f"1 rank loading the 2-rank checkpoint: {k} differs"
    o1, o2 = one.optimizer.state_dict()["state"], fresh.optimizer.state_dict()["state"]
    assert max((o1[i]["exp_avg"] - o2[i]["exp_avg"]).abs().max().item() for i in o1) < ATOL


def test_a_per_rank_normalisation_is_caught(model_dir, tmp_path):
    """The tolerances above still catch the mistake they guard against: ranks whose responses have
    different lengths, each normalising by its own counts, end far outside ATOL and METRIC_REL."""
    _, before, p1, m1 = _one_rank(model_dir, [], tmp_path)
    p2, m2, _ = _two_ranks(model_dir, [], tmp_path, per_rank_counts=True)
    assert _weight_diff(p1, p2, before).max() > 1e4 * ATOL
    assert (
        max(abs(b["actor/pg_loss"] - a["actor/pg_loss"]) / abs(a["actor/pg_loss"]) for a, b in zip(m1, m2))
        > 1e4 * METRIC_REL
    )


@pytest.mark.slow
def test_grpo_run_on_two_cpu_ranks(tmp_path, gsm8k):
    """`grpo run tiny-cpu trainer.n_gpus_per_node=2`: two Ray CPU actors (gloo ranks), each with its
    own vLLM engine, against one rank on the same recipe."""
    import pandas as pd
    from safetensors.torch import load_file

    from tests.conftest import VLLM_LOGP_ATOL_CPU, mlflow_run, run_grpo

    runs = {}
    for world in (1, 2):
        (tmp_path / str(world)).mkdir()
        # A reward the random tiny policy earns (GSM8K's is 0 for all): non-zero advantages,
        # so the update moves the weights and the weight sync to both engines is tested.
        run_grpo(
            tmp_path / str(world), f"trainer.n_gpus_per_node={world}", "reward.function=tests.toy_reward:letter_e_share"
        )
        client, run = mlflow_run(tmp_path / str(world))
        assert run.info.status == "FINISHED"
        runs[world] = (client, run, tmp_path / str(world) / "ckpt")
    (c1, r1, ck1), (c2, r2, ck2) = runs[1], runs[2]
    # Training metrics per step; MLflow's system metrics (system/*) are sampled by time, not by step.
    keys = {k for k in r1.data.metrics if not k.startswith("system/")}
    assert {k for k in r2.data.metrics if not k.startswith("system/")} == keys
    for key in keys:
        assert [m.step for m in c2.get_metric_history(r2.info.run_id, key)] == [
            m.step for m in c1.get_metric_history(r1.info.run_id, key)
        ], key

    # Rollout split over two engines, gathered back in prompt order. vLLM seeds each prompt's
    # sampling, so the two engines draw exactly what one engine drew.
    one = pd.read_parquet(ck1 / "rollouts" / "step_000001.parquet")
    two = pd.read_parquet(ck2 / "rollouts" / "step_000001.parquet")
    half = two["prompt_index"].nunique() // 2
    assert set(two["engine"]) == {0, 1} and set(one["engine"]) == {0}
    assert (two["engine"] == (two["prompt_index"] >= half)).all()
    assert two["prompt_index"].is_monotonic_increasing
    assert list(two["row"]) == list(one["row"])
    assert [list(x) for x in two["response_ids"]] == [list(x) for x in one["response_ids"]]
    # Same samples and weights, so the first update is the same; sharding changes only the order of
    # float32 sums (the flow trains in float32: vLLM has no float64). A step-1 metric sums ~1e3
    # token terms; rounding grows like sqrt(n) * u (conftest): sqrt(1e3) * 2^-24 = 2e-6 relative,
    # times the cancellation of terms of both signs (<= ~30 here): rel 1e-4. KL is ~0 at step 1
    # (policy = reference), hence abs 1e-6. Per-rank normalisation would be off by > 1e-2.
    first = lambda c, r, key: next(m.value for m in c.get_metric_history(r.info.run_id, key) if m.step == 1)  # noqa: E731
    assert first(c1, r1, "actor/grad_norm") > 0.01
    for key in ("critic/score/mean", "actor/pg_loss", "actor/entropy", "actor/grad_norm", "actor/kl_loss"):
        assert first(c2, r2, key) == pytest.approx(first(c1, r1, key), rel=1e-4, abs=1e-6), key
    # After each update both engines sample with the new weights: vLLM's log-probs of what it
    # sampled match the trainer's (fp32 CPU, as tests/test_parity.py).
    diffs = c2.get_metric_history(r2.info.run_id, "training/rollout_probs_diff_max")
    assert len(diffs) == 3 and max(m.value for m in diffs) < VLLM_LOGP_ATOL_CPU

    # Each rank wrote its own shards of the training state; the HF exports are whole either way.
    assert len(list((ck2 / "global_step_3" / "actor").glob("*.distcp"))) == 2
    a = load_file(ck1 / "global_step_3" / "huggingface" / "model.safetensors")
    b = load_file(ck2 / "global_step_3" / "huggingface" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    # ... and one rank resumes them: a 4th step from the 2-rank run's step 3, in the same MLflow run.
    run_grpo(
        tmp_path / "2",
        "trainer.n_gpus_per_node=1",
        "trainer.total_training_steps=4",
        "reward.function=tests.toy_reward:letter_e_share",
    )
    assert "resumed from" in (tmp_path / "2" / "run.log").read_text()
    client, run = mlflow_run(tmp_path / "2")
    assert run.info.run_id == r2.info.run_id
    assert [m.step for m in client.get_metric_history(run.info.run_id, "actor/grad_norm")] == [1, 2, 3, 4]


@pytest.mark.slow
def test_grpo_run_with_one_engine_over_two_ranks(tmp_path, gsm8k):
    """rollout.tensor_model_parallel_size=2: the two gloo ranks form one vLLM engine (tensor
    parallel, in the trainer's process group). It samples what one rank's engine samples (fp32,
    seeded per prompt), and after each update its log-probs match the trainer's."""
    import pandas as pd

    from tests.conftest import VLLM_LOGP_ATOL_CPU, mlflow_run, run_grpo

    run_grpo(
        tmp_path,
        "trainer.n_gpus_per_node=2",
        "rollout.tensor_model_parallel_size=2",
        "reward.function=tests.toy_reward:letter_e_share",
        "trainer.total_training_steps=2",
    )
    client, run = mlflow_run(tmp_path)
    assert run.info.status == "FINISHED"
    rows = pd.read_parquet(tmp_path / "ckpt" / "rollouts" / "step_000002.parquet")
    assert set(rows["engine"]) == {0} and rows["prompt_index"].is_monotonic_increasing
    diffs = client.get_metric_history(run.info.run_id, "training/rollout_probs_diff_max")
    assert len(diffs) == 2 and max(m.value for m in diffs) < VLLM_LOGP_ATOL_CPU
    # One rank, one engine, the same seeds: the same first rollout, token for token.
    (tmp_path / "one").mkdir()
    run_grpo(tmp_path / "one", "reward.function=tests.toy_reward:letter_e_share", "trainer.total_training_steps=1")
    one = pd.read_parquet(tmp_path / "one" / "ckpt" / "rollouts" / "step_000001.parquet")
    tp = pd.read_parquet(tmp_path / "ckpt" / "rollouts" / "step_000001.parquet")
    assert [list(x) for x in tp["response_ids"]] == [list(x) for x in one["response_ids"]]


def test_export_in_shards_loads_in_hf(model_dir, tmp_path, monkeypatch):
    """Past SHARD_BYTES the export goes to several files + the HF index; transformers loads them in
    the compute dtype, equal to the trainer's weights rounded to it; load() restores the fp32 ones."""
    from transformers import AutoModelForCausalLM

    from engines.trainer import checkpoint
    from engines.trainer.fsdp import FSDPTrainer

    monkeypatch.setattr(checkpoint, "SHARD_BYTES", 200_000)
    t = FSDPTrainer(_cfg(1, ["model.dtype=bfloat16"]), model_dir, "cpu")
    t.save(str(tmp_path / "ck"))
    assert len(list((tmp_path / "ck" / "huggingface").glob("model-*-of-*.safetensors"))) > 2
    assert (tmp_path / "ck" / "huggingface" / "model.safetensors.index.json").exists()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ck" / "huggingface")
    mine = _state(t)
    for k, v in hf.state_dict().items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, mine[k].to(torch.bfloat16)), k
    with torch.no_grad():
        for p in t.model.parameters():
            p.zero_()
    t.load(str(tmp_path / "ck"))
    for k, v in _state(t).items():
        assert torch.equal(v, mine[k]), k
