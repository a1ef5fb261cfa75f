"""The worker's two seams: a trainer backend chosen by actor.strategy, a rollout engine chosen by
rollout.name, and the weight sync between them.

A backend or engine registered here, in a test file, runs inside the real GRPOWorker: a new one
needs no edit outside its own file. The fakes stand in only where the real part cannot run on CPU
(vLLM's sleep mode is CUDA-only): the weight sync's calls are checked against the order the
colocated engine needs. The real FSDP2 trainer and vLLM-CPU engine are built through the two
factories from a config alone (slow).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from configs.load import load_config, with_overrides
from engines.rollout import ROLLOUTS, RolloutEngine, build_rollout
from engines.rollout.base import TAGS
from engines.trainer import TRAINERS, TrainerBackend, build_trainer
from engines.types import GENERATED, SamplingSpec, UpdateBatch
from tests.conftest import cached_inputs

CALLS: list[tuple] = []  # what the fakes were asked, in order


@TRAINERS.register("fake-test")
class FakeTrainer(TrainerBackend):
    """A backend in one file: log-probs of -1 per token, an update that counts its steps."""

    def __init__(self, cfg, model_dir, **kwargs):
        self.cfg, self.is_lora, self.n_params, self.tokenizer = cfg, cfg.model.lora_rank > 0, 3, None
        self.on_host, self.updates = False, 0

    def compute_log_prob(self, prompts, responses, ref=False):
        CALLS.append(("log_prob", ref, self.on_host))
        return [np.full(len(r), -1.0, np.float32) for r in responses]

    def update(self, batch, seed, steps=None):
        CALLS.append(("update", len(batch), self.on_host))
        self.updates += 1
        return {"actor/pg_loss": 0.0, "actor/updates": float(self.updates)}

    def weights_for_rollout(self):
        CALLS.append(("gather", self.on_host))
        yield "w", torch.full((2,), float(self.updates))

    def save_adapter(self, out_dir):
        CALLS.append(("save_adapter", self.on_host))

    def save_state(self, ckpt_dir):
        return []

    def save_exports(self, ckpt_dir, export_hf=True):
        return []

    def load(self, ckpt_dir):
        pass

    def to_host(self):
        CALLS.append(("trainer_to_host",))
        self.on_host = True

    def to_device(self, optimizer=False):
        CALLS.append(("trainer_to_device", optimizer))
        self.on_host = False

    @property
    def weights_on_host(self):
        return self.on_host


@ROLLOUTS.register("fake-test")
class FakeRollout(RolloutEngine):
    """An engine in one file, with sleep mode (as vLLM on CUDA): echoes each prompt n times."""

    def __init__(self, cfg, model_dir, rank=0):
        self.sleep_mode, self.asleep, self.weights = True, set(), None

    def generate(self, prompts, *, n, temperature, top_p, top_k, max_tokens, seeds, logprobs=False):
        assert not self.asleep, f"generate while {self.asleep} sleep"
        CALLS.append(("generate",))
        return [
            {
                "prompt_index": i,
                "sample_index": j,
                "response_ids": list(p[:max_tokens]),
                "response_text": "",
                "rollout_log_probs": [],
                "finish_reason": "stop",
            }
            for i, p in enumerate(prompts)
            for j in range(n)
        ]

    def sleep(self, level):
        CALLS.append(("sleep", level))
        self.asleep = set(TAGS)

    def wake_up(self, tags=TAGS):
        todo = [t for t in tags if t in self.asleep]
        if todo:
            CALLS.append(("wake", *todo))
            self.asleep -= set(todo)

    def load_weights(self, named_tensors):
        self.wake_up(("weights",))
        CALLS.append(("load_weights",))
        self.weights = dict(named_tensors)  # consumed here, as vLLM's reload does

    def load_adapter(self, save_adapter):
        CALLS.append(("load_adapter",))
        save_adapter("/nonexistent")


def _fake_worker(*overrides):
    from engines.worker import GRPOWorker

    cfg = load_config("tiny-cpu", with_overrides(["actor.strategy=fake-test", "rollout.name=fake-test"], overrides))
    CALLS.clear()
    return GRPOWorker(cfg.model_dump_json(), "unused", rank=0, world_size=1)


SAMPLING = dict(n=2, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=3, seeds=[1])


def test_a_registered_backend_and_engine_run_in_the_worker_unchanged():
    """Full fine-tuning: the engine sleeps at level 2 (weights dropped) and is refilled from the
    trainer, with the trainer's offloaded weights borrowed onto the device for the copy and put
    back, before the KV cache wakes; a push after an update replaces the refill."""
    w = _fake_worker()
    assert type(w.trainer) is FakeTrainer and type(w.rollout) is FakeRollout
    assert CALLS == [("trainer_to_host",), ("sleep", 2)]
    CALLS.clear()
    out = w.generate([[5, 6, 7, 8]], SamplingSpec(**SAMPLING))
    assert [o["response_ids"] for o in out] == [[5, 6, 7]] * 2
    assert all(set(o) == set(GENERATED) - {"engine"} for o in out)  # the worker group adds `engine`
    assert CALLS == [
        ("trainer_to_host",),
        ("wake", "weights"),
        ("load_weights",),
        ("trainer_to_device", False),
        ("gather", False),
        ("trainer_to_host",),
        ("wake", "kv_cache"),
        ("generate",),
        ("sleep", 2),
    ]
    CALLS.clear()
    old = w.compute_log_prob([[5]], [[6, 7]])
    metrics = w.update_actor(
        UpdateBatch(prompts=[[5]], responses=[[6, 7]], old_log_probs=old, advantages=[1.0]), seed=0
    )
    assert metrics["actor/updates"] == 1.0
    w.sync_weights()
    assert CALLS == [
        ("trainer_to_device", False),
        ("log_prob", False, False),
        ("trainer_to_device", True),
        ("update", 1, False),
        ("wake", "weights"),
        ("load_weights",),
        ("trainer_to_device", False),
        ("gather", False),
    ]
    assert torch.equal(w.rollout.weights["w"], torch.ones(2))  # the updated weights went over
    CALLS.clear()
    w.generate([[5]], SAMPLING)  # pushed weights are current: no refill, only the KV cache wakes
    assert CALLS == [("trainer_to_host",), ("wake", "kv_cache"), ("generate",), ("sleep", 2)]


def test_lora_keeps_the_engine_base_at_level_1_and_pushes_only_the_adapter():
    w = _fake_worker("model.lora_rank=4")
    assert CALLS == [("trainer_to_host",), ("sleep", 1)]
    CALLS.clear()
    w.generate([[5]], SAMPLING)
    assert CALLS == [("trainer_to_host",), ("wake", "weights", "kv_cache"), ("generate",), ("sleep", 1)]
    CALLS.clear()
    w.sync_weights()
    assert CALLS == [("trainer_to_device", False), ("load_adapter",), ("save_adapter", False)]


@pytest.mark.parametrize("key, value", [("actor.strategy", "deepspeed"), ("rollout.name", "sglang")])
def test_a_backend_this_build_lacks_is_one_error_line_before_any_work(key, value):
    from flows.preflight import preflight

    cfg = load_config("tiny-cpu", cached_inputs() + [f"{key}={value}"])
    with pytest.raises(ValueError) as e:
        preflight(cfg)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{key}={value} is not supported in this build (have: "), msg


def _factories_main(rank: int) -> None:
    """In its own process (an in-process vLLM engine leaves vLLM's groups behind: test_adapter_dirs.py)."""
    from engines.models import materialize
    from engines.rollout.vllm import VLLMRollout
    from engines.trainer.fsdp import FSDPTrainer
    from envs import get_env
    from envs.prep import load_raw

    cfg = load_config("tiny-cpu", cached_inputs())
    env = get_env(cfg.data.data_source)
    corpus = env.tokenizer_corpus(load_raw(env, cfg.data.source)["train"])
    materialize("random", cfg.model.path, corpus=corpus)
    trainer, rollout = build_trainer(cfg), build_rollout(cfg)
    try:
        assert type(trainer) is FSDPTrainer and type(rollout) is VLLMRollout
        out = rollout.generate([[5, 6, 7]], **SAMPLING, logprobs=True)
        logp = trainer.compute_log_prob([[5, 6, 7]] * 2, [o["response_ids"] for o in out])
        assert [len(x) for x in logp] == [len(o["response_ids"]) for o in out]
        diff = max(float(np.abs(np.asarray(o["rollout_log_probs"]) - x).max()) for o, x in zip(out, logp))
        assert diff < 1e-4, diff  # the two load the same weights (tests/conftest.py: VLLM_LOGP_ATOL_CPU)
    finally:
        rollout.close()


@pytest.mark.slow
def test_the_factories_build_the_real_trainer_and_engine_from_config_alone(gsm8k):
    import torch.multiprocessing as mp

    mp.spawn(_factories_main, nprocs=1)


def test_sampling_specs_come_from_the_config_once():
    """Training samples as rollout.* says; eval one greedy sample (rollout.val_temperature) over the
    whole vocabulary, without log-probs (tiny-cpu's training asks for them: rollout.calculate_log_probs);
    a share of the prompts keeps everything but its seeds."""
    cfg = load_config("tiny-cpu", ["rollout.top_p=0.9", "rollout.top_k=50"])
    train = SamplingSpec.for_training(cfg, [3, 4])
    assert train.as_kwargs() == dict(
        n=4, temperature=1.0, top_p=0.9, top_k=50, max_tokens=32, seeds=[3, 4], logprobs=True
    )
    assert SamplingSpec.for_eval(cfg, [5]).as_kwargs() == dict(
        n=1, temperature=0.0, top_p=1.0, top_k=-1, max_tokens=32, seeds=[5], logprobs=False
    )
    assert train.with_seeds([4]) == SamplingSpec.for_training(cfg, [4])


def test_readme_names_every_abstract_method_of_the_seams():
    """A fresh clone's review: the README's "Extending" section must name exactly the methods a new
    backend or engine has to implement (read from the ABCs, so a renamed method fails here)."""
    import re
    from pathlib import Path

    from engines.trainer.actor import GRPOActor

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Extending") :]

    def paragraph(title: str) -> str:  # from its bold title to its code example
        start = section.index(title)
        return section[start : section.index("```python", start)]

    trainer, rollout = paragraph("**A trainer backend**"), paragraph("**A rollout engine**")

    def named(par: str) -> set[str]:
        return set(re.findall(r"`(\w+)`", par))

    assert set(TrainerBackend.__abstractmethods__) <= named(trainer)
    assert set(GRPOActor.__abstractmethods__) - set(TrainerBackend.__abstractmethods__) <= named(trainer)
    assert set(RolloutEngine.__abstractmethods__) <= named(rollout)
    assert not {m for m in named(trainer) if m.startswith("_")} - set(GRPOActor.__abstractmethods__)
