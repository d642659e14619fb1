"""Shared by the multi-node and Slurm tests: the 1-node reference run every multi-node run must
reproduce, a runner for several launchers at once, and the comparison of two runs."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO, read_metrics, run, test_env, write_config

HERE = Path(__file__).resolve().parent
NETNS = HERE / "netns.sh"
LOCAL_SLURM = HERE / "local_slurm.sh"
STEPS = 4
# Generous: the CI machine has 2 cores, and the first DeepSpeed run JIT-compiles two ops (~2 min).
TIMEOUT = 900

_reference: dict[str, tuple[Path, Path]] = {}


def reference_run(tiny_model: Path, tmp_path_factory) -> tuple[Path, Path]:
    """(config, run dir) of the tiny model trained STEPS steps on one node with 2 processes by
    launch/single_node.sh. Other runs use the same config with another train.output_dir.
    Computed once per session and shared by the test modules."""
    if "ref" not in _reference:
        d = tmp_path_factory.mktemp("reference")
        cfg = write_config(d / "cfg.yaml", tiny_model, d / "run",
                           train={"max_steps": STEPS, "save_steps": 0, "log_steps": 1, "warmup_steps": 1})
        run(["bash", REPO / "launch" / "single_node.sh", cfg], timeout=TIMEOUT, env=test_env(NUM_GPUS=2))
        _reference["ref"] = (cfg, d / "run")
    return _reference["ref"]


def final_checkpoint(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{STEPS:08d}"


def assert_same_training(run_dir: Path, ref_dir: Path, what: str) -> None:
    """Bit-identical adapters and per-step losses: the same 2-rank ZeRO-3 computation, only laid
    out differently across machines (gloo sums 2 values in either order to the same float)."""
    ref = load_file(final_checkpoint(ref_dir) / "adapter_model.safetensors")
    got = load_file(final_checkpoint(run_dir) / "adapter_model.safetensors")
    assert sorted(got) == sorted(ref), f"{what}: adapter names differ from the 1-node reference"
    for k in ref:
        diff = (got[k] - ref[k]).abs().max().item()
        assert torch.equal(got[k], ref[k]), f"{what}: {k} differs from the 1-node 2-process reference (max |diff| {diff:.3e})"
    ref_loss = [(r["step"], r["loss"]) for r in read_metrics(ref_dir)]
    got_loss = [(r["step"], r["loss"]) for r in read_metrics(run_dir)]
    assert got_loss == ref_loss, f"{what}: losses {got_loss} != reference {ref_loss}"


def run_together(cmds: list[list], logs: list[Path], env: dict, timeout: float = TIMEOUT) -> None:
    """Start all commands at once (each in its own process group, output to its log) and wait for
    all. If one fails, the others are stopped at once rather than left waiting in a rendezvous;
    on failure or timeout the test fails with the end of every log."""
    procs = []
    try:
        for cmd, log in zip(cmds, logs):
            with open(log, "w") as f:
                procs.append(subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=env,
                                              cwd=REPO, start_new_session=True))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        for p in procs:  # only the process groups started above
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    codes = [p.returncode for p in procs]
    if any(codes):
        tails = "\n".join(f"--- {log} (rc={c}) ---\n{tail(log)}" for log, c in zip(logs, codes))
        pytest.fail(f"launchers failed or timed out (exit codes {codes}):\n{tails}")


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-chars:]
    except OSError as e:
        return f"<{e}>"


def is_root() -> bool:
    return os.geteuid() == 0
