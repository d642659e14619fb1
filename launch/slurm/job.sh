# The body of every launch/slurm/*.sbatch, which set DEFAULT_CONFIG and ALLORA_DIR and source this
# file with the job's arguments: one Slurm job = one deepspeed launcher per node (see their headers).
set -euo pipefail
say() { echo "[$(date '+%F %T') $(hostname -s)] $*"; }
die() { echo "error: $*" >&2; exit 2; }

[[ -n "${SLURM_JOB_ID:-}" && -n "${SLURM_JOB_NODELIST:-}" && -n "${SLURM_JOB_NUM_NODES:-}" ]] \
  || die "SLURM_JOB_ID, SLURM_JOB_NODELIST or SLURM_JOB_NUM_NODES is not set: submit this file with sbatch"
cd "$ALLORA_DIR"
[[ -f allora_ds/train.py ]] || die "$ALLORA_DIR is not the allora_ds repository: sbatch from its root or set ALLORA_DIR"
# Under --export=NONE nothing of the submitting shell is here: fall back to the repository's venv.
if [[ -n "${ALLORA_VENV:-}" ]]; then
  PATH="$ALLORA_VENV/bin:$PATH"
elif ! command -v deepspeed >/dev/null && [[ -x .venv/bin/deepspeed ]]; then
  PATH="$PWD/.venv/bin:$PATH"
fi
export PATH
command -v deepspeed >/dev/null || die "deepspeed is not on PATH: activate the virtualenv before sbatch or set ALLORA_VENV"

CONFIG=$DEFAULT_CONFIG
if [[ $# -gt 0 && "$1" != *=* ]]; then CONFIG=$1; shift; fi  # a first argument with '=' is an override
[[ -f "$CONFIG" && -r "$CONFIG" ]] || die "config $CONFIG is not a readable file (relative to $ALLORA_DIR)"

mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
[[ ${#NODES[@]} -eq $SLURM_JOB_NUM_NODES ]] \
  || die "scontrol show hostnames '$SLURM_JOB_NODELIST' gave ${#NODES[@]} name(s), the job has $SLURM_JOB_NUM_NODES nodes"
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
[[ "$GPUS_PER_NODE" =~ ^[1-9][0-9]*$ ]] \
  || die "no GPU count: the job has no GPUs (request --gpus-per-node) and GPUS_PER_NODE is '${GPUS_PER_NODE}'"
# This script runs on node 0, so a port free here is free on the rendezvous host.
MASTER_ADDR=${NODES[0]}
MASTER_PORT=$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
LOG_DIR=${LOG_DIR:-logs/slurm/${SLURM_JOB_NAME:-allora}-$SLURM_JOB_ID}
mkdir -p "$LOG_DIR"
HOSTFILE=$LOG_DIR/hostfile
for node in "${NODES[@]}"; do echo "$node slots=$GPUS_PER_NODE"; done > "$HOSTFILE"
# JIT-built ops (none with the shipped configs; a user's FusedAdam or CPU Adam) are compiled into a
# node-local directory: one node's build in a shared home cannot hold a lock that another node waits
# on forever, and a build killed with the job leaves its lock on this node's scratch only.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-${TMPDIR:-/tmp}/torch_extensions_$(id -u)}
# One OpenMP pool per rank, not one per core per rank.
if [[ -n "${SLURM_CPUS_ON_NODE:-}" && -z "${OMP_NUM_THREADS:-}" ]]; then
  export OMP_NUM_THREADS=$(( SLURM_CPUS_ON_NODE / GPUS_PER_NODE > 0 ? SLURM_CPUS_ON_NODE / GPUS_PER_NODE : 1 ))
fi

# Networking: uncomment what your cluster needs (the ranks inherit this environment).
# export NCCL_SOCKET_IFNAME=ib0   # interface for NCCL's bootstrap/socket traffic (also GLOO_SOCKET_IFNAME)
# export NCCL_IB_HCA=mlx5         # InfiniBand adapters NCCL may use
# export NCCL_DEBUG=INFO          # log the transport every rank picked (debugging only)
# export NCCL_CROSS_NIC=1         # rail-optimised fabrics where GPUs' NICs sit on different switches

say "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): ${#NODES[@]} node(s) x $GPUS_PER_NODE rank(s)," \
    "rendezvous $MASTER_ADDR:$MASTER_PORT, config $CONFIG, per-node logs in $LOG_DIR/"
ds_args=(--hostfile "$HOSTFILE" --no_ssh --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
         --module allora_ds.train "$CONFIG" train.resume=auto "$@")
# On every node: the launcher processes ignore SIGUSR1 (the default action would kill them and
# with them the ranks); the ignore survives exec, and the ranks install their own handler.
node_cmd='trap "" USR1
cmd=(deepspeed --node_rank "$SLURM_NODEID" "$@")
echo "[$(hostname -s)] node $SLURM_NODEID:$(printf " %q" "${cmd[@]}")"
exec "${cmd[@]}"'
# --export=ALL: the tasks get this script's environment even under `sbatch --export=NONE`;
# --cpus-per-task: a step task gets one CPU unless told otherwise, and it runs all the node's ranks;
# --ntasks: one per node this run got; srun would otherwise take SLURM_NTASKS, the count asked for
# at submission or by a later `scontrol update`, which need not match the nodes.
srun_opts=(--export=ALL --nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1
           --kill-on-bad-exit=1 --output="$LOG_DIR/node%n-%N.log" --open-mode=append)
if [[ -n "${SLURM_CPUS_ON_NODE:-}" ]]; then srun_opts+=(--cpus-per-task="$SLURM_CPUS_ON_NODE"); fi
echo "+ srun$(printf ' %q' "${srun_opts[@]}") ... deepspeed --node_rank \$SLURM_NODEID$(printf ' %q' "${ds_args[@]}")"

stop_forwarded=0
forward_stop() {
  stop_forwarded=1
  say "SIGUSR1 (time limit near): asking every rank to save a checkpoint and stop"
  scancel --signal=USR1 "$SLURM_JOB_ID" || true
}
trap forward_stop USR1
# srun in the background: bash runs a trap only between commands, and `wait` is interruptible.
srun "${srun_opts[@]}" bash -c "$node_cmd" node "${ds_args[@]}" &
srun_pid=$!
while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid" || true; done
rc=0
wait "$srun_pid" || rc=$?

if [[ $rc -ne 0 ]]; then
  say "training failed (exit $rc); the end of each node's log:"
  for f in "$LOG_DIR"/node*.log; do echo "==> $f <=="; tail -n 20 "$f"; done
elif [[ $stop_forwarded -eq 1 ]]; then
  say "checkpoint saved before the time limit; requeueing job $SLURM_JOB_ID to continue from it"
  scontrol requeue "$SLURM_JOB_ID"
else
  say "training ended (exit 0)"
fi
exit "$rc"
