# Shared by the launchers (sourced, not run): errors, argument checks, printing commands.
# shellcheck shell=bash

die() {
    echo "$(basename "$0"): error: $*" >&2
    exit 2
}

# The repository root (the launchers live in scripts/).
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}

require_config() {  # CONFIG: must be a readable file
    [[ -n ${1:-} ]] || die "missing CONFIG (a YAML file, e.g. configs/quickstart.yaml); see --help"
    [[ $1 != -* ]] || die "unknown option '$1'; see --help"
    [[ -f $1 && -r $1 ]] || die "config file not found: $1"
}

require_overrides() {  # every argument must look like dotted.key=value
    local o
    for o in "$@"; do
        [[ $o =~ ^[A-Za-z_][A-Za-z0-9_.]*= ]] ||
            die "'$o' is not an override: expected dotted.key=value (e.g. train.epochs=5)"
    done
}

require_uint() {  # NAME VALUE [MIN]: VALUE must be an integer >= MIN (default 1)
    [[ ${2:-} =~ ^[0-9]+$ ]] && (( 10#$2 >= ${3:-1} )) ||
        die "$1 must be an integer >= ${3:-1}, got '${2:-}'"
}

local_gpus() {  # GPUs this process can see (honours CUDA_VISIBLE_DEVICES)
    "$PYTHON" -c 'import torch; print(torch.cuda.device_count())'
}

torchrun_cmd() {  # the torchrun launcher of this Python
    if command -v torchrun >/dev/null 2>&1; then
        echo torchrun
    else
        echo "$PYTHON -m torch.distributed.run"
    fi
}

run_cmd() {  # print the resolved command, then run it (unless DRY_RUN=1)
    printf '+'
    printf ' %q' "$@"
    printf '\n'
    [[ ${DRY_RUN:-0} == 1 ]] && return 0
    "$@"
}
