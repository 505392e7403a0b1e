#!/usr/bin/env bash
# What tests/test_slurm_real.py needs on this machine: Debian's Slurm (slurm-wlm: slurmctld, slurmd, sbatch, srun,
# scontrol) and munge. A quick no-op when they are installed; without root or apt-get it only says so (the tests
# then skip, naming what is missing). Used by `make slurm-packages`, which .ci/run calls.
set -euo pipefail
PATH=$PATH:/usr/sbin:/sbin

installed() {
    local binary
    for binary in munged slurmctld slurmd sbatch srun scontrol squeue scancel sinfo; do
        command -v "$binary" >/dev/null 2>&1 || return 1
    done
}

if installed; then
    echo "slurm-packages: $(slurmctld -V) and munge are installed"
    exit 0
fi
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "slurm-packages: not root or no apt-get: slurm-wlm and munge not installed; the real-Slurm tests will skip"
    exit 0
fi
echo "slurm-packages: apt-get install slurm-wlm munge"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
installed || {
    echo "slurm-packages: error: slurm-wlm and munge installed, yet a Slurm or munge command is still missing" >&2
    exit 1
}
echo "slurm-packages: $(slurmctld -V) and munge installed"
