"""Faults of the GPU path that CPU ranks can be made to show: host syncs per micro-batch, full
adapter copies on every rank, a stale JIT-build lock, ranks that each pick their own checkpoint."""

import json
import os
import re
import shutil
import subprocess
import time

import pytest

from tests.helpers import BIN, REPO, deepspeed_cmd, free_port, read_metrics, run, test_env, train_cmd, write_config

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]  # the trainer or its ranks run in child processes

PROBE = REPO / "tests" / "integration" / "trainer_probe_worker.py"


def test_a_step_syncs_the_host_once_and_only_rank0_keeps_the_adapters(tiny_model, tmp_path):
    gas = 4
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model, tmp_path / "run",
                       train={"gradient_accumulation_steps": gas, "micro_batch_size": 2})
    run(deepspeed_cmd([PROBE, cfg, tmp_path / "probe"]))
    ranks = [json.loads((tmp_path / "probe" / f"rank-{k}.json").read_text()) for k in (0, 1)]
    for k, r in enumerate(ranks):
        # Ours: one all-reduce (non-finite flags + stop requests) and one host read of it per
        # optimizer step, whatever the number of micro-batches: no nonzero for the labels (found on
        # the host in collate) and no synchronize() from the LM head's gather (GatheredParameters
        # ends with one on CUDA). transformers: at most two per micro-batch, in its sdpa mask creation
        # before the decoder's kernels are queued (an .all() on the packed positions, or two on a
        # padding mask: masking_utils.find_packed_sequence_indices / _ignore_causal_mask_sdpa).
        syncs = {key: n for key, n in r["per_step"].items() if n}
        ours = {key: n for key, n in syncs.items() if key.startswith("ours.")}
        assert ours == {"ours.all_reduce": 1, "ours.tolist": 1}, f"rank {k}: per step with {gas} micro-batches: {syncs}"
        theirs = sum(n for key, n in syncs.items() if key.startswith("transformers."))
        assert theirs <= 2 * gas, f"rank {k}: transformers syncs the host {theirs} times per step of {gas} micro-batches"
    assert ranks[0]["kept"] == ranks[0]["trainable"] > 0
    assert ranks[1]["kept"] == 0, f"rank 1 kept {ranks[1]['kept_bytes']} bytes of adapters in host memory"


def test_stale_build_lock_stops_the_run_with_one_line(tiny_model, tmp_path):
    ext = tmp_path / "torch_extensions"
    lock = ext / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    hour_ago = time.time() - 3600
    os.utime(lock, (hour_ago, hour_ago))
    os.utime(lock.parent, (hour_ago, hour_ago))
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model, tmp_path / "run")
    # Without the check, the first DeepSpeed op waits on the lock forever: the timeout fails the test.
    p = run(train_cmd(cfg), env=test_env(TORCH_EXTENSIONS_DIR=ext), check=False, timeout=180)
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert p.returncode == 2 and len(errors) == 1, p.stderr[-3000:]
    assert str(lock) in errors[0] and "stale build lock" in errors[0] and re.search(r"left (6\d) min ago", errors[0])
    assert not (tmp_path / "run").exists()


@pytest.mark.needs_root
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root for a mount namespace")
def test_resume_is_decided_by_rank_zero_whatever_other_nodes_see(trained, tmp_path):
    """Two 'nodes' (deepspeed --no_ssh, one rank each). Node 1 sees the shared run directory as an
    NFS client with a stale attribute cache would: the newest checkpoint's trainer_state.json is
    missing, so listing on its own it would resume from the older checkpoint while node 0 resumes
    from the newest, and the ranks would run different steps."""
    run_dir, cfg, _ = trained
    out = tmp_path / "run"
    shutil.copytree(run_dir / "checkpoints", out / "checkpoints")
    newest = out / "checkpoints" / "step-00000008"
    stale_view = tmp_path / "stale-view"  # what node 1 sees in place of the newest checkpoint
    shutil.copytree(newest, stale_view)
    (stale_view / "trainer_state.json").unlink()
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("nodeA slots=1\nnodeB slots=1\n")
    port = free_port()
    overrides = [f"train.output_dir={out}", "train.max_steps=10", "export.merged=false", "export.adapter=false"]

    def node(k):
        ds = [BIN / "deepspeed", "--hostfile", hostfile, "--no_ssh", "--node_rank", k, "--master_addr", "127.0.0.1",
              "--master_port", port, "--module", "allora_ds.train", cfg, *overrides]
        cmd = [str(c) for c in ds]
        if k == 1:  # a private mount namespace in which the stale view covers the newest checkpoint
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   'mount --bind "$1" "$2" && shift 2 && exec "$@"', "sh", str(stale_view), str(newest), *cmd]
        # Each node logs to a file: a pipe left unread while waiting on the other node fills and
        # blocks that node inside a collective, and both hang.
        with open(tmp_path / f"node-{k}.log", "w") as log:
            return subprocess.Popen(cmd, env=test_env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    procs = [node(0), node(1)]
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs):
                break  # one node failed: the other would wait for it until the collective timeout
            time.sleep(1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = [(tmp_path / f"node-{k}.log").read_text() for k in (0, 1)]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    assert "resumed from" in logs[0] and "step-00000008 at step 8" in logs[0]
    steps = [r["step"] for r in read_metrics(out)]
    assert steps == [9, 10], f"metrics steps {steps}: the ranks did not resume from the same step"
