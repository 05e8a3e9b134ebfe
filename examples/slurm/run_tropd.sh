#!/usr/bin/env bash
# Shared body of the sbatch scripts in this folder: one `tropd launch` task per node inside the container.
# `tropd launch` reads SLURM_* and starts this node's SGLang servers and/or its torchrun (see docs/cluster.md).
# Usage (from an sbatch script): exec bash examples/slurm/run_tropd.sh CONFIG [key=value ...]
# Environment: TROPD_IMAGE (pyxis image: .sqsh file or registry ref), TROPD_MOUNTS (extra src:dst,...),
#              TROPD_RESUME=1 (resume even on the first start), TROPD_WORKDIR (repo path inside the container).
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: run_tropd.sh CONFIG [key=value ...]" >&2
    exit 2
fi
config="$1"
shift
: "${SLURM_JOB_ID:?run this from an sbatch script (SLURM_JOB_ID is not set)}"

submit_dir="${SLURM_SUBMIT_DIR:-$PWD}"
image="${TROPD_IMAGE:-/shared/containers/megatron-tropd.sqsh}"
workdir="${TROPD_WORKDIR:-/workspace/megatron-tropd}"
mounts="${submit_dir}:${workdir}"
if [[ -n "${TROPD_MOUNTS:-}" ]]; then
    mounts="${mounts},${TROPD_MOUNTS}"
fi
log_dir="${submit_dir}/logs/${SLURM_JOB_NAME:-tropd}-${SLURM_JOB_ID}"
mkdir -p "${log_dir}"

# Resume from the last complete checkpoint after a requeue (or when asked).
overrides=("$@")
if [[ "${SLURM_RESTART_COUNT:-0}" -gt 0 || "${TROPD_RESUME:-0}" == "1" ]]; then
    overrides+=("train.resume=true")
fi

# Preemption / time limit: SLURM signals the batch shell (--signal=B:USR1@300, or TERM on preemption);
# stop the job step cleanly (the trainer gets SIGTERM) and put the job back in the queue.
srun_pid=""
requeue() {
    echo "[tropd] $(date -Is) signal received: stopping step and requeueing job ${SLURM_JOB_ID}" >&2
    if [[ -n "${srun_pid}" ]]; then
        kill -TERM "${srun_pid}" 2>/dev/null || true
        wait "${srun_pid}" || true
    fi
    scontrol requeue "${SLURM_JOB_ID}"
    exit 0
}
trap requeue USR1 TERM

echo "[tropd] job ${SLURM_JOB_ID} on ${SLURM_JOB_NODELIST}: config ${config} ${overrides[*]:-}" >&2
srun --ntasks-per-node=1 --ntasks="${SLURM_NNODES}" --kill-on-bad-exit=1 \
    --container-image="${image}" --container-mounts="${mounts}" --container-workdir="${workdir}" \
    --output="${log_dir}/%N.log" \
    tropd launch "${config}" "cluster.log_dir=logs/${SLURM_JOB_NAME:-tropd}-${SLURM_JOB_ID}" "${overrides[@]}" &
srun_pid=$!
# `wait` returns early when a trapped signal arrives; the trap then handles the step.
wait "${srun_pid}"
