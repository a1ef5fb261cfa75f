#!/usr/bin/env bash
# A seed recipe at its real shape on a lent GPU machine (after the staging calls): random weights of
# the recipe's model shape, the recipe's own micro-batch, lengths, TP/SP, offload and sleep settings,
# with host RSS of every worker, node MemAvailable and nvidia-smi sampled every 2 s. The flow runs in
# its own session (setsid) so that it outlives one device call; `wait` picks it up in the next call.
#
#   tools/device/gpu_recipe.sh start RUN RECIPE ARCH [key=value ...]   build the model, start the flow
#   tools/device/gpu_recipe.sh wait RUN SECONDS                          wait for it, copy logs to $OUT
#
# RUN names the run (logs /root/runs/RUN, checkpoints /root/ckpt-RUN, MLflow run name RUN); a second
# `start` of the same RUN with more trainer.total_training_steps resumes from its checkpoint.
set -euo pipefail
cmd=$1 run=$2; shift 2
source tools/device/device_env.sh >/dev/null
logs=/root/runs/$run; out=${OUT:-/root/out}; mkdir -p "$logs" "$out"

sample() {  # every 2 s: time, per-GPU used MiB, node MemAvailable GiB, RSS GiB of each worker
  while true; do
    local t; t=$(date +%s)
    echo "$t $(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | tr '\n' ' ')" >> "$logs/smi.log"
    echo "$t $(awk '/MemAvailable/{printf "%.1f", $2/2^20}' /proc/meminfo)" >> "$logs/memavail.log"
    for p in $(pgrep -f "ray::GRPOWorker" || true); do
      echo "$t $p $(awk '/VmRSS/{printf "%.2f", $2/2^20}' /proc/$p/status 2>/dev/null)"
    done >> "$logs/rss.log"
    sleep 2
  done
}

case $cmd in
  start)
    recipe=$1 arch=$2; shift 2
    t0=$SECONDS
    python3 benchmarks/build_models.py "$arch" --models-dir /root/models --gsm8k "$PWD/.device/gsm8k" \
      | grep "^\[model\]" | tee -a "$logs/build.log"
    echo "model ready in $((SECONDS - t0)) s"
    setsid bash -c "$(declare -f sample); logs=$logs; sample" >/dev/null 2>&1 < /dev/null &
    echo $! > "$logs/sampler.pid"
    setsid python3 -m flows.cli run "$recipe" model.source=random model.arch="$arch" \
      model.path="/root/models/random-qwen2-$arch" data.source="$PWD/.device/gsm8k" data.dir="/root/data-$arch" \
      tracking.tracking_uri=sqlite:////root/mlflow.db tracking.run_name="$run" \
      trainer.default_local_dir="/root/ckpt-$run" "$@" >> "$logs/flow.log" 2>&1 < /dev/null &
    echo $! > "$logs/flow.pid"
    echo "flow started (pid $(cat "$logs/flow.pid")); logs in $logs"
    ;;
  wait)
    limit=$1; t0=$SECONDS; pid=$(cat "$logs/flow.pid")
    while kill -0 "$pid" 2>/dev/null && [ $((SECONDS - t0)) -lt "$limit" ]; do sleep 5; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "flow still running after ${limit} s"
    else
      echo "flow finished"; kill "$(cat "$logs/sampler.pid")" 2>/dev/null || true
      python3 tools/device/mlflow_summary.py sqlite:////root/mlflow.db "$run" > "$logs/metrics.txt" 2>&1 || true
    fi
    grep -E "worker group|step [0-9]+/|resumed|error|Error|OOM|Killed" "$logs/flow.log" | grep -v "Loading weights" | tail -40
    python3 - "$logs" <<'P'
import collections, sys
d = sys.argv[1]
rss = collections.defaultdict(float)
for line in open(f"{d}/rss.log") if __import__("os").path.exists(f"{d}/rss.log") else []:
    p = line.split()
    if len(p) == 3 and p[2]:
        rss[p[1]] = max(rss[p[1]], float(p[2]))
smi = [list(map(int, l.split()[1:])) for l in open(f"{d}/smi.log")] if __import__("os").path.exists(f"{d}/smi.log") else []
peaks = [max(col) for col in zip(*smi)] if smi else []
avail = [float(l.split()[1]) for l in open(f"{d}/memavail.log")] if __import__("os").path.exists(f"{d}/memavail.log") else []
print("peak RSS GiB per worker pid:", {k: round(v, 1) for k, v in rss.items()})
print("nvidia-smi peak MiB per GPU:", peaks, "| node MemAvailable min GiB:", min(avail) if avail else None)
P
    tar -C /root/runs -czf "$out/$run.tgz" "$run"
    [ -f "$logs/metrics.txt" ] && cat "$logs/metrics.txt"
    ;;
  *) echo "usage: $0 start|wait RUN ..." >&2; exit 2 ;;
esac
