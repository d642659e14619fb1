#!/usr/bin/env bash
# One machine, one rank per GPU, with the deepspeed launcher.
#
#   bash launch/single_node.sh CONFIG.yaml [section.key=value ...]
#   NUM_GPUS=4 bash launch/single_node.sh configs/llama3_8b_allora.yaml train.gradient_accumulation_steps=4
#
# Environment:
#   NUM_GPUS     ranks to start (default: every GPU that CUDA_VISIBLE_DEVICES leaves visible).
#                Without a GPU, DeepSpeed's CPU accelerator starts NUM_GPUS CPU processes (gloo).
#   MASTER_PORT  rendezvous port on 127.0.0.1 (default: a free one, so two runs can share a machine).
# Run from the repository root with the project's virtualenv active (`deepspeed` on PATH).
set -euo pipefail

die() { echo "error: $*" >&2; exit 2; }
show_and_run() { printf '+'; printf ' %q' "$@"; printf '\n'; "$@"; }

[[ $# -ge 1 ]] || die "usage: $0 CONFIG.yaml [section.key=value ...]"
CONFIG=$1
shift
[[ -r "$CONFIG" ]] || die "config $CONFIG is not a readable file"
command -v deepspeed >/dev/null || die "deepspeed is not on PATH: activate the project's virtualenv (. .venv/bin/activate)"

args=()
if [[ -n "${NUM_GPUS:-}" ]]; then
  [[ "$NUM_GPUS" =~ ^[1-9][0-9]*$ ]] || die "NUM_GPUS must be a positive integer, got '$NUM_GPUS'"
  # --num_gpus makes deepspeed use devices 0..N-1 and ignore CUDA_VISIBLE_DEVICES: say so.
  if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    echo "note: NUM_GPUS=$NUM_GPUS overrides CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES in the deepspeed launcher" >&2
  fi
  args+=(--num_gpus "$NUM_GPUS")
fi
MASTER_PORT=${MASTER_PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
[[ "$MASTER_PORT" =~ ^[0-9]+$ ]] || die "MASTER_PORT must be a port number, got '$MASTER_PORT'"

show_and_run deepspeed "${args[@]}" --master_port "$MASTER_PORT" --module allora_ds.train "$CONFIG" "$@"
