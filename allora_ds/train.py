"""allora-train: finetune a causal LM with ALLoRA (or LoRA) adapters on DeepSpeed.

    allora-train configs/demo.yaml train.max_steps=20                            # one process
    deepspeed --num_gpus 8 --module allora_ds.train configs/llama3_8b_allora.yaml      # one node
    torchrun --nproc-per-node 8 -m allora_ds.train configs/llama3_8b_allora.yaml
    sbatch launch/slurm/llama3_8b_allora.sbatch                                  # a cluster

The recipe: setup (distributed, config, tokenizer, data, model, engine, resume) -> train loop
(micro-batches -> engine.backward/step, logging, eval, checkpoints, graceful stop) -> final
eval, checkpoint and optional export. Loss is the mean over all response tokens of the global
batch (every rank and micro-batch), so results do not depend on how the batch is split.
The components live elsewhere: process-group plumbing in distributed.py, model and engine in
modeling.py, checkpoints and the resume policy in checkpoint.py, metrics and MFU in metrics.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from allora_ds import activation_offload, checkpoint, flops, log, mixture, tiled_mlp
from allora_ds import sequence_parallel as sp
from allora_ds._testing import faults
from allora_ds.adapters import scale_diagnostics
from allora_ds.config import Config, load_config, save_config, schema_text
from allora_ds.data import IGNORE, collate, epoch_order, example_lengths, label_count, rounds_per_epoch, rank_micro_batch
from allora_ds.distributed import (
    all_reduce_sum, init_distributed, install_stop_handlers, leave_process_group,
)
from allora_ds.ds_config import fill_ds_config, ranks_per_node, read_ds_config
from allora_ds.errors import ReportedError, UserError, cli
from allora_ds.extensions import check_build_locks
from allora_ds.launch_env import check_launch_env
from allora_ds.loss import installed as chunked_loss_installed
from allora_ds.loss import label_positions
from allora_ds.metrics import LogWindow, MetricsLog, peak_tflops
from allora_ds.modeling import (
    build_engine, discard_step, flat_batches, load_model, load_model_config, load_tokenizer,
)


class NonFiniteLoss(ReportedError):
    """Raised under train.nonfinite=stop: the run ends (exit code 3), the last good checkpoint stays."""

    exit_code = 3


@dataclass
class TrainingRun:
    """Everything the loop needs, built by ``setup``."""

    cfg: Config
    out: Path
    rank: int
    world: int
    engine: object
    pad_token_id: int
    train_rows: object
    eval_rows: object | None
    rounds_per_epoch: int
    total_steps: int
    label_counts: list[int] = field(default_factory=list)  # labelled tokens of every train row
    grad_divisor: int = 1  # what DeepSpeed divides the gradients summed over ranks by (sp.gradient_divisor)
    flatten: bool = False  # one row per micro-batch (flash attention), see data.collate
    host_label_positions: bool = False  # the chunked loss is installed: see model_inputs
    flop_model: flops.FlopModel | None = None
    peak_tflops: float | None = None  # per device, for MFU; None: not reported
    run_id: str = ""  # names this run's checkpoints (kept across resumes); pruning touches no others
    tracker_runs: dict = field(default_factory=dict)  # the trackers' own run ids (rank 0), kept across resumes
    step: int = 0
    skipped_steps: int = 0
    schedule_batch: int = 0  # sequences per step train.max_steps/warmup_steps count (checkpoint.Continuation); 0: ours
    stop_signal: threading.Event = field(default_factory=threading.Event)  # set by a signal on this rank
    stop_requested: bool = False  # set when any rank got one, at the same step on all ranks
    keepalive: list = field(default_factory=list)  # objects that must outlive deepspeed.initialize
    layout: sp.Layout = field(default_factory=sp.Layout)  # data-parallel rank/size, place in the SP group
    teardown: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # closed after training
    offload: object = field(default_factory=contextlib.nullcontext)  # entered per step (activation_offload.py)


# ---------------------------------------------------------------------------------------------
# setup


def prepare_data(cfg: Config, tokenizer, rank: int):
    """Tokenized (mixed, packed) train/eval datasets (mixture.prepare); prints the data report on rank 0."""
    data = mixture.prepare(cfg, tokenizer)
    if rank == 0:
        for line in data.report(cfg):
            log.info(line)
    return data.train.rows, data.eval.rows if data.eval else None


def setup(cfg: Config) -> TrainingRun:
    out = Path(cfg.train.output_dir)
    # Check everything a user can get wrong before any process group or model exists.
    ds_raw = read_ds_config(cfg.train.deepspeed)
    model_config = load_model_config(cfg.model)
    sp.check_model(cfg.train.sequence_parallel_size, model_config, cfg.model.attn_implementation)
    sp.check_ds_config(ds_raw, cfg.train.sequence_parallel_size, cfg.train.deepspeed)
    tiled_mlp.check(cfg.model.mlp_tiles)
    activation_offload.check(cfg.model.activation_offload)
    mixture.check_paths(cfg)
    check_launch_env()  # before init_distributed fills in a world of one
    check_build_locks()  # a stale JIT-build lock would make the first DeepSpeed op wait forever

    rank, world, local_rank = init_distributed(cfg.train.collective_timeout_minutes)
    sp.check_layout(cfg.train.sequence_parallel_size, world, ranks_per_node(world))
    layout = sp.Layout.of(rank, world, cfg.train.sequence_parallel_size)
    ds = fill_ds_config(ds_raw, cfg, world, getattr(model_config, "hidden_size", 4096), cfg.train.deepspeed)
    ckpt, state, replace_old_run = checkpoint.decide_resume(cfg, out, rank, world)
    torch.manual_seed(cfg.train.seed)

    tokenizer = load_tokenizer(cfg.model)
    with mixture.tokenizing_rank_first(cfg.data.tokenize_timeout_minutes, local_rank):
        train_rows, eval_rows = prepare_data(cfg, tokenizer, rank)
    tc = cfg.train
    rounds = rounds_per_epoch(len(train_rows), tc.micro_batch_size, layout.dp_world)
    rounds -= rounds % tc.gradient_accumulation_steps  # an optimizer step never spans two epochs
    if rounds == 0:
        raise UserError(f"data.train: {len(train_rows)} examples are fewer than one global batch "
                        f"({tc.micro_batch_size} x {tc.gradient_accumulation_steps} x {layout.dp_world} "
                        "data-parallel ranks)")
    steps_per_epoch = rounds // tc.gradient_accumulation_steps
    total = tc.max_steps if tc.max_steps > 0 else steps_per_epoch * tc.epochs

    model, keepalive, _ = load_model(cfg, ds, verbose=rank == 0)
    sp.check_model(layout.size, model_config, model.config._attn_implementation)  # what transformers chose
    teardown = contextlib.ExitStack()
    mpu = teardown.enter_context(sp.ulysses_attention(model, layout, 1 if flat_batches(model) else tc.micro_batch_size))
    engine = build_engine(cfg, ds, model, total, mpu)
    torch.manual_seed(cfg.train.seed + rank)  # dropout masks differ across ranks
    run = TrainingRun(cfg=cfg, out=out, rank=rank, world=world, layout=layout, teardown=teardown, engine=engine,
                      pad_token_id=tokenizer.pad_token_id,
                      train_rows=train_rows, eval_rows=eval_rows, rounds_per_epoch=rounds, total_steps=total,
                      grad_divisor=sp.gradient_divisor(ds, layout), keepalive=[keepalive],
                      label_counts=train_rows["n_labels"], flatten=flat_batches(model),
                      host_label_positions=chunked_loss_installed(model),
                      flop_model=flops.flop_model(model), peak_tflops=peak_tflops(cfg),
                      offload=activation_offload.install(model) if cfg.model.activation_offload
                      else contextlib.nullcontext(),
                      run_id=(state or {}).get("run_id") or uuid.uuid4().hex,
                      tracker_runs=(state or {}).get("tracker_runs") or {})
    if cfg.model.activation_offload and not activation_offload.offloads_here():
        log.info("model.activation_offload: this accelerator has no device memory to offload from; "
                 "the layer inputs stay where they are")
    split = f" ({layout.dp_world} data-parallel x {layout.size} sequence-parallel)" if layout.size > 1 else ""
    log.info(f"{world} rank(s){split}, {steps_per_epoch} steps/epoch, {total} steps, global batch "
             f"{checkpoint.global_batch(cfg, world)} sequences")
    if ckpt is not None:
        resumed = checkpoint.load(engine, ckpt, state, cfg, rank, world, steps_per_epoch, total)
        run.step, run.skipped_steps = resumed.step, state.get("skipped_steps", 0)
        run.total_steps, run.schedule_batch = resumed.total_steps, resumed.schedule_batch
        log.info(f"resumed from {ckpt} at step {run.step}")
    checkpoint.warn_if_low_space(engine, out, tc.keep_last)
    if replace_old_run:
        dist.barrier()  # every rank has read what it resumes from, wherever that was
    if rank == 0:  # only now: a run that failed to set up leaves an existing output_dir untouched
        if replace_old_run:
            aside = checkpoint.move_aside(out)
            log.info(f"train.overwrite_output_dir: moved the previous run in {out} to {aside}")
        out.mkdir(parents=True, exist_ok=True)
        (out / "ds_config.json").write_text(json.dumps(ds, indent=2))
        save_config(cfg, out / "config.yaml")
        checkpoint.truncate_metrics(out / "metrics.jsonl", state["step"] if state else run.step)
    return run


# ---------------------------------------------------------------------------------------------
# train


@dataclass
class StepBatch:
    """This rank's micro-batches of one optimizer step, and the counts the loss and MFU need."""

    batches: list[dict]
    tokens: int  # this rank's tokens before padding
    causal_pairs: int  # this rank's query-key pairs under the causal mask (attention FLOPs)
    global_labels: int  # labelled tokens of the whole global batch (every rank, every micro-batch)


def micro_batches(run: TrainingRun, step: int) -> StepBatch:
    """This rank's micro-batches of optimizer step ``step``: a pure function of seed and step.

    The global label count, which normalises the loss, is summed here from the data order over
    every data-parallel rank's rows: each rank knows it without a collective. Under sequence
    parallelism a rank keeps its slice of its group's rows, and counts its slice's tokens and its
    share (1/SP of the heads) of the attention pairs: summed over ranks, each counts once.
    """
    tc, lay = run.cfg.train, run.layout
    gas = tc.gradient_accumulation_steps
    epoch, first = divmod(step * gas, run.rounds_per_epoch)
    order = epoch_order(len(run.train_rows), tc.seed, epoch)
    span = order[first * tc.micro_batch_size * lay.dp_world: (first + gas) * tc.micro_batch_size * lay.dp_world]
    batch = StepBatch([], 0, 0, sum(run.label_counts[i] for i in span))
    for k in range(gas):
        rows = [run.train_rows[i] for i in rank_micro_batch(order, first + k, tc.micro_batch_size, lay.dp_world, lay.dp_rank)]
        pairs = flops.causal_pairs(n for r in rows for n in example_lengths(r))
        collated = collate(rows, run.pad_token_id, run.flatten)
        if lay.size > 1:
            collated, tokens = sp.shard(collated, lay, run.pad_token_id)
            pairs /= lay.size
        else:
            tokens = sum(len(r["input_ids"]) for r in rows)
        batch.tokens += tokens
        batch.causal_pairs += pairs
        batch.batches.append(collated)
    return batch


def model_inputs(run: TrainingRun, batch: dict) -> dict:
    """A collated micro-batch as the engine's keyword arguments, on the device.

    With the chunked loss, the labelled positions are found here, on the host copy of the labels:
    a ``nonzero`` on the device would make the host wait for the device once per micro-batch.
    """
    dev = run.engine.device
    out = {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    if run.host_label_positions:
        positions = label_positions(batch["labels"], batch.get("shift_labels"))
        out["label_positions"] = tuple(t.to(dev, non_blocking=True) for t in positions)
    return out


def train_step(run: TrainingRun) -> tuple[torch.Tensor, StepBatch, bool]:
    """One optimizer step. Returns (this rank's share of the global mean loss, as a device tensor;
    the step's batch counts; whether the step was applied).

    Losses and the finite check stay on the device through the micro-batches: the one host sync of
    the step is the all-reduce at its end, which lets every rank take the same branch (skip or step).
    A CPU thread that waited on ``.item()`` per micro-batch could not run ahead and launch ZeRO-3's
    prefetches while the device computes.
    """
    eng, tc = run.engine, run.cfg.train
    faults.at_step_start(run.step + 1)
    sb = micro_batches(run, run.step)
    gas, div = tc.gradient_accumulation_steps, run.grad_divisor
    # DeepSpeed divides by the accumulation steps, sums over all ranks and divides by ``div`` (the
    # world; see sequence_parallel.gradient_divisor); scaling each micro-batch's summed loss by
    # div*gas/N makes the applied gradient that of (sum of all token losses)/N.
    per_micro = max(sb.global_labels, 1) / (div * gas)
    loss_share = torch.zeros((), dtype=torch.float32, device=eng.device)
    nonfinite = torch.zeros((), dtype=torch.float32, device=eng.device)
    with run.offload:  # checkpointed layer inputs to host and back; its exit drains the copies
        for k, b in enumerate(sb.batches):
            loss = eng(**model_inputs(run, b), num_items_in_batch=per_micro).loss
            loss = faults.maybe_poison_loss(loss, run.step + 1, k + 1)
            nonfinite += (~torch.isfinite(loss.detach())).float()
            # A non-finite micro-batch still goes through backward (its gradients are dropped with the
            # whole step below), so that every rank runs the same collectives whatever its data.
            eng.backward(loss)
            loss_share += loss.detach().float() / (gas * div)
            if k < gas - 1:
                eng.step()  # not a boundary: DeepSpeed only counts the micro-step
    flags = torch.stack([nonfinite, torch.tensor(float(run.stop_signal.is_set()), device=eng.device)])
    dist.all_reduce(flags)
    n_nonfinite, stop = flags.tolist()
    run.stop_requested = stop > 0
    if n_nonfinite:
        if tc.nonfinite == "stop":
            raise NonFiniteLoss(f"non-finite loss at step {run.step + 1}; stopped (train.nonfinite=stop). "
                                f"The last good checkpoint is kept in {run.out / checkpoint.CKPT_DIR}; "
                                "lower train.lr or check the data, then resume")
        discard_step(eng)
    else:
        eng.step()
    return loss_share, sb, not n_nonfinite


def evaluate(run: TrainingRun) -> dict:
    """Token-mean loss and perplexity on the eval set, sharded over ranks."""
    eng, rows, lay = run.engine, run.eval_rows, run.layout
    micro = run.cfg.train.micro_batch_size
    # Every rank runs the same number of forwards (ZeRO-3 gathers are collective); the padding
    # rows repeat example 0 with no labels, so they count for nothing.
    per_round = micro * lay.dp_world
    n_rounds = math.ceil(len(rows) / per_round)
    order = list(range(len(rows))) + [-1] * (n_rounds * per_round - len(rows))
    loss_sum = torch.zeros((), dtype=torch.float64, device=eng.device)
    n_tok = 0
    eng.eval()
    with torch.no_grad():
        for r in range(n_rounds):
            idx = rank_micro_batch(order, r, micro, lay.dp_world, lay.dp_rank)
            batch_rows = [rows[i] if i >= 0 else {**rows[0], "labels": [IGNORE] * len(rows[0]["labels"])} for i in idx]
            b = collate(batch_rows, run.pad_token_id, run.flatten)
            if lay.size > 1:
                b = sp.shard(b, lay, run.pad_token_id)[0]
            n = label_count(b)
            out = eng(**model_inputs(run, b), num_items_in_batch=1.0)
            if n:
                loss_sum += out.loss.detach().double()
                n_tok += n
    eng.train()
    loss_sum, n_tok = all_reduce_sum([loss_sum, n_tok], eng.device)
    loss = loss_sum / max(n_tok, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": int(n_tok)}


def save(run: TrainingRun) -> Path:
    tc = run.cfg.train
    state = checkpoint.trainer_state(run.cfg, run.step, run.run_id, run.rounds_per_epoch // tc.gradient_accumulation_steps,
                                     run.skipped_steps, run.world, run.schedule_batch, run.tracker_runs)
    return checkpoint.save(run.engine, run.out, run.step, state, tc.keep_last, run.rank)


def fit(run: TrainingRun, metrics: MetricsLog) -> dict:
    """The training loop; returns the last train/eval metrics."""
    from tqdm import tqdm

    tc = run.cfg.train
    steps_per_epoch = run.rounds_per_epoch // tc.gradient_accumulation_steps
    bar = tqdm(total=run.total_steps, initial=run.step, disable=run.rank != 0, desc="train", dynamic_ncols=True)
    last: dict = {}
    window = LogWindow()
    try:  # closed on every exit, so an error message starts on a line of its own
        while run.step < run.total_steps:
            t0 = time.perf_counter()
            loss_share, sb, applied = train_step(run)  # ends with a host sync: the step is done on the device
            window.add(loss_share, sb.tokens, sb.causal_pairs, applied, time.perf_counter() - t0)
            run.step += 1
            run.skipped_steps += not applied
            bar.update(1)
            if run.step % tc.log_steps == 0 or run.step == run.total_steps:
                rec = {"kind": "train", "step": run.step, "epoch": round(run.step / steps_per_epoch, 4),
                       **window.record(run.engine.device, run.world, run.flop_model, run.peak_tflops),
                       "lr": run.engine.get_lr()[0],
                       # DeepSpeed keeps the last applied step's norm through a skipped one
                       "grad_norm": _float(run.engine.get_global_grad_norm()) if applied else None,
                       "skipped_steps": run.skipped_steps,
                       **scale_diagnostics(run.engine.module)}
                metrics.write(rec)
                bar.set_postfix(loss="-" if rec["loss"] is None else f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}",
                                tok_s=f"{rec['tokens_per_s']:.0f}",
                                **({"mfu": f"{rec['mfu']:.1%}"} if "mfu" in rec else {}))
                last.update(rec)
                window = LogWindow()
            if run.eval_rows is not None and tc.eval_steps and run.step % tc.eval_steps == 0 and run.step < run.total_steps:
                last.update(_log_eval(run, metrics))
            if run.stop_requested:
                path = save(run)
                log.info(f"stop signal received: saved {path} at step {run.step}; "
                         f"run the same command again to resume (train.resume=auto)", after_bar=True)
                return {**last, "stopped": True}
            if tc.save_steps and run.step % tc.save_steps == 0 and run.step < run.total_steps:
                save(run)
    finally:
        bar.close()
    if run.eval_rows is not None:
        last.update(_log_eval(run, metrics))
    path = save(run)
    last["checkpoint"] = str(path)
    return last


def _log_eval(run: TrainingRun, metrics: MetricsLog) -> dict:
    rec = {"kind": "eval", "step": run.step, **evaluate(run)}
    metrics.write(rec)
    log.info(f"step {run.step}: eval loss {rec['eval_loss']:.4f}, perplexity {rec['eval_ppl']:.2f}", above_bar=True)
    return rec


def _float(x) -> float | None:
    if x is None:
        return None
    return float(x.item() if torch.is_tensor(x) else x)


# ---------------------------------------------------------------------------------------------
# CLI


def parse_args(argv):
    p = argparse.ArgumentParser(prog="allora-train", description="Finetune a causal LM with ALLoRA on DeepSpeed.")
    p.add_argument("config", nargs="?", help="YAML config (see configs/ and --print-config-schema)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=2e-4")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--print-config-schema", action="store_true", help="print every config key and exit")
    args = p.parse_args(argv)
    if not args.print_config_schema and not args.config:
        p.error("the config file is required")
    return args


def train(cfg: Config) -> dict:
    """Run a whole finetune (setup -> fit -> export); returns the final metrics."""
    stop_signal = install_stop_handlers()
    run = setup(cfg)
    run.stop_signal = stop_signal
    with run.teardown, MetricsLog(run.out, run.rank == 0, cfg, run.run_id, run.tracker_runs) as metrics:
        run.tracker_runs = metrics.tracker_runs() or run.tracker_runs
        result = fit(run, metrics)
    # The last collective is behind us (fit ends with a checkpoint and its barrier). Leave the
    # process group before the export: rank 0 alone reads and writes the whole model (141 GB each
    # way for 70B), and ranks left waiting in a barrier meanwhile would be killed by NCCL's watchdog.
    leave_process_group()
    if run.rank == 0 and not result.get("stopped"):
        if cfg.export.merged or cfg.export.adapter:
            from allora_ds.export import export_run

            faults.before_export(run.step)
            export_run(cfg, Path(result["checkpoint"]))
        summary = ", ".join(f"{k} {result[k]:.4g}" for k in ("loss", "eval_loss", "eval_ppl")
                            if result.get(k) is not None)
        log.info(f"finished at step {run.step}: {summary}; outputs in {run.out}")
    return result


@cli
def main(argv: list[str] | None = None) -> None:
    # DeepSpeed still calls the torch.distributed names torch 2.13 deprecated, once per call site.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.print_config_schema:
        print(schema_text())
        return
    cfg = load_config(args.config, args.overrides)
    train(cfg)


if __name__ == "__main__":
    main()
