#!/usr/bin/env bash
# A throw-away Slurm cluster on this machine, for the tests (Debian 12, root): one slurmctld and
# NNODES slurmd "nodes" (node1, node2, ...), each slurmd in its own network namespace with its own
# address, hostname and /etc/hosts, so jobs see a real multi-host network.
#
#   local_slurm.sh up BASE [NNODES [MODE]]   start it; state, logs and config live under BASE
#                                     MODE netns (default) or multi (see below)
#   local_slurm.sh down BASE          cancel its jobs, stop its daemons, delete its namespaces
# After `up`:  export SLURM_CONF=BASE/etc/slurm.conf   (also written to BASE/env)
#
# Everything is private to BASE so that several runs can share one machine: our own munged on
# its own socket and key, free TCP ports, uniquely named namespaces and an unused subnet. Where
# network namespaces are unavailable, all slurmd share 127.0.0.1 on distinct ports ("multi"
# mode; Debian's Slurm is built with --enable-multiple-slurmd). Only processes this script
# started (their pid files under BASE) are ever signalled.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
log() { echo "[local_slurm] $*" >&2; }
run() { echo "+ $*" >&2; "$@"; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null && return 0
  command -v apt-get >/dev/null || { log "Slurm is not installed and there is no apt-get"; return 1; }
  export DEBIAN_FRONTEND=noninteractive
  run apt-get update -qq
  run apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge iproute2 util-linux
}

start_munge() {  # our own munged: key and socket under BASE/munge, which must be world-traversable
  local dir=$BASE/munge
  mkdir -p "$dir"
  dd if=/dev/urandom of="$dir/munge.key" bs=1024 count=1 status=none
  chown -R munge:munge "$dir"
  chmod 0755 "$dir"
  chmod 0400 "$dir/munge.key"
  run runuser -u munge -- munged --socket="$dir/munge.sock" --key-file="$dir/munge.key" \
    --pid-file="$dir/munged.pid" --seed-file="$dir/munged.seed" --log-file="$dir/munged.log"
  for _ in $(seq 50); do
    munge -n -S "$dir/munge.sock" | unmunge -S "$dir/munge.sock" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  log "munged did not come up:"; cat "$dir/munged.log" >&2; return 1
}

write_conf() {  # $1 = controller address; NodeName lines on stdin
  cat > "$BASE/etc/slurm.conf" <<EOF
ClusterName=allora$$
SlurmctldHost=$(hostname -s)($1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$BASE/munge/munge.sock
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
KillWait=10
MinJobAge=900
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/%n
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
EOF
  cat >> "$BASE/etc/slurm.conf"
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >> "$BASE/etc/slurm.conf"
}

# Start slurmd for node$1, optionally inside a network namespace ($2). Its own UTS and mount
# namespaces make `hostname` the node name and let a private /etc/hosts resolve node names, as on
# a real cluster (gloo and MASTER_ADDR rely on that). nsenter rather than `ip netns exec`, which
# remounts /sys and breaks slurmd's cgroup probing.
start_slurmd() {
  local node=node$1 netns=${2:-} prefix=()
  [[ -n "$netns" ]] && prefix=(nsenter "--net=/run/netns/$netns" --)
  mkdir -p "$BASE/spool/$node"
  run "${prefix[@]}" unshare --uts --mount -- sh -c \
    'hostname "$1" && mount --bind "$2" /etc/hosts && exec slurmd -f "$3" -N "$1"' \
    sh "$node" "$BASE/etc/hosts" "$BASE/etc/slurm.conf"
}

wait_idle() {
  for _ in $(seq 200); do
    [[ "$(sinfo -h -o '%T %D' 2>/dev/null)" == "idle $1" ]] && return 0
    sleep 0.25
  done
  log "nodes did not become idle:"; sinfo -N >&2 || true; tail -n 30 "$BASE"/log/*.log >&2 || true
  return 1
}

up() {
  local n=${1:-2} mode=${2:-netns} prefix subnet i
  [[ $EUID -eq 0 ]] || { log "needs root"; return 1; }
  install_packages
  mkdir -p "$BASE"/{etc,state,run,log}
  chmod 0755 "$BASE"
  export SLURM_CONF=$BASE/etc/slurm.conf
  echo "$n" > "$BASE/nnodes"
  start_munge
  prefix="sl$(( $$ % 100000 ))"
  if [[ $mode == multi ]]; then
    log "multi-slurmd mode requested: all nodes share 127.0.0.1"
  elif subnet=$(bash "$HERE/netns.sh" free-subnet) && bash "$HERE/netns.sh" up "$prefix" "$subnet" "$n"; then
    echo "$prefix" > "$BASE/netns_prefix"
  else
    log "network namespaces unavailable: all nodes share 127.0.0.1 (multi-slurmd mode)"
    bash "$HERE/netns.sh" down "$prefix" "$n" || true
    mode=multi
  fi
  echo "$mode" > "$BASE/mode"
  echo "127.0.0.1 localhost" > "$BASE/etc/hosts"
  if [[ $mode == netns ]]; then
    echo "$subnet.1 $(hostname -s)" >> "$BASE/etc/hosts"
    for i in $(seq "$n"); do echo "$subnet.$((10 + i)) node$i" >> "$BASE/etc/hosts"; done
    for i in $(seq "$n"); do
      echo "NodeName=node$i NodeAddr=$subnet.$((10 + i)) CPUs=$(nproc) RealMemory=1000 State=UNKNOWN"
    done | write_conf "$subnet.1"
  else
    echo "127.0.0.1 $(hostname -s) $(seq -f 'node%g' -s ' ' "$n")" >> "$BASE/etc/hosts"
    for i in $(seq "$n"); do
      echo "NodeName=node$i NodeHostname=$(hostname -s) NodeAddr=127.0.0.1 Port=$(free_port) CPUs=$(nproc) RealMemory=1000 State=UNKNOWN"
    done | write_conf 127.0.0.1
  fi
  run slurmctld -i -f "$SLURM_CONF"
  for i in $(seq "$n"); do
    if [[ $mode == netns ]]; then start_slurmd "$i" "${prefix}n$i"; else start_slurmd "$i"; fi
  done
  wait_idle "$n"
  echo "SLURM_CONF=$SLURM_CONF" > "$BASE/env"
  log "cluster up ($mode, $n nodes):"; sinfo -N >&2
  echo "export SLURM_CONF=$SLURM_CONF"
}

stop_pidfiles() {  # SIGTERM the daemons named by pid files we wrote; wait (together) up to 10 s
  local f pid pids=()
  for f in "$@"; do
    [[ -s "$f" ]] || continue
    pid=$(cat "$f")
    if kill "$pid" 2>/dev/null; then pids+=("$pid"); fi
  done
  for _ in $(seq 100); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [[ $alive -eq 1 ]] || return 0
    sleep 0.1
  done
  for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then log "pid $pid still alive after 10 s; SIGKILL"; kill -9 "$pid" || true; fi
  done
}

down() {
  local n i
  export SLURM_CONF=$BASE/etc/slurm.conf
  n=$(cat "$BASE/nnodes" 2>/dev/null || echo 2)
  # Cancel leftover jobs first so that slurmd ends their processes; then stop the daemons.
  if [[ -s "$BASE/run/slurmctld.pid" ]] && kill -0 "$(cat "$BASE/run/slurmctld.pid")" 2>/dev/null; then
    if [[ -n "$(squeue -h -o %i 2>/dev/null)" ]]; then
      scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
      for _ in $(seq 60); do [[ -z "$(squeue -h -o %i 2>/dev/null)" ]] && break; sleep 0.5; done
    fi
  fi
  local daemons=("$BASE/run/slurmctld.pid")
  for i in $(seq "$n"); do daemons+=("$BASE/run/slurmd-node$i.pid"); done
  stop_pidfiles "${daemons[@]}"
  stop_pidfiles "$BASE/munge/munged.pid"  # last: the Slurm daemons authenticate through it
  if [[ -s "$BASE/netns_prefix" ]]; then bash "$HERE/netns.sh" down "$(cat "$BASE/netns_prefix")" "$n"; fi
  log "cluster down"
}

usage() { echo "usage: $0 up BASE [NNODES [netns|multi]] | down BASE" >&2; exit 2; }
[[ $# -ge 2 ]] || usage
BASE=$(realpath -m "$2")
case $1 in
  up) up "${3:-2}" "${4:-netns}" ;;
  down) down ;;
  *) usage ;;
esac
