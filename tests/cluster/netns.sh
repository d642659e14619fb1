#!/usr/bin/env bash
# Give N fake "nodes" their own network stack on this machine (root only): a bridge with the host
# at SUBNET.1 and one network namespace per node at SUBNET.11, SUBNET.12, ... (interface eth0).
#
#   netns.sh free-subnet          print a 10.77.X prefix no interface on this machine uses
#   netns.sh up PREFIX SUBNET N   create bridge PREFIXb and namespaces PREFIXn1..PREFIXnN
#   netns.sh down PREFIX N        delete them again (idempotent)
#
# Names carry a caller-chosen PREFIX (keep it <= 10 characters: Linux interface names are limited
# to 15) so that several test runs on one shared machine never touch each other's namespaces.
set -euo pipefail

run() { echo "+ $*" >&2; "$@"; }

free_subnet() {
  local used x
  used=$(ip -4 -o addr show | awk '{print $4}')
  # Start from a per-process offset so concurrent callers rarely race for the same prefix.
  for k in $(seq 0 199); do
    x=$(( ($$ + k) % 200 + 20 ))
    if ! grep -q "^10\.77\.$x\." <<<"$used"; then echo "10.77.$x"; return 0; fi
  done
  echo "netns.sh: no free 10.77.X.0/24 subnet" >&2
  return 1
}

up() {
  local prefix=$1 subnet=$2 n=$3 i
  run ip link add "${prefix}b" type bridge
  run ip addr add "$subnet.1/24" dev "${prefix}b"
  run ip link set "${prefix}b" up
  for i in $(seq "$n"); do
    run ip netns add "${prefix}n$i"
    run ip link add "${prefix}v$i" type veth peer name eth0 netns "${prefix}n$i"
    run ip link set "${prefix}v$i" master "${prefix}b" up
    run ip -n "${prefix}n$i" addr add "$subnet.$((10 + i))/24" dev eth0
    run ip -n "${prefix}n$i" link set eth0 up
    run ip -n "${prefix}n$i" link set lo up
  done
  # With br_netfilter loaded, bridged frames traverse iptables' FORWARD chain; a DROP policy
  # there (Docker hosts) would silently eat the traffic between our nodes.
  if command -v iptables >/dev/null && [[ -e /proc/sys/net/bridge/bridge-nf-call-iptables ]]; then
    run iptables -I FORWARD -i "${prefix}b" -o "${prefix}b" -j ACCEPT || true
  fi
}

down() {
  local prefix=$1 n=$2 i
  for i in $(seq "$n"); do
    # Deleting the host end removes the pair now (a namespace's deletion frees it only lazily).
    if ip link show "${prefix}v$i" >/dev/null 2>&1; then run ip link del "${prefix}v$i" || true; fi
    if [[ -e "/run/netns/${prefix}n$i" ]]; then run ip netns del "${prefix}n$i" || true; fi
  done
  if ip link show "${prefix}b" >/dev/null 2>&1; then run ip link del "${prefix}b" || true; fi
  if command -v iptables >/dev/null; then
    iptables -D FORWARD -i "${prefix}b" -o "${prefix}b" -j ACCEPT 2>/dev/null || true
  fi
}

case ${1:-} in
  free-subnet) free_subnet ;;
  up) [[ $# -eq 4 ]] || { echo "usage: $0 up PREFIX SUBNET N" >&2; exit 2; }; up "$2" "$3" "$4" ;;
  down) [[ $# -eq 3 ]] || { echo "usage: $0 down PREFIX N" >&2; exit 2; }; down "$2" "$3" ;;
  *) echo "usage: $0 free-subnet | up PREFIX SUBNET N | down PREFIX N" >&2; exit 2 ;;
esac
