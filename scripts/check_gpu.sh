#!/usr/bin/env bash
# The GPU checks in one go: the tests CI cannot run (it has no GPU), what SGE costs on this
# GPU, and where a fused train step's time goes. Each step is bounded and logged.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"

usage() {
    cat <<USAGE
Usage: scripts/check_gpu.sh [--dry-run] [OUT_DIR]

On a machine with a CUDA GPU, runs one after another (about 5 minutes on an H200):
  kernels    tests/test_fused_triton.py (the Triton kernels against the reference)
  tests      the GPU cases of tests/test_fused.py, tests/test_scripts.py and
             tests/faults/test_numerical.py (the fused models on the GPU, a train step with
             no call that waits for the GPU, CUDA graph capture, fp16's grad scaler)
  cost       bench_sge.py: ResNet50, fused SGE-ResNet50 and a second ResNet50 (control),
             train step and inference, batch BATCH, bf16, channels_last
  graphs     the same as CUDA graph replays (the GPU's time, without the host's)
  profile    profile_step.py: step against kernel time, where the GPU idles; timelines
             for Perfetto in OUT_DIR/trace
  blocks     bench_sge_block.py: each stage's block tail, GPU and host time
Each step's output goes to OUT_DIR/<step>.log (default OUT_DIR: runs/gpu_check), and one
line per step says how it ended (with its log's last line that is not JSON). Exits 1 if any step failed or ran past its limit.
--dry-run prints the commands (shell-quoted) without running them.

Environment: PYTHON, BATCH (default 128), STEP_TIMEOUT (seconds per step, default 240).
USAGE
}

DRY=0
case ${1:-} in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY=1; shift ;;
    -*) die "unknown option '$1'; see --help" ;;
esac
OUT_DIR=${1:-runs/gpu_check}
BATCH=${BATCH:-128}
STEP_TIMEOUT=${STEP_TIMEOUT:-240}
require_uint BATCH "$BATCH"
require_uint STEP_TIMEOUT "$STEP_TIMEOUT"
cd "$ROOT" || die "cannot enter $ROOT"

BENCH=(scripts/bench_sge.py --device cuda --batch "$BATCH" --amp bfloat16 --channels-last
       --same-process --measure train,infer --warmup 3 --steps 6)
PYTEST=(-m pytest -q -p no:cacheprovider)
# One array per step: its arguments to $PYTHON.
kernels=("${PYTEST[@]}" tests/test_fused_triton.py)
tests=("${PYTEST[@]}" tests/test_fused.py tests/test_scripts.py tests/faults/test_numerical.py
       -k "cuda or gpu")
cost=("${BENCH[@]}" --variants resnet50,sge_resnet50_fused,resnet50_control)
graphs=("${BENCH[@]}" --variants resnet50,sge_resnet50_fused --cuda-graph)
profile=(scripts/profile_step.py --device cuda --channels-last --trace "$OUT_DIR/trace")
blocks=(scripts/bench_sge_block.py --device cuda --batch "$BATCH" --dtype bfloat16
        --channels-last --rounds 3)
ORDER=(kernels tests cost graphs profile blocks)

if (( DRY )); then
    for step in "${ORDER[@]}"; do
        declare -n words=$step
        printf '%s: %s' "$step" "$PYTHON"
        printf ' %q' "${words[@]}"
        echo
        unset -n words
    done
    exit 0
fi
(( $(local_gpus) > 0 )) || die "no CUDA GPU is visible to $PYTHON (these checks need one)"
mkdir -p "$OUT_DIR" || die "cannot create $OUT_DIR"
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "on", torch.cuda.get_device_name())'

failed=0
for step in "${ORDER[@]}"; do
    start=$SECONDS
    declare -n words=$step
    timeout "$STEP_TIMEOUT" "$PYTHON" "${words[@]}" > "$OUT_DIR/$step.log" 2>&1
    code=$?
    unset -n words
    case $code in
        0) how="ok" ;;
        124) how="ran past ${STEP_TIMEOUT} s"; failed=1 ;;
        *) how="failed (exit $code)"; failed=1 ;;
    esac
    echo "$step: $how in $((SECONDS - start)) s; $(grep -v '^{' "$OUT_DIR/$step.log" | tail -n 1 | cut -c1-200)"
done
exit "$failed"
