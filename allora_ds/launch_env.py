"""Is the launch environment consistent? One clear line instead of a hang in rendezvous or an
error deep inside torch.distributed.

A launcher (deepspeed, torchrun, our launch/ and Slurm scripts) describes each rank with
environment variables; the trainer joins the process group they describe. The mistakes caught
here all start training in a wrong shape or never start it:

* a partial set (RANK without WORLD_SIZE, ...): a hand-written launcher forgot one;
* several srun tasks without RANK: each would train alone into the same output_dir;
* a world that is not nodes x ranks-per-node (a hostfile with different slots= per node, or
  deepspeed started on fewer nodes than the Slurm step spans);
* more ranks on a node than it has GPUs.

``python -m allora_ds.launch_env`` runs the check in the current environment (e.g. under
``srun`` or ``deepspeed``) and prints what it found.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from allora_ds.errors import UserError, cli

# What every launcher sets for each rank; init_distributed needs all of them or none.
RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Ranks on this node: torchrun's and deepspeed's names. Nodes in the world: likewise.
LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE")
NODE_COUNT_VARS = ("GROUP_WORLD_SIZE", "CROSS_SIZE")


def _int(env: Mapping[str, str], key: str, minimum: int = 0) -> int:
    try:
        value = int(env[key])
    except ValueError:
        raise UserError(f"launch environment: {key}={env[key]!r} on {_host()} is not an integer") from None
    if value < minimum:
        raise UserError(f"launch environment: {key}={value} on {_host()} must be >= {minimum}")
    return value


def _first_int(env: Mapping[str, str], keys: tuple[str, ...]) -> tuple[str, int] | None:
    for key in keys:
        if env.get(key):
            return key, _int(env, key, minimum=1)
    return None


def _host() -> str:
    return socket.gethostname()


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_launch_env(env: Mapping[str, str] | None = None, gpus: int | None = None) -> None:
    """Raise ``UserError`` (one line) if the rank environment is inconsistent; return otherwise.

    ``env`` defaults to ``os.environ``; ``gpus`` (GPUs visible to this process) to what torch sees.
    """
    env = os.environ if env is None else env
    present = [k for k in RANK_VARS if env.get(k)]
    if not present:
        # A world of one. Under srun with several tasks that is a mistake: every task would be a
        # separate world of one, all writing the same output_dir.
        tasks = _int(env, "SLURM_STEP_NUM_TASKS") if env.get("SLURM_STEP_NUM_TASKS") else 1
        if tasks > 1:
            raise UserError(f"launch environment: srun started {tasks} tasks but none has RANK/WORLD_SIZE, so each "
                            "would train alone into the same output_dir; run one deepspeed launcher per node "
                            "(launch/slurm/*.sbatch) or a single task")
        return
    missing = [k for k in RANK_VARS if k not in present]
    if missing:
        raise UserError(f"launch environment: {', '.join(present)} set but {', '.join(missing)} not; start the "
                        "trainer with deepspeed, torchrun or launch/*.sh (they set all of them) or unset them")

    rank, world, local_rank = _int(env, "RANK"), _int(env, "WORLD_SIZE", 1), _int(env, "LOCAL_RANK")
    port = _int(env, "MASTER_PORT", 1)
    if port > 65535:
        raise UserError(f"launch environment: MASTER_PORT={port} is not a TCP port")
    if rank >= world:
        raise UserError(f"launch environment: RANK={rank} but WORLD_SIZE={world} (ranks are 0..{world - 1})")

    local = _first_int(env, LOCAL_SIZE_VARS)
    nodes = _first_int(env, NODE_COUNT_VARS)
    if local:
        key, per_node = local
        if local_rank >= per_node:
            raise UserError(f"launch environment: LOCAL_RANK={local_rank} but {key}={per_node} on {_host()}")
        if nodes and nodes[1] * per_node != world:
            raise UserError(f"launch environment: world size {world} is not {nodes[1]} node(s) x {per_node} "
                            f"rank(s) on {_host()}: every node must run the same number of ranks "
                            "(check the hostfile's slots= or --nproc-per-node on each node)")
        if world % per_node:
            raise UserError(f"launch environment: world size {world} is not divisible by the {per_node} rank(s) "
                            f"on {_host()}: every node must run the same number of ranks (check the hostfile's "
                            "slots= or --nproc-per-node on each node)")

    # Inside a Slurm step our sbatch scripts start one launcher per node of the step; a launcher
    # that formed a world over fewer nodes means the step's nodes train separate worlds.
    if nodes and env.get("SLURM_STEP_NUM_NODES"):
        step_nodes = _int(env, "SLURM_STEP_NUM_NODES", 1)
        if step_nodes != nodes[1]:
            raise UserError(f"launch environment: srun runs this step on {step_nodes} node(s) but the launcher "
                            f"formed a world over {nodes[1]} ({nodes[0]}); give every node to the launcher "
                            "(deepspeed --hostfile with all nodes --no_ssh --node_rank=$SLURM_NODEID, as "
                            "launch/slurm/*.sbatch does)")

    gpus = _visible_gpus() if gpus is None else gpus
    if gpus and local_rank >= gpus:
        raise UserError(f"launch environment: LOCAL_RANK={local_rank} but {_host()} has only {gpus} visible GPU(s); "
                        "start at most that many ranks per node (--num_gpus, hostfile slots=, GPUS_PER_NODE)")


@cli
def main() -> None:
    check_launch_env()
    env = os.environ
    if env.get("RANK"):
        print(f"launch environment OK on {_host()}: rank {env['RANK']} of {env['WORLD_SIZE']}, "
              f"local rank {env['LOCAL_RANK']}, master {env['MASTER_ADDR']}:{env['MASTER_PORT']}")
    else:
        print(f"launch environment OK on {_host()}: no launcher variables, a world of one")


if __name__ == "__main__":
    main()
