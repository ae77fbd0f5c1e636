#!/usr/bin/env bash
# Issue 15's runs on one host with N GPUs, in one command of at most 10 minutes, JSON under $OUT:
#
#   bash tools/multi_gpu/run.sh N        # N = 2, 4 or 8 (h200-x2.sh, h200-x4.sh, h200-x8.sh call this)
#
# Three torchrun sweeps (ringbook.bench.dist_sweep, NCCL, bf16, b=1 h=8 d=64, NCCL_NVLS_ENABLE=0), each with a
# deadline of its own so that one stuck step cannot take the others with it:
#   1. dense forward, 128K 512K 1M, non-causal and causal: the production ring over NCCL, PyTorch's
#      context_parallel (cuDNN), one GPU on the whole sequence (cuDNN) and the one-process stacked ring;
#   2. the benchmark's dilated configuration, forward, 128K 512K 1M: ring_dilated_attention(backend="auto") over
#      NCCL against dilated_sdpa on one GPU and the stacked production_dilated;
#   3. forward+backward, 128K 512K: the production ring against context_parallel and one GPU.
# Each writes <stem>.json and <stem>.log under $OUT; this script prints one line per step with its exit status.
# RINGBOOK_MULTI_GPU_SMOKE=1 rehearses the same steps on the CPU (gloo, float32, tiny sizes), as
# tests/test_multi_gpu_scripts.py does.
set -uo pipefail
N=${1:?usage: bash tools/multi_gpu/run.sh N (the number of GPUs)}
OUT=${OUT:-figures/multi-gpu}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0
TORCHRUN=${TORCHRUN:-torchrun}
PORT=${MASTER_PORT:-29517}
if [ "${RINGBOOK_MULTI_GPU_SMOKE:-0}" = 1 ]; then
  LENS=(256); BWD_LENS=(256)
  COMMON=(--backend gloo --dtype fp32 --heads 8 --head-dim 16 --warmup 1 --repeats 2 --timeout 60)
  ONE_DENSE=sdpa; STEP=(120 120 120)
else
  LENS=(128K 512K 1M); BWD_LENS=(128K 512K)
  COMMON=(--dtype bf16 --warmup 1 --repeats 3 --timeout 240)
  ONE_DENSE=sdpa_cudnn; STEP=(300 120 150)
fi
# Overrides, e.g. for a shorter rehearsal: LENS_OVERRIDE="128K 512K" BWD_LENS_OVERRIDE=128K STEP_SECONDS="150 60 60"
[ -n "${LENS_OVERRIDE:-}" ] && read -r -a LENS <<< "$LENS_OVERRIDE"
[ -n "${BWD_LENS_OVERRIDE:-}" ] && read -r -a BWD_LENS <<< "$BWD_LENS_OVERRIDE"
[ -n "${STEP_SECONDS:-}" ] && read -r -a STEP <<< "$STEP_SECONDS"
stem=h200-x$N
status=0
step() {  # step NAME SECONDS ARGS...: one torchrun sweep with its own deadline
  local name=$1 seconds=$2
  shift 2
  timeout "$seconds" "$TORCHRUN" --nproc-per-node="$N" --master-port "$PORT" -m ringbook.bench.dist_sweep \
    "${COMMON[@]}" --kernel auto --causal both --formats json --out "$OUT" --stem "$stem-$name" "$@" \
    > "$OUT/$stem-$name.log" 2>&1
  local rc=$?
  echo "$stem-$name: exit $rc$([ $rc = 124 ] && echo ' (deadline)')"
  [ $rc = 0 ] || status=1
  PORT=$((PORT + 1))
}
step dense "${STEP[0]}" --seq-lens "${LENS[@]}" --peers one_gpu stacked context_parallel \
  --one-gpu-impls "$ONE_DENSE" --cp-backends cudnn
step dilated "${STEP[1]}" --pattern dilated --seq-lens "${LENS[@]}" --peers one_gpu stacked \
  --one-gpu-impls dilated_sdpa
step fwd-bwd "${STEP[2]}" --mode fwd+bwd --seq-lens "${BWD_LENS[@]}" --peers one_gpu context_parallel \
  --one-gpu-impls "$ONE_DENSE" --cp-backends cudnn
exit $status
