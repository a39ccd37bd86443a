#!/usr/bin/env bash
# Launch foxdist on one node or many with torchrun (c10d rendezvous). Run it once per node.
#
#   RECIPE=recipes/fox_pro.py:fox_pro_125m GPUS_PER_NODE=8 launch/torchrun.sh --set data.source=/data/shards
#   # two nodes: on every node, with the head node's address
#   NNODES=2 RDZV_HOST=node001 RECIPE=recipes/fox_pro.py:fox_pro_760m launch/torchrun.sh --set parallel.cp=2
#
# Environment knobs (defaults in brackets):
#   RECIPE         FILE:FUNCTION                                     [recipes/debug.py:cpu]
#   GPUS_PER_NODE  processes per node                                [number of visible GPUs, or 1]
#   NNODES         number of nodes                                   [1]
#   RDZV_HOST      rendezvous host (the head node); unset = --standalone  []
#   RDZV_PORT      rendezvous port                                   [29500]
#   RDZV_ID        job id shared by all nodes                        [$SLURM_JOB_ID or foxdist]
#   RUN_DIR        run directory                                     [from the recipe]
#   PYTHON         interpreter                                       [.venv/bin/python if present, else python3]
# Everything after the script name is passed to `foxdist.train` (e.g. --set section.key=value).
set -euo pipefail
cd "$(dirname "$0")/.."
RECIPE=${RECIPE:-recipes/debug.py:cpu}
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
  GPUS_PER_NODE=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [[ "$GPUS_PER_NODE" -ge 1 ]] || GPUS_PER_NODE=1
fi
NNODES=${NNODES:-1}
PYTHON=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
# One CUDA connection lets communication kernels overlap with tensor-parallel compute in order.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

args=(--nproc-per-node "$GPUS_PER_NODE" --nnodes "$NNODES")
if [[ -n "${RDZV_HOST:-}" ]]; then
  args+=(--rdzv-backend c10d --rdzv-endpoint "${RDZV_HOST}:${RDZV_PORT:-29500}" --rdzv-id "${RDZV_ID:-${SLURM_JOB_ID:-foxdist}}")
else
  [[ "$NNODES" == 1 ]] || { echo "torchrun.sh: NNODES=$NNODES needs RDZV_HOST (the head node)" >&2; exit 2; }
  args+=(--standalone)
fi
run_dir=()
[[ -n "${RUN_DIR:-}" ]] && run_dir=(--run-dir "$RUN_DIR")
set -x
exec "$PYTHON" -m torch.distributed.run "${args[@]}" -m foxdist.train --recipe "$RECIPE" "${run_dir[@]}" "$@"
