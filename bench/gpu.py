"""Single-GPU step time, tokens/s and MFU of ALLoRA vs LoRA on a Llama-3-8B-shaped model (bf16, ZeRO-3, seq 2048).

    python bench/gpu.py                                    # one GPU with >= 40 GB (H100/H200: under 5 minutes)
    python bench/gpu.py --steps 20 --warmup 5              # longer measurement
    DS_ACCELERATOR=cpu python bench/gpu.py --tiny-cpu --out /tmp/gpu_tiny.json   # same code path, tiny model, CPU

Not run in CI (it needs a GPU); ``--tiny-cpu`` runs every line of it on a CPU with a tiny model of
the same form, and CI runs that. One process, a world of one (no launcher needed). For each method
(allora, then lora; r=16 on q/k/v/o/gate/up/down, alpha 32):

  1. the model is created directly on the GPU, partitioned, under ``zero.Init`` (``from_config`` with
     transformers' DeepSpeed integration: random weights, never materialised on the CPU), with
     gradient checkpointing, and the adapters are injected under ``zero.Init`` -- the steps of
     ``allora_ds.modeling.load_model``, with ``from_config`` for ``from_pretrained``;
  2. ``deepspeed.initialize`` with ds_configs/zero3_bf16.json, "auto" values filled by the trainer,
     and torch's AdamW (``"torch_adam": true``: nothing to compile on a fresh machine);
  3. the trainer's own ``allora_ds.train.train_step`` runs ``--warmup`` untimed then ``--steps`` timed
     optimizer steps on random token sequences of ``--seq-len`` (micro-batch 1, no padding).

Then the baseline users compare with, in the same process and on the same device, model shape,
rows and (filled) DeepSpeed JSON: transformers' Trainer + PEFT LoRA (``measure_hf``; ``--no-hf``
skips it), on the unpacked workload (Trainer has no packing of its own without flattening).

Reported per method: median step time, tokens/s, MFU as the trainer reports it (allora_ds/flops.py:
4N FLOPs per token for forward and input gradients, 2N_trainable for the adapter weight gradients,
causal attention FLOPs; N excludes the input embedding) and the hardware FLOPs utilisation that
also counts the recomputed forward of gradient checkpointing, peak GPU memory; and allora/lora step
time; allora_ds / HF tokens/s and peak memory. Prints the table last; writes JSON (default
bench/results/gpu.json, which --tiny-cpu does not touch unless --out says so).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

METHODS = ("allora", "lora")
RANK = 16
LLAMA_3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=8192)
TINY = dict(hidden_size=64, intermediate_size=224, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=512, max_position_embeddings=1024)


def llama_config(shape: dict):
    from transformers import LlamaConfig

    return LlamaConfig(**shape, rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False, bos_token_id=1,
                       eos_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})


def train_config(method: str, seq_len: int, steps: int, dtype: str, ds_path: Path, attn: str = "sdpa"):
    from allora_ds.config import load_config

    return load_config(None, base={
        # model.path and data.train are not read: the model and the rows are built here
        "model": {"path": "<from_config>", "dtype": dtype, "gradient_checkpointing": True, "attn_implementation": attn},
        "adapter": {"method": method, "rank": RANK, "alpha": 32.0},
        "data": {"train": "<random tokens>", "max_seq_len": seq_len},
        "train": {"deepspeed": str(ds_path), "micro_batch_size": 1, "gradient_accumulation_steps": 1, "lr": 1e-4,
                  "max_steps": steps, "warmup_steps": 0, "scheduler": "constant", "seed": 0},
    })


def build_engine(cfg, shape: dict, world: int):
    """Model (partitioned on creation) + adapters + DeepSpeed engine, built by the trainer's own code."""
    import torch

    from allora_ds.ds_config import fill_ds_config, read_ds_config
    from allora_ds.modeling import build_engine as trainer_engine
    from allora_ds.modeling import load_model

    ds = fill_ds_config(read_ds_config(cfg.train.deepspeed), cfg, world, shape["hidden_size"], cfg.train.deepspeed)
    # torch's AdamW rather than DeepSpeed's FusedAdam, which a fresh machine would first compile (a
    # minute or more, and it needs nvcc); it only updates the adapters, a negligible part of a step.
    ds["optimizer"]["params"]["torch_adam"] = True
    model, keepalive, counts = load_model(cfg, ds, verbose=False, architecture=llama_config(shape))
    engine = trainer_engine(cfg, ds, model, cfg.train.max_steps)
    del keepalive
    torch.manual_seed(cfg.train.seed)
    return engine, counts


def random_rows(n: int, seq_len: int, vocab: int, seed: int, example_len: int | None = None) -> list[dict]:
    """Rows as the trainer's data pipeline gives them: input_ids, labels (first token of each example
    masked); with ``example_len``, each row packs seq_len/example_len examples (restarted positions)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (seq_len,), generator=g).tolist()
        if example_len is None:
            rows.append({"input_ids": ids, "labels": [-100] + ids[1:], "n_labels": seq_len - 1})
            continue
        labels = [-100 if i % example_len == 0 else t for i, t in enumerate(ids)]
        rows.append({"input_ids": ids, "labels": labels, "n_labels": sum(t != -100 for t in labels),
                     "position_ids": [i % example_len for i in range(seq_len)]})
    return rows


def measure(method: str, args, shape: dict, ds_path: Path, dtype: str, out_dir: Path) -> list[dict]:
    """Build the engine once for ``method``, then time each workload on it."""
    import torch

    from allora_ds import flops
    from allora_ds.modeling import flat_batches
    from allora_ds.train import TrainingRun, train_step

    t0 = time.perf_counter()
    total = args.warmup + args.steps
    cfg = train_config(method, args.seq_len, total, dtype, ds_path, args.attn)
    engine, counts = build_engine(cfg, shape, world=1)
    build_s = time.perf_counter() - t0
    cuda = torch.cuda.is_available()
    results = []
    for example_len in (None, args.packed_example_len):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        rows = random_rows(total, args.seq_len, shape["vocab_size"], seed=1, example_len=example_len)
        run = TrainingRun(cfg=cfg, out=out_dir, rank=0, world=1, engine=engine, pad_token_id=0,
                  train_rows=rows, eval_rows=None, rounds_per_epoch=len(rows), total_steps=total,
                  label_counts=[r["n_labels"] for r in rows], flatten=flat_batches(engine.module),
                  flop_model=flops.flop_model(engine.module),
                  peak_tflops=flops.peak_tflops(torch.cuda.get_device_name()) if cuda else None)
        times, losses, step_flops = [], [], 0.0
        for i in range(total):
            if cuda:
                torch.cuda.synchronize()
            s0 = time.perf_counter()
            loss, sb, applied = train_step(run)
            run.step += 1
            if cuda:
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - s0)
            losses.append(float(loss))
            assert applied and sb.tokens == args.seq_len
            step_flops = run.flop_model.step_flops(sb.tokens, sb.causal_pairs)
        step_s = statistics.median(times)
        util = flops.mfu(step_flops, step_s, 1, run.peak_tflops)  # None without a GPU of known peak
        recompute = run.flop_model.matmul_params * 2 * args.seq_len  # the checkpointed forward, run twice
        results.append({
            "method": method, "workload": f"seq {args.seq_len}" + (f", packed {example_len}" if example_len else ""),
            "example_len": example_len or args.seq_len, "attn": args.attn, "build_s": build_s, "step_s": step_s,
            "step_s_all": times, "tokens_per_s": args.seq_len / step_s, "step_flops": step_flops, "mfu": util,
            "hfu_with_recompute": util * (step_flops + recompute) / step_flops if util is not None else None,
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "params": counts["total"], "trainable": counts["trainable"], "losses": losses,
        })
    engine.destroy()  # drop ZeRO-3's hooks and buffers so the next method starts from an empty device
    del engine, run
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return results


def measure_hf(args, shape: dict, ds_path: Path, dtype: str, out_dir: Path) -> dict:
    """The baseline users compare with, on the same device, model shape, rows and DeepSpeed JSON:
    transformers' Trainer + PEFT LoRA (r 16, alpha 32, the same 7 targets, no dropout), bf16,
    gradient checkpointing, micro-batch 1; the model built under zero.Init from the same config
    (random weights), the rows the unpacked workload's (seq_len tokens, no padding)."""
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments
    from transformers.data.data_collator import default_data_collator

    from allora_ds.adapters import LLAMA_TARGETS
    from bench.hf_baseline import let_accelerate_run_deepspeed_on_cpu

    let_accelerate_run_deepspeed_on_cpu()
    cuda = torch.cuda.is_available()
    total = args.warmup + args.steps
    t0 = time.perf_counter()
    # The DeepSpeed JSON as the allora_ds engine gets it, every "auto" filled (transformers does not
    # fill our ZeRO-3 sizes), with torch's AdamW as build_engine sets it.
    from allora_ds.ds_config import fill_ds_config, read_ds_config

    cfg = train_config("lora", args.seq_len, total, dtype, ds_path, args.attn)
    ds = fill_ds_config(read_ds_config(ds_path), cfg, 1, shape["hidden_size"], ds_path)
    ds["optimizer"]["params"]["torch_adam"] = True
    if not cuda:  # --tiny-cpu: Trainer refuses bf16 without a GPU; the code path runs in fp32
        ds["bf16"]["enabled"], dtype = False, "float32"
    ds_path = out_dir / "hf_ds_config.json"
    ds_path.write_text(json.dumps(ds))
    # First: its DeepSpeed config makes from_config build the model under zero.Init.
    targs = TrainingArguments(
        output_dir=str(out_dir / "hf"), per_device_train_batch_size=1, gradient_accumulation_steps=1, max_steps=total,
        learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        bf16=dtype == "bfloat16", gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[], deepspeed=str(ds_path),
        seed=0, disable_tqdm=True, dataloader_drop_last=True)
    model = AutoModelForCausalLM.from_config(llama_config(shape), dtype=getattr(torch, dtype),
                                             attn_implementation=args.attn)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=32.0, lora_dropout=0.0, bias="none",
                                             target_modules=list(LLAMA_TARGETS), task_type="CAUSAL_LM"))
    rows = random_rows(total, args.seq_len, shape["vocab_size"], seed=1)
    ds = datasets.Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"],
                                      "attention_mask": [1] * args.seq_len} for r in rows])
    ends: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, *a, **kw):
            if cuda:
                torch.cuda.synchronize()
            ends.append(time.perf_counter())

    trainer = Trainer(model=model, args=targs, train_dataset=ds, data_collator=default_data_collator,
                      callbacks=[StepTimer()])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    build_s = time.perf_counter() - t0 - (ends[-1] - ends[0])
    times = [b - a for a, b in zip(ends[args.warmup - 1 if args.warmup else 0:], ends[args.warmup:])]
    step_s = statistics.median(times)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = {"method": "hf_trainer_peft", "workload": f"seq {args.seq_len}", "example_len": args.seq_len,
              "attn": args.attn, "build_s": build_s, "step_s": step_s, "step_s_all": times,
              "tokens_per_s": args.seq_len / step_s, "mfu": None, "hfu_with_recompute": None,
              "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
              "trainable": model.get_nb_trainable_parameters()[0], "losses": losses}
    trainer.accelerator.free_memory()
    del trainer, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny-cpu", action="store_true", help="tiny model on the CPU: the code path without a GPU")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (2048; 64 with --tiny-cpu)")
    ap.add_argument("--packed-example-len", type=int, default=None,
                    help="second workload: rows of --seq-len packing examples this long (256; 16 with --tiny-cpu)")
    ap.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, flash_attention_2, eager)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per method and workload")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per method and workload")
    ap.add_argument("--out", type=Path, default=None, help="JSON (default bench/results/gpu.json on a GPU)")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF Trainer + PEFT baseline")
    args = ap.parse_args(argv)
    if args.tiny_cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    args.seq_len = args.seq_len or (64 if args.tiny_cpu else 2048)
    args.packed_example_len = args.packed_example_len or (16 if args.tiny_cpu else 256)

    import torch

    from allora_ds.distributed import init_distributed
    from bench.common import REPO, RESULTS, machine, table, write_json

    if not args.tiny_cpu and not torch.cuda.is_available():
        ap.error("no GPU: this benchmark needs one (use --tiny-cpu to check the code path on a CPU)")
    t_start = time.perf_counter()
    init_distributed()  # a world of one
    shape = TINY if args.tiny_cpu else LLAMA_3_8B
    dtype = "bfloat16"
    ds_path = REPO / "ds_configs" / "zero3_bf16.json"
    results = []
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        for method in METHODS:
            for r in measure(method, args, shape, ds_path, dtype, Path(tmp)):
                results.append(r)
                print(f"{method}, {r['workload']}: built in {r['build_s']:.0f} s, step {r['step_s']:.3f} s, "
                      f"{r['tokens_per_s']:.0f} tokens/s", flush=True)
        if not args.no_hf:
            r = measure_hf(args, shape, ds_path, dtype, Path(tmp))
            results.append(r)
            print(f"HF Trainer + PEFT, {r['workload']}: step {r['step_s']:.3f} s, {r['tokens_per_s']:.0f} tokens/s",
                  flush=True)
    by = {(r["method"], r["example_len"]): r for r in results}
    out = args.out or (RESULTS / "gpu.json" if not args.tiny_cpu else None)
    result = {
        "machine": machine(), "tiny_cpu": args.tiny_cpu, "shape": shape, "dtype": dtype, "seq_len": args.seq_len,
        "packed_example_len": args.packed_example_len, "attn": args.attn, "micro_batch": 1,
        "gradient_checkpointing": True, "zero_stage": 3, "deepspeed_config": str(ds_path.relative_to(REPO)),
        "warmup": args.warmup, "steps": args.steps, "results": results,
        "allora_time_over_lora": {f"example_len {n}": by[("allora", n)]["step_s"] / by[("lora", n)]["step_s"]
                                  for n in (args.seq_len, args.packed_example_len)},
        "wall_s": time.perf_counter() - t_start,
    }
    if not args.no_hf:  # what users compare: the same model, rows, device and DeepSpeed JSON
        hf = by[("hf_trainer_peft", args.seq_len)]
        result["tokens_per_s_over_hf"] = {m: by[(m, args.seq_len)]["tokens_per_s"] / hf["tokens_per_s"] for m in METHODS}
        result["peak_mem_over_hf"] = ({m: by[(m, args.seq_len)]["peak_mem_gb"] / hf["peak_mem_gb"] for m in METHODS}
                                      if hf["peak_mem_gb"] else None)
    if out:
        write_json(out, result)
    m = result["machine"]
    print(f"\n{m.get('gpu', m['cpu'])}, torch {m['torch']}, deepspeed {m['deepspeed']}; "
          f"{'tiny' if args.tiny_cpu else 'Llama-3-8B'}-shaped model ({results[0]['params'] / 1e9:.3g} B parameters), "
          f"bf16, ZeRO-3, {args.attn}, 1 device, seq {args.seq_len}, micro-batch 1, gradient checkpointing, r={RANK}; "
          f"{args.steps} timed steps after {args.warmup}; {result['wall_s']:.0f} s in all" + (f"; wrote {out}" if out else ""))

    def pct(x):
        return f"{100 * x:.1f}%" if x is not None else "-"

    print(table(["method", "workload", "step s", "tokens/s", "MFU", "HFU (+recompute)", "peak GiB"], [
        [r["method"], r["workload"], r["step_s"], r["tokens_per_s"], pct(r["mfu"]), pct(r["hfu_with_recompute"]),
         f"{r['peak_mem_gb']:.1f}" if r["peak_mem_gb"] is not None else "-"] for r in results
    ], {2: ".3f", 3: ".0f"}))
    for m, v in result.get("tokens_per_s_over_hf", {}).items():
        print(f"{m} / HF Trainer + PEFT tokens/s (seq {args.seq_len}): {v:.3f}")
    for k, v in result["allora_time_over_lora"].items():
        print(f"allora / lora step time ({k}): {v:.3f}")
    return result


if __name__ == "__main__":
    main()
