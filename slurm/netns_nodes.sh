#!/usr/bin/env bash
# Separate hosts on one machine for the local SLURM cluster: each node is a network namespace with its own
# address, its own hostname (a UTS namespace, entered by the daemon started in it) and an /etc/hosts entry.
#   slurm/netns_nodes.sh up N      # bridge sslbr0 (10.213.77.1/24) + namespaces sslnode1..N (10.213.77.11..)
#   slurm/netns_nodes.sh down      # removes every namespace, link and /etc/hosts line this script created
#   slurm/netns_nodes.sh run NODE CMD...   # runs CMD in NODE's network namespace under NODE's hostname
# Only these addresses are used; the script refuses to start if the subnet is already routed here.
# The file system is shared (one machine), as a cluster's shared file system would be.
set -euo pipefail
BRIDGE=sslbr0
PREFIX=10.213.77
HOSTS_TAG="# ssl-lightning local cluster node"

die() { echo "netns_nodes: $*" >&2; exit 1; }
node_addr() { echo "$PREFIX.$((10 + $1))"; }

up() {
  local n=$1 i
  [[ $n =~ ^[1-9]$ ]] || die "number of nodes $n must be 1-9"
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip route | grep -q "^$PREFIX\." && die "$PREFIX.0/24 is already routed on this machine; edit PREFIX in $0"
    ip link add "$BRIDGE" type bridge
    ip addr add "$PREFIX.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
  fi
  for i in $(seq "$n"); do
    ip netns list | grep -qw "sslnode$i" && continue
    ip netns add "sslnode$i"
    ip link add "sslv$i" type veth peer name eth0 netns "sslnode$i"
    ip link set "sslv$i" master "$BRIDGE" up
    ip -n "sslnode$i" addr add "$(node_addr "$i")/24" dev eth0
    ip -n "sslnode$i" link set eth0 up
    ip -n "sslnode$i" link set lo up
    grep -q " sslnode$i $HOSTS_TAG" /etc/hosts || echo "$(node_addr "$i") sslnode$i $HOSTS_TAG" >> /etc/hosts
  done
}

down() {
  local ns
  for ns in $(ip netns list | awk '/^sslnode[0-9]/ {print $1}'); do
    ip netns pids "$ns" | xargs -r kill -9 2>/dev/null || true
    ip netns del "$ns"
    ip link del "sslv${ns#sslnode}" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  if grep -q "$HOSTS_TAG" /etc/hosts; then  # /etc/hosts may be a bind mount: rewrite it in place
    grep -v "$HOSTS_TAG" /etc/hosts > /etc/hosts.ssl-tmp; cat /etc/hosts.ssl-tmp > /etc/hosts; rm -f /etc/hosts.ssl-tmp
  fi
}

run() {
  local node=$1; shift
  # nsenter, not `ip netns exec`: the latter remounts /sys, hiding the cgroup file system slurmd needs
  exec nsenter --net="/run/netns/$node" unshare --uts sh -c 'hostname "$0" && exec "$@"' "$node" "$@"
}

case "${1:-}" in
  up) up "${2:-2}" ;;
  down) down ;;
  run) shift; run "$@" ;;
  addr) node_addr "${2:?node number}" ;;
  prefix) echo "$PREFIX" ;;
  *) die "usage: $0 up N | down | run NODE CMD... | addr I | prefix" ;;
esac
