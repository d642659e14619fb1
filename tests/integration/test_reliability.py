"""Fault injection on real 2-rank ZeRO-3 runs: killed ranks, crashes mid-save, NaNs, refusals.
(Skip, stop, kill and resume on every shipped layout: test_layouts.py.)

Each faulty run uses the config of the shared uninterrupted ``trained`` run (8 steps, checkpoints
every 4) with another output_dir, so "nothing lost" is checked bitwise against it.
"""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from allora_ds._testing.faults import SLOW_S
from tests.helpers import read_metrics, run, test_env, train_cmd

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]  # the trainer or its ranks run in child processes

FINAL = "step-00000008"


def _launch(cfg, out, fault=None, check=True, *overrides):
    env = test_env(ALLORA_DS_FAULT=fault) if fault else test_env()
    return run(train_cmd(cfg, f"train.output_dir={out}", "export.merged=false", "export.adapter=false", *overrides),
               env=env, check=check)


def _ckpts(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())


def _assert_same_as_uninterrupted(trained_dir, out):
    straight = [(r["step"], r["loss"]) for r in read_metrics(trained_dir)]
    again = [(r["step"], r["loss"]) for r in read_metrics(out)]
    assert again == straight, f"per-step losses differ:\n uninterrupted {straight}\n interrupted   {again}"
    a = load_file(trained_dir / "checkpoints" / FINAL / "adapter_model.safetensors")
    b = load_file(out / "checkpoints" / FINAL / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: final adapter weights differ from the uninterrupted run"


def test_killed_rank_and_crash_during_save_lose_nothing(trained, tmp_path):
    run_dir, cfg, _ = trained
    out = tmp_path / "run"
    # 1. Rank 1 is SIGKILLed as step 6 starts, after the step-4 checkpoint.
    p = _launch(cfg, out, "sigkill@6:1", check=False)
    assert p.returncode != 0, "the launcher must report the killed rank"
    assert _ckpts(out) == ["step-00000004"]
    # 2. Resumed; now rank 0 dies while writing the step-8 checkpoint (after DeepSpeed wrote its part).
    p = _launch(cfg, out, "crash_in_save@8:0", check=False)
    assert p.returncode != 0
    assert _ckpts(out) == [".tmp-step-00000008", "step-00000004"], "a half-written checkpoint must not look complete"
    assert (out / "checkpoints" / "latest").read_text() == "step-00000004"
    # 3. Resumed again: the half-written directory is reported and skipped, step 4 is used.
    p = _launch(cfg, out)
    log = p.stdout + p.stderr
    assert "ignoring incomplete checkpoint" in log and ".tmp-step-00000008" in log, log[-3000:]
    assert "resumed from" in log and "step-00000004 at step 4" in log
    _assert_same_as_uninterrupted(run_dir, out)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(trained, tmp_path):
    _, cfg, _ = trained
    out = tmp_path / "run"
    p = _launch(cfg, out, "nonfinite_loss@6:0", check=False)
    assert p.returncode == 3, p.stderr[-3000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert errors and all("non-finite loss at step 6; stopped (train.nonfinite=stop)" in e for e in errors), errors
    assert "Traceback" not in p.stderr
    assert _ckpts(out) == ["step-00000004"] and (out / "checkpoints" / "latest").read_text() == "step-00000004"
    weights = load_file(out / "checkpoints" / "step-00000004" / "adapter_model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_incompatible_resume_is_refused_by_key(trained, tmp_path):
    run_dir, cfg, _ = trained
    p = run(train_cmd(cfg, "adapter.rank=8", "train.seed=4"), check=False)  # same output_dir: resumes step 8
    err = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and "adapter.rank: 4 -> 8" in err and "train.seed: 3 -> 4" in err, p.stderr[-2000:]
    assert "train.resume_allow_changes=adapter.rank,train.seed" in err
    # Another world size or layout is no longer refused: test_resume_anywhere.py continues it.


def test_metrics_average_applied_steps_and_time_only_training(trained, tmp_path):
    """One run with log windows of 2 steps (the trained run logged every step, with the same data):
    step 4 is non-finite in its second micro-batch only, steps 5 and 6 entirely; the step-4
    checkpoint takes 20 s longer than it should; the export after step 8 takes 45 s longer, which is
    longer than the 30 s a rank may wait in a collective here."""
    run_dir, cfg, _ = trained
    out = tmp_path / "run"
    faults = "nonfinite_loss@4.2,nonfinite_loss@5,nonfinite_loss@6,slow_save@4,slow_export@8"
    p = _launch(cfg, out, faults, False, "train.nonfinite=skip", "train.log_steps=2",
                "train.collective_timeout_minutes=0.5", "export.adapter=true")
    assert p.returncode == 0, p.stderr[-3000:]
    assert (out / "export" / "adapter" / "adapter_model.safetensors").is_file(), "the export was lost"
    straight = {r["step"]: r["loss"] for r in read_metrics(run_dir)}
    rows = {r["step"]: r for r in read_metrics(out)}
    assert sorted(rows) == [2, 4, 6, 8]
    assert rows[2]["loss"] == pytest.approx((straight[1] + straight[2]) / 2, rel=1e-6)
    # Step 3 applied, step 4 skipped: the mean is step 3's loss, not biased by step 4's finite half.
    assert (rows[4]["applied_steps"], rows[4]["window_skipped_steps"]) == (1, 1)
    assert rows[4]["loss"] == pytest.approx(straight[3], rel=1e-6)
    # Nothing applied: no loss to report (not 0.0).
    assert rows[6]["loss"] is None and rows[6]["applied_steps"] == 0 and rows[6]["skipped_steps"] == 3
    # The 20 s spent saving step 4 are not training time: the step-6 window is two tiny steps.
    assert rows[6]["train_seconds"] < SLOW_S["slow_save"], rows[6]


def test_a_new_run_into_a_used_output_dir_is_refused_or_moves_the_old_run_aside(trained, tmp_path):
    run_dir, cfg, _ = trained
    out = tmp_path / "run"
    shutil.copytree(run_dir / "checkpoints", out / "checkpoints")
    shutil.copy(run_dir / "metrics.jsonl", out / "metrics.jsonl")
    before, metrics = _ckpts(out), (out / "metrics.jsonl").read_text()
    new_run = ("train.max_steps=4", "train.save_steps=2", "train.keep_last=1")
    for resume in ("never", str(out / "checkpoints" / "step-00000004")):  # a new run; a resume from an older step
        p = _launch(cfg, out, None, False, f"train.resume={resume}", *new_run)
        errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
        assert p.returncode == 2 and errors, p.stderr[-3000:]
        assert f"{out / 'checkpoints'} holds another run's checkpoints (up to step-00000008)" in errors[0]
        assert "train.overwrite_output_dir=true" in errors[0] and "train.resume=auto" in errors[0]
        assert _ckpts(out) == before and (out / "metrics.jsonl").read_text() == metrics, "refused, yet touched"
    p = _launch(cfg, out, None, True, "train.resume=never", *new_run, "train.overwrite_output_dir=true",
                "export.adapter=true")
    aside = [d for d in tmp_path.iterdir() if d.name.startswith("run.replaced-")]
    assert len(aside) == 1 and _ckpts(aside[0]) == before and (aside[0] / "metrics.jsonl").read_text() == metrics
    assert _ckpts(out) == ["step-00000004"] and (out / "checkpoints" / "latest").read_text() == "step-00000004"
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
    assert (out / "export" / "adapter" / "adapter_model.safetensors").is_file()
