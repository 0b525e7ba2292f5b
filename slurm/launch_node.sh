#!/usr/bin/env bash
# One copy runs on every node of a job (pretrain.sbatch starts it with `srun --ntasks-per-node=1`); it starts
# torchrun, which starts one trainer process per GPU of THIS node's allocation and joins the other nodes
# through a c10d rendezvous on the head node.
#
# Usage (from pretrain.sbatch): launch_node.sh HEAD_ADDR:PORT RECIPE [key.path=value ...]
set -euo pipefail

die() { echo "launch_node.sh on $(hostname): $*" >&2; exit 2; }

[ $# -ge 2 ] || die "usage: launch_node.sh HEAD_ADDR:PORT RECIPE [key.path=value ...]"
RDZV_ENDPOINT=$1
shift

# Workers per node = GPUs Slurm gave this node. MOETRON_NPROC_PER_NODE overrides it (CPU-only runs).
nproc_per_node() {
  local n
  if [ -n "${MOETRON_NPROC_PER_NODE:-}" ]; then
    n=$MOETRON_NPROC_PER_NODE
  elif [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
    n=$SLURM_GPUS_ON_NODE
  elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    n=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)
  else
    die "no GPUs in this node's allocation: submit with --gpus-per-node=N, or set MOETRON_NPROC_PER_NODE=N" \
        "for a CPU-only run"
  fi
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "workers per node must be a positive integer, got '$n'" \
    "(from MOETRON_NPROC_PER_NODE, SLURM_GPUS_ON_NODE or CUDA_VISIBLE_DEVICES)"
  echo "$n"
}

NPROC=$(nproc_per_node)
echo "[moetron] node ${SLURMD_NODENAME:-?} ($(hostname)): slurm node id ${SLURM_NODEID:-?}/${SLURM_NNODES}," \
     "$NPROC workers, CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-<unset>}, rendezvous $RDZV_ENDPOINT"

# Preemption: pretrain.sbatch forwards SIGUSR2 to this step, and Slurm delivers it to EVERY process of the step.
# The trainer workers catch it (checkpoint at the next step boundary, exit 0). The torchrun agent must not act
# on it: SIGUSR2's default action would kill the agent (and with it the step), and making torchrun forward it
# (TORCHELASTIC_SIGNALS_TO_HANDLE) would SIGKILL workers 30 s later, cutting a large checkpoint save short.
# An ignored signal stays ignored across exec and is inherited by the workers; the trainer's handler then
# replaces the SIG_IGN (a signal that arrives before the handler is installed is lost).
trap '' USR2
exec "$MOETRON_PYTHON" -m launcher.torchrun \
  --nnodes="$SLURM_NNODES" \
  --nproc-per-node="$NPROC" \
  --rdzv-backend=c10d \
  --rdzv-endpoint="$RDZV_ENDPOINT" \
  --rdzv-id="moetron-$SLURM_JOB_ID" \
  --max-restarts=0 \
  -m launcher.pretrain --recipe "$@"
