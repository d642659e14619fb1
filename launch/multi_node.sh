#!/usr/bin/env bash
# Several machines with the deepspeed launcher. Every node needs the same repository path, the
# same virtualenv path, and a shared filesystem for train.output_dir (checkpoints are written by
# all ranks into one directory).
#
# ssh mode (pdsh): run once, on the first node of the hostfile; deepspeed logs into every host of
# the hostfile with passwordless ssh and starts its ranks there.
#   bash launch/multi_node.sh HOSTFILE CONFIG.yaml [section.key=value ...]
#
# no-ssh mode: run the same command on every node, each with its own NODE_RANK (the node's
# position in the hostfile, from 0); use this where nodes cannot ssh to each other.
#   NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash launch/multi_node.sh HOSTFILE CONFIG.yaml ...   # node 0
#   NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash launch/multi_node.sh HOSTFILE CONFIG.yaml ...   # node 1
#
# Environment:
#   NODE_RANK    selects no-ssh mode: this node's index in the hostfile.
#   MASTER_ADDR  address of the hostfile's first node, reachable from every node
#                (default: the first hostfile entry, which must then resolve).
#   MASTER_PORT  rendezvous port on MASTER_ADDR, the same on every node (default 29500).
# HOSTFILE lines are `hostname slots=GPUS` (see launch/hostfile.example); ranks are numbered in
# hostfile order.
set -euo pipefail

die() { echo "error: $*" >&2; exit 2; }
show_and_run() { printf '+'; printf ' %q' "$@"; printf '\n'; "$@"; }

[[ $# -ge 2 ]] || die "usage: $0 HOSTFILE CONFIG.yaml [section.key=value ...]"
HOSTFILE=$1
CONFIG=$2
shift 2
# deepspeed itself only warns about a missing hostfile and then trains on this node alone.
[[ -f "$HOSTFILE" && -r "$HOSTFILE" ]] || die "hostfile $HOSTFILE is not a readable file"
[[ -r "$CONFIG" ]] || die "config $CONFIG is not a readable file"
command -v deepspeed >/dev/null || die "deepspeed is not on PATH: activate the project's virtualenv (. .venv/bin/activate)"

hosts=()
while read -r host slots rest || [[ -n "${host:-}" ]]; do  # also a last line without newline
  [[ -z "$host" || "$host" == \#* ]] && continue
  [[ "$slots" =~ ^slots=[1-9][0-9]*$ && -z "$rest" ]] \
    || die "$HOSTFILE: expected 'hostname slots=N', got '$host $slots $rest'"
  for h in "${hosts[@]}"; do [[ "$h" != "$host" ]] || die "$HOSTFILE: host $host is listed twice"; done
  hosts+=("$host")
done < "$HOSTFILE"
[[ ${#hosts[@]} -ge 1 ]] || die "$HOSTFILE lists no hosts"

MASTER_PORT=${MASTER_PORT:-29500}
[[ "$MASTER_PORT" =~ ^[0-9]+$ ]] || die "MASTER_PORT must be a port number, got '$MASTER_PORT'"
args=(--hostfile "$HOSTFILE" --master_port "$MASTER_PORT")

if [[ -n "${NODE_RANK:-}" ]]; then
  [[ "$NODE_RANK" =~ ^[0-9]+$ && "$NODE_RANK" -lt ${#hosts[@]} ]] \
    || die "NODE_RANK=$NODE_RANK but $HOSTFILE lists ${#hosts[@]} host(s): use 0..$(( ${#hosts[@]} - 1 ))"
  MASTER_ADDR=${MASTER_ADDR:-${hosts[0]}}
  # Without ssh deepspeed cannot look the address up itself; fail here rather than hang in rendezvous.
  getent ahosts "$MASTER_ADDR" >/dev/null \
    || die "MASTER_ADDR=$MASTER_ADDR does not resolve on $(hostname): set MASTER_ADDR to node 0's IP address"
  echo "node $NODE_RANK of ${#hosts[@]} (${hosts[$NODE_RANK]}), master $MASTER_ADDR:$MASTER_PORT"
  args+=(--no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR")
else
  command -v pdsh >/dev/null \
    || die "pdsh is not installed: install it for ssh mode, or run on every node with NODE_RANK=K (no-ssh mode)"
  if [[ -n "${MASTER_ADDR:-}" ]]; then args+=(--master_addr "$MASTER_ADDR"); fi
  echo "ssh mode: ${#hosts[@]} host(s) from $HOSTFILE"
fi

show_and_run deepspeed "${args[@]}" --module allora_ds.train "$CONFIG" "$@"
