"""Any env's raw splits -> the standard RL parquet (envs/base.py: ROW_COLUMNS), cached by content.

Plain functions so that the prep task, scripts and tests call them alike. Where the files come from
(the env's hub repository, or a local directory with train/test .jsonl or .parquet), reading and
the column check, the prompt-length filter, the cache and the manifest are here; what a row means
is the env's (`Env.check_rows`, `Env.to_rows`). Input problems surface as ``ValueError`` naming the
file and the fix before anything is written, because a bad row found mid-run costs far more than
one found here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import pandas as pd
from huggingface_hub import hf_hub_download

from envs.base import ROW_COLUMNS, Env
from runtime.atomic import atomic_text, atomic_write

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")
MANIFEST_NAME = "prep_manifest.json"


@dataclass(frozen=True)
class PrepResult:
    train_path: str
    test_path: str
    n_train: int
    n_test: int
    filtered_train: int
    filtered_test: int
    cached: bool


def _local_hint(env: Env) -> str:
    example = f", such as {env.local_example}" if env.local_example else ""
    return (
        f"set data.source to a directory holding {env.name} train.jsonl/test.jsonl "
        f"(or train.parquet/test.parquet){example}"
    )


def _source_hint(env: Env) -> str:
    return f"{_local_hint(env)}, or to '{env.hub_repo}'" if env.hub_repo else _local_hint(env)


def _download_split(env: Env, split: str) -> Path:
    try:
        return Path(hf_hub_download(repo_id=env.hub_repo, repo_type="dataset", filename=env.hub_files[split]))
    except Exception as err:
        raise ValueError(
            f"could not download the {split} split of {env.hub_repo!r} from the Hugging Face hub "
            f"(is the hub reachable from this machine?): {str(err).rstrip('.')}. Instead, {_local_hint(env)}"
        ) from err


def _resolve_split_files(env: Env, source: str) -> dict[str, Path]:
    """Map each split to its raw file; a directory may hold parquet or jsonl (parquet wins if both)."""
    if env.hub_repo and source == env.hub_repo:
        return {split: _download_split(env, split) for split in SPLITS}
    root = Path(source).expanduser()
    if not root.exists():
        raise ValueError(f"data.source path {str(root)!r} does not exist; {_source_hint(env)}")
    if not root.is_dir():
        raise ValueError(f"data.source path {str(root)!r} is a file, not a directory; {_source_hint(env)}")
    files, missing = {}, []
    for split in SPLITS:
        found = [p for p in (root / f"{split}.parquet", root / f"{split}.jsonl") if p.is_file()]
        if found:
            files[split] = found[0]
        else:
            missing.append(f"{split}.parquet or {split}.jsonl")
    if missing:
        raise ValueError(f"data.source directory {str(root)!r} has no {' and no '.join(missing)}; {_source_hint(env)}")
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


def _read_split(env: Env, path: Path, split: str) -> pd.DataFrame:
    """Read and check one split; returns just the env's raw_columns, rows in file order."""
    if path.suffix == ".parquet":
        try:
            df = pd.read_parquet(path)
        except Exception as err:
            raise ValueError(f"{path}: not a readable parquet file ({err}); {_source_hint(env)}") from err
    else:
        df = _read_jsonl(path)
    if len(df) == 0:
        raise ValueError(f"{path}: the {split} split has no rows; {_source_hint(env)}")
    missing = [c for c in env.raw_columns if c not in df.columns]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {', '.join(repr(c) for c in missing)} (found {list(df.columns)}); "
            f"{env.name} files need {' and '.join(repr(c) for c in env.raw_columns)}"
        )
    df = df[list(env.raw_columns)].reset_index(drop=True)
    env.check_rows(df, split, str(path))
    return df


def load_raw(env: Env, source: str) -> dict[str, pd.DataFrame]:
    """Checked raw splits {"train", "test"} (columns env.raw_columns) of `source`: env.hub_repo or
    a local directory. Raises ValueError naming the file and the fix."""
    return {split: _read_split(env, path, split) for split, path in _resolve_split_files(env, source).items()}


def standard_rows(env: Env, raw: pd.DataFrame, split: str) -> pd.DataFrame:
    """env.to_rows, held to the layout every stage reads: columns ROW_COLUMNS in that order, one
    row per raw row, data_source the env's. Raises ValueError naming the env otherwise."""
    rows = env.to_rows(raw, split)
    if tuple(rows.columns) != ROW_COLUMNS or len(rows) != len(raw):
        raise ValueError(
            f"{type(env).__name__}.to_rows gave {len(rows)} rows with columns {list(rows.columns)} for "
            f"{len(raw)} raw rows; it must give one row per raw row with columns {list(ROW_COLUMNS)}"
        )
    if len(rows) and set(rows["data_source"]) != {env.data_source}:
        raise ValueError(f"{type(env).__name__}.to_rows must set data_source to {env.data_source!r}")
    return rows


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


def prepare(
    env: Env,
    source: str,
    out_dir: str,
    prompt_length: Callable[[list[dict]], int] | None = None,
    max_prompt_length: int = 512,
    overlong: Literal["filter", "error"] = "filter",
    tokenizer_fingerprint: str | None = None,
) -> PrepResult:
    """Write out_dir/{train,test}.parquet (env's rows) and prep_manifest.json, reusing them when
    the inputs match. Raises ValueError naming the input and the fix, before anything is written.

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
    files = _resolve_split_files(env, source)
    input_digests = {split: _sha256_file(path) for split, path in files.items()}
    if prompt_length is None:
        length_fingerprint: str | None = "no-length-filter"
    else:
        length_fingerprint = tokenizer_fingerprint
    cache_key = None
    if length_fingerprint is not None:
        key_material = {
            "data_source": env.data_source,
            "prep_version": env.prep_version,
            "inputs": input_digests,
            "max_prompt_length": max_prompt_length,
            "overlong": overlong,
            "prompt_length": length_fingerprint,
        }
        cache_key = hashlib.sha256(json.dumps(key_material, sort_keys=True).encode()).hexdigest()
    else:
        logger.info("prompt_length given without tokenizer_fingerprint: prep cache disabled")

    cached = _cached_result(out, cache_key)
    if cached is not None:
        logger.info("%s prep inputs unchanged; reusing %s", env.name, out)
        return cached

    tables, filtered = {}, {}
    for split, path in files.items():
        rows = standard_rows(env, _read_split(env, path, split), split)
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
        "data_source": env.data_source,
        "prep_version": env.prep_version,
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
        "%s prepared in %s: %d train (%d dropped), %d test (%d dropped)",
        env.name,
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
