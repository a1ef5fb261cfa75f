#!/usr/bin/env bash
# Issue 14's GPU runs as a queue that survives across device calls: each call runs
#     tools/device/issue14_queue.sh SECONDS
# which, for at most SECONDS, collects what finished since the last call (its logs to $OUT),
# waits on what is running, and starts the next job when the GPU is free. Jobs run one at a time,
# in the background (setsid), so a job may span calls; state lives in /root/q. After staging
# (tools/device/gpu_issue14.sh put ... and setup). Jobs, in order:
#   smol      ours, smollm2-135m-1xh200, STEPS steps, val at 0 and every TF steps
#   (order: JOBS_ORDER, default below)
#   rollout   benchmarks/vs_peers/rollout_real.py: our rollout + eval vs bare vLLM (foreground)
#   verl      verl on the same work (benchmarks/vs_peers/verl_grpo.sh)
#   liger     tests/test_liger_gpu.py + tests/test_remove_padding_gpu.py on CUDA (foreground)
#   lora05    ours, qwen2-0.5b-lora-1xh100 on random 0.5B weights, 512-token responses, 3 steps
#   verl05    verl on that (RECIPE=qwen2-0.5b-lora-1xh100 verl_grpo.sh)
#   trl       TRL GRPOTrainer on the smollm2 work, STEPS steps
set -uo pipefail
budget=$1; t_end=$((SECONDS + budget))
R=${QUEUE_ROOT:-/root}; Q=$R/q; T=${QUEUE_T:-tools/device/gpu_issue14.sh}; mkdir -p $Q  # QUEUE_*: to try it elsewhere
STEPS=${STEPS:-6} TF=${TF:-3}
SMOL=(data.dir=$R/data-smollm2 model.path=$R/models/smollm2-135m-instruct)
JOBS=(${JOBS_ORDER:-smol verl rollout liger lora05 verl05 trl})
left() { echo $((t_end - SECONDS)); }

start() {
  case $1 in
    smol) $T ours smol trainer.total_training_steps=$STEPS trainer.test_freq=$TF ;;
    rollout)  # foreground; needs ~170 s
      [ "$(left)" -lt 200 ] && return 1
      mkdir -p $R/runs/rollout; ( source tools/device/device_env.sh >/dev/null && PYTHONUNBUFFERED=1 timeout 190 \
        python3 benchmarks/vs_peers/rollout_real.py --model $R/models/smollm2-135m-instruct --gsm8k $R/st/gsm8k \
        --out $R/runs/rollout/rollout_real.json data.dir=$R/data-smollm2 > $R/runs/rollout/rollout_real.log 2>&1
        echo $? > $R/runs/rollout/rc ) ;;
    liger)  # foreground: the CUDA tests of liger-kernel and of packing (carried .device/pyd -> /root/st/pyd)
      [ "$(left)" -lt 200 ] && return 1
      mkdir -p $R/runs/liger; ( source tools/device/device_env.sh >/dev/null && python3 -m pip install -q --no-deps \
        --no-index --target $R/lsite $R/st/pyd/liger_kernel-*.whl && PYTHONPATH=$PYTHONPATH:$R/lsite GRPO_TEST_DEVICE=cuda \
        timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_liger_gpu.py tests/test_remove_padding_gpu.py \
        > $R/runs/liger/pytest.log 2>&1; echo $? > $R/runs/liger/rc ) ;;
    verl) TEST_FREQ=$TF $T bgpeer verl bash benchmarks/vs_peers/verl_grpo.sh $STEPS $R/data-smollm2 $R/models/smollm2-135m-instruct ;;
    lora05) RECIPE=qwen2-0.5b-lora-1xh100 $T ours lora05 model.source=random model.arch=0.5b \
        model.path=$R/models/random-qwen2-0.5b data.dir=$R/data-05b rollout.max_response_length=512 \
        trainer.total_training_steps=3 trainer.val_before_train=false trainer.test_freq=-1 trainer.export_hf=never ;;
    verl05) RECIPE=qwen2-0.5b-lora-1xh100 $T bgpeer verl05 bash benchmarks/vs_peers/verl_grpo.sh 3 $R/data-05b $R/models/random-qwen2-0.5b ;;
    trl) $T bgpeer trl python3 benchmarks/vs_peers/trl_grpo.py --steps $STEPS --out $R/runs/trl/trl.json \
        data.source=$R/st/gsm8k "${SMOL[@]}" ;;
  esac
}
finished() {  # 0 when job $1 (started) has ended
  if [ -f $R/runs/$1/flow.pid ]; then ! kill -0 "$(cat $R/runs/$1/flow.pid)" 2>/dev/null; else [ -f $R/runs/$1/rc ]; fi
}
collect() {
  case $1 in
    smol|lora05) $T wait $1 0 ;;
    rollout) tail -c 3000 $R/runs/rollout/rollout_real.log; cp $R/runs/rollout/rollout_real.* "$OUT/" ;;
    liger) tail -c 2500 $R/runs/liger/pytest.log; cp $R/runs/liger/pytest.log "$OUT/liger_pytest.log" ;;
    *) $T waitpeer $1 0 ;;
  esac
  touch $Q/$1.collected
}

for j in "${JOBS[@]}"; do
  [ -f $Q/$j.collected ] && continue
  if [ ! -f $Q/$j.started ]; then
    [ "$(left)" -lt 30 ] && { echo "queue: $j not started ($(left) s left)"; exit 0; }
    echo "queue: start $j at $(date +%T)"; touch $Q/$j.started
    start $j || { rm -f $Q/$j.started; echo "queue: $j needs more time than is left"; exit 0; }
  fi
  while ! finished $j && [ "$(left)" -gt 15 ]; do sleep 3; done
  if finished $j; then echo "queue: $j ended at $(date +%T)"; collect $j
  else echo "queue: $j still running at $(date +%T)"; tail -n 3 $R/runs/$j/*.log 2>/dev/null | cut -c1-300
    tar -C $R/runs -czf "$OUT/$j-sofar.tgz" $j; exit 0; fi  # its logs so far, in case no call follows
done
echo "queue: all jobs done"
