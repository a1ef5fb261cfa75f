"""GSM8K preparation into the standard RL parquet layout: one row per problem with the columns
data_source ("openai/gsm8k"), prompt (one user chat message: the question + INSTRUCTION), ability
("math"), reward_model ({"style": "rule", "ground_truth": the number after "#### ", commas
removed}) and extra_info ({"split", "index", "answer", "question"}), the reference framework's
GSM8K layout (its examples/data_preprocess/gsm8k.py) that users expect.

Plain functions so that flows, scripts and tests can call them alike. Input
problems surface as ``ValueError`` naming the file and the fix before anything
is written, because a bad row found mid-run costs far more than one found here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import pandas as pd
from huggingface_hub import hf_hub_download

from runtime.atomic import atomic_text, atomic_write

logger = logging.getLogger(__name__)

# Bump whenever the output layout or row contents change, so old caches are not reused.
PREP_VERSION = "1"
DATA_SOURCE = "openai/gsm8k"
SPLITS = ("train", "test")
INSTRUCTION = ' Let\'s think step by step and output the final answer after "####".'
MANIFEST_NAME = "prep_manifest.json"
_REQUIRED_COLUMNS = ("question", "answer")
_GROUND_TRUTH_RE = re.compile(r"-?[0-9]+(\.[0-9]+)?")
_LOCAL_HINT = (
    "set data.source to a directory holding GSM8K train.jsonl/test.jsonl (or train.parquet/test.parquet), "
    "such as ../shared/data/gsm8k"
)
_SOURCE_HINT = f"{_LOCAL_HINT}, or to '{DATA_SOURCE}'"


@dataclass(frozen=True)
class PrepResult:
    train_path: str
    test_path: str
    n_train: int
    n_test: int
    filtered_train: int
    filtered_test: int
    cached: bool


def _ground_truth(answer: object) -> str:
    """The number after the last ``####`` with commas removed; raises if there is none."""
    if not isinstance(answer, str) or "####" not in answer:
        raise ValueError("answer has no '#### <number>' line")
    truth = answer.rsplit("####", 1)[1].strip().replace(",", "")
    if not _GROUND_TRUTH_RE.fullmatch(truth):
        raise ValueError(f"the text after '####' is {truth!r}, not a number")
    return truth


def _ground_truths(df: pd.DataFrame, split: str, where: str) -> list[str]:
    truths = []
    for i, answer in enumerate(df["answer"]):
        try:
            truths.append(_ground_truth(answer))
        except ValueError as err:
            raise ValueError(f"{where}: {split} row {i} (0-based): {err}; fix or remove that row") from None
    return truths


def _download_split(split: str) -> Path:
    try:
        return Path(
            hf_hub_download(repo_id=DATA_SOURCE, repo_type="dataset", filename=f"main/{split}-00000-of-00001.parquet")
        )
    except Exception as err:
        raise ValueError(
            f"could not download the {split} split of {DATA_SOURCE!r} from the Hugging Face hub "
            f"(is the hub reachable from this machine?): {str(err).rstrip('.')}. Instead, {_LOCAL_HINT}"
        ) from err


def _resolve_split_files(source: str) -> dict[str, Path]:
    """Map each split to its raw file; a directory may hold parquet or jsonl (parquet wins if both)."""
    if source == DATA_SOURCE:
        return {split: _download_split(split) for split in SPLITS}
    root = Path(source).expanduser()
    if not root.exists():
        raise ValueError(f"data.source path {str(root)!r} does not exist; {_SOURCE_HINT}")
    if not root.is_dir():
        raise ValueError(f"data.source path {str(root)!r} is a file, not a directory; {_SOURCE_HINT}")
    files, missing = {}, []
    for split in SPLITS:
        found = [p for p in (root / f"{split}.parquet", root / f"{split}.jsonl") if p.is_file()]
        if found:
            files[split] = found[0]
        else:
            missing.append(f"{split}.parquet or {split}.jsonl")
    if missing:
        raise ValueError(f"data.source directory {str(root)!r} has no {' and no '.join(missing)}; {_SOURCE_HINT}")
    return files


def _read_jsonl(path: Path) -> pd.DataFrame:
    records = []
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}: line {lineno} is not valid JSON ({err})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{path}: line {lineno} is not a JSON object")
                records.append(record)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from None
    return pd.DataFrame.from_records(records)


def _read_split(path: Path, split: str) -> pd.DataFrame:
    """Read and validate one split; returns just question/answer, rows in file order."""
    if path.suffix == ".parquet":
        try:
            df = pd.read_parquet(path)
        except Exception as err:
            raise ValueError(f"{path}: not a readable parquet file ({err}); {_SOURCE_HINT}") from err
    else:
        df = _read_jsonl(path)
    if len(df) == 0:
        raise ValueError(f"{path}: the {split} split has no rows; {_SOURCE_HINT}")
    missing = [c for c in _REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {', '.join(repr(c) for c in missing)} (found {list(df.columns)}); "
            "GSM8K files need 'question' and 'answer'"
        )
    df = df[list(_REQUIRED_COLUMNS)].reset_index(drop=True)
    for i, question in enumerate(df["question"]):
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{path}: {split} row {i} (0-based) has an empty or non-text question")
    _ground_truths(df, split, str(path))
    return df


def load_raw_gsm8k(source: str) -> dict[str, pd.DataFrame]:
    """Validated raw splits (columns question, answer) from the hub id or a local directory."""
    return {split: _read_split(path, split) for split, path in _resolve_split_files(source).items()}


def to_standard_rows(df: pd.DataFrame, split: str) -> pd.DataFrame:
    """Rows in the standard layout; extra_info.index is the row's position in the raw split."""
    truths = _ground_truths(df, split, "to_standard_rows")
    records = [
        {
            "data_source": DATA_SOURCE,
            "prompt": [{"role": "user", "content": question + INSTRUCTION}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": truth},
            "extra_info": {"split": split, "index": i, "answer": answer, "question": question},
        }
        for i, (question, answer, truth) in enumerate(zip(df["question"], df["answer"], truths))
    ]
    return pd.DataFrame(records, columns=["data_source", "prompt", "ability", "reward_model", "extra_info"])


def _drop_overlong(
    rows: pd.DataFrame,
    split: str,
    prompt_length: Callable[[list[dict]], int],
    max_prompt_length: int,
    overlong: str,
) -> tuple[pd.DataFrame, int]:
    lengths = [prompt_length(list(messages)) for messages in rows["prompt"]]
    over = [i for i, n in enumerate(lengths) if n > max_prompt_length]
    if not over:
        return rows, 0
    if len(over) == len(rows):
        raise ValueError(
            f"all {len(rows)} prompts of the {split} split are longer than data.max_prompt_length="
            f"{max_prompt_length} tokens (shortest: {min(lengths)}); raise data.max_prompt_length"
        )
    if overlong == "error":
        first = over[0]
        raise ValueError(
            f"{len(over)} prompt(s) of the {split} split are longer than data.max_prompt_length="
            f"{max_prompt_length} tokens (first: index {first}, {lengths[first]} tokens); "
            "raise data.max_prompt_length or set data.filter_overlong_prompts=true"
        )
    logger.warning("dropping %d of %d %s prompts longer than %d tokens", len(over), len(rows), split, max_prompt_length)
    keep = [n <= max_prompt_length for n in lengths]
    return rows[keep].reset_index(drop=True), len(over)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _cached_result(out: Path, cache_key: str | None) -> PrepResult | None:
    if cache_key is None:
        return None
    try:
        manifest = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    paths = {split: out / f"{split}.parquet" for split in SPLITS}
    if not isinstance(manifest, dict) or manifest.get("cache_key") != cache_key:
        return None
    if not all(p.is_file() for p in paths.values()):
        return None
    return PrepResult(
        train_path=str(paths["train"]),
        test_path=str(paths["test"]),
        n_train=manifest["n_train"],
        n_test=manifest["n_test"],
        filtered_train=manifest["filtered_train"],
        filtered_test=manifest["filtered_test"],
        cached=True,
    )


def prepare_gsm8k(
    source: str,
    out_dir: str,
    prompt_length: Callable[[list[dict]], int] | None = None,
    max_prompt_length: int = 512,
    overlong: Literal["filter", "error"] = "filter",
    tokenizer_fingerprint: str | None = None,
) -> PrepResult:
    """Write out_dir/{train,test}.parquet and prep_manifest.json, reusing them when the inputs match.

    ``prompt_length`` measures a chat prompt in tokens (None: no length filter).
    The cache cannot see inside that function, so the caller names its
    behaviour with ``tokenizer_fingerprint`` (e.g. tokenizer name + revision +
    chat template hash); a length function without a fingerprint disables the
    cache rather than risk reusing a filter computed with another tokenizer.
    """
    if overlong not in ("filter", "error"):
        raise ValueError(f"overlong must be 'filter' or 'error', got {overlong!r}")
    if max_prompt_length < 1:
        raise ValueError(f"data.max_prompt_length must be a positive number of tokens, got {max_prompt_length}")
    out = Path(out_dir)
    files = _resolve_split_files(source)
    input_digests = {split: _sha256_file(path) for split, path in files.items()}
    if prompt_length is None:
        length_fingerprint: str | None = "no-length-filter"
    else:
        length_fingerprint = tokenizer_fingerprint
    cache_key = None
    if length_fingerprint is not None:
        key_material = {
            "prep_version": PREP_VERSION,
            "inputs": input_digests,
            "max_prompt_length": max_prompt_length,
            "overlong": overlong,
            "prompt_length": length_fingerprint,
        }
        cache_key = hashlib.sha256(json.dumps(key_material, sort_keys=True).encode()).hexdigest()
    else:
        logger.info("prompt_length given without tokenizer_fingerprint: GSM8K prep cache disabled")

    cached = _cached_result(out, cache_key)
    if cached is not None:
        logger.info("GSM8K prep inputs unchanged; reusing %s", out)
        return cached

    tables, filtered = {}, {}
    for split, path in files.items():
        rows = to_standard_rows(_read_split(path, split), split)
        if prompt_length is not None:
            rows, filtered[split] = _drop_overlong(rows, split, prompt_length, max_prompt_length, overlong)
        else:
            filtered[split] = 0
        tables[split] = rows

    out.mkdir(parents=True, exist_ok=True)
    # A stale manifest must never vouch for outputs that are half replaced by this run.
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    paths = {split: out / f"{split}.parquet" for split in SPLITS}
    for split in SPLITS:
        atomic_write(paths[split], lambda tmp, df=tables[split]: df.to_parquet(tmp, index=False))
    manifest = {
        "cache_key": cache_key,
        "prep_version": PREP_VERSION,
        "source": source,
        "inputs": {split: {"file": str(files[split]), "sha256": input_digests[split]} for split in SPLITS},
        "max_prompt_length": max_prompt_length,
        "overlong": overlong,
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "n_train": len(tables["train"]),
        "n_test": len(tables["test"]),
        "filtered_train": filtered["train"],
        "filtered_test": filtered["test"],
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_text(out / MANIFEST_NAME, json.dumps(manifest, indent=2))
    logger.info(
        "GSM8K prepared in %s: %d train (%d dropped), %d test (%d dropped)",
        out,
        manifest["n_train"],
        filtered["train"],
        manifest["n_test"],
        filtered["test"],
    )
    return PrepResult(
        train_path=str(paths["train"]),
        test_path=str(paths["test"]),
        n_train=manifest["n_train"],
        n_test=manifest["n_test"],
        filtered_train=filtered["train"],
        filtered_test=filtered["test"],
        cached=False,
    )
