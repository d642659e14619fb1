"""Fault injection for the reliability tests, driven by one environment variable.

    ALLORA_DS_FAULT=KIND@STEP[:RANK]     (STEP is the 1-based optimizer step; RANK defaults to all)

    nonfinite_loss   the loss of step STEP is NaN
    crash_in_save    the process dies (no cleanup) while writing the checkpoint of step STEP
    sigkill          the process SIGKILLs itself as step STEP starts
    sigterm, sigusr1 the process receives the signal as step STEP starts

Unset (always, outside tests) every hook is a no-op.
"""

from __future__ import annotations

import os
import signal

import torch

SIGNALS = {"sigkill": signal.SIGKILL, "sigterm": signal.SIGTERM, "sigusr1": signal.SIGUSR1}


def _fault(step: int) -> str | None:
    spec = os.environ.get("ALLORA_DS_FAULT", "")
    if "@" not in spec:
        return None
    kind, at = spec.split("@", 1)
    at, _, rank = at.partition(":")
    if int(at) == step and (not rank or int(rank) == int(os.environ.get("RANK", "0"))):
        return kind
    return None


def at_step_start(step: int) -> None:
    kind = _fault(step)
    if kind in SIGNALS:
        os.kill(os.getpid(), SIGNALS[kind])


def maybe_poison_loss(loss: torch.Tensor, step: int) -> torch.Tensor:
    return loss * float("nan") if _fault(step) == "nonfinite_loss" else loss


def maybe_crash_during_save(step: int) -> None:
    if _fault(step) == "crash_in_save":
        os._exit(17)  # as abrupt as a SIGKILL: no cleanup, no exception handlers
