"""Bad input a fresh clone's review found only once work had started (Ray up, an MLflow run and a
checkpoint folder written): a Megatron TP size that cannot split the model's heads, more ranks than
the local Ray has CPUs, a context past the model's, an unwritable directory that os.access passes
for root, and one broken module in a registry's package. Each is now one line before any work."""

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from configs.load import load_config, with_overrides
from engines.registry import DuplicateRegistration, Registry
from engines.worker_group import ClusterTooSmall, check_rank_count
from flows.preflight import _check_writable, check_local_ray, check_model_fit, context_limit, preflight

ROOT = Path(__file__).resolve().parents[1]
MEGATRON_TP2 = ["actor.strategy=megatron", "actor.megatron.tensor_model_parallel_size=2", "trainer.n_gpus_per_node=2"]
FOUR_RANKS = ["trainer.n_gpus_per_node=4", "actor.ppo_micro_batch_size_per_gpu=4"]


def _cfg(tmp_path, *overrides):
    """tiny-cpu writing only under tmp_path (its model: the tiny preset, one key-value head)."""
    return load_config(
        "tiny-cpu",
        with_overrides(
            [
                f"trainer.default_local_dir={tmp_path / 'ckpt'}",
                f"data.dir={tmp_path / 'data'}",
                f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                f"model.path={tmp_path / 'no-model-yet'}",
            ],
            overrides,
        ),
    )


def _one_line_and_nothing_written(tmp_path, cfg, needle: str) -> str:
    with pytest.raises(ValueError) as e:
        preflight(cfg)
    msg = str(e.value)
    assert "\n" not in msg and needle in msg, msg
    assert list(tmp_path.iterdir()) == [], "preflight must write nothing"
    return msg


# ---- 1. Megatron's TP (and Ulysses, vLLM's TP) against the model's heads ---------------------------
def test_a_megatron_tp_that_does_not_split_the_heads_is_refused_in_preflight(tmp_path):
    cfg = _cfg(tmp_path, *MEGATRON_TP2)
    msg = _one_line_and_nothing_written(
        tmp_path, cfg, "actor.megatron.tensor_model_parallel_size=2 does not divide the model's num_key_value_heads (1)"
    )
    assert "ARCH_PRESETS['tiny']" in msg and msg.endswith("choose a tensor-parallel size that divides it"), msg


def test_the_head_rules_are_the_planners_for_every_parallel_size(tmp_path):
    ulysses = _cfg(tmp_path, *FOUR_RANKS, "actor.ulysses_sequence_parallel_size=4")
    with pytest.raises(ValueError, match=r"actor.ulysses_sequence_parallel_size=4 must divide the model's 2 attention"):
        check_model_fit(ulysses)
    vllm = _cfg(tmp_path, *FOUR_RANKS, "rollout.tensor_model_parallel_size=4")
    with pytest.raises(ValueError, match=r"rollout.tensor_model_parallel_size=4 must divide .* \(vLLM refuses it\)"):
        check_model_fit(vllm)
    check_model_fit(_cfg(tmp_path, "actor.strategy=megatron"))  # TP 1 splits anything
    check_model_fit(_cfg(tmp_path, *FOUR_RANKS, "actor.ulysses_sequence_parallel_size=2"))  # 2 heads, 1 KV head


def test_a_local_config_json_is_the_shape_checked(tmp_path):
    """A built model's config.json, not the preset, decides: here 4 key-value heads split over TP 2."""
    model = tmp_path / "model"
    model.mkdir()
    conf = dict(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=1024,
        max_position_embeddings=2048,
    )
    (model / "config.json").write_text(json.dumps(conf))
    check_model_fit(_cfg(tmp_path, *MEGATRON_TP2, f"model.path={model}"))
    (model / "config.json").write_text(json.dumps({**conf, "num_key_value_heads": 1}))
    with pytest.raises(ValueError, match=rf"num_key_value_heads \(1\) \(the model's shape from {model}/config.json\)"):
        check_model_fit(_cfg(tmp_path, *MEGATRON_TP2, f"model.path={model}"))


# ---- 2. more ranks than the local Ray has CPUs -----------------------------------------------------
def test_more_cpu_ranks_than_cores_is_one_line_before_ray(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)  # local Ray: one CPU per core, at least 2
    cfg = _cfg(tmp_path, *FOUR_RANKS)
    msg = _one_line_and_nothing_written(tmp_path, cfg, "recipe 'tiny-cpu' needs 4 CPUs (trainer.n_gpus_per_node=4")
    assert "the local Ray (one CPU per core of this machine) has 2" in msg and "lower trainer.n_gpus_per_node" in msg
    check_local_ray(_cfg(tmp_path, "trainer.n_gpus_per_node=2"))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a cluster: the flow asks Ray, before the MLflow run
    check_local_ray(cfg)


def test_a_cluster_too_small_is_bad_input_not_a_retried_failure(tmp_path):
    """check_resources' error is a ValueError: the CLI prints it as one `error:` line (exit 2) and
    the flow records it as final (no retry)."""
    with pytest.raises(ClusterTooSmall) as e:
        check_rank_count(_cfg(tmp_path, *FOUR_RANKS), 3, "the Ray cluster has")
    assert (
        isinstance(e.value, ValueError) and "needs 4 CPUs" in str(e.value) and "the Ray cluster has 3" in str(e.value)
    )
    grpo_source = (ROOT / "flows" / "grpo.py").read_text()
    assert grpo_source.index("check_resources(cfg)") < grpo_source.index("tracker = Tracker(")


# ---- 3. the context against the model's --------------------------------------------------------
def test_a_response_past_the_models_context_is_refused_in_preflight(tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", raising=False)
    cfg = _cfg(tmp_path, "rollout.max_response_length=100000")
    msg = _one_line_and_nothing_written(
        tmp_path, cfg, "data.max_prompt_length+rollout.max_response_length=256+100000=100256 is more than"
    )
    assert "context of 2048 tokens (max_position_embeddings=2048" in msg, msg
    assert msg.endswith("lower rollout.max_response_length to at most 1792"), msg
    with pytest.raises(ValueError, match=r"rollout.max_model_len=4096 .*lower rollout.max_model_len to at most 2048"):
        check_model_fit(_cfg(tmp_path, "rollout.max_model_len=4096"))
    check_model_fit(_cfg(tmp_path, "rollout.max_response_length=1792"))  # 256 + 1792 = 2048 fits
    monkeypatch.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")  # vLLM's own override: it then allows it
    check_model_fit(cfg)


def test_the_context_limit_follows_vllms_rule(tmp_path):
    assert context_limit({"max_position_embeddings": 4096, "n_positions": 1024}) == (1024, "n_positions=1024")
    linear = {"max_position_embeddings": 4096, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert context_limit(linear)[0] == 8192
    yarn = {"max_position_embeddings": 4096, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    assert context_limit(yarn)[0] == 4096  # already scaled
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))
    assert context_limit({"max_position_embeddings": 4096}, tmp_path) == (512, "the tokenizer's model_max_length=512")
    assert context_limit({"hidden_size": 8}) is None


# ---- 5. writability by a real probe ------------------------------------------------------------
def test_a_directory_that_cannot_be_written_is_found_by_a_probe(tmp_path):
    with pytest.raises(ValueError) as e:
        _check_writable("trainer.default_local_dir", Path("/proc/grpo-x"))  # os.access: writable for root
    assert str(e.value).startswith("trainer.default_local_dir=/proc/grpo-x: /proc is not a writable directory (")
    _check_writable("trainer.default_local_dir", tmp_path / "a" / "b")
    _check_writable("data.dir", tmp_path)
    assert list(tmp_path.iterdir()) == [], "the probe must leave nothing behind"


# ---- 4. registry discovery with a broken module ------------------------------------------------
def _package(tmp_path, monkeypatch, name: str, modules: dict[str, str]) -> Registry:
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text(f"from engines.registry import Registry\nREG = Registry('test.key', {name!r})\n")
    for module, text in modules.items():
        (pkg / f"{module}.py").write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    __import__(name)
    return sys.modules[name].REG


GOOD = """
    from {pkg} import REG

    @REG.register("good")
    class Good:
        pass
"""


def test_a_module_that_does_not_import_is_skipped_with_one_warning(tmp_path, monkeypatch, caplog):
    reg = _package(
        tmp_path,
        monkeypatch,
        "regpkg_a",
        {
            "good": GOOD.format(pkg="regpkg_a"),
            "half": """
                from regpkg_a import REG

                @REG.register("half")
                class Half:
                    pass

                import no_such_module_anywhere
            """,
            "typo": "def broken(:\n",
        },
    )
    with caplog.at_level(logging.WARNING, logger="engines.registry"):
        assert reg.get("good").__name__ == "Good"
        assert reg.names() == ["good"]  # the half-imported module's name is taken back
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all("\n" not in line for line in lines), lines
    assert lines[0].startswith("regpkg_a/half.py: skipped") and "ModuleNotFoundError" in lines[0], lines
    assert lines[1].startswith("regpkg_a/typo.py: skipped") and "SyntaxError" in lines[1], lines


def test_a_name_not_found_lists_the_names_and_the_modules_that_failed(tmp_path, monkeypatch):
    reg = _package(tmp_path, monkeypatch, "regpkg_b", {"good": GOOD.format(pkg="regpkg_b"), "bad": "1 / 0\n"})
    with pytest.raises(ValueError) as e:
        reg.get("wanted")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("test.key=wanted is not supported in this build (have: good; "), msg
    assert "failed to import: regpkg_b/bad.py: ZeroDivisionError: division by zero" in msg, msg


def test_a_name_registered_twice_names_both_files(tmp_path, monkeypatch):
    twin = GOOD.format(pkg="regpkg_c").replace("class Good", "class Twin")
    reg = _package(tmp_path, monkeypatch, "regpkg_c", {"one": GOOD.format(pkg="regpkg_c"), "two": twin})
    with pytest.raises(DuplicateRegistration) as e:
        reg.get("good")
    msg = str(e.value)
    assert msg.startswith("test.key=good is registered twice: Good in "), msg
    pkg = (tmp_path / "regpkg_c").resolve()
    assert f"Good in {pkg / 'one.py'} and Twin in {pkg / 'two.py'}" in msg, msg


def test_the_real_registries_have_no_broken_module():
    from engines.rollout import ROLLOUTS
    from engines.trainer import TRAINERS
    from envs import ENVS

    for reg in (TRAINERS, ROLLOUTS, ENVS):
        reg.names()
        assert reg._broken == {}, reg._broken


# ---- end to end: the CLI ----------------------------------------------------------------------
@pytest.mark.slow  # a subprocess each: ~10 s of imports per case
@pytest.mark.parametrize(
    "overrides,needle",
    [
        (MEGATRON_TP2, "actor.megatron.tensor_model_parallel_size=2 does not divide"),
        (FOUR_RANKS, "needs 4 CPUs"),
        (["rollout.max_response_length=100000"], "max_position_embeddings=2048"),
        (["trainer.default_local_dir=/proc/grpo-x"], "trainer.default_local_dir=/proc/grpo-x"),
    ],
)
def test_cli_refuses_each_in_one_line_exit_2_nothing_written(tmp_path, overrides, needle):
    if "needs 4 CPUs" in needle and (os.cpu_count() or 1) >= 4:
        pytest.skip("this machine has 4 cores: 4 CPU ranks fit its local Ray")
    work = tmp_path / "work"
    work.mkdir()
    args = [f"trainer.default_local_dir={work / 'ckpt'}", f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    res = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "tiny-cpu", *with_overrides(args, overrides)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and lines and lines[-1].startswith("error: "), res.stderr[-3000:]
    assert needle in lines[-1] and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert list(work.iterdir()) == [], "a rejected run must write nothing"


# ---- the sharded load reads safetensors only --------------------------------------------------------
def test_a_bin_only_model_is_refused_for_a_sharded_run(tmp_path, model_dir):
    """A model dir with *.bin weights only passes check_hf_dir (one rank loads it with from_pretrained),
    but the sharded trainer's load (engines/trainer/load.py) reads safetensors: refused in one line
    before any work, for FSDP2 on 2 ranks; one rank is still allowed."""
    import shutil

    import torch
    from safetensors.torch import load_file

    bin_dir = tmp_path / "bin-model"
    bin_dir.mkdir()
    for f in Path(model_dir).iterdir():
        if f.suffix == ".safetensors":  # the weights as an older torch.save checkpoint
            torch.save(load_file(f), bin_dir / "pytorch_model.bin")
        else:
            shutil.copy(f, bin_dir / f.name)
    assert not list(bin_dir.glob("*.safetensors")) and list(bin_dir.glob("*.bin"))
    work = tmp_path / "work"
    work.mkdir()
    overrides = ["model.source=hf", f"model.path={bin_dir}", "trainer.n_gpus_per_node=2"]
    msg = _one_line_and_nothing_written(work, _cfg(work, *overrides), "has *.bin weights only")
    assert msg.startswith(f"model.path={bin_dir}") and msg.endswith("(safetensors by default)"), msg
    preflight(_cfg(work, *overrides[:2]))  # one rank: from_pretrained reads *.bin, nothing to refuse
