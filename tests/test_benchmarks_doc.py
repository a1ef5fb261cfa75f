"""The benchmark record stays whole when results are pruned or scripts move: every result file or
folder that benchmarks/BENCHMARKS.md cites exists, and so does every benchmark or device script
that BENCHMARKS.md, the README or tools/device/README.md names by path."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = ROOT / "benchmarks" / "BENCHMARKS.md"
# `results/...` is relative to benchmarks/ (as BENCHMARKS.md writes it), `benchmarks/results/...` to the root.
RESULT = re.compile(r"(?<![\w/.-])(?:benchmarks/)?results/[\w./-]+")
SCRIPT = re.compile(r"(?<![\w/.-])(?:benchmarks|tools/device)/[\w./-]+\.(?:py|sh|txt|md)\b")


def cited(pattern: re.Pattern, *docs: Path) -> set[str]:
    return {m.rstrip(".") for doc in docs for m in pattern.findall(doc.read_text())}


def test_every_result_benchmarks_md_cites_exists():
    paths = cited(RESULT, BENCHMARKS_MD)
    assert len(paths) >= 10, f"BENCHMARKS.md cites only {sorted(paths)}: did the pattern stop matching?"
    missing = [p for p in sorted(paths) if not (ROOT / "benchmarks" / p.removeprefix("benchmarks/")).exists()]
    assert not missing, f"BENCHMARKS.md cites results that are not in the tree: {missing}"


def test_every_script_the_docs_name_exists():
    docs = (BENCHMARKS_MD, ROOT / "README.md", ROOT / "tools" / "device" / "README.md")
    paths = cited(SCRIPT, *docs)
    assert {"tools/device/device_stage.sh", "tools/device/gpu_suite.sh"} <= paths, sorted(paths)
    missing = [p for p in sorted(paths) if not (ROOT / p).is_file()]
    assert not missing, f"the docs name scripts that are not in the tree: {missing}"
