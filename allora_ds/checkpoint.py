"""Checkpoints: adapters + optimizer + scheduler + data position + RNG, never the frozen base.

Layout of ``OUTPUT_DIR/checkpoints/step-00000040/`` (the one place that knows it):

    ds/state/...                  DeepSpeed's checkpoint (exclude_frozen_parameters): per-rank
                                  optimizer partitions, scheduler, adapter module states
    elastic/rank-00000.safetensors  the same optimizer state by parameter name, each rank's own
                                  ranges (elastic_state.py): what a run on another number of
                                  ranks or another ZeRO layout continues from
    adapter_model.safetensors     the full fp32 adapter weights, topology-free (rank 0)
    rng/rank-00000.pt             each rank's torch RNG state
    trainer_state.json            step, epoch, batch and layout, schedule position, the config; last

A checkpoint is written under ``.tmp-step-…`` and renamed to ``step-…`` by rank 0 only after
every rank has finished and ``trainer_state.json`` exists, so a crash mid-save never leaves a
directory that looks complete. ``latest`` names the newest complete checkpoint. A write that fails
(full disk, quota, I/O error, read-only filesystem) on any rank stops every rank with one line
(``CheckpointWriteError``): the partial directory is removed and ``latest`` is left as it was.

Resuming with the layout that wrote a checkpoint loads DeepSpeed's own files; another world size or
ZeRO stage loads ``elastic/`` into the new partitioning, and a changed global batch continues at the
same position in the data with the schedule converted (``plan_continuation``).
"""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import re
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from allora_ds import elastic_state, log
from allora_ds.config import Config
from allora_ds.errors import ReportedError, UserError

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
    Raises ``CheckpointWriteError`` on every rank when a write fails on any of them.
    """
    from allora_ds._testing import faults

    root = run_dir / CKPT_DIR
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}"
    writes = _Writes(tmp)
    if rank == 0:
        writes.attempt(tmp, lambda: (shutil.rmtree(tmp, ignore_errors=True), tmp.mkdir(parents=True)))
    _raise_if_failed(writes, engine, run_dir, final, rank)  # also the barrier: the directory exists
    with writes.into_deepspeed(engine):
        engine.save_checkpoint(str(tmp / DS_DIR), tag=DS_TAG, save_latest=False, exclude_frozen_parameters=True)
    faults.maybe_crash_during_save(step)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    writes.attempt(tmp / "rng", lambda: (faults.maybe_fail_write(step), (tmp / "rng").mkdir(exist_ok=True),
                                         torch.save(rng, tmp / "rng" / f"rank-{rank:05d}.pt")))
    if elastic_state.supported(engine):
        writes.attempt(tmp / elastic_state.DIR, elastic_state.save, engine, tmp / elastic_state.DIR, rank)
    adapters = gather_adapter_state(engine.module)  # a collective: every rank, failed or not
    if rank == 0:
        writes.attempt(tmp / ADAPTER_FILE, save_file, adapters, tmp / ADAPTER_FILE, {"format": "pt"})
    _raise_if_failed(writes, engine, run_dir, final, rank)  # every rank's files are on disk
    if rank == 0:
        state = {**trainer_state, **_engine_record(engine)}
        writes.attempt(tmp / STATE_FILE, _commit, root, tmp, final, state, keep_last)
    _raise_if_failed(writes, engine, run_dir, final, rank)
    return final


def _engine_record(engine) -> dict:
    """What trainer_state.json records of the engine: its layout and where its schedule stands."""
    return {"zero_stage": engine.zero_optimization_stage(), "scheduler_steps": engine.lr_scheduler.last_epoch,
            "engine_steps": engine.global_steps, "engine_samples": engine.global_samples,
            "elastic": elastic_state.supported(engine)}


def _commit(root: Path, tmp: Path, final: Path, state: dict, keep_last: int) -> None:
    """Rank 0, once every rank's files are written: make the checkpoint complete, name it, prune."""
    _write_json(tmp / STATE_FILE, state)
    if final.exists():  # a same-step checkpoint from an earlier attempt
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_text_atomic(root / LATEST, final.name)
    ours = [c for c in complete_checkpoints(root.parent) if _run_id(c) == state["run_id"]]
    for old in ours[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# failures while saving


class CheckpointWriteError(ReportedError):
    """A checkpoint could not be written (full disk, quota, I/O error, read-only filesystem): the run
    stops on every rank with exit code 4; the last complete checkpoint stays where ``latest`` says."""

    exit_code = 4


# What the writers raise: OSError from Python's own I/O, RuntimeError from torch's zip writer
# ("unexpected pos ...", which carries no errno), SafetensorError from safetensors.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)
REASONS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
           errno.EIO: "input/output error", errno.EROFS: "read-only file system"}
SPACE = (errno.ENOSPC, errno.EDQUOT)


class _Writes:
    """One rank's writes of one checkpoint. A failed write is kept, not raised, so that this rank
    still takes part in the collectives that follow (DeepSpeed's save has barriers and gathers; a
    rank that left them would leave the others waiting until the collective timeout); the ranks
    then agree on the first failure (``_raise_if_failed``). After a failure the later writes of
    this rank are skipped: the checkpoint is lost anyway."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.failure: tuple[int | None, str] | None = None  # (errno, what failed)

    def attempt(self, path: Path, fn, *args):
        if self.failure is not None:
            return None
        try:
            return fn(*args)
        except WRITE_ERRORS as e:
            code = _errno_of(e, path)
            where = os.path.relpath(path, self.tmp) if str(path).startswith(str(self.tmp)) else str(path)
            reason = REASONS.get(code) or f"write failed ({(str(e).strip() or type(e).__name__).splitlines()[0]})"
            self.failure = (code, f"{reason} while writing {where}")
            return None

    @contextmanager
    def into_deepspeed(self, engine):
        """DeepSpeed's writes of this checkpoint go through ``attempt`` too: its checkpoint engine's
        ``save`` (every torch.save of model and optimizer states) and the copy of its recovery
        scripts (rank 0); the instance attributes set here are removed again afterwards."""
        ce = engine.checkpoint_engine
        save, copy = ce.save, engine._copy_recovery_script
        ce.save = lambda state_dict, path: self.attempt(Path(path), save, state_dict, path)
        engine._copy_recovery_script = lambda path: self.attempt(Path(path), copy, path)
        try:
            yield
        finally:
            del ce.save, engine._copy_recovery_script


def _errno_of(e: BaseException, path: Path) -> int | None:
    """The errno behind a failed write. torch's and safetensors' writers lose it (their messages may
    still name it); failing that, the filesystem says whether it is read-only or full."""
    if isinstance(e, OSError) and e.errno:
        return e.errno
    text = str(e)
    for code in REASONS:
        if os.strerror(code) in text:
            return code
    fs = _statvfs(path)
    if fs is not None and fs.f_flag & os.ST_RDONLY:
        return errno.EROFS
    if fs is not None and fs.f_bavail * fs.f_frsize < _MIN_FREE:
        return errno.ENOSPC
    return None


_MIN_FREE = 1 << 20  # below 1 MiB free after a failed write, the write failed for want of space


def _statvfs(path: Path):
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return os.statvfs(p)
    except OSError:
        return None


def _raise_if_failed(writes: _Writes, engine, run_dir: Path, final: Path, rank: int) -> None:
    """Agree on the first failure of any rank (this is the barrier between the phases of a save);
    on one, remove the partial checkpoint and raise the same one-line error on every rank."""
    failures = [writes.failure]
    if dist.is_initialized() and dist.get_world_size() > 1:
        failures = [None] * dist.get_world_size()
        dist.all_gather_object(failures, writes.failure)
    failed = [(k, f) for k, f in enumerate(failures) if f is not None]
    if not failed:
        return
    if rank == 0:
        shutil.rmtree(writes.tmp, ignore_errors=True)
    _barrier()
    k, (code, what) = failed[0]
    root = run_dir / CKPT_DIR
    on = f" on rank {k}" if len(failures) > 1 else ""
    need = ""
    if code in SPACE:
        fs = _statvfs(root)
        free = f", {_size(fs.f_bavail * fs.f_frsize)} free" if fs is not None else ""
        need = f"; a checkpoint needs about {_size(checkpoint_size(engine, run_dir))}{free}"
    latest = root / LATEST
    last = f"{latest} still names {latest.read_text().strip()}" if latest.is_file() else "there is no earlier checkpoint"
    raise CheckpointWriteError(f"checkpoint {final.name} not saved in {root}: {what}{on}{need}; the partial "
                               f"checkpoint was removed and {last}; free space (or set train.output_dir to another "
                               "filesystem), then run the same command to resume")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def checkpoint_size(engine, run_dir: Path) -> int:
    """Bytes one checkpoint takes: the newest complete one's size, or an estimate before there is one.

    The estimate: per adapter parameter, fp32 master and two Adam moments twice (DeepSpeed's and
    elastic/), the fp32 adapter file and DeepSpeed's low-precision module copy; per rank the RNG
    state and file overheads; DeepSpeed's two recovery scripts.
    """
    done = complete_checkpoints(run_dir)
    if done:
        return sum(f.stat().st_size for f in done[-1].rglob("*") if f.is_file())
    import deepspeed

    params = [p for p in engine.module.parameters() if p.requires_grad]
    numel = sum(p.ds_numel if _is_zero3_param(p) else p.numel() for p in params)
    lp_bytes = params[0].element_size() if params else 4
    world = dist.get_world_size() if dist.is_initialized() else 1
    scripts = sum(os.path.getsize(Path(deepspeed.__file__).parent / "utils" / f) for f in ("zero_to_fp32.py", "zero_to_torch.py")
                  if (Path(deepspeed.__file__).parent / "utils" / f).is_file())
    return numel * (2 * 12 + 4 + lp_bytes) + world * (32 << 10) + 256 * len(params) + scripts


def warn_if_low_space(engine, run_dir: Path, keep_last: int) -> None:
    """Before the first save: warn when the filesystem of ``run_dir`` has less room than the
    ``keep_last`` checkpoints a run keeps plus the one being written need (rank 0 prints)."""
    have = len(complete_checkpoints(run_dir))
    need = max(keep_last + 1 - have, 1) * checkpoint_size(engine, run_dir)
    fs = _statvfs(run_dir / CKPT_DIR)
    if fs is not None and fs.f_bavail * fs.f_frsize < need:
        log.info(f"warning: {run_dir / CKPT_DIR}: {_size(fs.f_bavail * fs.f_frsize)} free, but train.keep_last="
                 f"{keep_last} checkpoints and the one being written need about {_size(need)} "
                 f"({_size(checkpoint_size(engine, run_dir))} each); a save that runs out of space stops the run "
                 "(the last complete checkpoint is kept)")


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


def load(engine, ckpt: Path, state: dict, cfg: Config, rank: int, world: int, steps_per_epoch: int,
         total_steps: int) -> Continuation:
    """Restore adapters, optimizer, scheduler and RNG from ``ckpt`` (all ranks call this) and return
    where the run continues. ``state`` is rank 0's trainer state, broadcast (decide_resume): this
    rank's view of ``trainer_state.json`` may be stale.

    The layout that wrote the checkpoint (world size and ZeRO stage) loads DeepSpeed's own files;
    any other loads the checkpoint's ``elastic/`` state into this run's partitioning.
    """
    ckpt = Path(ckpt)
    plan = plan_continuation(state, cfg, world, steps_per_epoch, total_steps)
    stage = engine.zero_optimization_stage()
    was = (state.get("world_size"), state.get("zero_stage", stage))
    if was == (world, stage):
        load_path, _ = engine.load_checkpoint(str(ckpt / DS_DIR), tag=DS_TAG, load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise UserError(f"{ckpt}: DeepSpeed could not load {DS_DIR}/{DS_TAG}")
    else:
        why = _why_not_elastic(state, ckpt, world, stage, engine)
        if why:
            raise UserError(why)
        elastic_state.load(engine, ckpt / elastic_state.DIR, ckpt / ADAPTER_FILE)
        engine.global_steps, engine.global_samples = state.get("engine_steps", 0), state.get("engine_samples", 0)
        log.info(f"continuing a checkpoint of {was[0]} rank(s) under ZeRO-{was[1]} on {world} rank(s) under "
                 f"ZeRO-{stage}: masters, Adam moments and step counts from {ckpt / elastic_state.DIR}")
    if was != (world, stage) or plan.schedule_scale != 1 or plan.scheduler_steps != state.get("scheduler_steps"):
        _continue_schedule(engine.lr_scheduler, cfg, plan)
    rng_file = ckpt / "rng" / f"rank-{rank:05d}.pt"
    if was[0] == world and rng_file.is_file():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    elif was[0] != world:
        # A rank's stream cannot be carried over to another number of ranks: each rank starts one
        # of its own, a function of the seed, its rank and the step (dropout masks, if any, differ
        # from those of an uninterrupted run).
        torch.manual_seed(cfg.train.seed + 1_000_003 * (plan.step + 1) + rank)
        log.info(f"RNG: {world} rank(s) instead of {was[0]}: each rank reseeded from train.seed, its rank and step "
                 f"{plan.step}")
    for note in plan.notes:
        log.info(note)
    from allora_ds._testing import faults

    faults.maybe_dump_restored(state["step"], cfg.train.output_dir, lambda d: elastic_state.save(engine, d, rank, masters=True))
    return plan


def _why_not_elastic(state: dict, ckpt: Path, world: int, stage: int, engine) -> str | None:
    """Why ``ckpt`` cannot continue on this layout, as a one-line refusal, or None if it can."""
    written = f"{state.get('world_size')} rank(s) under ZeRO-{state.get('zero_stage', '?')}"
    same = f"resume with {state.get('world_size')} processes and that layout"
    if not (ckpt / elastic_state.DIR).is_dir() or not state.get("elastic", True):
        return (f"train.resume: {ckpt} was written by {written} and holds no world-size-free optimizer state "
                f"({elastic_state.DIR}/: written since allora_ds checkpoints carry it, and only under ZeRO 1-3); "
                f"{same}")
    if not elastic_state.supported(engine):
        return (f"train.resume: {ckpt} was written by {written}; this run's layout (ZeRO-{stage}, {world} rank(s)) "
                f"keeps no partitioned optimizer state to load it into; use a ZeRO-1/2/3 train.deepspeed or {same}")
    return None


@dataclass
class Continuation:
    """Where a resumed run continues, in its own steps (``plan_continuation``)."""

    step: int  # the step this run continues after
    total_steps: int
    schedule_batch: int  # sequences per step that train.max_steps and train.warmup_steps count
    schedule_scale: float  # schedule_batch / this run's global batch (1: the schedule is in this run's steps)
    scheduler_steps: float  # the LR scheduler's position, in this run's steps
    notes: list[str] = field(default_factory=list)


def global_batch(cfg: Config, world: int) -> int:
    """Sequences per optimizer step: the ranks of a sequence-parallel group share theirs."""
    tc = cfg.train
    return tc.micro_batch_size * tc.gradient_accumulation_steps * (world // tc.sequence_parallel_size)


def plan_continuation(saved: dict, cfg: Config, world: int, steps_per_epoch: int, total_steps: int) -> Continuation:
    """Map a checkpoint's progress onto this run's global batch.

    With the same global batch nothing moves: the same step, schedule and data follow (only how a
    step's rows are split over ranks and micro-batches changes). With another one, the data position
    is kept: the run continues in the same epoch at the same number of examples into it (rounded
    down to a whole step: a few examples may be trained twice, never skipped), and the schedule is
    kept in examples: ``train.warmup_steps`` and ``train.max_steps`` count steps of the run's first
    global batch (``schedule_batch``), converted here; ``train.epochs`` counts epochs.
    """
    tc = cfg.train
    batch = global_batch(cfg, world)
    old_cfg = saved.get("config", {}).get("train", {})
    old_batch = saved.get("global_batch") or old_cfg.get("micro_batch_size", tc.micro_batch_size) * \
        old_cfg.get("gradient_accumulation_steps", tc.gradient_accumulation_steps) * saved.get("world_size", world) \
        // old_cfg.get("sequence_parallel_size", 1)
    schedule_batch = saved.get("schedule_batch") or old_batch
    step = saved["step"]
    scheduler_steps = saved.get("scheduler_steps", step - saved.get("skipped_steps", 0))
    plan = Continuation(step, total_steps, schedule_batch, schedule_batch / batch, scheduler_steps)
    if batch != old_batch:
        old_spe = saved.get("steps_per_epoch") or (round(step / saved["epoch"]) if saved.get("epoch") else 1)
        epoch, into = divmod(step, old_spe)
        seen = into * old_batch
        k = seen // batch
        plan.step = epoch * steps_per_epoch + min(k, steps_per_epoch)
        again = seen - min(k, steps_per_epoch) * batch
        plan.scheduler_steps = _exact(scheduler_steps * old_batch / batch)
        detail = (f"; {again} of them are trained again (a step here is {batch})" if 0 < again and k < steps_per_epoch
                  else "; this run's epoch ends before them, so the next epoch starts" if k >= steps_per_epoch else "")
        plan.notes.append(f"global batch {old_batch} -> {batch} sequences: step {step} ({seen} examples into epoch "
                          f"{epoch}) continues as step {plan.step}{detail}")
    if plan.schedule_scale != 1:
        plan.schedule_scale = _exact(plan.schedule_scale)
        if tc.max_steps > 0:
            plan.total_steps = math.ceil(tc.max_steps * plan.schedule_scale)
        length = (f"train.max_steps={tc.max_steps}: {plan.total_steps} steps here" if tc.max_steps > 0
                  else f"train.epochs={tc.epochs}: {plan.total_steps} steps here")
        plan.notes.append(f"schedule kept in examples: train.warmup_steps={tc.warmup_steps} and train.max_steps count "
                          f"steps of {schedule_batch} sequences (the run's first global batch); warmup "
                          f"{tc.warmup_steps * plan.schedule_scale:g} steps of {batch}, {length}")
    return plan


def _exact(x: float):
    """An int where the value is one (a schedule position of 8.0 is step 8)."""
    return int(x) if float(x).is_integer() else x


def _continue_schedule(sched, cfg: Config, plan: Continuation) -> None:
    """Put the LR scheduler where ``plan`` says: its lambdas converted to this run's steps (the
    partial functions transformers' get_scheduler builds, with fractional warmup and length), its
    position, and the optimizer's learning rates recomputed from them, as its own step does."""
    tc = cfg.train
    if plan.schedule_scale != 1:
        scaled = {"num_warmup_steps": tc.warmup_steps * plan.schedule_scale}
        if tc.max_steps > 0:
            scaled["num_training_steps"] = tc.max_steps * plan.schedule_scale
        lambdas = []
        for f in sched.lr_lambdas:
            if not isinstance(f, functools.partial) or "num_warmup_steps" not in f.keywords:
                batch = plan.schedule_batch / plan.schedule_scale
                gas = plan.schedule_batch * tc.gradient_accumulation_steps / batch
                raise UserError(f"train.scheduler={tc.scheduler}: cannot convert its steps to a global batch of "
                                f"{batch:g} sequences; keep the run's {plan.schedule_batch} "
                                f"(train.gradient_accumulation_steps={gas:g} on this world size)")
            lambdas.append(functools.partial(f.func, *f.args, **{**f.keywords, **{key: v for key, v in scaled.items()
                                                                                    if key in f.keywords}}))
        sched.lr_lambdas = lambdas
    sched.last_epoch = plan.scheduler_steps - 1
    with warnings.catch_warnings():  # torch warns of a scheduler step before the first optimizer step
        warnings.simplefilter("ignore", UserWarning)
        sched.step()


# ---------------------------------------------------------------------------------------------
# resume policy


def trainer_state(cfg: Config, step: int, run_id: str, steps_per_epoch: int, skipped_steps: int, world: int,
                  schedule_batch: int = 0, tracker_runs: dict | None = None) -> dict:
    """What a checkpoint records besides the weights (trainer_state.json): progress, run, config,
    adapters, and what a run with another global batch needs to continue (``plan_continuation``);
    ``save`` adds the engine's layout and schedule position. ``tracker_runs``: each tracker's own
    run id (trackers.py), so that a resume continues the same tracker runs."""
    batch = global_batch(cfg, world)
    return {"step": step, "run_id": run_id, "tracker_runs": tracker_runs or {}, "epoch": step / steps_per_epoch,
            "skipped_steps": skipped_steps,
            "world_size": world, "global_batch": batch, "steps_per_epoch": steps_per_epoch,
            "schedule_batch": schedule_batch or batch, "config": cfg.to_dict(), "adapter": cfg.adapter.checkpoint_record()}


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


# Keys whose change makes a resumed run a different experiment. The batch shape is not one: another
# global batch continues from the same data position with the schedule kept in examples.
RESUME_GUARDED = ("model.path", "model.dtype", "adapter.method", "adapter.rank", "adapter.eta", "adapter.alpha",
                  "adapter.dropout", "adapter.target_modules", "data.train", "data.format", "data.max_seq_len",
                  "data.packing", "train.seed")


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
    if saved.get("world_size") != world and not (Path(ckpt) / elastic_state.DIR).is_dir():
        # Known before any model is loaded; a change of ZeRO stage alone is checked in load().
        raise UserError(f"train.resume: {ckpt} was written by {saved.get('world_size')} ranks and holds no "
                        f"world-size-free optimizer state ({elastic_state.DIR}/, written by allora_ds since it "
                        f"resumes on other layouts); this run has {world}: resume it with "
                        f"{saved.get('world_size')} processes")
