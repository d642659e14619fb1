"""Stale build locks of JIT-compiled ops: one clear line instead of a silent hang.

DeepSpeed builds some ops (its CPU communication op, FusedAdam, CPU Adam) with torch's
``cpp_extension.load`` on first use, into ``$TORCH_EXTENSIONS_DIR/NAME`` (default
``~/.cache/torch_extensions/pyXY_ACC/NAME``). A build holds ``NAME/lock`` while it runs; every other
process waits until the file is gone, forever and without a word. A build killed midway (a
cancelled job, an OOM kill, Ctrl-C) leaves the file behind, and every later run then hangs at start.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from allora_ds.errors import UserError

# A lock this old, in a directory where nothing has changed for as long and that no process on
# this node is building in, belongs to a build that is no longer running. Real builds (nvcc on
# FusedAdam, g++ on the CPU ops) write object files every minute or two.
STALE_AFTER_S = 300.0


def extensions_root() -> Path:
    """Where torch builds extensions: ``TORCH_EXTENSIONS_DIR`` or its per-user default."""
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env)
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def _builders() -> set[Path]:
    """Working directories of this node's processes (a build runs ninja/nvcc/c++ in its op directory)."""
    cwds = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cwds.add(Path(os.readlink(proc / "cwd")))
        except OSError:  # gone, or another user's process
            continue
    return cwds


def _last_change(directory: Path) -> float:
    latest = 0.0
    for p in [directory, *directory.rglob("*")]:
        try:
            latest = max(latest, p.stat().st_mtime)
        except OSError:
            continue
    return latest


def stale_locks(root: Path | None = None, now: float | None = None) -> list[tuple[Path, float]]:
    """``(lock file, age in seconds)`` of the build locks under ``root`` that no live build holds."""
    root = extensions_root() if root is None else root
    now = time.time() if now is None else now
    locks = [*root.glob("*/lock"), *root.glob("*/*/lock")]
    if not locks:
        return []
    builders = _builders()
    stale = []
    for lock in locks:
        try:
            age = now - lock.stat().st_mtime
        except OSError:  # released meanwhile
            continue
        op_dir = lock.parent.resolve()
        busy = any(c == op_dir or op_dir in c.parents for c in builders)
        if age > STALE_AFTER_S and not busy and now - _last_change(op_dir) > STALE_AFTER_S:
            stale.append((lock, age))
    return stale


def check_build_locks() -> None:
    """Raise ``UserError`` naming a stale build lock, which would make this run wait forever."""
    found = stale_locks()
    if found:
        lock, age = found[0]
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise UserError(f"stale build lock {lock}{more}: left {age / 60:.0f} min ago by a build of a DeepSpeed op that "
                        "is no longer running, and every run would wait on it forever; delete it (rm "
                        f"{lock}) and start again; on a cluster, give each node its own TORCH_EXTENSIONS_DIR")
