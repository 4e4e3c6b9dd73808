#!/usr/bin/env bash
# Train on this machine: all local GPUs under torchrun, or CPU processes when there are none.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"

usage() {
    cat <<USAGE
Usage: scripts/train.sh [--dry-run] CONFIG [dotted.key=value ...]

Runs train.py on this machine: one process per visible GPU under torchrun (--standalone),
or, without GPUs, NPROC CPU processes (default 1; gloo backend). Prints the resolved
command first. The run resumes from its output.dir automatically (train.resume=auto).

Environment:
  NPROC     processes to start (default: the number of visible GPUs, else 1)
  PYTHON    the Python to use (default: python)
  DRY_RUN=1 print the command without running it (same as --dry-run)

Examples:
  scripts/train.sh configs/quickstart.yaml
  scripts/train.sh configs/imagenet/sge_resnet50.yaml data.root=/data/imagenet
  NPROC=2 scripts/train.sh configs/quickstart.yaml output.dir=runs/qs_2proc
USAGE
}

case "${1:-}" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
esac
require_config "${1:-}"
CONFIG=$1
shift
require_overrides "$@"

gpus=$(local_gpus)
NPROC=${NPROC:-$(( gpus > 0 ? gpus : 1 ))}
require_uint NPROC "$NPROC"
if (( NPROC == 1 )); then
    cmd=("$PYTHON" "$ROOT/train.py" --config "$CONFIG" "$@")
else
    if (( gpus == 0 )) && [[ -z ${OMP_NUM_THREADS:-} ]]; then
        # CPU processes share the cores; torchrun's default of 1 thread each wastes them.
        cores=$(nproc)
        export OMP_NUM_THREADS=$(( cores / NPROC > 0 ? cores / NPROC : 1 ))
    fi
    read -r -a launcher <<<"$(torchrun_cmd)"
    cmd=("${launcher[@]}" --standalone --nproc_per_node="$NPROC" "$ROOT/train.py" --config "$CONFIG" "$@")
fi
run_cmd "${cmd[@]}"
