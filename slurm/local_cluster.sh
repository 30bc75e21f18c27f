#!/usr/bin/env bash
# A real one-node SLURM cluster (munge + slurmctld + slurmd) on this machine, for tests and demos.
#   slurm/local_cluster.sh start    # idempotent: configures and starts what is not running, waits for the node
#   slurm/local_cluster.sh stop     # stops slurmd, slurmctld and the munged it started
#   slurm/local_cluster.sh status
# Needs root and the Debian packages slurm-wlm and munge (.ci/run installs them). State, logs and
# spool live under $SSL_SLURM_DIR (default /tmp/ssl-lightning-slurm); the config is /etc/slurm/slurm.conf.
set -euo pipefail
DIR=${SSL_SLURM_DIR:-/tmp/ssl-lightning-slurm}
CONF=/etc/slurm/slurm.conf
HOST=$(hostname)

die() { echo "local_cluster: $*" >&2; exit 1; }

write_config() {
  local mem cpus
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))  # MiB, leave 20% to the OS
  mkdir -p "$DIR/state" "$DIR/spool" /etc/slurm
  cat > "$CONF.tmp" <<CONF
# written by slurm/local_cluster.sh
ClusterName=ssl-lightning
SlurmctldHost=$HOST
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=300
NodeName=$HOST CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
  mv "$CONF.tmp" "$CONF"
}

start() {
  [ "$(id -u)" -eq 0 ] || die "needs root (it writes $CONF and starts the daemons)"
  command -v slurmctld >/dev/null && command -v munged >/dev/null \
    || die "missing packages: apt-get install -y slurm-wlm munge"
  mkdir -p "$DIR"
  if ! pgrep -x munged >/dev/null; then
    [ -f /etc/munge/munge.key ] || mungekey -c
    mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
    if id munge >/dev/null 2>&1; then su -s /bin/sh munge -c munged 2>/dev/null || munged --force; else munged --force; fi
    echo started > "$DIR/munged.started"
  fi
  write_config
  pgrep -x slurmctld >/dev/null || slurmctld
  pgrep -x slurmd >/dev/null || slurmd
  for _ in $(seq 60); do
    state=$(sinfo -h -n "$HOST" -o %t 2>/dev/null || true)
    case "$state" in
      idle*|mix*|alloc*) echo "local_cluster: node $HOST is $state (partition debug, $(nproc) CPUs)"; return 0 ;;
      down*|drain*) scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 1
  done
  die "node did not become idle in 60 s; see $DIR/slurmctld.log and $DIR/slurmd.log"
}

stop() {
  pkill -x slurmd || true
  pkill -x slurmctld || true
  if [ -f "$DIR/munged.started" ]; then pkill -x munged || true; rm -f "$DIR/munged.started"; fi
  for _ in $(seq 20); do pgrep -x 'slurmd|slurmctld' >/dev/null || { echo "local_cluster: stopped"; return 0; }; sleep 0.5; done
  die "daemons still running after 10 s"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) sinfo 2>/dev/null || { echo "local_cluster: not running"; exit 1; } ;;
  *) die "usage: $0 start|stop|status" ;;
esac
