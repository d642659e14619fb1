"""Errors a CLI reports as one line and an exit code: user mistakes (2) and deliberate stops."""

from __future__ import annotations

import atexit
import functools
import os
import sys
import threading


class ReportedError(Exception):
    """An error a CLI prints as ``error: <message>`` (no traceback) and exits with ``exit_code``."""

    exit_code = 1


class UserError(ReportedError):
    """A mistake in the user's input (config, data, paths, arguments), not a bug."""

    exit_code = 2


def _in_process_group() -> bool:
    try:
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized()
    except Exception:  # noqa: BLE001 - reporting an error must never raise another
        return False


def _one_rank_of_many() -> bool:
    """Whether this process is (or was, or is about to be) one rank of a multi-process job."""
    try:
        return _in_process_group() or int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def _rank_prefix() -> str:
    import torch.distributed as dist

    return f"[rank {dist.get_rank()}] " if _in_process_group() and dist.get_world_size() > 1 else ""


def _exit(code: int) -> None:
    """End the process with ``code``; a rank of a multi-process job without the interpreter's teardown.

    Once a process has had a gloo process group, the C++ teardown at interpreter exit aborts it now
    and then ("terminate called without an active exception", SIGABRT), whether the group is still
    alive or was destroyed (DeepSpeed's ZeRO-3 parameters and groups keep references to it): exit 0
    or 2 becomes 134, or 250 through the deepspeed launcher, and a scheduler or script reads a
    finished run or a user mistake as a crash. Leaving the group first is no cure for the error
    path either: a barrier waits forever when this rank fails alone. So a rank does what the
    interpreter would up to that teardown (every ``with`` and ``finally`` has run by now: the
    metrics file and trackers are closed): join its non-daemon threads, run the ``atexit``
    handlers, flush, and ends with ``os._exit``.
    """
    if not _one_rank_of_many():
        sys.exit(code)
    for t in threading.enumerate():
        if t is not threading.current_thread() and not t.daemon:
            t.join()
    atexit._run_exitfuncs()  # logging.shutdown, weakref finalizers, libraries' own exit hooks
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def cli(fn):
    """Wrap a CLI ``main``: a ``ReportedError`` becomes ``error: <message>`` on stderr and its exit code;
    a rank of a multi-process job ends through ``_exit`` whatever the outcome.

    Before distributed init every process sees the same inputs, so only local rank 0 prints;
    afterwards each failing rank prints with its rank so a node-specific problem is visible. The
    line goes out in one write: ranks share the launcher's stderr, and ``print`` writes the text
    and its newline separately, so two ranks' lines could run into one.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            result = fn(*args, **kwargs)
        except ReportedError as e:
            prefix = _rank_prefix()
            if prefix or os.environ.get("LOCAL_RANK", "0") == "0":
                sys.stderr.write(f"error: {prefix}{e}\n")
                sys.stderr.flush()
            _exit(e.exit_code)
        if _one_rank_of_many():
            _exit(0)
        return result

    return wrapper
