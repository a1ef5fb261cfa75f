"""The benchmark record stays whole when results are pruned or scripts move: every result file or
folder that benchmarks/BENCHMARKS.md cites exists, and so does every benchmark or device script
that BENCHMARKS.md, the README or tools/device/README.md names by path; the README's recipe table
says what `grpo plan` says."""

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


def test_the_readme_recipe_table_gives_the_planner_s_verdicts():
    """A review found the table saying the 0.5b/1.5b/3b LoRA recipes "run on one GPU" while `grpo
    plan` said they do not fit one H100: each row's H100 / H200 verdict is the planner's, and each
    micro-batch the row says fits does."""
    from configs.load import load_config, recipe_names
    from planner import plan

    rows = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `")]
    checked = set()
    for row in rows:
        names_cell, *_, verdicts, _status = row.strip("|").split("|")
        names = [n for g in re.findall(r"`([^`]+)`", names_cell) for n in _expand(g)]
        for gpu, verdict, rest in re.findall(r"(H100|H200): (FITS|DOES NOT FIT)([^/]*)", verdicts):
            for name in names:
                cfg = load_config(name)
                assert plan(cfg, gpu)["verdict"] == verdict, f"README: {name} on {gpu}: {verdict}"
                for micro in re.findall(r"(\d+) fits", rest):
                    smaller = load_config(name, [f"actor.ppo_micro_batch_size_per_gpu={micro}"])
                    assert plan(smaller, gpu)["verdict"] == "FITS", f"README: {name} at {micro} on {gpu}"
                checked.add(name)
    gpu_recipes = {n for n in recipe_names() if load_config(n).trainer.device == "cuda"}
    assert checked == gpu_recipes, f"README's table gives no verdict for {sorted(gpu_recipes - checked)}"


def _expand(name: str) -> list[str]:
    """`qwen2-70b-32xh{20,800}` -> both names."""
    m = re.fullmatch(r"(.*)\{([^}]*)\}(.*)", name)
    return [m[1] + part + m[3] for part in m[2].split(",")] if m else [name]
