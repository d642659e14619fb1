"""The longest sequence one GPU trains for the Llama-3-8B shape, with ALST's single-GPU tricks.

    python bench/gpu_long.py                                   # one GPU (H100 80 GB: about 5 minutes)
    python bench/gpu_long.py --start 32768 --max 262144 --budget-s 600
    python bench/gpu_long.py --tiny-cpu --out /tmp/long.json   # the code path on a CPU, tiny model

Not run in CI (it needs a GPU); ``--tiny-cpu`` runs every line of it on a CPU with a tiny model of
the same form (the offload engine copying for real, allora_ds/_testing/offload.py), and CI runs that.

One process, one device. The model is built as bench/gpu.py builds it (random weights, the
trainer's ``load_model``), ALLoRA r=16 on the 7 projections, bf16, ZeRO-2 (``zero2_bf16``: what
``allora-plan`` picks for one GPU), with gradient checkpointing, ``model.mlp_tiles`` (default 32:
128k tokens / hidden 4096, ALST's rule) and ``model.activation_offload``. Then one optimizer step of
the trainer's own ``train_step`` per sequence length, doubling from ``--start``, on one random row
of that many tokens, until a step runs out of GPU memory, the next length's pinned host memory
would not fit, the next step would not end within ``--budget-s`` (predicted from the last step's
time and the FLOP model), or ``--max``. The first length runs a warm-up step first, and once more
with the offload off: the peak-memory difference is what offload saves, beside what allora-plan
predicts ((layers - 3) x tokens x hidden x 2 bytes).

Reported per length: step time, tokens/s, MFU (allora_ds/flops.py), peak GPU memory
(``max_memory_allocated``) beside ``allora-plan``'s total for the same layout (less its CUDA
context, which the allocator does not see), and the host memory offload pinned. Prints a table;
writes JSON (default bench/results/gpu_long.json on a GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

GB = 1e9
HOST_SHARE = 0.7  # of the machine's memory that offload's pinned buffers may take


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def planned(seq_len: int, tiles: int, shape: dict) -> dict:
    """allora-plan's memory for this run: one GPU, ZeRO-2, checkpointing, tiles, offload."""
    from allora_ds import plan
    from allora_ds.zero_comm import shape_from_config
    from bench.gpu import llama_config

    s = shape_from_config(llama_config(shape))
    c, w = plan.Cluster(1, 1), plan.Workload(seq_len, 1, mlp_tiles=tiles, activation_offload=True)
    mem = plan.memory("zero2", s, plan.filled_config("zero2", s, c, w), c, w)
    inputs = plan.activation_inputs(s, w)
    return {"total_gb": plan.total_memory(mem, True), "allocator_gb": plan.total_memory(mem, True) - mem["context"],
            "host_gb": plan.host_memory(mem, True),
            "offload_saves_gb": (s.layers - inputs[0]) * 2 * s.hidden * seq_len / GB}


def one_step(engine, cfg, seq_len: int, vocab: int, offload, out_dir: Path) -> dict:
    """One optimizer step of the trainer's train_step on a random row of ``seq_len`` tokens."""
    import torch

    from bench.gpu import random_rows
    from allora_ds import flops
    from allora_ds.train import TrainingRun, train_step

    cuda = torch.cuda.is_available()
    rows = random_rows(1, seq_len, vocab, seed=seq_len)
    run = TrainingRun(cfg=cfg, out=out_dir, rank=0, world=1, engine=engine, pad_token_id=0, train_rows=rows,
                      eval_rows=None, rounds_per_epoch=1, total_steps=cfg.train.max_steps,
                      label_counts=[r["n_labels"] for r in rows], flop_model=flops.flop_model(engine.module),
                      peak_tflops=flops.peak_tflops(torch.cuda.get_device_name()) if cuda else None, offload=offload)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    loss, sb, applied = train_step(run)
    loss = float(loss)  # waits for the step
    if cuda:
        torch.cuda.synchronize()
    step_s = time.perf_counter() - t0
    step_flops = run.flop_model.step_flops(sb.tokens, sb.causal_pairs)
    stats = getattr(offload, "stats", None)
    return {"seq_len": seq_len, "step_s": step_s, "tokens_per_s": seq_len / step_s, "loss": loss, "applied": applied,
            "step_flops": step_flops, "mfu": flops.mfu(step_flops, step_s, 1, run.peak_tflops),
            "peak_gb": torch.cuda.max_memory_allocated() / GB if cuda else None,
            "offloaded_gb": stats.offloaded_bytes / GB if stats else 0.0,
            "offloaded_inputs": stats.offloaded_tensors if stats else 0}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny-cpu", action="store_true", help="tiny model on the CPU: the code path without a GPU")
    ap.add_argument("--start", type=int, default=None, help="first sequence length (16384; 64 with --tiny-cpu)")
    ap.add_argument("--max", type=int, default=None, help="longest length to try (524288; 256 with --tiny-cpu)")
    ap.add_argument("--mlp-tiles", type=int, default=None, help="model.mlp_tiles (32; 4 with --tiny-cpu)")
    ap.add_argument("--budget-s", type=float, default=300.0, help="stop before a step would end past this (default 300)")
    ap.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, flash_attention_2)")
    ap.add_argument("--out", type=Path, default=None, help="JSON (default bench/results/gpu_long.json on a GPU)")
    args = ap.parse_args(argv)
    if args.tiny_cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    args.start = args.start or (64 if args.tiny_cpu else 16384)
    args.max = args.max or (256 if args.tiny_cpu else 524288)
    args.mlp_tiles = args.mlp_tiles or (4 if args.tiny_cpu else 32)

    import torch

    from allora_ds import activation_offload
    from allora_ds.distributed import init_distributed
    from bench.common import REPO, RESULTS, machine, table, write_json
    from bench.gpu import LLAMA_3_8B, TINY, build_engine, train_config

    if not args.tiny_cpu and not torch.cuda.is_available():
        ap.error("no GPU: this benchmark needs one (use --tiny-cpu to check the code path on a CPU)")
    if args.tiny_cpu:
        from allora_ds._testing import offload as emulation

        emulation.emulate_device()
    t_start = time.perf_counter()
    init_distributed()  # a world of one
    shape = TINY if args.tiny_cpu else LLAMA_3_8B
    shape = {**shape, "max_position_embeddings": max(shape["max_position_embeddings"], args.max)}
    ds_path = REPO / "ds_configs" / "zero2_bf16.json"
    cfg = train_config("allora", args.max, 1 << 20, "bfloat16", ds_path, args.attn)
    cfg.model.mlp_tiles, cfg.model.activation_offload = args.mlp_tiles, True
    engine, counts = build_engine(cfg, shape, world=1)
    offload = activation_offload.install(engine.module)
    host_limit = HOST_SHARE * host_memory_bytes() / GB
    results, stopped = [], "max"
    with tempfile.TemporaryDirectory(prefix="gpu-long-") as tmp:
        one_step(engine, cfg, args.start, shape["vocab_size"], offload, Path(tmp))  # warm-up: kernels, allocator
        without = one_step(engine, cfg, args.start, shape["vocab_size"], contextlib.nullcontext(), Path(tmp))
        seq, last = args.start, None
        while seq <= args.max:
            plan_ = planned(seq, args.mlp_tiles, shape)
            if plan_["host_gb"] > host_limit:
                stopped = f"host memory: {plan_['host_gb']:.0f} GB pinned > {host_limit:.0f} GB"
                break
            if last is not None:  # the step time grows with the FLOPs (quadratic attention)
                from allora_ds import flops

                fm = flops.flop_model(engine.module)
                predicted = last["step_s"] * fm.step_flops(seq, seq * (seq + 1) // 2) / last["step_flops"]
                if time.perf_counter() - t_start + predicted > args.budget_s:
                    stopped = f"budget: the {seq}-token step would take about {predicted:.0f} s"
                    break
            try:
                r = one_step(engine, cfg, seq, shape["vocab_size"], offload, Path(tmp))
            except torch.OutOfMemoryError as e:
                stopped = f"out of GPU memory at {seq} tokens: {str(e).splitlines()[0][:160]}"
                break
            r["planned"] = plan_
            results.append(r)
            print(f"{seq} tokens: step {r['step_s']:.1f} s, {r['tokens_per_s']:.0f} tokens/s, peak "
                  f"{r['peak_gb'] or 0:.1f} GB (planned {plan_['allocator_gb']:.1f}), {r['offloaded_gb']:.1f} GB "
                  "offloaded", flush=True)
            last, seq = r, seq * 2
    first = results[0] if results else None
    out = args.out or (RESULTS / "gpu_long.json" if not args.tiny_cpu else None)
    result = {
        "machine": machine(), "tiny_cpu": args.tiny_cpu, "shape": shape, "dtype": "bfloat16",
        "deepspeed_config": str(ds_path.relative_to(REPO)), "attn": args.attn, "mlp_tiles": args.mlp_tiles,
        "gradient_checkpointing": True, "activation_offload": True, "params": counts["total"],
        "trainable": counts["trainable"], "results": results, "stopped": stopped,
        "longest_seq_len": results[-1]["seq_len"] if results else None,
        "without_offload_at_start": without,
        "offload_saves_gb": (without["peak_gb"] - first["peak_gb"]) if first and first["peak_gb"] else None,
        "offload_saves_gb_planned": first["planned"]["offload_saves_gb"] if first else None,
        "wall_s": time.perf_counter() - t_start,
    }
    if out:
        write_json(out, result)
    m = result["machine"]
    print(f"\n{m.get('gpu', m['cpu'])}, torch {m['torch']}, deepspeed {m['deepspeed']}; "
          f"{'tiny' if args.tiny_cpu else 'Llama-3-8B'}-shaped model, ALLoRA r=16, bf16, ZeRO-2, {args.attn}, "
          f"checkpointing + mlp_tiles {args.mlp_tiles} + activation offload; one step per length; "
          f"{result['wall_s']:.0f} s in all" + (f"; wrote {out}" if out else ""))
    print(table(["tokens", "step s", "tokens/s", "MFU", "peak GB", "planned GB", "offloaded GB"], [
        [r["seq_len"], r["step_s"], r["tokens_per_s"], f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-",
         f"{r['peak_gb']:.1f}" if r["peak_gb"] is not None else "-", f"{r['planned']['allocator_gb']:.1f}",
         f"{r['offloaded_gb']:.2f}"] for r in results], {1: ".2f", 2: ".0f"}))
    if result["offload_saves_gb"] is not None:
        print(f"offload saves {result['offload_saves_gb']:.1f} GB at {args.start} tokens "
              f"(planned {result['offload_saves_gb_planned']:.1f})")
    print(f"longest: {result['longest_seq_len']} tokens; stopped: {stopped}")
    return result


if __name__ == "__main__":
    main()
