#!/usr/bin/env bash
# Freeze the code a benchmark measures: HEAD's engines/ configs/ tasks/ flows/ (+ the toy reward)
# into benchmarks/_snapshot/, plus any working-tree files named as arguments (e.g. a change under
# test). Benchmarks use it when BENCH_SRC=benchmarks/_snapshot is set; the device calls carry it
# (git-ignored).
#   tools/device/snapshot.sh [path ...]
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
out=benchmarks/_snapshot
rm -rf "$out" && mkdir -p "$out"
git archive HEAD engines configs tasks flows tests/__init__.py tests/toy_reward.py | tar -x -C "$out"
for f in "$@"; do mkdir -p "$out/$(dirname "$f")" && cp "$f" "$out/$f"; done
echo "HEAD $(git rev-parse HEAD)${*:+ + working tree: $*}" > "$out/SNAPSHOT"
cat "$out/SNAPSHOT"; du -sh "$out"
