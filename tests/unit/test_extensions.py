"""Stale JIT-build locks are told apart from builds in progress."""

import os
import subprocess
import time

from allora_ds.extensions import STALE_AFTER_S, stale_locks


def make_lock(root, op, age_s, files_age_s=None):
    d = root / "py311_cpu" / op
    d.mkdir(parents=True)
    (d / "build.ninja").write_text("rule cxx\n")
    lock = d / "lock"
    lock.touch()
    t = time.time()
    for p, age in ((lock, age_s), (d / "build.ninja", files_age_s if files_age_s is not None else age_s), (d, age_s)):
        os.utime(p, (t - age, t - age))
    return lock


def test_an_old_lock_with_no_build_is_stale(tmp_path):
    lock = make_lock(tmp_path, "fused_adam", 2 * STALE_AFTER_S)
    found = stale_locks(tmp_path)
    assert [p for p, _ in found] == [lock] and found[0][1] > 2 * STALE_AFTER_S - 5


def test_a_fresh_lock_is_a_build_starting(tmp_path):
    make_lock(tmp_path, "fused_adam", 10)
    assert stale_locks(tmp_path) == []


def test_an_old_lock_with_recent_output_is_a_build_in_progress(tmp_path):
    make_lock(tmp_path, "fused_adam", 2 * STALE_AFTER_S, files_age_s=20)
    assert stale_locks(tmp_path) == []


def test_an_old_lock_in_a_directory_a_process_builds_in_is_not_stale(tmp_path):
    lock = make_lock(tmp_path, "fused_adam", 2 * STALE_AFTER_S)
    builder = subprocess.Popen(["sleep", "30"], cwd=lock.parent)  # as ninja/nvcc run in the op directory
    try:
        assert stale_locks(tmp_path) == []
    finally:
        builder.kill()
        builder.wait()
    assert [p for p, _ in stale_locks(tmp_path)] == [lock]


def test_torch_extensions_dir_layout_without_the_python_folder(tmp_path):
    d = tmp_path / "deepspeed_shm_comm"  # TORCH_EXTENSIONS_DIR=... puts ops directly under it
    d.mkdir()
    (d / "lock").touch()
    old = time.time() - 2 * STALE_AFTER_S
    os.utime(d / "lock", (old, old))
    os.utime(d, (old, old))
    assert [p for p, _ in stale_locks(tmp_path)] == [d / "lock"]
