"""The reliability paths on every shipped DeepSpeed layout that runs on CPU ranks, as users run them.

For each layout (2 ranks): one uninterrupted run with a non-finite step skipped (train.nonfinite=skip,
step 3), and the same run interrupted twice on the way: a stop signal to one rank (step 2, saved),
a SIGKILL of one rank (as step 5 starts, after the step-4 checkpoint), each resumed by the same
command. The skipped step must leave weights, optimizer and LR schedule where they were and the
next step must be applied (ZeRO-2 once summed it onto the dropped gradients, and DeepSpeed then
skipped it as an overflow while the metrics said applied); the interrupted run must end bitwise
where the uninterrupted one does.

The bf16 layouts run with a bf16 model on CPU (DeepSpeed's CPU accelerator supports bf16). hpZ
runs over both ranks (``zero_hpz_partition_size`` 2: its code path, not its inter-node grouping).
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO, read_metrics, run, test_env, train_cmd

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

SHIPPED = REPO / "ds_configs"
LAYOUTS = {  # name -> (model.dtype, changes to the shipped JSON)
    "zero3_cpu": ("float32", {}),
    "zero2_bf16": ("bfloat16", {}),
    "zero3_bf16": ("bfloat16", {}),
    "zero3_hpz_bf16": ("bfloat16", {"zero_hpz_partition_size": 2}),
    "zero3_offload_bf16": ("bfloat16", {}),
}
SKIPPED = 3
STEPS = 6


def test_every_shipped_layout_is_tested_here():
    assert sorted(p.stem for p in SHIPPED.glob("*.json")) == sorted(LAYOUTS)


def _ds_config(name, tmp_path):
    _, changes = LAYOUTS[name]
    if not changes:
        return SHIPPED / f"{name}.json"
    ds = json.loads((SHIPPED / f"{name}.json").read_text())
    ds["zero_optimization"].update(changes)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(ds))
    return path


def _launch(cfg, out, ds_config, dtype, faults, check=True):
    overrides = [f"train.output_dir={out}", f"train.deepspeed={ds_config}", f"model.dtype={dtype}",
                 "train.nonfinite=skip", f"train.max_steps={STEPS}", "train.save_steps=1", f"train.keep_last={STEPS}",
                 "train.eval_steps=0", "export.merged=false", "export.adapter=false"]
    env = test_env(ALLORA_DS_FAULT=",".join([f"nonfinite_loss@{SKIPPED}", *faults]))
    return run(train_cmd(cfg, *overrides), env=env, check=check)


def _adapters(out, step):
    return load_file(out / "checkpoints" / f"step-{step:08d}" / "adapter_model.safetensors")


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_skip_stop_kill_and_resume(layout, trained, tmp_path):
    _, cfg, _ = trained
    dtype, _ = LAYOUTS[layout]
    ds_config = _ds_config(layout, tmp_path)
    straight = tmp_path / "straight"
    p = _launch(cfg, straight, ds_config, dtype, [])
    assert "OVERFLOW" not in p.stdout + p.stderr, "DeepSpeed skipped a step the trainer counted as applied"
    rows = {r["step"]: r for r in read_metrics(straight)}
    assert [rows[s]["skipped_steps"] for s in sorted(rows)] == [0, 0, 1, 1, 1, 1]
    assert rows[SKIPPED]["loss"] is None and rows[SKIPPED]["grad_norm"] is None
    # Skipped: the LR schedule holds. Next: applied, with a finite norm, and the schedule moves on.
    assert rows[SKIPPED]["lr"] == rows[SKIPPED - 1]["lr"]
    after = rows[SKIPPED + 1]
    assert after["grad_norm"] is not None and after["grad_norm"] < float("inf"), after
    assert after["lr"] != rows[SKIPPED]["lr"], "the step after the skipped one did not advance the LR schedule"
    before, skipped, nxt = (_adapters(straight, s) for s in (SKIPPED - 1, SKIPPED, SKIPPED + 1))
    assert all(torch.equal(before[k], skipped[k]) for k in before), "the skipped step moved the weights"
    assert any(not torch.equal(skipped[k], nxt[k]) for k in skipped), "the step after the skipped one was not applied"
    assert all(torch.isfinite(v).all() for v in nxt.values())

    out = tmp_path / "interrupted"
    p = _launch(cfg, out, ds_config, dtype, ["sigterm@2:1"])  # one rank gets it; both stop at step 2
    assert "stop signal received" in p.stdout + p.stderr
    p = _launch(cfg, out, ds_config, dtype, ["sigkill@5:1"], check=False)
    assert p.returncode != 0, "the launcher must report the killed rank"
    assert (out / "checkpoints" / "latest").read_text() == "step-00000004"
    p = _launch(cfg, out, ds_config, dtype, [])
    assert "step-00000004 at step 4" in p.stdout + p.stderr
    want = [(s, rows[s]["loss"]) for s in sorted(rows)]
    got = [(r["step"], r["loss"]) for r in read_metrics(out)]
    assert got == want, f"{layout}: per-step losses differ after stop/kill/resume:\n {want}\n {got}"
    a, b = _adapters(straight, STEPS), _adapters(out, STEPS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{layout}: final adapters differ"
