#!/usr/bin/env bash
# A real SLURM cluster (munge + slurmctld + slurmd) on this machine, for tests and demos.
#   slurm/local_cluster.sh start              # one node (this host) in partition debug
#   slurm/local_cluster.sh start --nodes 2    # and partition multi: nodes sslnode1, sslnode2, each a separate
#                                             # host (network namespace, address, hostname: netns_nodes.sh)
#   slurm/local_cluster.sh stop     # stops the daemons, the munged it started, and removes the namespaces
#   slurm/local_cluster.sh status
# start is idempotent: it configures and starts what is not running and waits for the nodes. Needs root and
# the Debian packages slurm-wlm and munge (.ci/run installs them). State, logs and spool live under
# $SSL_SLURM_DIR (default /tmp/ssl-lightning-slurm); the config is /etc/slurm/slurm.conf.
set -euo pipefail
DIR=${SSL_SLURM_DIR:-/tmp/ssl-lightning-slurm}
CONF=/etc/slurm/slurm.conf
HOST=$(hostname)
HERE=$(cd "$(dirname "$0")" && pwd)
NODES=1

die() { echo "local_cluster: $*" >&2; exit 1; }

# Writes the config; prints "changed" when it differs from the one in place (the daemons must restart).
write_config() {
  local mem cpus ctld_host prefix i multi_nodes=""
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))  # MiB, leave 20% to the OS
  mkdir -p "$DIR/state" "$DIR/spool" /etc/slurm
  ctld_host=$HOST
  if [ "$NODES" -gt 1 ]; then
    prefix=$("$HERE/netns_nodes.sh" prefix)
    ctld_host="$HOST($prefix.1)"  # the bridge's address: reachable from every node's namespace
    for i in $(seq "$NODES"); do
      multi_nodes+="NodeName=sslnode$i NodeAddr=$("$HERE/netns_nodes.sh" addr "$i") CPUs=$cpus RealMemory=$mem State=UNKNOWN
"
    done
    multi_nodes+="PartitionName=multi Nodes=sslnode[1-$NODES] MaxTime=INFINITE State=UP OverSubscribe=NO"
  fi
  cat > "$CONF.tmp" <<CONF
# written by slurm/local_cluster.sh (--nodes $NODES)
ClusterName=ssl-lightning
SlurmctldHost=$ctld_host
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd-%n.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=300
NodeName=$HOST CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
$multi_nodes
CONF
  if cmp -s "$CONF.tmp" "$CONF"; then rm "$CONF.tmp"; else mv "$CONF.tmp" "$CONF"; echo changed; fi
}

# Waits until node $1 is idle (resuming it from down/drain); dies after 60 s.
wait_idle() {
  local state
  for _ in $(seq 60); do
    state=$(sinfo -h -n "$1" -o %t 2>/dev/null || true)
    case "$state" in
      idle*|mix*|alloc*) return 0 ;;
      down*|drain*) scontrol update NodeName="$1" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 1
  done
  die "node $1 did not become idle in 60 s; see $DIR/slurmctld.log and $DIR/slurmd-$1.log"
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
  if [ "$NODES" -gt 1 ]; then "$HERE/netns_nodes.sh" up "$NODES"; fi
  if [ -n "$(write_config)" ]; then stop_daemons; fi  # a new node list: slurmctld and every slurmd restart
  pgrep -x slurmctld >/dev/null || slurmctld
  mkdir -p "$DIR/spool/$HOST"
  slurmd_running "$HOST" || slurmd
  local i
  for i in $(seq 1 $((NODES > 1 ? NODES : 0))); do
    mkdir -p "$DIR/spool/sslnode$i"
    slurmd_running "sslnode$i" || "$HERE/netns_nodes.sh" run "sslnode$i" slurmd -N "sslnode$i"
  done
  wait_idle "$HOST"
  echo "local_cluster: node $HOST is idle (partition debug, $(nproc) CPUs)"
  if [ "$NODES" -gt 1 ]; then
    for i in $(seq "$NODES"); do wait_idle "sslnode$i"; done
    echo "local_cluster: nodes sslnode[1-$NODES] are idle (partition multi, separate network namespaces)"
  fi
}

# slurmd of node $1 is running (its pid file names a live slurmd)
slurmd_running() {
  local pid
  pid=$(cat "$DIR/slurmd-$1.pid" 2>/dev/null) || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = slurmd ]
}

# Waits up to $1 seconds until no process named $2, $3 ... is left; status 1 if some are.
gone_within() {
  local seconds=$1 name; shift
  for _ in $(seq $((seconds * 2))); do
    for name in "$@"; do pgrep -x "$name" >/dev/null && break; name=""; done
    [ -z "$name" ] && return 0
    sleep 0.5
  done
  return 1
}

stop_daemons() {
  pkill -x slurmd || true
  pkill -x slurmctld || true
  gone_within 10 slurmd slurmctld && return 0
  # a slurmd still registering with a controller that is gone does not act on SIGTERM
  pkill -9 -x slurmd || true
  pkill -9 -x slurmctld || true
  gone_within 10 slurmd slurmctld || die "slurmd/slurmctld still running after SIGKILL"
}

stop() {
  stop_daemons
  "$HERE/netns_nodes.sh" down
  if [ -f "$DIR/munged.started" ]; then
    pkill -x munged || true
    gone_within 10 munged || die "munged still running 10 s after SIGTERM"
    rm -f "$DIR/munged.started"
  fi
  echo "local_cluster: stopped"
}

COMMAND=${1:-}
[ "${2:-}" = --nodes ] && NODES=${3:?--nodes needs a number}
[[ $NODES =~ ^[1-9]$ ]] || die "--nodes $NODES must be 1-9"
case "$COMMAND" in
  start) start ;;
  stop) stop ;;
  status) sinfo 2>/dev/null || { echo "local_cluster: not running"; exit 1; } ;;
  *) die "usage: $0 start [--nodes N]|stop|status" ;;
esac
