#!/usr/bin/env bash
# The paper's ablation axis: train and evaluate SGE-ResNet for each group count G.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"

usage() {
    cat <<USAGE
Usage: scripts/sweep_groups.sh CONFIG OUT_ROOT [G ...] [-- dotted.key=value ...]

For each group count G (default: 1 2 4 8 16 32 64), trains CONFIG with model.groups=G into
OUT_ROOT/g<G> (scripts/train.sh: all local GPUs, or NPROC CPU processes), evaluates its
best.pt with eval.py into OUT_ROOT/g<G>/eval.txt, and finally writes the summary table
OUT_ROOT/summary.md and the plots OUT_ROOT/curves.png, OUT_ROOT/groups.png (report.py).

Resumable: re-running the same command skips runs whose last epoch is recorded in their
metrics.jsonl, resumes interrupted ones from their last checkpoint, and re-evaluates only
what changed. Every G is checked against the model (it must divide every block's
channels) before anything trains.

Examples:
  scripts/sweep_groups.sh configs/imagenet/sge_resnet50.yaml runs/sweep -- data.root=/data/imagenet
  scripts/sweep_groups.sh configs/quickstart.yaml runs/qs_sweep 2 4 -- train.epochs=3
USAGE
}

case "${1:-}" in
    -h|--help) usage; exit 0 ;;
esac
require_config "${1:-}"
CONFIG=$1
[[ -n ${2:-} && ${2:-} != -- ]] || die "missing OUT_ROOT (the folder for the runs); see --help"
[[ $2 != -* ]] || die "unknown option '$2'; see --help"
OUT_ROOT=$2
shift 2
GROUP_LIST=()
while (( $# )) && [[ $1 != -- ]]; do
    require_uint "group count G" "$1"
    GROUP_LIST+=("$((10#$1))")
    shift
done
[[ ${1:-} == -- ]] && shift
OVERRIDES=("$@")
require_overrides "${OVERRIDES[@]}"
for o in "${OVERRIDES[@]}"; do
    case $o in
        model.groups=*|output.dir=*) die "'$o': the sweep sets model.groups and output.dir itself" ;;
    esac
done
(( ${#GROUP_LIST[@]} )) || GROUP_LIST=(1 2 4 8 16 32 64)

# sweep_status G...: validates each run's config, prints "G done|resume|new EPOCHS".
# sweep_status --finished RUN EPOCHS: exits 0 when RUN recorded validation of epoch EPOCHS
# (no torch import: it runs after every training).
sweep_status() {
    ROOT="$ROOT" "$PYTHON" - "$CONFIG" "$OUT_ROOT" "$@" -- "${OVERRIDES[@]}" <<'PY'
import json, os, sys
from pathlib import Path


def finished(run: Path, epochs: int) -> bool:
    metrics = run / "metrics.jsonl"
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line of a killed run
        if row.get("split") == "val" and row.get("epoch") == epochs:
            return True
    return False


config, out_root, args = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
groups, overrides = args[:args.index("--")], args[args.index("--") + 1:]
if groups[0] == "--finished":
    sys.exit(0 if finished(Path(groups[1]), int(groups[2])) else 1)
sys.path.insert(0, os.environ["ROOT"])
import models
from sge.config import ConfigError, load_config

for g in groups:
    run = out_root / f"g{g}"
    try:
        cfg = load_config(config, [*overrides, f"model.groups={g}", f"output.dir={run}"])
    except ConfigError as exc:
        sys.exit(f"sweep_groups.sh: error: G={g}: {exc}")
    if not models.is_sge(cfg.model.name):
        sys.exit(f"sweep_groups.sh: error: {config}: model.name={cfg.model.name} has no SGE "
                 f"groups to sweep; use an sge_* model (or the override model.name=sge_...)")
    state = "done" if finished(run, cfg.train.epochs) else \
        "resume" if (run / "checkpoints" / "last.pt").is_file() else "new"
    print(g, state, cfg.train.epochs)
PY
}

trap 'echo "sweep_groups.sh: interrupted; re-run the same command to resume" >&2; exit 130' INT TERM
echo "checking ${#GROUP_LIST[@]} group count(s): ${GROUP_LIST[*]}"
status_text=$(sweep_status "${GROUP_LIST[@]}")
mapfile -t STATUS <<<"$status_text"

RUNS=()
for line in "${STATUS[@]}"; do
    read -r g state epochs <<<"$line"
    run=$OUT_ROOT/g$g
    RUNS+=("$run")
    case $state in
        done) echo "== G=$g: finished earlier ($run), skipping training" ;;
        resume) echo "== G=$g: resuming the interrupted run in $run" ;;
        new) echo "== G=$g: training into $run" ;;
    esac
    if [[ $state != done ]]; then
        "$ROOT/scripts/train.sh" "$CONFIG" "${OVERRIDES[@]}" "model.groups=$g" "output.dir=$run"
        sweep_status --finished "$run" "$epochs" ||
            die "G=$g stopped before its last epoch (signal or preemption?); re-run the same command to resume"
    fi
    if [[ -f $run/eval.txt && $run/eval.txt -nt $run/checkpoints/best.pt ]] &&
            grep -q '^top1=' "$run/eval.txt"; then
        echo "== G=$g: evaluated earlier: $(grep '^top1=' "$run/eval.txt" | tail -n 1)"
    else
        echo "== G=$g: evaluating $run/checkpoints/best.pt"
        run_cmd "$PYTHON" "$ROOT/eval.py" --config "$run/config.yaml" \
            --checkpoint "$run/checkpoints/best.pt" > "$run/eval.txt.tmp"
        mv "$run/eval.txt.tmp" "$run/eval.txt"
        tail -n 1 "$run/eval.txt"
    fi
done

echo "== summary of ${#RUNS[@]} run(s)"
run_cmd "$PYTHON" "$ROOT/scripts/report.py" "${RUNS[@]}" --out "$OUT_ROOT/summary.md" \
    --plots "$OUT_ROOT"
