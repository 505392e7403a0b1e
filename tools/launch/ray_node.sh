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
# retries while the head starts; every RAY_JOIN_RETRY_S, default 5), RAY (the `ray` command; default ray), DRY_RUN=1 (print, do not start),
# RAY_START_ARGS (more `ray start` options for this node, split at spaces: --temp-dir, --num-cpus, --resources=JSON
# without spaces, ports), RAY_AUTH_MODE (see below).
#
# Token authentication (Ray >= 2.5x): `ray start --head` turns it on by itself when a token exists
# (~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN; any local `ray.init()` writes the file), but a
# joining `ray start --address` and a driver's `ray.init(address=...)` do not, and are then refused
# ("InvalidAuthToken"). With RAY_AUTH_MODE unset, every node therefore makes the head's choice explicit:
# RAY_AUTH_MODE=token when a token is there, so nodes sharing a home directory agree (the trainer does the same).
# Nodes that do not share the head's home need the token (RAY_AUTH_TOKEN) or RAY_AUTH_MODE=disabled everywhere.
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
read -ra extra <<<"${RAY_START_ARGS:-}"
common+=(${extra[@]+"${extra[@]}"}) # (an empty array is "unbound" to `set -u` before bash 4.4)
token_file=${RAY_AUTH_TOKEN_PATH:-${HOME:-/nonexistent}/.ray/auth_token}
if [[ -z ${RAY_AUTH_MODE:-} && (-n ${RAY_AUTH_TOKEN:-} || -s $token_file) ]]; then
    export RAY_AUTH_MODE=token # a token-mode node or driver is accepted by a head without authentication too
fi
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
