#!/usr/bin/env bash
# A one-node SLURM on this machine, for scripts/test-slurm.sh and for trying
# deploy/slurm/lightrnn.sbatch by hand: `scripts/slurm-local.sh start DIR` writes DIR/slurm.conf
# (this host as the only node, its CPUs counted CPUS times over, select/cons_tres with
# CR_Core_Memory, JobRequeue=1, proctrack/linuxproc, task/none) and starts munged,
# slurmctld and slurmd directly (no systemd); `export SLURM_CONF=DIR/slurm.conf` then points
# sbatch, squeue and scontrol at it. `scripts/slurm-local.sh stop DIR` stops the daemons.
# Needs root and Debian's slurm-wlm and munge (installed here when missing and apt works).
set -euo pipefail
cmd=${1:?usage: slurm-local.sh start|stop DIR}
dir=$(mkdir -p "${2:?usage: slurm-local.sh start|stop DIR}" && cd "$2" && pwd)
KILL_WAIT=${KILL_WAIT:-30}

stop() {
  for d in slurmd slurmctld; do
    [[ -f $dir/$d.pid ]] && kill "$(cat "$dir/$d.pid")" 2>/dev/null || true
  done
  for _ in $(seq 50); do
    pgrep -f "slurm(ctld|d) .*-f $dir/slurm.conf" >/dev/null || break
    sleep 0.2
  done
  pkill -9 -f "slurm(ctld|d) .*-f $dir/slurm.conf" 2>/dev/null || true
}

if [[ $cmd == stop ]]; then
  stop
  exit 0
fi
[[ $cmd == start ]] || { echo "usage: slurm-local.sh start|stop DIR" >&2; exit 2; }

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge
fi

# munge: the key Debian's package made, the daemon as its own user.
if ! pgrep -x munged >/dev/null; then
  [[ -s /etc/munge/munge.key ]] || { mungekey --create 2>/dev/null || create-munge-key -f; }
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge/munge.key
  chmod 700 /etc/munge
  chmod 400 /etc/munge/munge.key
  runuser -u munge -- munged
fi

host=$(hostname -s)
cpus=$(( $(nproc) * ${CPUS:-4} ))
mem=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) * 3 / 4 ))
mkdir -p "$dir/state" "$dir/spool"
cat > "$dir/slurm.conf" <<CONF
ClusterName=lightrnn-test
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
JobRequeue=1
# A requeued job waits cred_expire seconds (120 by default, 5 at least) before it may
# start again.
AuthInfo=cred_expire=${CRED_EXPIRE:-5}
KillWait=$KILL_WAIT
MinJobAge=600
ReturnToService=2
SchedulerType=sched/backfill
# Pending jobs (a requeued one, once its begin time passes) are looked at every 2 s.
SchedulerParameters=sched_interval=2,bf_interval=2
MpiDefault=none
MailProg=/bin/true
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
stop
slurmctld -i -f "$dir/slurm.conf"
slurmd -f "$dir/slurm.conf"
export SLURM_CONF=$dir/slurm.conf
for _ in $(seq 100); do
  state=$(sinfo -h -o %T 2>/dev/null || true)
  [[ $state == idle* ]] && { echo "SLURM $(slurmctld -V | cut -d' ' -f2): node $host, $cpus CPUs, $mem MiB, KillWait $KILL_WAIT s ($dir/slurm.conf)"; exit 0; }
  sleep 0.2
done
echo "error: the SLURM node did not come up (state: ${state:-none}); see $dir/slurmctld.log and $dir/slurmd.log" >&2
exit 1
