"""Fault injection for the reliability tests, driven by one environment variable.

    ALLORA_DS_FAULT=nonfinite_loss@STEP[:RANK]   the loss of optimizer step STEP (1-based) is NaN
    ALLORA_DS_FAULT=crash_in_save@STEP[:RANK]    the process dies while writing checkpoint STEP

Unset (always, outside tests) every hook is a no-op.
"""

from __future__ import annotations

import os

import torch


def _fault(kind: str, step: int) -> bool:
    spec = os.environ.get("ALLORA_DS_FAULT", "")
    if not spec.startswith(kind + "@"):
        return False
    at, _, rank = spec.split("@", 1)[1].partition(":")
    return int(at) == step and (not rank or int(rank) == int(os.environ.get("RANK", "0")))


def maybe_poison_loss(loss: torch.Tensor, step: int) -> torch.Tensor:
    return loss * float("nan") if _fault("nonfinite_loss", step) else loss


def maybe_crash_during_save(step: int) -> None:
    if _fault("crash_in_save", step):
        os._exit(17)  # as abrupt as a SIGKILL: no cleanup, no exception handlers
