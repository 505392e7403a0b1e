#!/usr/bin/env bash
# Launch spin-train with torchrun on this node: `tools/launch/torchrun.sh [--dry-run] [hydra overrides...]`.
#
#   single node (default): torchrun --standalone --nproc_per_node $NPROC_PER_NODE
#   multi-node (NNODES>1): c10d rendezvous at $MASTER_ADDR:$MASTER_PORT with id $RDZV_ID; run the same command
#                          on every node (node $NODE_RANK=0 hosts the rendezvous store)
#
# Environment:
#   NPROC_PER_NODE  processes on this node (default: the GPUs in CUDA_VISIBLE_DEVICES / nvidia-smi -L; 2 on CPU)
#   NNODES          nodes in the run (default 1)
#   MASTER_ADDR     rendezvous host (a host name or address of node 0; required when NNODES>1)
#   MASTER_PORT     rendezvous port (default 29500)
#   RDZV_ID         rendezvous id, the same on every node (default $SLURM_JOB_ID, else "spin")
#   NODE_RANK       this node's index 0..NNODES-1 (default $SLURM_NODEID); node 0 hosts the store
#   RDZV_JOIN_TIMEOUT  seconds the nodes wait for each other at the rendezvous (torch's default: 600)
#   PYTHON          interpreter (default: python, else python3)
#   DRY_RUN=1       print the command instead of running it (same as --dry-run)
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT  seconds torchrun waits for its workers after a signal before SIGKILL
#                   (default here 270; torch's own default, 30, is too short to finish a step and checkpoint)
#
# Every argument after the options reaches `python -m spin_megatron.train` unchanged (spaces, brackets, quotes).
set -euo pipefail

die() {
    echo "torchrun.sh: error: $*" >&2
    exit 2
}

dry_run=${DRY_RUN:-0}
while [[ $# -gt 0 ]]; do
    case $1 in
        --dry-run) dry_run=1; shift ;;
        -h | --help) sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) break ;;  # the first Hydra override: everything from here on is passed through
    esac
done

count_gpus() {
    if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then  # set, even empty: it is what CUDA will see
        local ids=()
        [[ $CUDA_VISIBLE_DEVICES == -1 || $CUDA_VISIBLE_DEVICES == NoDevFiles ]] ||
            IFS=, read -r -a ids <<<"$CUDA_VISIBLE_DEVICES"
        echo "${#ids[@]}"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        { nvidia-smi -L 2>/dev/null || true; } | grep -c '^GPU' || true
    else
        echo 0
    fi
}

is_positive_int() {
    [[ $1 =~ ^[1-9][0-9]*$ ]]
}

nproc=${NPROC_PER_NODE:-}
if [[ -z $nproc ]]; then
    nproc=$(count_gpus)
    [[ $nproc -gt 0 ]] || nproc=2  # CPU: two gloo ranks (enough for TP=2 / PP=2 / DP=2)
fi
nnodes=${NNODES:-1}
is_positive_int "$nproc" || die "NPROC_PER_NODE must be a positive integer, got '$nproc'"
is_positive_int "$nnodes" || die "NNODES must be a positive integer, got '$nnodes'"

python=${PYTHON:-}
if [[ -z $python ]]; then
    python=python
    command -v python >/dev/null 2>&1 || python=python3
fi

cmd=("$python" -m torch.distributed.run)
if [[ $nnodes -eq 1 ]]; then
    cmd+=(--standalone --nnodes 1 --nproc_per_node "$nproc")
else
    [[ -n ${MASTER_ADDR:-} ]] || die "NNODES=$nnodes needs MASTER_ADDR (host name or address of node 0)"
    port=${MASTER_PORT:-29500}
    is_positive_int "$port" || die "MASTER_PORT must be a port number, got '$port'"
    cmd+=(--nnodes "$nnodes" --nproc_per_node "$nproc")
    cmd+=(--rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$port" --rdzv_id "${RDZV_ID:-${SLURM_JOB_ID:-spin}}")
    node_rank=${NODE_RANK:-${SLURM_NODEID:-}}
    rdzv_conf=()
    if [[ -n $node_rank ]]; then
        [[ $node_rank =~ ^[0-9]+$ && $node_rank -lt $nnodes ]] ||
            die "NODE_RANK must be in 0..$((nnodes - 1)), got '$node_rank'"
        # Who hosts the c10d store: node 0, said explicitly instead of torch guessing from host names.
        if [[ $node_rank -eq 0 ]]; then rdzv_conf+=(is_host=1); else rdzv_conf+=(is_host=0); fi
    fi
    if [[ -n ${RDZV_JOIN_TIMEOUT:-} ]]; then
        is_positive_int "$RDZV_JOIN_TIMEOUT" || die "RDZV_JOIN_TIMEOUT must be a number of seconds, got '$RDZV_JOIN_TIMEOUT'"
        rdzv_conf+=("join_timeout=$RDZV_JOIN_TIMEOUT")
    fi
    if [[ ${#rdzv_conf[@]} -gt 0 ]]; then
        cmd+=(--rdzv_conf "$(IFS=,; echo "${rdzv_conf[*]}")")
    fi
fi
cmd+=(-m spin_megatron.train "$@")

# A preemption signal (SIGTERM, or SIGUSR1 from a Slurm warning) must reach the trainer, which finishes its step,
# checkpoints and exits 0. torchrun's agent forwards only the signals it handles (SIGUSR1 would otherwise kill
# it, and with it the workers) and SIGKILLs the workers 30 s after a signal unless told otherwise. Older torch
# versions ignore these variables (PET_* is torchrun's --signals_to_handle; TORCHELASTIC_* the older spelling).
signals=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
env_vars=(
    "PET_SIGNALS_TO_HANDLE=$signals"
    "TORCHELASTIC_SIGNALS_TO_HANDLE=$signals"
    "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-270}"
)

quote() {  # shell-quote each argument only where needed, so the printed line can be pasted back
    local out=() arg
    for arg in "$@"; do
        if [[ $arg =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
            out+=("$arg")
        else
            out+=("'${arg//\'/\'\\\'\'}'")
        fi
    done
    echo "${out[*]}"
}

if [[ $dry_run == 1 ]]; then
    quote env "${env_vars[@]}" "${cmd[@]}"
    exit 0
fi
exec env "${env_vars[@]}" "${cmd[@]}"
