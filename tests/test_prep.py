"""GSM8K prep through envs/prep.py: the standard parquet rows, the length filter, the cache by
content, and one error line per bad input file."""

import json
from pathlib import Path

import pandas as pd
import pytest

import envs.prep as prep
from envs import get_env
from envs.gsm8k import INSTRUCTION
from envs.prep import load_raw, prepare, standard_rows

ENV = get_env("openai/gsm8k")  # through the registry, as the prep task gets it

DATA_DIR = Path(__file__).resolve().parents[2] / "shared/data/gsm8k"
needs_real_data = pytest.mark.skipif(
    not (DATA_DIR / "train.jsonl").is_file() or not (DATA_DIR / "test.jsonl").is_file(),
    reason=f"real GSM8K jsonl files not found under {DATA_DIR}",
)
OUTPUTS = {"train.parquet", "test.parquet", "prep_manifest.json"}

GOOD = [
    {"question": "What is 2+2?", "answer": "2+2=<<2+2=4>>4\n#### 4"},
    {"question": "What is 1000+234?", "answer": "#### 1,234"},
    {"question": "What is 3-10?", "answer": "#### -7"},
]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def make_source(root: Path, train=GOOD, test=GOOD, fmt="jsonl") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train), ("test", test)):
        if fmt == "jsonl":
            write_jsonl(root / f"{split}.jsonl", rows)
        else:
            pd.DataFrame(rows).to_parquet(root / f"{split}.parquet")
    return root


def char_length(messages):
    return len(messages[0]["content"])


def raw_questions(split):
    with open(DATA_DIR / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["question"] for line in f]


def mtimes(out: Path) -> dict:
    return {name: (out / name).stat().st_mtime_ns for name in OUTPUTS}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("gsm8k")
    result = prepare(ENV, str(DATA_DIR), str(out))
    return result, pd.read_parquet(result.train_path), pd.read_parquet(result.test_path)


# --- real data -------------------------------------------------------------------------------


@needs_real_data
def test_real_row_counts_and_files(prepared):
    result, train, test = prepared
    assert (result.n_train, result.n_test) == (7473, 1319)
    assert (len(train), len(test)) == (7473, 1319)
    assert (result.filtered_train, result.filtered_test, result.cached) == (0, 0, False)
    assert set(p.name for p in Path(result.train_path).parent.iterdir()) == OUTPUTS  # no temp files left
    manifest = json.loads((Path(result.train_path).parent / "prep_manifest.json").read_text())
    assert manifest["n_train"] == 7473 and manifest["prep_version"] == ENV.prep_version


@needs_real_data
@pytest.mark.parametrize(
    "split, index, truth",
    [
        ("train", 0, "72"),  # "#### 72"
        ("train", 1, "10"),
        ("train", 345, "1080"),  # "#### 1,080"
        ("train", 5715, "-7"),  # "#### -7"
        ("test", 0, "18"),
        ("test", 146, "2125"),  # "#### 2,125"
        ("test", 489, "-10"),
    ],
)
def test_real_known_ground_truths(prepared, split, index, truth):
    _, train, test = prepared
    row = (train if split == "train" else test).iloc[index]
    assert row["extra_info"]["index"] == index
    assert row["extra_info"]["split"] == split
    assert row["reward_model"] == {"style": "rule", "ground_truth": truth}


@needs_real_data
def test_real_layout_and_prompt(prepared):
    _, train, test = prepared
    assert list(train.columns) == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    assert set(train["data_source"]) == {"openai/gsm8k"} and set(test["ability"]) == {"math"}
    first = train.iloc[0]
    messages = list(first["prompt"])
    assert len(messages) == 1 and messages[0]["role"] == "user"
    assert messages[0]["content"] == first["extra_info"]["question"] + INSTRUCTION
    assert messages[0]["content"].startswith("Natalia sold clips to 48 of her friends")
    assert messages[0]["content"].endswith(' Let\'s think step by step and output the final answer after "####".')
    assert first["extra_info"]["answer"].endswith("#### 72")
    assert all(list(p)[0]["content"].endswith(INSTRUCTION) for p in test["prompt"])


@needs_real_data
def test_real_second_call_is_cached_and_rewrites_nothing(tmp_path):
    out = tmp_path / "out"
    first = prepare(ENV, str(DATA_DIR), str(out))
    before = mtimes(out)
    second = prepare(ENV, str(DATA_DIR), str(out))
    assert second.cached and not first.cached
    assert (second.n_train, second.n_test, second.train_path) == (first.n_train, first.n_test, first.train_path)
    assert mtimes(out) == before
    # A different option is a different cache key.
    third = prepare(ENV, str(DATA_DIR), str(out), max_prompt_length=1024)
    assert not third.cached


@needs_real_data
def test_real_filter_counts_with_fake_length(tmp_path):
    limit = 300
    expected = {
        split: [i for i, q in enumerate(raw_questions(split)) if len(q + INSTRUCTION) > limit]
        for split in ("train", "test")
    }
    assert 0 < len(expected["train"]) < 7473 and 0 < len(expected["test"]) < 1319
    out = tmp_path / "out"
    result = prepare(
        ENV, str(DATA_DIR), str(out), prompt_length=char_length, max_prompt_length=limit, tokenizer_fingerprint="chars"
    )
    assert (result.filtered_train, result.filtered_test) == (len(expected["train"]), len(expected["test"]))
    assert result.n_train == 7473 - len(expected["train"])
    train = pd.read_parquet(result.train_path)
    kept = [info["index"] for info in train["extra_info"]]
    assert set(kept).isdisjoint(expected["train"]) and len(kept) == result.n_train
    assert prepare(
        ENV, str(DATA_DIR), str(out), prompt_length=char_length, max_prompt_length=limit, tokenizer_fingerprint="chars"
    ).cached
    # Without a fingerprint the length function is opaque, so the cache is not trusted.
    assert not prepare(ENV, str(DATA_DIR), str(out), prompt_length=char_length, max_prompt_length=limit).cached


@needs_real_data
def test_real_overlong_error_mode_names_split_count_and_first_index(tmp_path):
    limit = 300
    over = [i for i, q in enumerate(raw_questions("train")) if len(q + INSTRUCTION) > limit]
    out = tmp_path / "out"
    with pytest.raises(ValueError) as info:
        prepare(ENV, str(DATA_DIR), str(out), prompt_length=char_length, max_prompt_length=limit, overlong="error")
    message = str(info.value)
    assert f"{len(over)} prompt(s) of the train split" in message
    assert f"index {over[0]}" in message
    assert "data.max_prompt_length" in message and "data.filter_overlong_prompts=true" in message
    assert not out.exists()


# --- overlong edge cases and hub, on small data ----------------------------------------------


def test_all_prompts_overlong_always_raises(tmp_path):
    source = make_source(tmp_path / "src")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"all 3 prompts of the train split.*max_prompt_length=5"):
        prepare(ENV, str(source), str(out), prompt_length=char_length, max_prompt_length=5)
    assert not out.exists()


def test_error_leaves_earlier_outputs_untouched(tmp_path):
    source = make_source(tmp_path / "src")
    out = tmp_path / "out"
    prepare(ENV, str(source), str(out))
    before = mtimes(out)
    with pytest.raises(ValueError):
        prepare(ENV, str(source), str(out), prompt_length=char_length, max_prompt_length=5, overlong="error")
    assert mtimes(out) == before


def test_parquet_source_directory(tmp_path):
    source = make_source(tmp_path / "src", fmt="parquet")
    result = prepare(ENV, str(source), str(tmp_path / "out"))
    train = pd.read_parquet(result.train_path)
    assert [r["ground_truth"] for r in train["reward_model"]] == ["4", "1234", "-7"]
    assert [info["index"] for info in train["extra_info"]] == [0, 1, 2]


def test_source_change_invalidates_cache(tmp_path):
    source = make_source(tmp_path / "src")
    out = tmp_path / "out"
    assert not prepare(ENV, str(source), str(out)).cached
    write_jsonl(source / "test.jsonl", GOOD[:2])
    result = prepare(ENV, str(source), str(out))
    assert not result.cached and result.n_test == 2


def test_standard_rows_layout():
    rows = standard_rows(ENV, pd.DataFrame(GOOD), "test")
    assert rows.iloc[1]["reward_model"] == {"style": "rule", "ground_truth": "1234"}
    assert rows.iloc[1]["extra_info"] == {
        "split": "test",
        "index": 1,
        "answer": "#### 1,234",
        "question": "What is 1000+234?",
    }
    assert rows.iloc[1]["prompt"] == [{"role": "user", "content": "What is 1000+234?" + INSTRUCTION}]


def test_hub_unreachable_points_to_local_source(tmp_path, monkeypatch):
    def offline(**kwargs):
        raise OSError("no network")

    monkeypatch.setattr(prep, "hf_hub_download", offline)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"Hugging Face hub.*data\.source.*\.\./shared/data/gsm8k"):
        prepare(ENV, "openai/gsm8k", str(out))
    assert not out.exists()


def test_hub_files_are_used_when_reachable(tmp_path, monkeypatch):
    cache = make_source(tmp_path / "hub", fmt="parquet")
    requested = []

    def fake_download(repo_id, repo_type, filename):
        requested.append((repo_id, repo_type, filename))
        return str(cache / ("train.parquet" if filename.startswith("main/train") else "test.parquet"))

    monkeypatch.setattr(prep, "hf_hub_download", fake_download)
    raw = load_raw(ENV, "openai/gsm8k")
    assert list(raw["train"].columns) == ["question", "answer"] and len(raw["test"]) == 3
    assert ("openai/gsm8k", "dataset", "main/train-00000-of-00001.parquet") in requested


# --- bad inputs: ValueError naming the problem, nothing written ------------------------------


def _bad_jsonl_line(root: Path) -> None:
    make_source(root)
    (root / "train.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n{not json\n')


def _missing_answer_jsonl(root: Path) -> None:
    make_source(root, train=[{"question": "q", "solution": "#### 1"}])


def _missing_question_parquet(root: Path) -> None:
    make_source(root, fmt="parquet")
    pd.DataFrame({"prompt": ["q"], "answer": ["#### 1"]}).to_parquet(root / "test.parquet")


def _empty_jsonl(root: Path) -> None:
    make_source(root)
    (root / "train.jsonl").write_text("")


def _empty_parquet(root: Path) -> None:
    make_source(root, fmt="parquet")
    pd.DataFrame({"question": pd.Series([], dtype=str), "answer": pd.Series([], dtype=str)}).to_parquet(
        root / "test.parquet"
    )


def _corrupt_parquet(root: Path) -> None:
    make_source(root, fmt="parquet")
    (root / "train.parquet").write_bytes(b"not a parquet file")


@pytest.mark.parametrize(
    "build, source_name, expected",
    [
        (None, "does-not-exist", [r"does-not-exist", "does not exist", "data.source"]),
        (lambda root: root.mkdir(), "src", ["src", "no train.parquet or train.jsonl", "test.parquet or test.jsonl"]),
        (lambda root: (root.mkdir(), write_jsonl(root / "train.jsonl", GOOD)), "src", ["no test.parquet"]),
        (lambda root: root.write_text("x"), "src", ["src", "not a directory"]),
        (_missing_answer_jsonl, "src", ["train.jsonl", "missing column(s) 'answer'"]),
        (_missing_question_parquet, "src", ["test.parquet", "missing column(s) 'question'"]),
        (_empty_jsonl, "src", ["train.jsonl", "has no rows"]),
        (_empty_parquet, "src", ["test.parquet", "has no rows"]),
        (_corrupt_parquet, "src", ["train.parquet", "not a readable parquet"]),
        (_bad_jsonl_line, "src", ["train.jsonl", "line 2 is not valid JSON"]),
        (
            lambda root: make_source(root, train=GOOD + [{"question": "q", "answer": "it is 5"}]),
            "src",
            ["train.jsonl", "train row 3", "no '#### <number>'"],
        ),
        (
            lambda root: make_source(root, test=[{"question": "q", "answer": "#### five"}]),
            "src",
            ["test.jsonl", "test row 0", "'five', not a number"],
        ),
        (
            lambda root: make_source(root, train=[{"question": "", "answer": "#### 5"}]),
            "src",
            ["train.jsonl", "train row 0", "empty or non-text question"],
        ),
    ],
)
def test_bad_input_raises_and_writes_nothing(tmp_path, build, source_name, expected):
    source = tmp_path / source_name
    if build is not None:
        build(source)
    out = tmp_path / "out"
    with pytest.raises(ValueError) as info:
        prepare(ENV, str(source), str(out))
    for fragment in expected:
        assert fragment in str(info.value)
    assert not out.exists()


def test_rejects_bad_options(tmp_path):
    source = make_source(tmp_path / "src")
    with pytest.raises(ValueError, match="overlong"):
        prepare(ENV, str(source), str(tmp_path / "out"), overlong="truncate")
    with pytest.raises(ValueError, match="max_prompt_length"):
        prepare(ENV, str(source), str(tmp_path / "out"), max_prompt_length=0)
