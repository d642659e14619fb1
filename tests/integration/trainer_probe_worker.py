"""Worker for test_gpu_path: set up the real trainer, then count what a GPU would pay for.

    deepspeed --num_gpus 2 trainer_probe_worker.py CONFIG.yaml OUT_DIR

Runs ``train_step`` for a few optimizer steps with the host-sync points of torch counted when the
project's code calls them (``Tensor.item``, ``Tensor.tolist``, ``float(tensor)``,
``dist.all_reduce``), then calls the
checkpoint's adapter gather and records how many tensors each rank kept. Writes
``OUT_DIR/rank-K.json``.
"""

import functools
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

STEPS = 2
COUNTS = {"item": 0, "tolist": 0, "float": 0, "all_reduce": 0}


def counted(key, fn):
    """``fn``, counting the calls made from the project's own code (DeepSpeed's are its business)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        if "/allora_ds/" in sys._getframe(1).f_code.co_filename:
            COUNTS[key] += 1
        return fn(*args, **kwargs)

    return wrapped


def main():
    cfg_path, out = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    from allora_ds import checkpoint
    from allora_ds.config import load_config
    from allora_ds.distributed import leave_process_group
    from allora_ds.train import setup, train_step

    run = setup(load_config(cfg_path))
    train_step(run)  # warm up: first-call work is not per-step work
    run.step += 1
    torch.Tensor.item = counted("item", torch.Tensor.item)
    torch.Tensor.tolist = counted("tolist", torch.Tensor.tolist)
    torch.Tensor.__float__ = counted("float", torch.Tensor.__float__)
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
    main()
