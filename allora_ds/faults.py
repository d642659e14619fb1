"""Fault injection for the reliability tests, driven by one environment variable.

    ALLORA_DS_FAULT=KIND@STEP[.MICRO][:RANK]   (STEP: 1-based optimizer step; MICRO: 1-based micro-batch
                                                of it, default all; RANK defaults to all)

    nonfinite_loss   the loss of step STEP (micro-batch MICRO) is NaN
    crash_in_save    the process dies (no cleanup) while writing the checkpoint of step STEP
    slow_save        writing the checkpoint of step STEP takes 20 s longer
    sigkill          the process SIGKILLs itself as step STEP starts
    sigterm, sigusr1 the process receives the signal as step STEP starts

Unset (always, outside tests) every hook is a no-op.
"""

from __future__ import annotations

import os
import signal
import time

import torch

SIGNALS = {"sigkill": signal.SIGKILL, "sigterm": signal.SIGTERM, "sigusr1": signal.SIGUSR1}
SLOW_SAVE_S = 20.0


def _fault(step: int, micro: int | None = None) -> str | None:
    spec = os.environ.get("ALLORA_DS_FAULT", "")
    if "@" not in spec:
        return None
    kind, at = spec.split("@", 1)
    at, _, rank = at.partition(":")
    at, _, at_micro = at.partition(".")
    if int(at) != step or (rank and int(rank) != int(os.environ.get("RANK", "0"))):
        return None
    if at_micro and micro is not None and int(at_micro) != micro:
        return None
    return kind


def at_step_start(step: int) -> None:
    kind = _fault(step)
    if kind in SIGNALS:
        os.kill(os.getpid(), SIGNALS[kind])


def maybe_poison_loss(loss: torch.Tensor, step: int, micro: int) -> torch.Tensor:
    return loss * float("nan") if _fault(step, micro) == "nonfinite_loss" else loss


def maybe_crash_during_save(step: int) -> None:
    kind = _fault(step)
    if kind == "crash_in_save":
        os._exit(17)  # as abrupt as a SIGKILL: no cleanup, no exception handlers
    if kind == "slow_save":
        time.sleep(SLOW_SAVE_S)
