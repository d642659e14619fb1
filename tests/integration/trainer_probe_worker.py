"""Worker for test_gpu_path: set up the real trainer, then count what a GPU would pay for.

    deepspeed --num_gpus 2 trainer_probe_worker.py CONFIG.yaml OUT_DIR

Runs ``train_step`` for a few optimizer steps, counting the host syncs a CUDA run would make
there, by who makes them: ``Tensor.item/tolist/__bool__/__float__/__int__``, ``nonzero`` (without
``as_tuple``) and ``dist.all_reduce`` called from the project's code ("ours") or from transformers
("transformers"), and the accelerator's ``synchronize()`` reached from the project's code through
DeepSpeed calls alone (e.g. ``GatheredParameters``; DeepSpeed's own hooks are its business). The
CPU accelerator reports that it resolves data dependencies, so DeepSpeed skips the synchronize
calls a CUDA accelerator makes: here it reports what CUDA does. Then it calls the checkpoint's
adapter gather and records how many tensors each rank kept. Writes ``OUT_DIR/rank-K.json``.
"""

import functools
import json
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

STEPS = 2
COUNTS = Counter()
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "nonzero")


def caller(depth: int = 2) -> str | None:
    f = sys._getframe(depth).f_code.co_filename
    return "ours" if "/allora_ds/" in f else "transformers" if "/transformers/" in f else None


HOST_SIDE = [0]  # > 0 while train.model_inputs runs: it reads the collated batch, still on the host


def host_side(fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        HOST_SIDE[0] += 1
        try:
            return fn(*args, **kwargs)
        finally:
            HOST_SIDE[0] -= 1

    return wrapped


def counted(key, fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        who = caller()
        if who and not HOST_SIDE[0] and not (key == "nonzero" and kwargs.get("as_tuple")):
            COUNTS[f"{who}.{key}"] += 1
        return fn(*args, **kwargs)

    return wrapped


def called_by_us() -> bool:
    """Whether the nearest caller outside DeepSpeed is the project's code, not through the engine.
    (DeepSpeed's hooks run under torch's module calls, and the engine's forward/backward/step do
    their own syncing: e.g. ZeRO-3's step gathers the persistent parameters and synchronizes.)"""
    f = sys._getframe(2)
    while f is not None and "/deepspeed/" in f.f_code.co_filename:
        if f.f_code.co_filename.endswith("/deepspeed/runtime/engine.py"):
            return False
        f = f.f_back
    return f is not None and "/allora_ds/" in f.f_code.co_filename


def counted_synchronize(fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        if called_by_us():
            COUNTS["ours.synchronize"] += 1

        return fn(*args, **kwargs)

    return wrapped


def main():
    cfg_path, out = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    from allora_ds import checkpoint
    from allora_ds.config import load_config
    from allora_ds.distributed import leave_process_group
    from allora_ds import train
    from allora_ds.train import setup, train_step

    train.model_inputs = host_side(train.model_inputs)

    from deepspeed.accelerator import get_accelerator

    run = setup(load_config(cfg_path))
    acc = type(get_accelerator())
    # As CUDA, for the ZeRO-3 parameter calls the project makes (gathers): DeepSpeed then
    # synchronizes where it would there. The engine's and coordinator's own calls keep the CPU
    # answer: with CUDA's they would wait on CUDA streams, which the CPU accelerator does not have.
    if get_accelerator().device_name() == "cpu":  # on CUDA DeepSpeed already answers as CUDA does
        acc.resolves_data_dependency = lambda self: not (
            sys._getframe(1).f_code.co_filename.endswith("partition_parameters.py") and called_by_us())
    acc.synchronize = counted_synchronize(acc.synchronize)
    train_step(run)  # warm up: first-call work is not per-step work
    run.step += 1
    for name in HOST_READS:
        setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    torch.nonzero = counted("nonzero", torch.nonzero)
    dist.all_reduce = counted("all_reduce", dist.all_reduce)
    for _ in range(STEPS):
        train_step(run)
        run.step += 1
    per_step = {k: v / STEPS for k, v in COUNTS.items()}
    kept = checkpoint.gather_adapter_state(run.engine.module)
    trainable = sum(1 for p in run.engine.module.parameters() if p.requires_grad)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank-{run.rank}.json").write_text(json.dumps({
        "per_step": per_step, "gas": run.cfg.train.gradient_accumulation_steps, "kept": len(kept),
        "kept_bytes": sum(t.numel() * t.element_size() for t in kept.values()), "trainable": trainable}))
    leave_process_group()


if __name__ == "__main__":
    from allora_ds.errors import cli  # each rank ends through errors._exit, never in gloo's teardown abort

    cli(main)()
