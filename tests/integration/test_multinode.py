"""Two "nodes" on one machine with the deepspeed launcher in no-ssh mode.

`launch/multi_node.sh` runs once per node (NODE_RANK=0/1 -> `deepspeed --hostfile H --no_ssh
--node_rank K`), each in its own network namespace with its own address on a bridge the test
creates, so the ranks really talk across a network. The result must be bit-identical to the same
config trained on one node with 2 processes by `launch/single_node.sh`.
Also here: the launch scripts' own checks, and the shipped configs against DeepSpeed's schema.
"""

import contextlib
import os
import shutil
import subprocess
import warnings

import pytest

from tests.cluster.helpers import NETNS, STEPS, assert_same_training, final_checkpoint, is_root, reference_run, \
    run_together
from tests.helpers import REPO, free_port, read_metrics, test_env


@contextlib.contextmanager
def two_hosts(tmp_path):
    """Yield (command prefixes to run inside node A / node B, node A's address, interface name).

    Two network namespaces on a private bridge (10.77.X.0/24, X unused on this machine) when
    root with `ip netns` and nsenter; otherwise two launchers on 127.0.0.1 (said in a warning)."""
    prefix = f"mn{os.getpid() % 100000}"
    reason = None
    if os.environ.get("ALLORA_TEST_NETNS") == "0":  # to exercise the fallback on a machine with namespaces
        reason = "ALLORA_TEST_NETNS=0"
    elif not is_root():
        reason = "not root"
    elif not (shutil.which("ip") and shutil.which("nsenter")):
        reason = "no `ip` or `nsenter`"
    if reason is None:
        subnet = subprocess.run(["bash", NETNS, "free-subnet"], capture_output=True, text=True)
        up = subprocess.run(["bash", NETNS, "up", prefix, subnet.stdout.strip(), "2"], capture_output=True, text=True)
        if subnet.returncode or up.returncode:
            reason = f"creating network namespaces failed: {(subnet.stderr + up.stderr).strip()[-500:]}"
    try:
        if reason is None:
            yield ([["nsenter", f"--net=/run/netns/{prefix}n{i}", "--"] for i in (1, 2)],
                   f"{subnet.stdout.strip()}.11", "eth0")
        else:
            msg = f"network namespaces unavailable ({reason}): both 'nodes' run on 127.0.0.1"
            print(msg)
            warnings.warn(msg)
            yield [[], []], "127.0.0.1", "lo"
    finally:
        subprocess.run(["bash", NETNS, "down", prefix, "2"], capture_output=True)


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.needs_root
def test_two_nodes_in_network_namespaces_match_one_node(tiny_model, tmp_path_factory, tmp_path):
    cfg, ref = reference_run(tiny_model, tmp_path_factory)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("nodeA slots=1\nnodeB slots=1\n")
    out = tmp_path / "run"
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    with two_hosts(tmp_path) as (inside, master, ifname):
        # A fresh namespace has every port free; on 127.0.0.1 ask the host for one.
        port = 29500 if master != "127.0.0.1" else free_port()
        cmds = [[*inside[k], "env", f"NODE_RANK={k}", f"MASTER_ADDR={master}", f"MASTER_PORT={port}",
                 "bash", REPO / "launch" / "multi_node.sh", hostfile, cfg, f"train.output_dir={out}"] for k in (0, 1)]
        # gloo binds to the address the hostname resolves to; in a namespace that is not ours.
        run_together(cmds, logs, test_env(GLOO_SOCKET_IFNAME=ifname))
    for k, log in enumerate(logs):
        text = log.read_text()
        assert f"node {k} of 2" in text and f"--node_rank {k}" in text, f"node {k} did not launch as expected:\n{text[-2000:]}"
    assert {p.name for p in (final_checkpoint(out) / "rng").iterdir()} == {"rank-00000.pt", "rank-00001.pt"}
    assert [r["step"] for r in read_metrics(out)] == list(range(1, STEPS + 1))
    assert_same_training(out, ref, "2 nodes x 1 process")


# ---- the launch scripts refuse an inconsistent launch with one clear line (no training) ----

@pytest.mark.parametrize("script, args, env, expected", [
    ("multi_node.sh", ["{tmp}/missing-hostfile", "configs/demo.yaml"], {"NODE_RANK": "0"},
     "hostfile {tmp}/missing-hostfile is not a readable file"),
    ("multi_node.sh", ["{tmp}/hostfile", "configs/demo.yaml"], {"NODE_RANK": "2"},
     "NODE_RANK=2 but {tmp}/hostfile lists 2 host(s)"),
    ("multi_node.sh", ["{tmp}/bad-hostfile", "configs/demo.yaml"], {"NODE_RANK": "0"},
     "expected 'hostname slots=N'"),
    ("multi_node.sh", ["{tmp}/hostfile", "configs/demo.yaml"], {"NODE_RANK": "0", "MASTER_ADDR": "no-such-host.invalid"},
     "MASTER_ADDR=no-such-host.invalid does not resolve"),
    ("single_node.sh", ["configs/demo.yaml"], {"NUM_GPUS": "two"}, "NUM_GPUS must be a positive integer"),
    ("slurm/llama3_8b_allora.sbatch", [], {}, "submit this file with sbatch"),
], ids=["hostfile-missing", "node-rank-range", "hostfile-format", "master-unresolvable", "num-gpus", "not-in-slurm"])
def test_launch_scripts_reject_inconsistent_launches(tmp_path, script, args, env, expected):
    (tmp_path / "hostfile").write_text("nodeA slots=1\nnodeB slots=1\n")
    (tmp_path / "bad-hostfile").write_text("nodeA 8\n")
    clean = {k: v for k, v in test_env(**env).items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", REPO / "launch" / script, *(a.format(tmp=tmp_path) for a in args)],
                          capture_output=True, text=True, env=clean, cwd=REPO, timeout=60)
    assert proc.returncode == 2, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert proc.stderr.startswith("error: ") and expected.format(tmp=tmp_path) in proc.stderr, proc.stderr


# ---- the shipped DeepSpeed and example configs are what DeepSpeed and the trainer accept ----

@pytest.mark.parametrize("config, hidden", [("configs/llama3_8b_allora.yaml", 4096), ("configs/llama3_70b_allora.yaml", 8192)])
@pytest.mark.parametrize("ds", ["zero3_bf16.json", "zero3_offload_bf16.json", "zero2_bf16.json", "zero3_cpu.json",
                                "zero3_hpz_bf16.json"])
def test_shipped_configs_are_accepted(config, hidden, ds):
    from deepspeed.runtime.config import DeepSpeedConfig

    from allora_ds.config import load_config
    from allora_ds.ds_config import fill_ds_config, read_ds_config

    cfg = load_config(REPO / config)
    path = REPO / "ds_configs" / ds
    filled = fill_ds_config(read_ds_config(path), cfg, 1, hidden, path)
    parsed = DeepSpeedConfig(filled)  # pydantic, extra="forbid": a misspelt key fails here
    assert parsed.zero_config.stage == (2 if ds.startswith("zero2") else 3)
    assert parsed.bfloat16_config.enabled, f"{ds} with {config}: bf16 should be on"
    if "offload" in ds:
        assert parsed.zero_config.offload_param.pin_memory and parsed.zero_config.offload_optimizer.pin_memory
