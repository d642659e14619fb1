"""The real CLI under the deepspeed launcher, 2 ranks, ZeRO-3, on the tiny model."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import read_metrics, run, train_cmd

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]  # the trainer or its ranks run in child processes

STEPS = 8


def test_loss_decreases(trained):
    rows = read_metrics(trained[0])
    first, last = sum(r["loss"] for r in rows[:2]) / 2, sum(r["loss"] for r in rows[-2:]) / 2
    assert last < first - 0.1, f"loss did not fall: first steps {first:.4f}, last steps {last:.4f}"


def test_metrics_are_well_formed(trained):
    rows = read_metrics(trained[0])
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        for key in ("epoch", "loss", "lr", "grad_norm", "tokens_per_s", "c_min", "c_mean", "c_max", "row_norm_max"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), f"step {r['step']}: bad {key}={r.get(key)}"
        assert 0 < r["c_min"] <= r["c_mean"] <= r["c_max"] <= 2.0 + 1e-6  # c <= eta, equal at zero rows
    assert rows[1]["lr"] == pytest.approx(5e-3)  # end of the 2 warmup steps
    evals = read_metrics(trained[0], "eval")
    assert evals and evals[-1]["step"] == STEPS and evals[-1]["eval_ppl"] == pytest.approx(math.exp(evals[-1]["eval_loss"]))


def test_effective_deepspeed_config_is_written(trained):
    ds = json.loads((trained[0] / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 4 * 2 * 2 and ds["gradient_accumulation_steps"] == 2
    assert ds["optimizer"]["params"]["lr"] == 5e-3 and ds["zero_optimization"]["stage"] == 3
    assert "auto" not in json.dumps(ds)


def test_checkpoint_holds_adapters_not_the_frozen_base(trained, tiny_model):
    ckpts = sorted((trained[0] / "checkpoints").glob("step-*"))
    assert [c.name for c in ckpts] == ["step-00000004", "step-00000008"]
    final = ckpts[-1]
    assert (trained[0] / "checkpoints" / "latest").read_text() == final.name
    # DeepSpeed's module states carry only the trainable (adapter) weights.
    for f in (final / "ds" / "state").glob("*model_states.pt"):
        module = torch.load(f, map_location="cpu", weights_only=False)["module"]
        assert module and all(".lora_" in k for k in module), f"{f.name} holds frozen weights: {list(module)[:3]}"
    snapshot = load_file(final / "adapter_model.safetensors")
    assert snapshot and all(".lora_" in k for k in snapshot)
    size = sum(f.stat().st_size for f in final.rglob("*") if f.is_file() and f.suffix in (".pt", ".safetensors"))
    model_size = (tiny_model / "model.safetensors").stat().st_size
    assert size < 0.5 * model_size, f"checkpoint {size} bytes vs model {model_size}: frozen base saved?"


def test_resume_reproduces_the_uninterrupted_run(trained, tmp_path):
    run_dir, cfg, _ = trained
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir / "checkpoints" / "step-00000004", resumed / "checkpoints" / "step-00000004")
    proc = run(train_cmd(cfg, f"train.output_dir={resumed}", "export.merged=false", "export.adapter=false"))
    assert "resumed from" in proc.stdout + proc.stderr
    straight = {r["step"]: r["loss"] for r in read_metrics(run_dir)}
    again = {r["step"]: r["loss"] for r in read_metrics(resumed)}
    assert sorted(again) == [5, 6, 7, 8]
    for step, loss in again.items():
        assert loss == straight[step], f"step {step}: resumed loss {loss!r} != uninterrupted {straight[step]!r}"
    a = load_file(run_dir / "checkpoints" / "step-00000008" / "adapter_model.safetensors")
    b = load_file(resumed / "checkpoints" / "step-00000008" / "adapter_model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


def test_torchrun_launch_trains_identically(trained, tmp_path):
    """Under torchrun (env:// rendezvous, no --local_rank) the same config gives the same steps.

    With max_steps=4 only the cosine tail differs; steps 1-3 (warmup 2) must match the
    deepspeed-launched run exactly."""
    from tests.helpers import BIN, free_port

    run_dir, cfg, _ = trained
    out = tmp_path / "torchrun"
    run([BIN / "torchrun", "--nproc-per-node", 2, "--master-port", free_port(), "-m", "allora_ds.train", cfg,
         f"train.output_dir={out}", "train.max_steps=4", "export.merged=false", "export.adapter=false"])
    ours = {r["step"]: r["loss"] for r in read_metrics(out)}
    ref = {r["step"]: r["loss"] for r in read_metrics(run_dir)}
    assert [ours[s] for s in (1, 2, 3)] == [ref[s] for s in (1, 2, 3)]
