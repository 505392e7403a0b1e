#!/usr/bin/env bash
# One node of the job's Ray cluster for Ray-placed SGLang servers: `tools/launch/ray_node.sh [--dry-run]`.
# spin.sbatch runs it on every node (one srun task each) when SPIN_ROLLOUT_NODES > 0:
#
#   rollout nodes (SLURM_NODEID ≥ SPIN_ROLLOUT_FIRST_NODE): their GPUs join Ray; the first is the head
#   training nodes: join with no GPUs and no CPUs, so that trainer ranks there can be Ray drivers
#                   (ray.init needs a raylet on its node) while no server lands on a training GPU
#
# Environment: RAY_HEAD_ADDR, RAY_PORT (the head's GCS address), SPIN_ROLLOUT_FIRST_NODE, SLURM_NODEID,
# RAY_NUM_GPUS (default: SLURM_GPUS_ON_NODE, else 8), RAY_JOIN_TIMEOUT_S (default 600: how long a worker
# retries while the head starts; every RAY_JOIN_RETRY_S, default 5), RAY (the `ray` command; default ray), DRY_RUN=1 (print, do not start).
# The task holds the srun step until it gets SIGTERM or SIGUSR1, then stops this node's Ray. spin.sbatch stops the
# step after training with SIGUSR1 to its srun, which forwards it (a SIGTERM to srun SIGKILLs the tasks instead).
set -euo pipefail

die() {
    echo "ray_node.sh: error: $*" >&2
    exit 2
}

dry_run=${DRY_RUN:-0}
[[ ${1:-} == --dry-run ]] && dry_run=1

for var in RAY_HEAD_ADDR RAY_PORT SPIN_ROLLOUT_FIRST_NODE SLURM_NODEID; do
    [[ -n ${!var:-} ]] || die "$var is not set (spin.sbatch sets it; see the header of this file)"
done
ray=${RAY:-ray}
gpus=${RAY_NUM_GPUS:-${SLURM_GPUS_ON_NODE:-8}}
gpus=${gpus##*:}
node=$SLURM_NODEID
first=$SPIN_ROLLOUT_FIRST_NODE

common=(--disable-usage-stats)
if [[ $node -lt $first ]]; then
    role="training node (driver only)"
    cmd=("$ray" start --address="$RAY_HEAD_ADDR:$RAY_PORT" --num-gpus=0 --num-cpus=0 "${common[@]}")
elif [[ $node -eq $first ]]; then
    role="rollout node, Ray head"
    cmd=("$ray" start --head --port="$RAY_PORT" --num-gpus="$gpus")
    cmd+=(--include-dashboard=false "${common[@]}")
else
    role="rollout node"
    cmd=("$ray" start --address="$RAY_HEAD_ADDR:$RAY_PORT" --num-gpus="$gpus" "${common[@]}")
fi

if [[ $dry_run == 1 ]]; then
    echo "$role: ${cmd[*]}"
    exit 0
fi

echo "[ray_node.sh $(date '+%F %T')] node $node ($(hostname)): $role"
deadline=$((SECONDS + ${RAY_JOIN_TIMEOUT_S:-600}))
until "${cmd[@]}"; do  # a worker that starts before the head's GCS is up fails: try again
    [[ $node -ne $first && $SECONDS -lt $deadline ]] || die "'${cmd[*]}' failed"
    sleep "${RAY_JOIN_RETRY_S:-5}"
done

stop() {
    "$ray" stop --force >/dev/null 2>&1 || true
    exit 0
}
trap stop TERM INT USR1
while true; do  # `ray start` daemonizes: hold the srun task (and this node's Ray) until told to stop
    sleep 5 &
    wait $! || true
done
