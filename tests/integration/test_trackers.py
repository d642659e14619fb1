"""train.report_to with the real packages: W&B offline (its run files read back), MLflow against a
real ``mlflow server`` on 127.0.0.1 with a sqlite store (read back through its client); a resumed
run continues the same tracker run; a tracker that cannot be reached is one warning; rank 0 only."""

import json
import os
import signal
import struct
import subprocess
import time
import urllib.request

import pytest

from allora_ds.config import load_config
from allora_ds.distributed import free_port
from allora_ds.metrics import MetricsLog
from tests.helpers import BIN, run, test_env, train_cmd, write_config

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]  # an mlflow server (and the trainer) in child processes
wandb = pytest.importorskip("wandb")
pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}",
                             "--default-artifact-root", str(d / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], stdout=open(d / "server.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, (d / "server.log").read_text()[-2000:]
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start in 60 s: " + (d / "server.log").read_text()[-2000:])
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the workers it started
        proc.wait(timeout=30)


def wandb_records(path):
    """The records of a W&B run file (.wandb: LevelDB-log framing of protobuf Records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:
            break
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # a full record, or the last fragment of one
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def wandb_history(run_dir):
    """{step: {key: value}} of every offline W&B run directory under ``run_dir``, and the run ids."""
    history, ids, configs = {}, set(), []
    for f in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for r in wandb_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                ids.add(r.run.run_id)
                configs.append({u.key: json.loads(u.value_json) for u in r.run.config.update})
            elif kind == "history":
                item = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                if "step" in item:  # ours; W&B adds records of its own
                    history.setdefault(item["step"], {}).update(item)
    return history, ids, configs


def _mlflow_run(uri, run_id):
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("allora_ds")
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`allora_ds.run_id` = '{run_id}'")
    assert len(runs) == 1, runs
    return c, runs[0]


def test_metrics_reach_wandb_and_mlflow_and_a_resume_continues_their_runs(tmp_path, mlflow_uri, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    cfg = load_config(None, ["model.path=x", "data.train=d.jsonl", "train.lr=0.003", "train.report_to=[wandb, mlflow]"])
    records = [{"kind": "train", "step": 1, "loss": 2.5, "lr": 0.001}, {"kind": "train", "step": 2, "loss": 2.0, "lr": 0.002},
               {"kind": "eval", "step": 2, "eval_loss": 1.9, "eval_ppl": 6.7}]
    with MetricsLog(tmp_path, True, cfg, "run0123") as m:
        for r in records[:2]:
            m.write(r)
        ids = m.tracker_runs()  # what the trainer state keeps
    c, run_ = _mlflow_run(mlflow_uri, "run0123")
    assert ids == {"wandb": "run0123", "mlflow": run_.info.run_id}
    # The resumed run: same trainer-state run_id and tracker ids, under another experiment name. The
    # stored MLflow id finds the run wherever it is (a search by tag looks in one experiment only).
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "renamed")
    with MetricsLog(tmp_path, True, cfg, "run0123", ids) as m:
        m.write({"kind": "train", "step": 2, "loss": 2.0, "lr": 0.002})  # logged again after the checkpoint
        m.write(records[2])
        assert m.tracker_runs() == ids
    assert c.search_runs([c.get_experiment_by_name("renamed").experiment_id]) == []
    assert [(h.step, h.value) for h in c.get_metric_history(run_.info.run_id, "train/loss")] == [(1, 2.5), (2, 2.0), (2, 2.0)]
    assert [(h.step, h.value) for h in c.get_metric_history(run_.info.run_id, "eval/eval_ppl")] == [(2, 6.7)]
    assert run_.data.params["train.lr"] == "0.003" and run_.data.params["data.train"] == "d.jsonl"
    history, ids, configs = wandb_history(tmp_path)
    assert ids == {"run0123"} and configs[0]["train"]["lr"] == 0.003
    assert history[1]["train/loss"] == 2.5 and history[2]["eval/eval_loss"] == 1.9 and history[2]["train/lr"] == 0.002
    assert [json.loads(ln)["step"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 2, 2]


def test_a_stored_mlflow_id_the_server_does_not_have_falls_back_to_the_run_id_tag(tmp_path, mlflow_uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    cfg = load_config(None, ["model.path=x", "data.train=d.jsonl", "train.report_to=[mlflow]"])
    with MetricsLog(tmp_path, True, cfg, "runtag") as m:
        m.write({"kind": "train", "step": 1, "loss": 1.5})
    with MetricsLog(tmp_path, True, cfg, "runtag", {"mlflow": "0" * 32}) as m:  # e.g. a state from another server
        m.write({"kind": "train", "step": 2, "loss": 1.0})
        ids = m.tracker_runs()
    c, run_ = _mlflow_run(mlflow_uri, "runtag")
    assert ids == {"mlflow": run_.info.run_id}
    assert [h.step for h in c.get_metric_history(run_.info.run_id, "train/loss")] == [1, 2]


def test_an_unreachable_tracker_is_one_warning_and_metrics_jsonl_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = load_config(None, ["model.path=x", "data.train=d.jsonl", "train.report_to=[mlflow]"])
    with MetricsLog(tmp_path, True, cfg, "r1") as m:
        for step in (1, 2):
            m.write({"kind": "train", "step": step, "loss": 1.0})
    warnings = [ln for ln in capsys.readouterr().out.splitlines() if "warning:" in ln]
    assert len(warnings) == 1 and "train.report_to: mlflow could not start" in warnings[0], warnings
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_two_rank_training_reports_from_rank_0_under_the_trainer_state_run_id(tiny_model, tmp_path, mlflow_uri):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model, tmp_path / "run", train={"max_steps": 2, "save_steps": 0,
                                                                                   "report_to": ["wandb", "mlflow"]})
    run(train_cmd(cfg), env=test_env(WANDB_MODE="offline", MLFLOW_TRACKING_URI=mlflow_uri))
    out = tmp_path / "run"
    state = json.loads(next(out.glob("checkpoints/step-*/trainer_state.json")).read_text())
    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    history, ids, _ = wandb_history(out)
    assert ids == {state["run_id"]}, "one W&B run (rank 0's), named by the trainer state's run_id"
    c, run_ = _mlflow_run(mlflow_uri, state["run_id"])
    assert state["tracker_runs"] == {"wandb": state["run_id"], "mlflow": run_.info.run_id}
    losses = {h.step: h.value for h in c.get_metric_history(run_.info.run_id, "train/loss")}
    for rec in metrics:
        if rec["kind"] == "train":
            assert losses[rec["step"]] == pytest.approx(rec["loss"]) == history[rec["step"]]["train/loss"]
