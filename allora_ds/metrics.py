"""Training metrics: metrics.jsonl (+ the trackers of train.report_to) on rank 0, log windows over ranks, MFU."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from allora_ds import flops, log
from allora_ds.config import Config
from allora_ds.distributed import all_reduce_sum
from allora_ds.trackers import Trackers


class MetricsLog:
    """metrics.jsonl and the trackers of ``train.report_to`` (trackers.py), on rank 0 only."""

    def __init__(self, out: Path, enabled: bool, cfg: Config | None = None, run_id: str = "",
                 tracker_runs: dict | None = None):
        """``tracker_runs``: the trainer state's tracker run ids, for a resumed run to continue them."""
        self.enabled, self.trackers = enabled, None
        if enabled:
            self.f = open(out / "metrics.jsonl", "a", encoding="utf-8")
            names = cfg.train.report_to if cfg is not None else ["tensorboard"]
            self.trackers = Trackers(names, out, cfg.to_dict() if cfg is not None else {}, run_id, tracker_runs)

    def tracker_runs(self) -> dict[str, str]:
        """The started trackers' run ids (rank 0; empty elsewhere), kept in the trainer state."""
        return self.trackers.run_ids() if self.enabled else {}

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()
        self.trackers.log(record)

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.f.close()
            self.trackers.close()


@dataclass
class LogWindow:
    """What the training steps since the last log record add up to, on this rank.

    Only the steps themselves are timed (eval and checkpoints are not training throughput), and the
    loss averages over applied steps only: a skipped step's loss is not part of any update.
    """

    loss: float | torch.Tensor = 0.0  # sum over applied steps of this rank's loss share
    applied: int = 0
    skipped: int = 0
    tokens: int = 0
    causal_pairs: int = 0
    seconds: float = 0.0

    def add(self, loss_share: torch.Tensor, tokens: int, causal_pairs: int, applied: bool, seconds: float) -> None:
        if applied:
            self.loss = self.loss + loss_share.double()
        self.applied += applied
        self.skipped += not applied
        self.tokens += tokens
        self.causal_pairs += causal_pairs
        self.seconds += seconds

    def record(self, device, world: int, flop_model: flops.FlopModel | None, peak_tflops: float | None) -> dict:
        """The window's metrics over all ranks (one collective); MFU of ``world`` devices of ``peak_tflops``."""
        loss_sum, tokens, pairs = all_reduce_sum([self.loss, self.tokens, self.causal_pairs], device)
        flop = flop_model.step_flops(tokens, pairs) if flop_model else 0.0
        u = flops.mfu(flop, self.seconds, world, peak_tflops)
        return {"loss": loss_sum / self.applied if self.applied else None, "applied_steps": self.applied,
                "window_skipped_steps": self.skipped, "train_seconds": self.seconds,
                "tokens_per_s": tokens / self.seconds if self.seconds > 0 else None,
                **({"mfu": u} if u is not None else {})}


def peak_tflops(cfg: Config) -> float | None:
    """Per-device peak for MFU: train.peak_tflops, else the datasheet value of this GPU."""
    if cfg.train.peak_tflops > 0:
        return cfg.train.peak_tflops
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    peak = flops.peak_tflops(name)
    if peak is None:
        log.info(f"no datasheet peak for {name!r}: MFU is not reported; set train.peak_tflops")
    return peak
