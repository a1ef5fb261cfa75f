#!/usr/bin/env bash
# The GPU rows of benchmarks/BENCHMARKS.md on one H100/H200, in three parts that each fit one
# lent-machine call (< 10 min). From the repo root, with the pipeline's packages importable
# (on the lent machine: after the staging calls, `source tools/device/device_env.sh`):
#     python benchmarks/build_models.py 0.5b 1.5b 7b   # once (needs no vLLM: the lent machine's 3rd staging call)
#     tools/device/gpu_suite.sh p1   # engines: rollout vs bare vLLM (0.5B), weight sync + trainer MFU (0.5B/1.5B/7B LoRA)
#     tools/device/gpu_suite.sh p2   # the flow: step breakdown + Prefect/MLflow overhead, 0.5B and 1.5B LoRA recipes
#     tools/device/gpu_suite.sh p3   # resume determinism (0.5B full), 7B rows not done yet, anything p1 left
# After the rollout / sleep-level / fused-AdamW changes (one H200, so that 7B full fine-tuning fits):
#     tools/device/gpu_suite.sh p5   # rollout variants vs bare vLLM (0.5B full)
#     tools/device/gpu_suite.sh p6   # 7B full: sync at both sleep levels + trainer; 0.5B sync levels
#     tools/device/gpu_suite.sh p7   # CUDA parity tests; trainer rows; trainer memory vs plan
#     tools/device/gpu_suite.sh p10  # CUDA offload + parity tests; update speed vs micro-batch size
#     tools/device/gpu_suite.sh p12  # offload + DCP under FSDP2 on one GPU; memory at the big LoRA widths
# Each item runs under `timeout`, within DEADLINE (epoch seconds; default now + 570 s); items
# that do not fit are skipped and named. Results (JSON + logs) go to $BENCH_OUT/<part>
# (default /root/bench) and, packed, to $OUT/<part>.tgz when $OUT is set.
# Env: BENCH_SRC (code snapshot, default benchmarks/_snapshot if present), BENCH_MODELS_DIR
# (default /root/models), GSM8K_DIR (default .device/gsm8k).
set -uo pipefail
part=${1:?usage: tools/device/gpu_suite.sh p1|p2|p3}
cd "$(dirname "$0")/../.."
: "${DEADLINE:=$(( $(date +%s) + 570 ))}"
B=${BENCH_OUT:-/root/bench}; R=$B/$part; mkdir -p "$R"
if [ -z "${BENCH_SRC+x}" ] && [ -d benchmarks/_snapshot ]; then export BENCH_SRC=$PWD/benchmarks/_snapshot; fi
export BENCH_MODELS_DIR=${BENCH_MODELS_DIR:-/root/models} GSM8K_DIR=${GSM8K_DIR:-$PWD/.device/gsm8k}
export PYTHONUNBUFFERED=1 VLLM_LOGGING_LEVEL=${VLLM_LOGGING_LEVEL:-INFO}
M=$BENCH_MODELS_DIR
t0=$(date +%s)
left() { echo $(( DEADLINE - $(date +%s) )); }

cleanup_gpu() {  # a killed flow can leave Ray workers holding GPU memory: end them (all ours)
  ray stop --force >/dev/null 2>&1 || true
  for pid in $(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
  sleep 1
}

# run NAME MAX_S MIN_S CMD...: skipped when fewer than MIN_S seconds are left
run() {
  local name=$1 max=$2 min=$3; shift 3
  local l; l=$(left)
  if (( l < min )); then echo "SKIP $name: $l s left < $min s"; echo "$name" >> "$R/skipped.txt"; return 0; fi
  local t=$(( max < l - 20 ? max : l - 20 ))
  echo "=== $name: timeout $t s, at +$(( $(date +%s) - t0 )) s"
  timeout -k 10 "$t" "$@" > "$R/$name.log" 2>&1
  local rc=$?
  echo "=== $name: rc=$rc, at +$(( $(date +%s) - t0 )) s"
  grep -E "^\[(rollout|sync|train|done|breakdown|determinism|model)\]|Error|error:|OOM" "$R/$name.log" | grep -v "INFO" | tail -12
  echo "$name rc=$rc" >> "$R/status.txt"
  cleanup_gpu
}

eb() {  # eb ARCH MODE PARTS MAX MIN [extra args]
  local arch=$1 mode=$2 parts=$3 max=$4 min=$5; shift 5
  run "eb-$arch-$mode" "$max" "$min" python3 benchmarks/engine_bench.py --arch "$arch" --mode "$mode" --parts "$parts" \
    --models-dir "$M" --gsm8k "$GSM8K_DIR" --out "$R/engine-$arch-$mode.json" "$@"
}

done_eb() {  # done_eb ARCH MODE PART: a result with that part exists in any part's folder
  python3 - "$B" "$1" "$2" "$3" <<'EOF'
import glob, json, sys
b, arch, mode, part = sys.argv[1:]
for f in glob.glob(f"{b}/p*/engine-{arch}-{mode}.json"):
    try:
        d = json.load(open(f))
    except ValueError:
        continue
    if part in d and not [e for e in d.get("errors", []) if e.get("part") == part]:
        sys.exit(0)
sys.exit(1)
EOF
}

flow_common() {  # flow_common ARCH
  echo model.source=random model.arch="$1" model.path="$M/random-qwen2-$1" data.source="$GSM8K_DIR" \
    data.dir="/root/data/$1" tracking.tracking_uri="sqlite:///$B/mlflow.db" trainer.test_freq=-1
}

echo "part $part: $(left) s to the deadline; BENCH_SRC=${BENCH_SRC:-<repo>} $(cat "${BENCH_SRC:-.}/SNAPSHOT" 2>/dev/null)"
nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv,noheader
df -h /root | tail -1
case $part in
p1)
  eb 0.5b full rollout,sync,train 270 150
  eb 0.5b lora sync,train 150 70
  eb 1.5b full sync,train 170 90
  eb 1.5b lora sync,train 170 90
  eb 7b lora sync,train 240 210 --train-reps 1
  ;;
p2)
  # The LoRA recipes as written except: random weights, responses capped at 512 tokens (random
  # weights never stop early), micro-batch 20/16 (the recipes' 116/128 would need 36-72 GB of
  # logits alone in this trainer), 2 steps, no periodic eval.
  run flow-0.5b-lora 290 150 python3 benchmarks/flow_breakdown.py --out "$R/flow-0.5b-lora.json" qwen2-0.5b-lora-1xh100 \
    $(flow_common 0.5b) rollout.max_response_length=512 actor.ppo_micro_batch_size_per_gpu=20 \
    trainer.total_training_steps=2 trainer.default_local_dir=/root/ckpt/flow-0.5b-lora tracking.run_name=flow-0.5b-lora
  rm -rf /root/ckpt/flow-0.5b-lora
  run flow-1.5b-lora 420 200 python3 benchmarks/flow_breakdown.py --out "$R/flow-1.5b-lora.json" qwen2-1.5b-lora-1xh100 \
    $(flow_common 1.5b) rollout.max_response_length=512 actor.ppo_micro_batch_size_per_gpu=16 \
    trainer.total_training_steps=2 trainer.default_local_dir=/root/ckpt/flow-1.5b-lora tracking.run_name=flow-1.5b-lora
  rm -rf /root/ckpt/flow-1.5b-lora
  ;;
p3)
  free_gb=$(df -BG --output=avail /root | tail -1 | tr -dc 0-9)
  keep=2; (( free_gb < 45 )) && keep=1
  run determinism 330 200 python3 benchmarks/archive/determinism.py --workdir "$R/det" --out "$R/determinism.json" \
    --keep $keep --clean --timeout 150 qwen2-0.5b-lora-1xh100 $(flow_common 0.5b) model.lora_rank=0 actor.lr=1e-5 \
    data.train_batch_size=16 actor.ppo_mini_batch_size=16 actor.ppo_micro_batch_size_per_gpu=16 \
    rollout.max_response_length=256 rollout.gpu_memory_utilization=0.3 rollout.enforce_eager=true \
    reward.function=tests.toy_reward:letter_e_share
  rm -rf "$R/det/A" "$R/det/B"
  done_eb 7b lora train || eb 7b lora sync,train 240 200 --train-reps 1
  done_eb 7b full sync || eb 7b full sync,train 200 150 --train-reps 1
  for spec in 0.5b:lora 1.5b:full 1.5b:lora; do
    done_eb "${spec%:*}" "${spec#*:}" train || eb "${spec%:*}" "${spec#*:}" sync,train 170 90
  done
  ;;
p5)
  python3 benchmarks/build_models.py 0.5b 1.5b 7b --models-dir "$M" --gsm8k "$GSM8K_DIR" 2>&1 | grep "^\[model\]"
  eb 0.5b full rollout,sync 330 200 --rounds 3 --attrib-rounds 3
  ;;
p6)
  eb 7b full sync,train 330 240 --train-reps 1 --micro 8 --gpu-mem-util 0.15
  eb 0.5b full sync 100 60
  ;;
p7)
  # the snapshot's tests when there is one (tools/device/snapshot.sh tests/conftest.py tests/test_parity.py);
  # one process per test: vLLM's sleep-mode allocator allows one engine per process
  run parity 200 120 bash -c "cd ${BENCH_SRC:-.} && for t in 'full' 'lora' 'per_prompt'; do
    GRPO_TEST_DEVICE=cuda python3 -m pytest -q -s -p no:cacheprovider tests/test_parity.py -k \$t || exit 1; done"
  eb 1.5b full train 150 100
  eb 7b lora train 170 140 --train-reps 1
  run trainer-memory 100 80 env OUT="$R" python3 benchmarks/trainer_memory.py 0 1 4
  eb 0.5b full train 90 70
  eb 0.5b lora train 90 70
  eb 1.5b lora train 110 80
  ;;
p10)
  # offload (CUDA only) and the parity tests it relies on, one process each
  run cuda-tests 260 150 bash -c "cd ${BENCH_SRC:-.} && for t in 'test_offload.py' 'test_parity.py -k full' 'test_parity.py -k lora'; do
    GRPO_TEST_DEVICE=cuda python3 -m pytest -q -s -p no:cacheprovider tests/\$t || exit 1; done"
  # update speed against micro-batch size at the 0.5B LoRA recipe's batch (116 x 5 samples)
  for mb in 20 116; do
    run "micro-$mb" 130 90 python3 benchmarks/engine_bench.py --arch 0.5b --mode lora --parts train --models-dir "$M" \
      --gsm8k "$GSM8K_DIR" --samples 580 --micro $mb --train-reps 1 --out "$R/engine-0.5b-lora-micro$mb.json"
  done
  ;;
p12)
  # one GPU, issue 3: offload and DCP checkpoints unsharded and under FSDP2 (one-rank process group),
  # parity after the Module.to offload; trainer memory at the 14B/32B/72B LoRA widths, cut to a few
  # layers, unsharded (control) and FSDP2, against the plan
  run cuda-tests 300 150 bash -c "cd ${BENCH_SRC:-.} && for t in 'test_offload.py -k unsharded' 'test_offload.py -k fsdp2' 'test_parity.py -k full' 'test_parity.py -k lora'; do
    GRPO_TEST_DEVICE=cuda python3 -m pytest -q -s -p no:cacheprovider tests/\$t || exit 1; done"
  run mem-cut 120 60 env OUT="$R" CUT=1 python3 benchmarks/trainer_memory.py 0
  run mem-cut-fsdp 240 90 env OUT="$R" CUT=1 FSDP=1 python3 benchmarks/trainer_memory.py 0 1 2 3
  ;;
*) echo "unknown part $part"; exit 2 ;;
esac
echo "part $part finished at +$(( $(date +%s) - t0 )) s; skipped: $(cat "$R/skipped.txt" 2>/dev/null | tr '\n' ' ')"
python3 benchmarks/summarize.py "$B" --brief 2>&1 | tail -60
if [ -n "${OUT:-}" ]; then tar czf "$OUT/$part.tgz" -C "$B" "$part" && ls -la "$OUT"; fi
