"""Fault injection for the reliability tests, driven by one environment variable.

    ALLORA_DS_FAULT=KIND@STEP[.MICRO][:RANK][,...]   (STEP: 1-based optimizer step; MICRO: 1-based
                                                      micro-batch of it, default all; RANK: default all)

    nonfinite_loss   the loss of step STEP (micro-batch MICRO) is NaN
    crash_in_save    the process dies (no cleanup) while writing the checkpoint of step STEP
    slow_save        writing the checkpoint of step STEP takes 20 s longer
    slow_export      the end-of-run export after step STEP takes 45 s longer
    sigkill          the process SIGKILLs itself as step STEP starts
    sigterm, sigusr1 the process receives the signal as step STEP starts
    eio_in_save      a write of the checkpoint of step STEP fails with EIO (after DeepSpeed wrote its part)
    dump_restored    after resuming from the checkpoint of step STEP, every rank writes the optimizer
                     state it restored to OUTPUT_DIR/restored-step-STEP/ (the checkpoint's elastic/ layout)

Unset (always, outside tests) every hook is a no-op.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

import torch

SIGNALS = {"sigkill": signal.SIGKILL, "sigterm": signal.SIGTERM, "sigusr1": signal.SIGUSR1}
SLOW_S = {"slow_save": 20.0, "slow_export": 45.0}


def _planned(kinds, step: int, micro: int | None = None) -> str | None:
    """Which of ``kinds`` is planned for this step (and micro-batch, and rank), if any."""
    for spec in filter(None, os.environ.get("ALLORA_DS_FAULT", "").split(",")):
        kind, _, at = spec.partition("@")
        at, _, rank = at.partition(":")
        at, _, at_micro = at.partition(".")
        if kind not in kinds or int(at) != step or (rank and int(rank) != int(os.environ.get("RANK", "0"))):
            continue
        if at_micro and micro is not None and int(at_micro) != micro:
            continue
        return kind
    return None


def at_step_start(step: int) -> None:
    kind = _planned(SIGNALS, step)
    if kind:
        os.kill(os.getpid(), SIGNALS[kind])


def maybe_poison_loss(loss: torch.Tensor, step: int, micro: int) -> torch.Tensor:
    return loss * float("nan") if _planned(("nonfinite_loss",), step, micro) else loss


def maybe_crash_during_save(step: int) -> None:
    kind = _planned(("crash_in_save", "slow_save"), step)
    if kind == "crash_in_save":
        os._exit(17)  # as abrupt as a SIGKILL: no cleanup, no exception handlers
    if kind == "slow_save":
        time.sleep(SLOW_S[kind])


def before_export(step: int) -> None:
    if _planned(("slow_export",), step):
        time.sleep(SLOW_S["slow_export"])


def maybe_fail_write(step: int) -> None:
    if _planned(("eio_in_save",), step):
        raise OSError(errno.EIO, os.strerror(errno.EIO))


def maybe_dump_restored(step: int, out_dir, dump) -> None:
    """``dump(directory)`` writes the restored state; called on every rank after a resume."""
    if _planned(("dump_restored",), step):
        dump(Path(out_dir) / f"restored-step-{step:08d}")
