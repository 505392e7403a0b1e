#!/usr/bin/env bash
# A throw-away Slurm cluster on this host: its own munged, slurmctld and slurmd(s), everything under one directory.
#
#   tools/slurm/cluster.sh up DIR [NODE...]   write DIR/slurm.conf, start the daemons, wait until every node is
#                                             idle, print SLURM_CONF=DIR/slurm.conf (export it for sbatch, squeue...)
#   tools/slurm/cluster.sh down DIR           cancel this cluster's jobs, stop its daemons (by their pid files)
#
# One node by default, named after this host. Several names run one slurmd each (`slurmd -N NAME`, own port,
# NodeAddr=127.0.0.1): Debian's Slurm 22.05 can run them side by side on one host.
# Environment: SLURMCTLD_PORT (default 16817), SLURMD_PORT (the first node's, default 16818; +1 per node) or
# SLURMD_PORTS (one per node, separated by spaces),
# NODE_CPUS (default: this host's), NODE_MEMORY_MB (default 4096), UP_TIMEOUT_S (default 60), CRED_EXPIRE_S
# (default 10; Slurm also holds a requeued job that long before it may start again: 120 s by default).
# Needs root (SlurmUser=root) and the packages slurm-wlm and munge. Writes nothing outside DIR: the munge key
# and socket are DIR's own (AuthInfo=socket=...), the system's munged and /etc/slurm are not used.
set -euo pipefail

die() {
    echo "cluster.sh: error: $*" >&2
    exit 2
}

[[ $# -ge 2 && ($1 == up || $1 == down) ]] || {
    sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}
action=$1 dir=$2
shift 2
PATH=$PATH:/usr/sbin:/sbin
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
conf=$dir/slurm.conf
export SLURM_CONF=$conf

pid_of() {  # the pid in a pid file, if that process is alive
    local pid
    [[ -s $1 ]] || return 1
    pid=$(<"$1")
    kill -0 "$pid" 2>/dev/null && echo "$pid"
}

stop_pid_file() {
    local pid i
    pid=$(pid_of "$1") || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    echo "cluster.sh: $1 (pid $pid) ignored SIGTERM for 10 s: SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null || true
}

down() {
    local i pid_file
    if [[ -f $conf ]] && pid_of "$dir/slurmctld.pid" >/dev/null; then
        # This cluster's jobs (SLURM_CONF): their slurmstepd processes would outlive slurmd.
        scancel --quiet "--user=$(id -un)" 2>/dev/null || true
        for ((i = 0; i < 600; i++)); do
            [[ -z $(squeue -h -t PD,R,CG,S,RQ,RS,RH -o %i 2>/dev/null) ]] && break
            sleep 0.1
        done
    fi
    for pid_file in "$dir"/slurmd-*.pid "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
        [[ -e $pid_file ]] && stop_pid_file "$pid_file"
    done
    return 0
}

show_logs() {
    local log
    for log in "$dir"/log/*.log "$dir/munge/munged.log"; do
        [[ -f $log ]] || continue
        echo "--- $log" >&2
        tail -n 15 "$log" >&2
    done
}

if [[ $action == down ]]; then
    down
    exit 0
fi

# ----- up -----------------------------------------------------------------------------------------------------
for binary in munged slurmctld slurmd sbatch sinfo scontrol; do
    command -v "$binary" >/dev/null 2>&1 ||
        die "$binary not found: install slurm-wlm and munge (Debian: apt-get install -y slurm-wlm munge)"
done
[[ $(id -u) -eq 0 ]] || die "needs root (the daemons run as SlurmUser=root)"
host=$(hostname -s)
nodes=("$@")
[[ ${#nodes[@]} -gt 0 ]] || nodes=("$host")
ctld_port=${SLURMCTLD_PORT:-16817}
node_port=${SLURMD_PORT:-16818}
read -r -a node_ports <<<"${SLURMD_PORTS:-}"
for ((i = ${#node_ports[@]}; i < ${#nodes[@]}; i++)); do node_ports[i]=$((node_port + i)); done
node_port=${node_ports[0]}
cpus=${NODE_CPUS:-$(nproc)}
memory=${NODE_MEMORY_MB:-4096}
cred_expire=${CRED_EXPIRE_S:-10}
chmod 700 "$dir"
mkdir -p "$dir/munge" "$dir/state" "$dir/log"
chmod 700 "$dir/munge"
trap 'echo "cluster.sh: the cluster did not come up; stopping what started" >&2; show_logs; down' ERR

# munge: a key and a socket of this cluster's own
if [[ ! -s $dir/munge/munge.key ]]; then
    head -c 1024 /dev/urandom >"$dir/munge/munge.key"
    chmod 400 "$dir/munge/munge.key"
fi
socket=$dir/munge/munge.socket
pid_of "$dir/munge/munged.pid" >/dev/null ||
    munged --force --socket="$socket" --key-file="$dir/munge/munge.key" --pid-file="$dir/munge/munged.pid" \
        --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed"

single=0
[[ ${#nodes[@]} -eq 1 && ${nodes[0]} == "$host" ]] && single=1
{
    echo "# written by tools/slurm/cluster.sh"
    echo "ClusterName=spintest"
    echo "SlurmctldHost=$host"
    echo "SlurmctldPort=$ctld_port"
    echo "SlurmdPort=$node_port"
    echo "SlurmUser=root"
    echo "SlurmdUser=root"
    echo "AuthType=auth/munge"
    echo "CredType=cred/munge"
    echo "AuthInfo=socket=$socket,cred_expire=$cred_expire"
    echo "StateSaveLocation=$dir/state"
    echo "SlurmdSpoolDir=$dir/spool-%n"
    echo "SlurmctldPidFile=$dir/slurmctld.pid"
    echo "SlurmdPidFile=$dir/slurmd-%n.pid"
    echo "SlurmctldLogFile=$dir/log/slurmctld.log"
    echo "SlurmdLogFile=$dir/log/slurmd-%n.log"
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_Core"
    echo "SchedulerType=sched/backfill"
    echo "SchedulerParameters=bf_interval=1,sched_interval=2"  # a requeued job starts soon after it is eligible
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "AccountingStorageType=accounting_storage/none"
    echo "JobCompType=jobcomp/none"
    echo "MpiDefault=none"
    echo "ReturnToService=2"
    echo "MinJobAge=3600"  # finished jobs stay visible to `scontrol show job`
    echo "KillWait=30"
    echo "InactiveLimit=0"
    for i in "${!nodes[@]}"; do
        if [[ $single -eq 1 ]]; then
            echo "NodeName=${nodes[i]} CPUs=$cpus RealMemory=$memory State=UNKNOWN"
        else
            echo "NodeName=${nodes[i]} NodeHostname=$host NodeAddr=127.0.0.1 Port=${node_ports[i]} CPUs=$cpus RealMemory=$memory State=UNKNOWN"
        fi
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
} >"$conf"

pid_of "$dir/slurmctld.pid" >/dev/null || slurmctld -f "$conf"
for node in "${nodes[@]}"; do
    mkdir -p "$dir/spool-$node"
    name_args=()
    [[ $single -eq 1 ]] || name_args=(-N "$node")
    pid_of "$dir/slurmd-$node.pid" >/dev/null || slurmd -f "$conf" "${name_args[@]}"
done

deadline=$((SECONDS + ${UP_TIMEOUT_S:-60}))
while :; do
    states=$(sinfo -h -N -o '%N %T' 2>/dev/null || true)
    [[ $(grep -c ' idle$' <<<"$states" || true) -eq ${#nodes[@]} ]] && break
    for pid_file in "$dir/slurmctld.pid" "${nodes[@]/#/$dir/slurmd-}"; do
        pid_file=${pid_file%.pid}.pid
        [[ -s $pid_file ]] || [[ $SECONDS -lt $((deadline - ${UP_TIMEOUT_S:-60} + 5)) ]] || {
            echo "cluster.sh: no $pid_file: the daemon exited" >&2
            false
        }
        [[ ! -s $pid_file ]] || pid_of "$pid_file" >/dev/null || {
            echo "cluster.sh: the daemon of $pid_file exited" >&2
            false
        }
    done
    [[ $SECONDS -lt $deadline ]] || {
        echo "cluster.sh: nodes not idle after ${UP_TIMEOUT_S:-60} s: ${states:-sinfo answered nothing}" >&2
        false
    }
    sleep 0.5
done
trap - ERR
echo "SLURM_CONF=$conf"
