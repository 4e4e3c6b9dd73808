#!/usr/bin/env bash
# Evaluate the released PytorchInsight checkpoints on ImageNet val, beside the paper's numbers.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"

# Released file -> our recipe (its model and the paper's val preprocessing).
declare -A CONFIGS=(
    [sge_resnet50.pth.tar]=configs/imagenet/sge_resnet50.yaml
    [sge_resnet101.pth.tar]=configs/imagenet/sge_resnet101.yaml
    [old_resnet50.pth.tar]=configs/imagenet/resnet50.yaml
    [old_resnet101.pth.tar]=configs/imagenet/resnet101.yaml
)
ORDER=(old_resnet50.pth.tar sge_resnet50.pth.tar old_resnet101.pth.tar sge_resnet101.pth.tar)

usage() {
    cat <<USAGE
Usage: scripts/eval_released.sh CKPT_DIR IMAGENET [-- dotted.key=value ...]

Evaluates every released checkpoint found in CKPT_DIR (${ORDER[*]};
the old_* files are the paper's plain ResNet baselines) with eval.py on the ImageNet
validation set (single 224 center crop of the image resized to 256), then prints our
top-1/top-5 beside the published numbers.

IMAGENET is an ImageFolder root holding val/<synset>/*.JPEG (and usually train/), or the
val folder itself; a flat val folder must first be sorted into class folders with
scripts/prepare_imagenet_val.py. Logs go to OUT_DIR (default runs/eval_released).

Environment: NPROC processes (default: the visible GPUs, else 1; the counts are exact with
any number), PYTHON, OUT_DIR.

Example:
  scripts/eval_released.sh ~/Downloads/pytorchinsight /data/imagenet -- data.workers=16
USAGE
}

case "${1:-}" in
    -h|--help) usage; exit 0 ;;
esac
[[ -n ${1:-} && ${1:-} != -* ]] || die "missing CKPT_DIR (the folder with the .pth.tar files); see --help"
[[ -d $1 ]] || die "checkpoint folder not found: $1"
[[ -n ${2:-} && ${2:-} != -* ]] || die "missing IMAGENET (the ImageNet root or its val folder); see --help"
[[ -d $2 ]] || die "ImageNet folder not found: $2"
CKPT_DIR=$1
IMAGENET=$(cd "$2" && pwd)
shift 2
[[ ${1:-} == -- ]] && shift
require_overrides "$@"
OUT_DIR=${OUT_DIR:-runs/eval_released}

found=()
for f in "${ORDER[@]}"; do
    [[ -f $CKPT_DIR/$f ]] && found+=("$f")
done
(( ${#found[@]} )) || die "none of ${ORDER[*]} in $CKPT_DIR"

# The loaders take the class list from train/; with only a val folder at hand, give them a
# skeleton train/ of empty class folders beside a link to the real val/.
VAL=$IMAGENET
[[ -d $IMAGENET/val ]] && VAL=$IMAGENET/val
classes=$(find -L "$VAL/" -mindepth 1 -maxdepth 1 -type d ! -name '.*' | wc -l)
(( classes == 1000 )) || die "$VAL has $classes class folders, ImageNet has 1000 (sort a flat val folder with scripts/prepare_imagenet_val.py)"
if [[ -d $IMAGENET/val && -d $IMAGENET/train ]]; then
    DATA_ROOT=$IMAGENET
else
    DATA_ROOT=$OUT_DIR/imagenet_root
    mkdir -p "$DATA_ROOT/train"
    ln -sfn "$VAL" "$DATA_ROOT/val"
    (cd "$VAL/" && find -L . -mindepth 1 -maxdepth 1 -type d ! -name '.*' -printf '%P\0') |
        (cd "$DATA_ROOT/train" && xargs -0 -r mkdir -p)
fi

mkdir -p "$OUT_DIR"
gpus=$(local_gpus)
NPROC=${NPROC:-$(( gpus > 0 ? gpus : 1 ))}
require_uint NPROC "$NPROC"
if (( NPROC == 1 )); then
    launcher=("$PYTHON")
else
    read -r -a launcher <<<"$(torchrun_cmd)"
    launcher+=(--standalone --nproc_per_node="$NPROC")
fi

results=()
for f in "${found[@]}"; do
    log=$OUT_DIR/${f%.pth.tar}.txt
    echo "== $f"
    run_cmd "${launcher[@]}" "$ROOT/eval.py" --config "$ROOT/${CONFIGS[$f]}" \
        --checkpoint "$CKPT_DIR/$f" "data.root=$DATA_ROOT" "$@" | tee "$log"
    line=$(grep '^top1=' "$log" | tail -n 1) || die "eval.py printed no result for $f (log: $log)"
    results+=("$f $(basename "${CONFIGS[$f]}" .yaml) $line")
done

echo
ROOT="$ROOT" "$PYTHON" - "${results[@]}" <<'PY' | tee "$OUT_DIR/summary.md"
import os, re, sys
sys.path.insert(0, os.path.join(os.environ["ROOT"], "scripts"))
from model_info import PAPER  # the published numbers, kept in one place

print("| Checkpoint | Model | Images | Top-1 % | Paper top-1 % | Diff | Top-5 % | Paper top-5 % | Diff |")
print("|---|---|---|---|---|---|---|---|---|")
for item in sys.argv[1:]:
    ckpt, model, line = item.split(" ", 2)
    ours = dict(kv.split("=") for kv in line.split())
    t1, t5 = float(ours["top1"]), float(ours["top5"])
    p1, p5 = PAPER[model][2], PAPER[model][3]
    print(f"| {ckpt} | {model} | {ours['images']} | {t1:.3f} | {p1:.3f} | {t1 - p1:+.3f} "
          f"| {t5:.3f} | {p5:.3f} | {t5 - p5:+.3f} |")
PY
