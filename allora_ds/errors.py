"""Errors a CLI reports as one line and an exit code: user mistakes (2) and deliberate stops."""

from __future__ import annotations

import functools
import os
import sys


class ReportedError(Exception):
    """An error a CLI prints as ``error: <message>`` (no traceback) and exits with ``exit_code``."""

    exit_code = 1


class UserError(ReportedError):
    """A mistake in the user's input (config, data, paths, arguments), not a bug."""

    exit_code = 2


def _rank_prefix() -> str:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return f"[rank {dist.get_rank()}] "
    except Exception:  # noqa: BLE001 - printing an error must never raise another
        pass
    return ""


def cli(fn):
    """Wrap a CLI ``main``: a ``ReportedError`` becomes ``error: <message>`` on stderr and its exit code.

    Before distributed init every process sees the same inputs, so only local rank 0 prints;
    afterwards each failing rank prints with its rank so a node-specific problem is visible.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ReportedError as e:
            prefix = _rank_prefix()
            if prefix or os.environ.get("LOCAL_RANK", "0") == "0":
                print(f"error: {prefix}{e}", file=sys.stderr, flush=True)
            sys.exit(e.exit_code)

    return wrapper
