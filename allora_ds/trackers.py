"""Experiment trackers beside metrics.jsonl (``train.report_to``): TensorBoard, Weights & Biases, MLflow.

Each gets the scalars of every metrics.jsonl record (``train/loss``, ``eval/eval_loss``, ... at
their step) and the effective config as parameters; only rank 0 has trackers (``MetricsLog``). A
resumed run continues the same tracker run, found from the trainer state's ``run_id`` (kept
across resumes): it is the W&B run id, and the MLflow run carries it as the tag
``allora_ds.run_id``. A tracker that is not installed, fails or cannot be reached prints one
warning and is dropped: the run goes on, and metrics.jsonl stays the record.

W&B reads its usual environment (``WANDB_PROJECT``, ``WANDB_MODE=offline``, ``WANDB_DIR``; runs
are written under OUTPUT_DIR/wandb unless ``WANDB_DIR`` says otherwise); MLflow reads
``MLFLOW_TRACKING_URI`` and ``MLFLOW_EXPERIMENT_NAME`` (default ``allora_ds``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from allora_ds import log

RUN_TAG = "allora_ds.run_id"


def scalars(record: dict) -> dict[str, float]:
    """``kind/key -> value`` of a metrics.jsonl record's numbers (not its step)."""
    return {f"{record['kind']}/{k}": float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


def flat_params(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)
    return out


class TensorBoard:
    name = "tensorboard"

    run_id = None  # event files under OUTPUT_DIR/tensorboard: nothing to find again

    def __init__(self, out: Path, config: dict, run_id: str, resume_id: str | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.w = SummaryWriter(str(out / "tensorboard"))

    def log(self, record: dict) -> None:
        for k, v in scalars(record).items():
            self.w.add_scalar(k, v, record["step"])

    def close(self) -> None:
        self.w.close()


class WandB:
    name = "wandb"

    def __init__(self, out: Path, config: dict, run_id: str, resume_id: str | None = None):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "allora_ds"), name=out.name, id=resume_id or run_id,
                              resume="allow", config=config, dir=os.environ.get("WANDB_DIR", str(out)),
                              settings=wandb.Settings(console="off", silent=True))
        # Steps of the first attempt after its last checkpoint come again after a resume: an x-axis
        # of our own instead of W&B's strictly increasing internal step.
        self.run.define_metric("*", step_metric="step")
        self.run_id = self.run.id

    def log(self, record: dict) -> None:
        self.run.log({**scalars(record), "step": record["step"]})

    def close(self) -> None:
        self.run.finish()


class MLflow:
    name = "mlflow"

    def __init__(self, out: Path, config: dict, run_id: str, resume_id: str | None = None):
        # A tracking server that is down must not hold the run for minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = c = MlflowClient()
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "allora_ds")
        exp = c.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp else c.create_experiment(name)
        found = self._stored(resume_id) or c.search_runs([exp_id], filter_string=f"tags.`{RUN_TAG}` = '{run_id}'",
                                                         max_results=1)
        if found:
            self.run_id = found[0].info.run_id
            c.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = c.create_run(exp_id, run_name=out.name, tags={RUN_TAG: run_id}).info.run_id
            # MLflow keeps a parameter's first value: the config of the run's start. 6000: its value limit.
            params = [Param(k, v[:6000]) for k, v in flat_params(config).items()]
            for i in range(0, len(params), 100):
                c.log_batch(self.run_id, params=params[i:i + 100])

    def _stored(self, resume_id: str | None) -> list:
        """The run of the trainer state's MLflow id, if this server has it (a deleted run is not resumed)."""
        from mlflow.exceptions import MlflowException

        if not resume_id:
            return []
        try:
            found = self.client.get_run(resume_id)
        except MlflowException:  # another server, or the run is gone: look for it by tag
            return []
        return [found] if found.info.lifecycle_stage == "active" else []

    def log(self, record: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, record["step"]) for k, v in scalars(record).items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


CLASSES = {c.name: c for c in (TensorBoard, WandB, MLflow)}


class Trackers:
    """The trackers of ``train.report_to`` that could be started; each failure is one warning."""

    def __init__(self, names: list[str], out: Path, config: dict, run_id: str, resume: dict | None = None):
        self.active = []
        for name in names:
            try:
                self.active.append(CLASSES[name](out, config, run_id, (resume or {}).get(name)))
            except ImportError:
                if name != "tensorboard":  # the default: used when installed, silently skipped otherwise
                    self._warn(name, f"is not installed (pip install 'allora-ds[{name}]')")
            except Exception as e:  # noqa: BLE001 - a tracker must never stop training
                self._warn(name, f"could not start ({type(e).__name__}: {_first_line(e)})")

    @staticmethod
    def _warn(name: str, why: str) -> None:
        log.info(f"warning: train.report_to: {name} {why}; continuing without it (metrics.jsonl has every record)",
                 above_bar=True)

    def _each(self, call) -> None:
        for t in list(self.active):
            try:
                call(t)
            except Exception as e:  # noqa: BLE001 - a tracker must never stop training
                self.active.remove(t)
                self._warn(t.name, f"failed ({type(e).__name__}: {_first_line(e)})")

    def run_ids(self) -> dict[str, str]:
        """Each started tracker's own run id, for the trainer state (``tracker_runs``)."""
        return {t.name: t.run_id for t in self.active if t.run_id}

    def log(self, record: dict) -> None:
        self._each(lambda t: t.log(record))

    def close(self) -> None:
        self._each(lambda t: t.close())
        self.active = []


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [""])[0][:200]
