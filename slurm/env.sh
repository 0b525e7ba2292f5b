# Environment for moetron Slurm jobs; sourced by pretrain.sbatch and convert.sbatch in the batch shell, and
# inherited by every srun task (srun exports the batch environment). Every setting is a default: export your
# own value before `sbatch` (sbatch passes your environment on) to override it.
# shellcheck shell=bash

# --- Python --------------------------------------------------------------------------------------------
# Interpreter used for torchrun and the trainer. Point it at your virtualenv's python if you use one.
export MOETRON_PYTHON=${MOETRON_PYTHON:-python3}
export PYTHONUNBUFFERED=1  # log lines reach the Slurm output file as they happen
# torchrun sets OMP_NUM_THREADS=1 for multi-worker nodes; keep any value the user chose.

# --- NCCL / PyTorch distributed ------------------------------------------------------------------------
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Raise a Python error on NCCL failures/timeouts instead of hanging the job until its time limit.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# On a collective timeout, dump the flight recorder (last collectives per rank) to find the stuck rank.
export TORCH_FR_BUFFER_SIZE=${TORCH_FR_BUFFER_SIZE:-2000}
export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
# megatron-core tensor-parallel overlap relies on kernels being issued in order on one hardware queue.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# InfiniBand retry timeout (4.096 us * 2^N); the default 18 rides out transient fabric hiccups on big jobs.
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-18}
# Site-specific network settings belong here or in MOETRON_SITE_ENV, for example:
#   export NCCL_SOCKET_IFNAME=ib0        # interface for NCCL bootstrap / socket transport
#   export NCCL_IB_HCA=mlx5              # which HCAs NCCL may use
#   export GLOO_SOCKET_IFNAME=ib0        # same for gloo (CPU collectives)

# --- Site file -----------------------------------------------------------------------------------------
# A cluster-specific file (modules, virtualenv activation, NCCL network settings) sourced last.
if [ -n "${MOETRON_SITE_ENV:-}" ]; then
  if [ ! -f "$MOETRON_SITE_ENV" ]; then
    echo "slurm/env.sh: MOETRON_SITE_ENV=$MOETRON_SITE_ENV does not exist (unset it or fix the path)" >&2
    return 1
  fi
  # shellcheck disable=SC1090
  source "$MOETRON_SITE_ENV"
fi
