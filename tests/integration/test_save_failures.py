"""A checkpoint that cannot be written stops the run with one line and loses nothing.

On a small tmpfs the test mounts over ``OUTPUT_DIR/checkpoints`` (room for one checkpoint and a
half), 2 ranks under ZeRO-3 and under ZeRO-2: the step-1 checkpoint is saved, the step-2 one runs
out of space. Every rank must stop with the same ``error:`` line (exit 4) naming the directory, what
failed and the space a checkpoint needs; ``latest`` must still name step 1 and no partial directory
may be left. The run must have warned before its first save that keep_last + 1 checkpoints do not
fit. An I/O error on one rank only (fault ``eio_in_save``) and a read-only filesystem are checked
the same way; how torch's zip writer reports a full disk (no errno) is checked in process.
"""

import errno
import os
import shutil
import subprocess
from contextlib import contextmanager

import pytest
import torch

from allora_ds import checkpoint
from tests.helpers import read_metrics, run, test_env, train_cmd
from tests.integration.test_resume_anywhere import cpu_variant


@contextmanager
def tmpfs(path, size: int, read_only=False):
    """A tmpfs of ``size`` bytes mounted at ``path`` (skips the test where mounting is refused)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if p.returncode:
        pytest.skip(f"mount -t tmpfs refused: {p.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _launch(cfg, out, *overrides, fault=None):
    env = test_env(ALLORA_DS_FAULT=fault) if fault else test_env()
    return run(train_cmd(cfg, f"train.output_dir={out}", "export.merged=false", "export.adapter=false",
                         "train.eval_steps=0", *overrides), env=env, check=False)


def _errors(p):
    return [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.needs_root
@pytest.mark.parametrize("layout", ["zero3", "zero2"])
def test_a_full_disk_stops_every_rank_with_one_line_and_keeps_the_last_checkpoint(layout, trained, tmp_path):
    run_dir, cfg, _ = trained
    need = sum(f.stat().st_size for f in (run_dir / "checkpoints" / "step-00000004").rglob("*") if f.is_file())
    ds = [f"train.deepspeed={cpu_variant('zero2_bf16', tmp_path)}"] if layout == "zero2" else []
    out = tmp_path / "run"
    root = out / "checkpoints"
    with tmpfs(root, int(1.5 * need)):
        p = _launch(cfg, out, "train.max_steps=2", "train.save_steps=1", "train.keep_last=2", *ds)
        errors = _errors(p)
        assert p.returncode == 4 and len(errors) == 2, p.stdout[-2000:] + p.stderr[-4000:]
        for e in errors:
            assert f"checkpoint step-00000002 not saved in {root}: no space left on device while writing" in e, e
            assert "a checkpoint needs about" in e and f"{root / 'latest'} still names step-00000001" in e, e
        assert "Traceback" not in p.stderr, p.stderr[-4000:]
        assert f"warning: {root}:" in p.stdout and "train.keep_last=2 checkpoints and the one being written" in p.stdout
        assert sorted(x.name for x in root.iterdir()) == ["latest", "step-00000001"], "a partial checkpoint is left"
        assert (root / "latest").read_text() == "step-00000001" and checkpoint.is_complete(root / "step-00000001")
        assert [r["step"] for r in read_metrics(out)] == [1, 2]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_an_io_error_on_one_rank_stops_every_rank(trained, tmp_path):
    """Rank 1 alone fails (after DeepSpeed wrote its part); rank 0 must not wait for it in a collective."""
    run_dir, cfg, _ = trained
    out = tmp_path / "run"
    shutil.copytree(run_dir / "checkpoints" / "step-00000004", out / "checkpoints" / "step-00000004")
    (out / "checkpoints" / "latest").write_text("step-00000004")
    p = _launch(cfg, out, "train.max_steps=5", fault="eio_in_save@5:1")
    errors = _errors(p)
    assert p.returncode == 4 and len(errors) == 2, p.stderr[-4000:]
    root = out / "checkpoints"
    for e in errors:
        assert f"checkpoint step-00000005 not saved in {root}: input/output error while writing rng on rank 1" in e, e
        assert "needs about" not in e and f"{root / 'latest'} still names step-00000004" in e, e
    assert sorted(x.name for x in root.iterdir()) == ["latest", "step-00000004"]


@pytest.mark.needs_root
def test_read_only_and_full_filesystems_are_named(tmp_path):
    """In process: what each writer raises, as the save reports it (torch's zip writer loses the errno)."""
    with tmpfs(tmp_path / "ro", 1 << 20, read_only=True) as ro:
        w = checkpoint._Writes(ro / ".tmp-step-00000001")
        w.attempt(ro / ".tmp-step-00000001" / "x.pt", torch.save, {"x": torch.zeros(4)}, ro / ".tmp-step-00000001" / "x.pt")
        assert w.failure == (errno.EROFS, "read-only file system while writing x.pt")
    with tmpfs(tmp_path / "full", 64 << 10) as full:
        w = checkpoint._Writes(full)
        w.attempt(full / "big.pt", torch.save, {"x": torch.zeros(1 << 16)}, full / "big.pt")
        assert w.failure == (errno.ENOSPC, "no space left on device while writing big.pt")
        w.attempt(full / "next.pt", torch.save, {}, full / "next.pt")  # skipped: the first failure is kept
        assert not (full / "next.pt").exists()
