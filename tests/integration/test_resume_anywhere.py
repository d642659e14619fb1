"""A checkpoint continues on another number of ranks and under another ZeRO layout.

Each continuation resumes a checkpoint of step 4 with the fault hook ``dump_restored@4``: every
rank writes the optimizer state it restored (fp32 masters, Adam moments, step count) in the
checkpoint's own ``elastic/`` form, which must equal the saved state bit for bit. With the same
global batch the continued steps 5-8 must match an uninterrupted run up to the order of
floating-point reductions, and their learning rates exactly. Runs, shared where they can be: the
``trained`` run (2 ranks, ZeRO-3, ALLoRA) and one uninterrupted 1-rank run, each the source of one
continuation and the reference of the other (2 -> 1 under ZeRO-3; 1 -> 2 into ZeRO-2); an hpZ run
on 4 ranks as 2 nodes (LoRA, bf16), continued on 2 ranks under ZeRO-3.

The arithmetic of a changed global batch (data position, schedule kept in examples) is tested in
process below.
"""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from allora_ds import checkpoint
from allora_ds.config import load_config
from allora_ds.distributed import free_port
from tests.cluster.helpers import run_together
from tests.helpers import BIN, REPO, read_metrics, run, test_env, train_cmd, write_config

STEP = 4  # every run here checkpoints at step 4 of 8 (train.save_steps of the shared config)
CKPT = f"step-{STEP:08d}"


def _launch(cfg, out, *overrides, nprocs=2, fault=None):
    env = test_env(ALLORA_DS_FAULT=fault) if fault else test_env()
    return run(train_cmd(cfg, f"train.output_dir={out}", "export.merged=false", "export.adapter=false",
                         "train.eval_steps=0", *overrides, nprocs=nprocs), env=env)


def cpu_variant(name, tmp_path):
    """A shipped bf16 layout with its precision taken from model.dtype (fp32 on CPU)."""
    ds = json.loads((REPO / "ds_configs" / f"{name}.json").read_text())
    ds["bf16"]["enabled"] = "auto"
    path = tmp_path / f"{name}_fp32.json"
    path.write_text(json.dumps(ds))
    return path


def _full_state(directory, masters=None):
    """{(name, key): the whole flattened tensor} from every rank's ranges in an elastic/ directory;
    the fp32 masters from there or, for a checkpoint, from its adapter file."""
    out = {(name, "fp32"): t.reshape(-1) for name, t in load_file(masters).items()} if masters else {}
    for f in sorted(directory.glob("rank-*.safetensors")):
        with safe_open(f, "pt") as r:
            for name, (start, numel, total) in json.loads(r.metadata()["slices"]).items():
                for key in ("exp_avg", "exp_avg_sq") + (() if masters else ("fp32",)):
                    t = out.setdefault((name, key), torch.full((total,), float("nan")))
                    t[start:start + numel] = r.get_tensor(f"{name}/{key}")
            if "@step" in r.keys():
                out[("@step", "")] = r.get_tensor("@step")
    return out


def _continue(src_run, out, cfg, *overrides, nprocs=2):
    """Resume ``src_run``'s step-4 checkpoint from a copy in ``out``; check the restored state is the saved one."""
    shutil.copytree(src_run / "checkpoints" / CKPT, out / "checkpoints" / CKPT)
    p = _launch(cfg, out, *overrides, nprocs=nprocs, fault=f"dump_restored@{STEP}")
    saved = _full_state(out / "checkpoints" / CKPT / "elastic", out / "checkpoints" / CKPT / "adapter_model.safetensors")
    restored = _full_state(out / f"restored-{CKPT}")
    assert saved and ("@step", "") in saved and restored.keys() == saved.keys()
    for k in saved:
        assert torch.equal(restored[k], saved[k]), f"{k}: restored optimizer state differs from the saved one"
    assert saved[("@step", "")].item() == STEP
    return p.stdout + p.stderr


def _assert_continues(out, reference, what, rel):
    want = {r["step"]: r for r in read_metrics(reference)}
    got = read_metrics(out)
    assert [r["step"] for r in got] == list(range(STEP + 1, 9)), f"{what}: steps {[r['step'] for r in got]}"
    for r in got:
        assert r["lr"] == want[r["step"]]["lr"], f"{what}: step {r['step']} lr {r['lr']} != {want[r['step']]['lr']}"
        assert r["loss"] == pytest.approx(want[r["step"]]["loss"], rel=rel), \
            f"{what}: step {r['step']} loss {r['loss']} vs uninterrupted {want[r['step']]['loss']}"


@pytest.fixture(scope="module")
def one_rank(trained, tmp_path_factory):
    """The trained run's config on 1 rank with twice the accumulation (the same global batch of 16)."""
    _, cfg, _ = trained
    out = tmp_path_factory.mktemp("one_rank") / "run"
    _launch(cfg, out, "train.gradient_accumulation_steps=4", nprocs=1)
    return out


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_ranks_continue_on_one(trained, one_rank, tmp_path):
    run_dir, cfg, _ = trained
    out = tmp_path / "run"
    log = _continue(run_dir, out, cfg, "train.gradient_accumulation_steps=4", nprocs=1)
    assert "continuing a checkpoint of 2 rank(s) under ZeRO-3 on 1 rank(s) under ZeRO-3" in log, log[-3000:]
    assert f"resumed from {out / 'checkpoints' / CKPT} at step {STEP}" in log
    assert "continues as step" not in log, "the global batch is unchanged: nothing to convert"
    _assert_continues(out, one_rank, "2 ranks -> 1", rel=1e-5)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_one_rank_under_zero3_continues_on_two_under_zero2(trained, one_rank, tmp_path):
    """Into ZeRO-2's partitioning, where a rank's share of the flat fp32 group may end inside a
    parameter; compared with the 2-rank ZeRO-3 run (ZeRO-2 and ZeRO-3 compute the same steps:
    test_zero_equivalence)."""
    run_dir, cfg, _ = trained
    out = tmp_path / "run"
    log = _continue(one_rank, out, cfg, f"train.deepspeed={cpu_variant('zero2_bf16', tmp_path)}")
    assert "continuing a checkpoint of 1 rank(s) under ZeRO-3 on 2 rank(s) under ZeRO-2" in log, log[-3000:]
    _assert_continues(out, run_dir, "1 rank ZeRO-3 -> 2 ranks ZeRO-2", rel=1e-5)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_hpz_on_four_ranks_continues_as_zero3_on_two_with_lora(tiny_model, tmp_path):
    """ZeRO-3 + hpZ as users run it on 2 nodes (two launchers of 2 ranks, so hpZ groups the ranks of
    a node), LoRA and bf16 as the shipped configs are; its step-4 checkpoint continued on one node
    of 2 ranks under plain ZeRO-3 with the same global batch of 16, compared with its own steps 5-8
    (the same steps whatever the layout, up to reduction order)."""
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model, tmp_path / "unused",
                       model={"dtype": "bfloat16"}, adapter={"method": "lora", "alpha": 8.0},
                       train={"micro_batch_size": 2, "gradient_accumulation_steps": 2})
    src = tmp_path / "hpz"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("nodeA slots=2\nnodeB slots=2\n")
    port = free_port()
    cmds = [[BIN / "deepspeed", "--hostfile", hostfile, "--no_ssh", "--node_rank", k, "--master_addr", "127.0.0.1",
             "--master_port", port, "--module", "allora_ds.train", cfg, f"train.output_dir={src}",
             f"train.deepspeed={REPO / 'ds_configs' / 'zero3_hpz_bf16.json'}", "train.eval_steps=0",
             "export.merged=false", "export.adapter=false"] for k in (0, 1)]
    run_together(cmds, [tmp_path / f"node-{k}.log" for k in (0, 1)], test_env())
    assert json.loads((src / "ds_config.json").read_text())["zero_optimization"]["zero_hpz_partition_size"] == 2
    out = tmp_path / "run"
    log = _continue(src, out, cfg, f"train.deepspeed={REPO / 'ds_configs' / 'zero3_bf16.json'}",
                    "train.gradient_accumulation_steps=4")
    assert "continuing a checkpoint of 4 rank(s) under ZeRO-3 on 2 rank(s) under ZeRO-3" in log, log[-3000:]
    # bf16 weights: a last-bit difference of an fp32 master can flip a bf16 weight.
    _assert_continues(out, src, "hpZ on 4 ranks -> ZeRO-3 on 2", rel=2e-3)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_what_cannot_continue_is_refused_with_one_line(trained, tmp_path):
    """A checkpoint without elastic/ (as written before it existed), on another world size: refused
    before any model is loaded, naming the checkpoint and what to do."""
    run_dir, cfg, _ = trained
    out = tmp_path / "run"
    ckpt = out / "checkpoints" / "step-00000008"
    shutil.copytree(run_dir / "checkpoints" / "step-00000008", ckpt)
    shutil.rmtree(ckpt / "elastic")
    p = run(train_cmd(cfg, f"train.output_dir={out}", nprocs=1), check=False)
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert p.returncode == 2 and len(errors) == 1, p.stderr[-3000:]
    assert f"{ckpt} was written by 2 ranks and holds no world-size-free optimizer state" in errors[0], errors
    assert errors[0].endswith("this run has 1: resume it with 2 processes"), errors
    assert sorted(x.name for x in (out / "checkpoints").iterdir()) == ["step-00000008"], "refused, yet written"


# ---------------------------------------------------------------------------------------------
# another global batch: the plan, in process


def _cfg(tmp_path, **train):
    path = write_config(tmp_path / "cfg.yaml", tmp_path / "model", tmp_path / "out", train=train)
    return load_config(path)


def _saved(step, global_batch, steps_per_epoch, world=2, **extra):
    return {"step": step, "global_batch": global_batch, "steps_per_epoch": steps_per_epoch, "world_size": world,
            "skipped_steps": 0, "scheduler_steps": step, **extra}


def test_the_same_global_batch_continues_unchanged(tmp_path):
    cfg = _cfg(tmp_path, micro_batch_size=4, gradient_accumulation_steps=4, max_steps=100, warmup_steps=10)
    plan = checkpoint.plan_continuation(_saved(40, 16, 30), cfg, 1, 30, 100)
    assert (plan.step, plan.total_steps, plan.schedule_scale, plan.scheduler_steps, plan.notes) == (40, 100, 1, 40, [])


def test_half_the_global_batch_keeps_data_position_and_schedule_in_examples(tmp_path):
    # 2 ranks x 4 x 2 = 16 per step, 30 steps/epoch; now 1 rank x 4 x 2 = 8 per step, 60 steps/epoch.
    cfg = _cfg(tmp_path, micro_batch_size=4, gradient_accumulation_steps=2, max_steps=100, warmup_steps=10)
    plan = checkpoint.plan_continuation(_saved(45, 16, 30, skipped_steps=1, scheduler_steps=44), cfg, 1, 60, 100)
    # Step 45 = epoch 1, 15 steps (240 examples) into it = step 60 + 30 here.
    assert plan.step == 90 and plan.scheduler_steps == 88
    assert plan.schedule_scale == 2 and plan.total_steps == 200 and plan.schedule_batch == 16
    assert "global batch 16 -> 8 sequences: step 45 (240 examples into epoch 1) continues as step 90" in plan.notes[0]
    assert "warmup 20 steps of 8, train.max_steps=100: 200 steps here" in plan.notes[1]


def test_a_larger_global_batch_rounds_down_and_counts_epochs(tmp_path):
    # 16 per step -> 48 per step (3 ranks x 4 x 4); epochs mode: the run's own steps per epoch.
    cfg = _cfg(tmp_path, micro_batch_size=4, gradient_accumulation_steps=4, max_steps=-1, epochs=2, warmup_steps=3)
    plan = checkpoint.plan_continuation(_saved(5, 16, 30, world=2), cfg, 3, 10, 20)
    assert plan.step == 1 and plan.total_steps == 20  # 80 examples: one step of 48, 32 seen again
    assert "32 of them are trained again" in plan.notes[0]
    assert plan.scheduler_steps == pytest.approx(5 * 16 / 48) and plan.schedule_scale == pytest.approx(1 / 3)


def test_schedule_batch_carries_over_a_second_resume(tmp_path):
    """A run started at 16 per step, resumed at 8 (whose checkpoints record schedule_batch 16), then at 8
    again: still converted from 16, not taken as the run's own steps."""
    cfg = _cfg(tmp_path, micro_batch_size=4, gradient_accumulation_steps=2, max_steps=100, warmup_steps=10)
    plan = checkpoint.plan_continuation(_saved(90, 8, 60, world=1, schedule_batch=16, scheduler_steps=88), cfg, 1, 60,
                                        100)
    assert (plan.step, plan.total_steps, plan.schedule_scale, plan.scheduler_steps) == (90, 200, 2, 88)


@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)`")
def test_scheduler_lambdas_are_converted_to_this_runs_steps(tmp_path):
    from transformers import get_scheduler

    cfg = _cfg(tmp_path, micro_batch_size=4, gradient_accumulation_steps=2, max_steps=100, warmup_steps=10, lr=1.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = get_scheduler("cosine", opt, num_warmup_steps=10, num_training_steps=100)
    sched = get_scheduler("cosine", torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0),
                          num_warmup_steps=10, num_training_steps=100)
    plan = checkpoint.plan_continuation(_saved(30, 16, 30), cfg, 1, 60, 100)  # half the batch: steps 2x
    checkpoint._continue_schedule(sched, cfg, plan)
    for _ in range(30):
        ref.step()
    assert sched.get_last_lr() == pytest.approx(ref.get_last_lr(), rel=1e-12)  # step 60 here = step 30 there
    sched.step()
    ref_half = ref.lr_lambdas[0](30.5)
    assert sched.get_last_lr()[0] == pytest.approx(ref_half, rel=1e-12)
