#!/usr/bin/env bash
# One node's share of a multi-node run: torchrun with the standard rendezvous arguments.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"

usage() {
    cat <<USAGE
Usage: scripts/train_multinode.sh [options] CONFIG [dotted.key=value ...]

Run this on every node (same CONFIG, overrides and output.dir on a shared file system);
node 0's address is the rendezvous point. Prints the resolved torchrun command first.

Options (each falls back to the environment variable named, then to SLURM's):
  --nnodes N           number of nodes            (NNODES, SLURM_NNODES)
  --node-rank R        this node's rank, 0..N-1   (NODE_RANK, SLURM_NODEID)
  --master-addr HOST   node 0's host name or IP   (MASTER_ADDR)
  --master-port PORT   a free TCP port on node 0  (MASTER_PORT; default 29500)
  --nproc-per-node K   processes on this node     (NPROC_PER_NODE; default: its GPUs, else 1)
  --dry-run            print the command without running it (DRY_RUN=1)

Example, 2 nodes x 8 GPUs:
  node0$ scripts/train_multinode.sh --nnodes 2 --node-rank 0 --master-addr node0 \\
             configs/imagenet/sge_resnet50.yaml data.root=/data/imagenet
  node1$ scripts/train_multinode.sh --nnodes 2 --node-rank 1 --master-addr node0 \\
             configs/imagenet/sge_resnet50.yaml data.root=/data/imagenet
USAGE
}

NNODES=${NNODES:-${SLURM_NNODES:-}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-}}
MASTER_ADDR=${MASTER_ADDR:-}
MASTER_PORT=${MASTER_PORT:-29500}
NPROC_PER_NODE=${NPROC_PER_NODE:-}
while (( $# )); do
    case $1 in
        -h|--help) usage; exit 0 ;;
        --nnodes|--node-rank|--master-addr|--master-port|--nproc-per-node)
            [[ $# -ge 2 ]] || die "option $1 needs a value"
            case $1 in
                --nnodes) NNODES=$2 ;;
                --node-rank) NODE_RANK=$2 ;;
                --master-addr) MASTER_ADDR=$2 ;;
                --master-port) MASTER_PORT=$2 ;;
                --nproc-per-node) NPROC_PER_NODE=$2 ;;
            esac
            shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        --) shift; break ;;
        -*) die "unknown option '$1'; see --help" ;;
        *) break ;;
    esac
done
require_config "${1:-}"
CONFIG=$1
shift
require_overrides "$@"
[[ -n $NNODES ]] || die "the number of nodes is not set: pass --nnodes N or set NNODES"
require_uint NNODES "$NNODES"
[[ -n $NODE_RANK ]] || die "this node's rank is not set: pass --node-rank R or set NODE_RANK"
require_uint NODE_RANK "$NODE_RANK" 0
[[ -n $MASTER_ADDR ]] || die "the rendezvous host is not set: pass --master-addr HOST or set MASTER_ADDR"
(( 10#$NODE_RANK < 10#$NNODES )) || die "NODE_RANK=$NODE_RANK must be below NNODES=$NNODES"
require_uint MASTER_PORT "$MASTER_PORT"
(( 10#$MASTER_PORT <= 65535 )) || die "MASTER_PORT must be a TCP port (1-65535), got $MASTER_PORT"
if [[ -z $NPROC_PER_NODE ]]; then
    gpus=$(local_gpus)
    NPROC_PER_NODE=$(( gpus > 0 ? gpus : 1 ))
fi
require_uint NPROC_PER_NODE "$NPROC_PER_NODE"

read -r -a launcher <<<"$(torchrun_cmd)"
run_cmd "${launcher[@]}" --nnodes="$NNODES" --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
    --nproc_per_node="$NPROC_PER_NODE" "$ROOT/train.py" --config "$CONFIG" "$@"
