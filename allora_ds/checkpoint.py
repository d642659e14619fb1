"""Checkpoints: adapters + optimizer + scheduler + data position + RNG, never the frozen base.

Layout of ``OUTPUT_DIR/checkpoints/step-00000040/`` (the one place that knows it):

    ds/state/...                  DeepSpeed's checkpoint (exclude_frozen_parameters): per-rank
                                  optimizer partitions, scheduler, adapter module states
    adapter_model.safetensors     the full fp32 adapter weights, topology-free (rank 0)
    rng/rank-00000.pt             each rank's torch RNG state
    trainer_state.json            step, epoch, world size, the config; written last

A checkpoint is written under ``.tmp-step-…`` and renamed to ``step-…`` by rank 0 only after
every rank has finished and ``trainer_state.json`` exists, so a crash mid-save never leaves a
directory that looks complete. ``latest`` names the newest complete checkpoint. Resuming needs
the same world size (DeepSpeed's optimizer partitions are per rank); a different one is refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from allora_ds import log
from allora_ds.config import Config
from allora_ds.errors import UserError

CKPT_DIR = "checkpoints"
DS_DIR, DS_TAG = "ds", "state"
ADAPTER_FILE = "adapter_model.safetensors"
STATE_FILE = "trainer_state.json"
LATEST = "latest"
STEP_RE = re.compile(r"^step-(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _is_zero3_param(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def gather_adapter_state(module: torch.nn.Module, keep_on_rank: int = 0) -> dict[str, torch.Tensor]:
    """Full fp32 trainable weights by name (the optimizer's master copy where DeepSpeed keeps one).

    A collective under ZeRO: every rank must call it. Each weight is assembled on the device one at
    a time, and only ``keep_on_rank`` copies it to host memory; the other ranks get ``{}`` (a full
    copy per rank would be ~1.7 GB of host memory each for 70B at r=32, ~13 GB per 8-GPU node).
    """
    from deepspeed.utils import safe_get_full_fp32_param

    keep = not dist.is_initialized() or dist.get_rank() == keep_on_rank
    out = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        full = safe_get_full_fp32_param(p)
        if full is None:  # plain fp32 training without ZeRO: the parameter is the master copy
            full = p.detach()
        if keep:
            out[name] = full.detach().float().cpu().contiguous()
        del full
    return out


def save(engine, run_dir: Path, step: int, trainer_state: dict, keep_last: int, rank: int) -> Path:
    """Write a complete checkpoint for ``step`` (all ranks call this) and prune this run's old ones.

    ``trainer_state["run_id"]`` names the run: pruning only ever deletes checkpoints that carry it.
    """
    from allora_ds._testing import faults

    root = run_dir / CKPT_DIR
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    engine.save_checkpoint(str(tmp / DS_DIR), tag=DS_TAG, save_latest=False, exclude_frozen_parameters=True)
    faults.maybe_crash_during_save(step)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(rng, tmp / "rng" / f"rank-{rank:05d}.pt")
    adapters = gather_adapter_state(engine.module)
    if rank == 0:
        save_file(adapters, tmp / ADAPTER_FILE, metadata={"format": "pt"})
    _barrier()  # every rank's files are on disk
    if rank == 0:
        _write_json(tmp / STATE_FILE, trainer_state)
        if final.exists():  # a same-step checkpoint from an earlier attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_text_atomic(root / LATEST, final.name)
        ours = [c for c in complete_checkpoints(run_dir) if _run_id(c) == trainer_state["run_id"]]
        for old in ours[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _write_json(path: Path, obj: dict) -> None:
    _write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True))


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _run_id(ckpt: Path) -> str | None:
    try:
        return json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8")).get("run_id")
    except (OSError, json.JSONDecodeError):
        return None


def other_runs_checkpoints(run_dir: Path, resume_from: Path | None, overwrite: bool, why: str) -> bool:
    """Whether ``run_dir`` holds checkpoints this run must not write among; raises unless ``overwrite``.

    A run may write into ``run_dir/checkpoints`` only when it continues the newest complete checkpoint
    there (or there is none). Anything else (``why``: a new run, or a resume from an older or foreign
    checkpoint) would interleave two runs' checkpoints. With ``overwrite`` the caller moves
    ``run_dir`` aside (``move_aside``) before it writes anything.
    """
    done = complete_checkpoints(run_dir)
    if not done or (resume_from is not None and resume_from.resolve() == done[-1].resolve()):
        return False
    if not overwrite:
        raise UserError(f"train.output_dir: {run_dir / CKPT_DIR} holds another run's checkpoints (up to {done[-1].name}) "
                        f"and this run does not continue them ({why}); use a new train.output_dir, "
                        "train.resume=auto to continue that run, or train.overwrite_output_dir=true to move it aside")
    return True


def move_aside(run_dir: Path) -> Path:
    """Rename ``run_dir`` to ``RUN_DIR.replaced-TIME`` in one atomic step: nothing is deleted."""
    aside = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    os.rename(run_dir, aside)
    return aside


def is_complete(ckpt: Path) -> bool:
    return (ckpt / STATE_FILE).is_file() and (ckpt / ADAPTER_FILE).is_file() and (ckpt / DS_DIR / DS_TAG).is_dir()


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_RE.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: p.name)


def incomplete_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p.name.startswith(".tmp-") or
                                                                (STEP_RE.match(p.name) and not is_complete(p))))


def resolve_resume(resume: str, run_dir: Path) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from (or None) and notes to print about skipped directories."""
    notes = [f"ignoring incomplete checkpoint {p} (interrupted while saving)" for p in incomplete_checkpoints(run_dir)]
    if resume == "never":
        return None, []
    if resume == "auto":
        done = complete_checkpoints(run_dir)
        return (done[-1] if done else None), notes
    p = Path(resume)
    if not p.is_dir():
        raise UserError(f"train.resume: checkpoint {resume} does not exist")
    if not is_complete(p):
        raise UserError(f"train.resume: {resume} is not a complete checkpoint (no {STATE_FILE}, {ADAPTER_FILE} or {DS_DIR}/)")
    return p, []


def read_trainer_state(ckpt: Path) -> dict:
    try:
        return json.loads((Path(ckpt) / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{Path(ckpt) / STATE_FILE}: unreadable ({e})") from None


def read_adapter_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """The topology-free fp32 adapter weights of a checkpoint (no DeepSpeed needed)."""
    path = Path(ckpt) / ADAPTER_FILE
    if not path.is_file():
        raise UserError(f"checkpoint {ckpt}: missing {ADAPTER_FILE}")
    return load_file(path)


def load(engine, ckpt: Path, rank: int) -> None:
    """Restore engine (adapters, optimizer, scheduler) and this rank's RNG. The trainer state is rank
    0's, broadcast (decide_resume): this rank's view of ``trainer_state.json`` may be stale."""
    load_path, _ = engine.load_checkpoint(str(Path(ckpt) / DS_DIR), tag=DS_TAG, load_module_strict=False,
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise UserError(f"{ckpt}: DeepSpeed could not load {DS_DIR}/{DS_TAG}")
    rng_file = Path(ckpt) / "rng" / f"rank-{rank:05d}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])


# ---------------------------------------------------------------------------------------------
# resume policy


def trainer_state(cfg: Config, step: int, run_id: str, steps_per_epoch: int, skipped_steps: int, world: int) -> dict:
    """What a checkpoint records besides the weights (trainer_state.json): progress, run, config, adapters."""
    return {"step": step, "run_id": run_id, "epoch": step / steps_per_epoch, "skipped_steps": skipped_steps,
            "world_size": world, "config": cfg.to_dict(), "adapter": cfg.adapter.checkpoint_record()}


def decide_resume(cfg: Config, out: Path, rank: int, world: int) -> tuple[Path | None, dict | None, bool]:
    """The checkpoint to resume from, its trainer state, and whether ``out`` holds another run's
    checkpoints to move aside (train.overwrite_output_dir; refused otherwise): decided by rank 0
    and broadcast.

    Ranks on different nodes must not each list a shared filesystem: with NFS attribute caching a
    node can miss the newest checkpoint (or still see a pruned one), and ranks that resume from
    different steps hang or silently train on mismatched states. A user error found by rank 0
    (missing path, incompatible config) is raised on every rank, so all stop alike.
    """
    decision: list = [None, None, None, False]  # checkpoint path, trainer state, error message, move out aside
    if rank == 0:
        try:
            ckpt, notes = resolve_resume(cfg.train.resume, out)
            for n in notes:
                log.info(n)
            if ckpt is not None:  # refuse an incompatible resume before loading anything big
                state = read_trainer_state(ckpt)
                check_resume_compatible(cfg, state, ckpt, world)
            why = "train.resume=never" if ckpt is None else f"it resumes from {ckpt}"
            decision[3] = other_runs_checkpoints(out, ckpt, cfg.train.overwrite_output_dir, why)
            if ckpt is not None:
                decision[:2] = [str(ckpt), state]
        except UserError as e:
            decision[2] = str(e)
    dist.broadcast_object_list(decision, src=0)
    if decision[2] is not None:
        raise UserError(decision[2])
    return (Path(decision[0]) if decision[0] else None), decision[1], decision[3]


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records after ``step`` (logged by an interrupted run after its last checkpoint)."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")


# Keys whose change makes a resumed run a different experiment.
RESUME_GUARDED = ("model.path", "model.dtype", "adapter.method", "adapter.rank", "adapter.eta", "adapter.alpha",
                  "adapter.dropout", "adapter.target_modules", "data.train", "data.format", "data.max_seq_len",
                  "data.packing", "train.seed", "train.micro_batch_size", "train.gradient_accumulation_steps")


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part, {}) if isinstance(d, dict) else None
    return d


def check_resume_compatible(cfg: Config, saved: dict, ckpt: Path, world: int) -> None:
    old, new = saved.get("config", {}), cfg.to_dict()
    allowed = set(cfg.train.resume_allow_changes)
    diff = [k for k in RESUME_GUARDED if _get(old, k) != _get(new, k) and k not in allowed]
    if diff:
        detail = "; ".join(f"{k}: {_get(old, k)!r} -> {_get(new, k)!r}" for k in diff)
        raise UserError(f"train.resume: {ckpt} was written with a different config ({detail}); use a new "
                        f"train.output_dir, or train.resume_allow_changes={','.join(diff)} if the change is intended")
    if saved.get("world_size") != world:
        raise UserError(f"train.resume: {ckpt} was written by {saved.get('world_size')} ranks, this run has {world}; "
                        "DeepSpeed's optimizer state is partitioned per rank, so resume with the same number of "
                        "processes")
