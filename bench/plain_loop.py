"""The framework-overhead limit of bench/throughput_8b.py: a plain PyTorch loop, no DeepSpeed.

    deepspeed --num_gpus 2 bench/plain_loop.py --config RUN.yaml --out timing.json --marks marks.txt \
        --timed-from 4

Reads the same allora_ds config the allora_ds run reads and trains what it trains: the model and
adapters built by ``allora_ds.modeling.load_model`` (without ZeRO-3), the chunked loss, the
micro-batches of ``allora_ds.train.micro_batches`` (the same packed rows in the same order, the
same loss normalisation by the global batch's labels), AdamW, clipping and the schedule of the
config. What it leaves out is everything between the model and the hardware that a trainer adds:
the DeepSpeed engine, ZeRO's gradient partitioning and hooks, allora_ds's metrics, checkpoints and
stop handling. Gradients are averaged by ``torch.nn.parallel.DistributedDataParallel`` (gloo on
CPU, NCCL on GPUs): the least a data-parallel loop can communicate.

Rank 0 writes ``--out``: the wall-clock time between the ends of optimizer steps ``--timed-from``
and ``max_steps`` (each after a barrier, as in the other systems), the tokens of the steps in
between (the caller counts their examples from the same data order), and the mean loss of the
last ``--timed-from`` steps (the allora_ds run's last metrics record covers the same steps: equal
losses show both did the same work). At both ends it appends a line to ``--marks`` for the caller
to read the CPU time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="the allora_ds YAML of the run this one is compared with")
    p.add_argument("--out", required=True)
    p.add_argument("--marks", default=None, help="rank 0 appends a line here at both ends of the timing window")
    p.add_argument("--timed-from", type=int, required=True, help="the timing window starts at the end of this step")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args()


class PlainLoop:
    """The loop over one allora_ds config: ``step(i)`` trains optimizer step ``i`` and returns the
    step's global mean loss (a tensor) and this rank's tokens. With a process group of more than one
    rank, gradients are averaged by DDP; without one it is a world of one."""

    def __init__(self, config: str | Path):
        import torch
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel
        from transformers import get_scheduler

        from allora_ds import sequence_parallel as sp
        from allora_ds.config import load_config
        from allora_ds.data import rounds_per_epoch
        from allora_ds.ds_config import fill_ds_config, read_ds_config
        from allora_ds.modeling import SCHEDULERS, load_model, load_tokenizer
        from allora_ds.train import TrainingRun, prepare_data

        distributed = dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        cfg = load_config(config)
        tc = self.tc = cfg.train
        torch.manual_seed(tc.seed)
        tok = load_tokenizer(cfg.model)
        rows = prepare_data(cfg, tok, rank=1)[0]  # rank != 0: the allora_ds run prints the data report
        rounds = rounds_per_epoch(len(rows), tc.micro_batch_size, world)
        rounds -= rounds % tc.gradient_accumulation_steps
        # The trainer's own data order and counts: micro_batches reads only these fields.
        self.data = TrainingRun(cfg=cfg, out=Path(tc.output_dir), rank=rank, world=world, engine=None,
                                pad_token_id=tok.pad_token_id, train_rows=rows, eval_rows=None,
                                rounds_per_epoch=rounds, total_steps=tc.max_steps, label_counts=rows["n_labels"],
                                layout=sp.Layout.of(rank, world, 1))
        # The run's DeepSpeed JSON only for what load_model reads of it (a replicated base: not ZeRO-3).
        ds = fill_ds_config(read_ds_config(tc.deepspeed), cfg, world, 0, tc.deepspeed)
        assert ds["zero_optimization"]["stage"] < 3, "the plain loop replicates the base model"
        self.model, _, _ = load_model(cfg, ds, verbose=False)
        self.model.train()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.world, self.distributed = world, distributed and world > 1
        self.forward = DistributedDataParallel(self.model) if self.distributed else self.model
        self.opt = torch.optim.AdamW(self.trainable, lr=tc.lr, betas=(0.9, 0.999), eps=1e-8,
                                     weight_decay=tc.weight_decay)
        sched = SCHEDULERS[tc.scheduler]
        self.lr_schedule = get_scheduler(sched, self.opt, num_warmup_steps=tc.warmup_steps,
                                         num_training_steps=tc.max_steps)

    def step(self, step: int):
        import contextlib

        import torch
        import torch.distributed as dist

        from allora_ds.loss import label_positions
        from allora_ds.train import micro_batches

        sb = micro_batches(self.data, step)
        gas = len(sb.batches)
        # DDP averages over ranks: the loss summed over this rank's labels, times world / N, gives
        # the gradient of (sum of all token losses) / N, as the trainer's normalisation does.
        per_micro = max(sb.global_labels, 1) / self.world
        step_loss = torch.zeros(())
        for k, b in enumerate(sb.batches):
            inputs = dict(b)
            inputs["label_positions"] = label_positions(b["labels"], b.get("shift_labels"))
            accumulate = self.distributed and k < gas - 1
            with self.forward.no_sync() if accumulate else contextlib.nullcontext():
                loss = self.forward(**inputs, num_items_in_batch=per_micro).loss
                loss.backward()
            step_loss += loss.detach() / self.world
        torch.nn.utils.clip_grad_norm_(self.trainable, self.tc.max_grad_norm)
        self.opt.step()
        self.lr_schedule.step()
        self.opt.zero_grad(set_to_none=True)
        if self.distributed:
            dist.all_reduce(step_loss)  # the global mean loss of the step, as the trainer logs it
        return step_loss, sb.tokens


def main() -> None:
    a = parse_args()
    import deepspeed
    import torch
    import torch.distributed as dist

    # The process group through DeepSpeed only because load_model's (disabled) zero.Init reads the
    # world size from it; the loop itself uses torch.distributed and DDP.
    deepspeed.init_distributed(dist_backend="gloo")
    loop = PlainLoop(a.config)
    steps = loop.tc.max_steps
    marks: dict[int, float] = {}
    losses, tokens = [], 0
    for step in range(steps):
        loss, n = loop.step(step)
        losses.append(loss.item())
        done = step + 1
        if a.timed_from < done:
            tokens += n
        if done in (a.timed_from, steps):
            dist.barrier()
            marks[done] = time.perf_counter()
            if a.marks and dist.get_rank() == 0:
                with open(a.marks, "a") as f:
                    f.write(f"{done}\n")
    totals = torch.tensor([tokens], dtype=torch.float64)
    dist.all_reduce(totals)
    if dist.get_rank() == 0:
        dt = marks[steps] - marks[a.timed_from]
        Path(a.out).write_text(json.dumps({
            "tokens": int(totals[0]), "seconds": dt, "tokens_per_s": float(totals[0]) / dt, "world": loop.world,
            "final_loss": sum(losses[-a.timed_from:]) / a.timed_from, "losses": losses,
        }))


if __name__ == "__main__":
    from allora_ds.errors import cli  # each rank ends through errors._exit, never in gloo's teardown abort

    cli(main)()
