"""check_launch_env: consistent launcher environments pass, each kind of inconsistency is one clear line."""

import pytest

from allora_ds.errors import UserError
from allora_ds.launch_env import check_launch_env


def rank_env(rank=1, world=4, local_rank=1, **extra):
    env = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank),
           "MASTER_ADDR": "node1", "MASTER_PORT": "29500"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.mark.parametrize("env", [
    {},                                                                      # plain python: a world of one
    {"SLURM_STEP_NUM_TASKS": "1", "SLURM_JOB_ID": "7"},                      # one srun task
    rank_env(),                                                              # a launcher without size hints
    rank_env(3, 4, 1, LOCAL_SIZE=2, CROSS_SIZE=2, SLURM_STEP_NUM_NODES=2),   # deepspeed --no_ssh under our sbatch
    rank_env(5, 8, 1, LOCAL_WORLD_SIZE=4, GROUP_WORLD_SIZE=2),               # torchrun, 2 nodes x 4
], ids=["none", "one-srun-task", "bare", "deepspeed-slurm", "torchrun"])
def test_consistent_environments_pass(env):
    check_launch_env(env, gpus=0)


@pytest.mark.parametrize("env, gpus, words", [
    ({"RANK": "0", "WORLD_SIZE": "2"}, 0, ["RANK, WORLD_SIZE set", "LOCAL_RANK, MASTER_ADDR, MASTER_PORT not"]),
    ({"SLURM_STEP_NUM_TASKS": "8"}, 0, ["srun started 8 tasks", "same output_dir"]),
    (rank_env(world="two"), 0, ["WORLD_SIZE='two'", "not an integer"]),
    (rank_env(4, 4, 0), 0, ["RANK=4 but WORLD_SIZE=4"]),
    (rank_env(MASTER_PORT=70000), 0, ["MASTER_PORT=70000"]),
    (rank_env(2, 6, 0, LOCAL_SIZE=4, CROSS_SIZE=2), 0, ["world size 6 is not 2 node(s) x 4", "slots="]),
    (rank_env(2, 6, 0, LOCAL_WORLD_SIZE=4), 0, ["world size 6 is not divisible by the 4 rank(s)"]),
    (rank_env(1, 2, 2, LOCAL_SIZE=2), 0, ["LOCAL_RANK=2 but LOCAL_SIZE=2"]),
    (rank_env(1, 2, 1, LOCAL_SIZE=2, CROSS_SIZE=1, SLURM_STEP_NUM_NODES=2), 0,
     ["srun runs this step on 2 node(s)", "formed a world over 1", "--node_rank=$SLURM_NODEID"]),
    (rank_env(5, 8, 5, LOCAL_SIZE=8, CROSS_SIZE=1), 4, ["LOCAL_RANK=5", "only 4 visible GPU(s)"]),
], ids=["partial", "srun-without-launcher", "not-int", "rank-range", "port", "uneven-nodes", "indivisible",
        "local-rank-range", "fewer-nodes-than-step", "more-ranks-than-gpus"])
def test_inconsistent_environment_is_one_clear_line(env, gpus, words):
    with pytest.raises(UserError) as e:
        check_launch_env(env, gpus=gpus)
    msg = str(e.value)
    assert msg.startswith("launch environment: ") and "\n" not in msg, msg
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
