"""Long sequences under sequence parallelism (DeepSpeed Ulysses, ``train.sequence_parallel_size``):
SP=1 on 1 CPU rank against SP=2 on 2 CPU ranks, the same rows, with the real trainer.

    .venv/bin/python bench/long_sequence.py                                 # 256..2048 tokens, ~1.5 min on 2 cores
    .venv/bin/python bench/long_sequence.py --quick --out /tmp/ls.json      # smoke test: tiny model, 128/512 tokens

Every configuration runs ``allora_ds.train.setup`` + ``train_step`` (ALLoRA on the 7 projections,
the chunked loss, ZeRO-2, sdpa attention wrapped by Ulysses at SP=2) on a random-weight
Llama-3-architecture model in fp32 under ``deepspeed --num_gpus N``, one row of exactly ``L``
tokens per optimizer step (micro-batch 1, no accumulation), gradient checkpointing off and on.
Per rank and configuration:

* **Activation bytes** saved for backward by one micro-batch's forward: every tensor autograd
  saves passes through ``torch.autograd.graph.saved_tensors_hooks`` and each distinct storage is
  counted once (parameters and buffers excluded). Under gradient checkpointing (non-reentrant)
  the layers' own saved tensors are dropped and their inputs kept instead, so the decoder layers'
  inputs are counted too. Per layer these scale as ``tokens / SP x (c_h h + c_a heads head_dim +
  c_m intermediate)``: after Ulysses' all-to-all a rank holds all tokens but ``heads / SP`` heads,
  the same size as its ``tokens / SP`` slice of every head. So the SP=2 / SP=1 ratio is 0.5 up to
  what does not split (rotary tables, scalars) and to what Ulysses adds: measured here, one more
  ``[tokens / SP, hidden]`` storage per layer (around the attention output's all-to-all back),
  which is linear in tokens, so the ratio stays at ~0.52 without checkpointing at every length
  (~0.50 with it, where only the layers' inputs are kept). Shapes only: this figure is what a GPU
  holds too.
* **Peak RSS** of the rank during the steps (``/proc/self/status`` VmHWM, reset before the steps
  through ``/proc/self/clear_refs``; ``resource.getrusage`` cannot be reset and would carry the
  largest earlier configuration of the same process; it is recorded as ``ru_maxrss_mib``).
  Secondary and noisy: allocator caching, the model, DeepSpeed's buffers.
* **Tokens/s** of the steady steps (step 1 left out): the trainer's ``StepBatch.tokens`` summed
  over the ranks (each token once per SP group) over the steps' wall time (the slowest rank).
  CPU time ratios do NOT transfer to GPUs: two CPU ranks share two cores, and gloo's all-to-all
  and CPU attention cost nothing like NCCL's and flash attention's.
* **Ulysses' collectives** per rank per optimizer step, counted in forward and backward (the
  ``torch.distributed`` functions wrapped before DeepSpeed binds them, ``bench.comm``; ZeRO-2's
  gather of the updated adapters in ``engine.step`` is left out), against
  ``allora_ds.zero_comm.ulysses_bytes``: with ``t = rows x padded L / SP`` (this rank's slice),
  ``q = t heads head_dim b``, ``kv = t max(kv_heads, SP) head_dim b`` (``b`` bytes per element),
  ``f = 2`` forwards with checkpointing else 1,
  ``all_to_all = gas x (f (2q + 2kv) + first_layer_backward + (layers - 1)(f + 1)(2q + 2kv))``
  where ``first_layer_backward`` sends back only the gradients that reach an adapter (q, k, v of the
  adapted projections and, if any, the output's), and ``all_gather = gas x layers x f x t x SP x 8``
  (the int64 position ids). Bytes depend on shapes only and transfer to GPUs as they are; counted
  and predicted must agree to the byte, else the benchmark exits 1 (after writing its JSON).

Writes bench/results/long_sequence.json (``--out`` to change) and prints a table last.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from bench.common import (  # noqa: E402
    REPO, RESULTS, child_env, deepspeed_cmd, machine, random_llama_assets, run_job, table, worker_parser, write_json,
)

DEFAULT_OUT = RESULTS / "long_sequence.json"

# Llama-3 proportions at toy width (MLP 3.5 h, GQA, untied head); heads and KV heads split over SP=2.
FULL = dict(hidden=256, intermediate=896, layers=4, heads=8, kv_heads=4, vocab=2048, rank=16)
QUICK = dict(hidden=64, intermediate=224, layers=2, heads=4, kv_heads=2, vocab=512, rank=4)
LENGTHS_FULL, LENGTHS_QUICK = (256, 512, 1024, 2048), (128, 512)
STEPS_FULL, STEPS_QUICK = 6, 3  # step 1 is left out of the timing
ACT_BYTES = 4  # fp32: the model's dtype, and so that of q, k, v and the attention output Ulysses sends
ROWS = 8


# ---------------------------------------------------------------------------------------------
# worker side


class SavedBytes:
    """Distinct storages kept for backward by the forwards run inside ``forward``."""

    def __init__(self, module) -> None:
        self.excluded = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}
        self.seen: dict[int, int] = {}

    def add(self, t) -> None:
        s = t.untyped_storage()
        if s.data_ptr() not in self.excluded:
            self.seen.setdefault(s.data_ptr(), s.nbytes())

    def add_all(self, x) -> None:
        import torch

        if torch.is_tensor(x):
            self.add(x)
        elif isinstance(x, (list, tuple)):
            for v in x:
                self.add_all(v)
        elif isinstance(x, dict):
            for v in x.values():
                self.add_all(v)


def measure_forward(engine, layers, checkpointing: bool, armed: list) -> list:
    """Wrap ``engine.forward``: while ``armed[0]``, count what it saves for backward into a new
    ``SavedBytes`` appended to the returned list."""
    import torch

    found: list[SavedBytes] = []
    real = engine.forward

    def pack(t):
        found[-1].add(t)
        return t

    def layer_inputs(_module, args, kwargs):
        # what non-reentrant checkpointing keeps alive in place of the layer's saved tensors
        if found and armed[0]:
            found[-1].add_all((args, kwargs))

    if checkpointing:
        for layer in layers:
            layer.register_forward_pre_hook(layer_inputs, with_kwargs=True)

    def counted(*args, **kwargs):
        if not armed[0]:
            return real(*args, **kwargs)
        found.append(SavedBytes(engine.module))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return real(*args, **kwargs)

    engine.forward = counted
    return found


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident set size
    except OSError:
        pass


def worker(args) -> None:
    from bench.comm import install_counter

    counter = install_counter()  # first: before deepspeed binds torch.distributed's functions
    import gc

    import torch.distributed as dist

    from allora_ds import train as T
    from allora_ds.config import load_config
    from allora_ds.distributed import leave_process_group

    out = Path(args.worker_out)
    for spec in json.loads(Path(args.worker_spec).read_text()):
        run = T.setup(load_config(None, base=spec["config"]))
        eng = run.engine
        lengths = {len(r["input_ids"]) for r in run.train_rows}
        if lengths != {spec["seq_len"]}:
            raise SystemExit(f"{spec['name']}: rows of {sorted(lengths)} tokens, wanted {spec['seq_len']}")
        armed = [False]
        saved = measure_forward(eng, eng.module.model.layers, spec["checkpointing"], armed)
        real_step, fwd_bwd = eng.step, []

        def step_after_counting(_real=real_step, _fwd_bwd=fwd_bwd):
            _fwd_bwd.append(counter.reset())  # forward + backward: Ulysses' collectives (and ZeRO-2's all-reduce)
            _real()

        eng.step = step_after_counting
        counter.reset()
        reset_peak_rss()
        steps = []
        with run.teardown:
            for k in range(spec["steps"]):
                armed[0] = k == spec["steps"] - 1  # one steady micro-batch; the hooks cost time
                t0 = time.perf_counter()
                _, sb, applied = T.train_step(run)
                seconds = time.perf_counter() - t0
                if not applied:
                    raise SystemExit(f"{spec['name']}: step {k + 1} was skipped (non-finite loss)")
                run.step += 1
                steps.append({"seconds": seconds, "tokens": sb.tokens, "fwd_bwd": fwd_bwd[-1],
                              "optimizer_step": counter.reset()})
            rec = {"name": spec["name"], "rank": run.rank, "world": run.world, "steps": steps,
                   "activation_bytes": sum(saved[-1].seen.values()), "activation_storages": len(saved[-1].seen),
                   "peak_rss_mib": peak_rss_mib(),
                   "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
            (out / f"{spec['name']}.rank{run.rank}.json").write_text(json.dumps(rec))
            dist.barrier()
        eng.destroy()
        del run, eng, saved
        gc.collect()
    leave_process_group()


# ---------------------------------------------------------------------------------------------
# driver


def build_assets(shape: dict, longest: int, cache: Path) -> tuple[Path, Path]:
    """Random-weight fp32 model + the demo tokenizer, and text rows longer than ``longest`` tokens."""
    per_row = 2 * longest // 8  # corpus lines are ~8 words; >= 2 words per token of margin is plenty

    def rows(lines):
        return [{"text": " ".join(lines[(i * per_row + j) % len(lines)] for j in range(per_row))} for i in range(ROWS)]

    return random_llama_assets(cache, f"long-sequence-{longest}", shape, rows, max_positions=2 * longest)


def ds_config(work: Path) -> Path:
    """ZeRO-2 as shipped, in the model's dtype: ZeRO-3 would add its parameter gathers to the SP
    group's all-gathers (the same two ranks), and bf16 matmuls are slow on CPU."""
    ds = json.loads((REPO / "ds_configs" / "zero2_bf16.json").read_text())
    ds["bf16"] = {"enabled": "auto"}
    path = work / "zero2_fp32.json"
    path.write_text(json.dumps(ds, indent=2))
    return path


def name_of(sp: int, seq_len: int, checkpointing: bool) -> str:
    return f"sp{sp}-L{seq_len}{'-gc' if checkpointing else ''}"


def config(sp: int, seq_len: int, checkpointing: bool, shape: dict, model_dir: Path, data: Path, ds: Path,
           work: Path, steps: int) -> dict:
    return {"model": {"path": str(model_dir), "dtype": "float32", "gradient_checkpointing": checkpointing,
                      "attn_implementation": "sdpa"},
            "adapter": {"method": "allora", "rank": shape["rank"]},
            "data": {"train": str(data), "format": "text", "max_seq_len": seq_len},
            "train": {"output_dir": str(work / f"run-{name_of(sp, seq_len, checkpointing)}"), "deepspeed": str(ds),
                      "micro_batch_size": 1, "gradient_accumulation_steps": 1, "max_steps": steps,
                      "warmup_steps": 0, "save_steps": 0, "resume": "never", "seed": 0,
                      "sequence_parallel_size": sp}}


def run_world(sp: int, lengths, shape: dict, model_dir: Path, data: Path, tmp: Path, steps: int) -> list:
    """One launch of ``sp`` ranks, every configuration in turn (longer rows later: the process's
    memory only grows, so each peak is its own)."""
    work = tmp / f"sp{sp}"
    work.mkdir(parents=True, exist_ok=True)
    ds = ds_config(work)
    specs = [{"name": name_of(sp, n, gc), "seq_len": n, "checkpointing": gc, "steps": steps,
              "config": config(sp, n, gc, shape, model_dir, data, ds, work, steps)}
             for n in lengths for gc in (True, False)]
    (work / "spec.json").write_text(json.dumps(specs))
    cmd = deepspeed_cmd(sp, Path(__file__).resolve(), "--worker-spec", work / "spec.json", "--worker-out", work)
    t0 = time.perf_counter()
    run_job(cmd, work / "log.txt", child_env(threads=1), timeout=3600)
    print(f"SP={sp} on {sp} rank(s): {len(specs)} configurations in {time.perf_counter() - t0:.0f} s", flush=True)
    return [(s, [json.loads((work / f"{s['name']}.rank{r}.json").read_text()) for r in range(sp)]) for s in specs]


def summarise(sp: int, seq_len: int, gc: bool, ranks: list[dict], shape: dict) -> dict:
    from allora_ds.zero_comm import Shape, ulysses_bytes

    steady = list(zip(*(r["steps"][1:] for r in ranks)))  # per steady step, every rank's record
    seconds = sum(max(s["seconds"] for s in step) for step in steady)
    tokens = sum(s["tokens"] for step in steady for s in step)
    s = Shape(shape["hidden"], shape["intermediate"], shape["layers"], shape["heads"], shape["kv_heads"],
              shape["hidden"] // shape["heads"], shape["vocab"])
    slice_tokens = -(-seq_len // sp)  # one row, padded to a multiple of SP, split over SP ranks
    predicted = ulysses_bytes(s, slice_tokens, sp, 1, gc, act_bytes=ACT_BYTES)
    keys = (f"all_to_all@{sp}", f"all_gather@{sp}") if sp > 1 else ()
    collectives = {}
    for k in keys:
        counted = [[st["fwd_bwd"].get(k, {}).get("bytes", 0) for st in r["steps"]] for r in ranks]
        last = counted[0][-1]
        collectives[k] = {"counted": last, "predicted": predicted.get(k, 0),
                          "calls": ranks[0]["steps"][-1]["fwd_bwd"].get(k, {}).get("calls", 0),
                          "every_rank_and_step_equal": all(c == last for rc in counted for c in rc),
                          "rel_err": abs(predicted.get(k, 0) - last) / max(last, 1)}
    return {"name": name_of(sp, seq_len, gc), "sp": sp, "ranks": len(ranks), "seq_len": seq_len,
            "checkpointing": gc, "tokens_per_rank": slice_tokens,
            "activation_bytes": [r["activation_bytes"] for r in ranks],
            "activation_storages": [r["activation_storages"] for r in ranks],
            "peak_rss_mib": [round(r["peak_rss_mib"], 1) for r in ranks],
            "ru_maxrss_mib": [round(r["ru_maxrss_mib"], 1) for r in ranks],
            "steady_steps": len(steady), "steady_seconds": seconds, "steady_tokens": tokens,
            "tokens_per_s": tokens / seconds, "step_seconds": [max(s["seconds"] for s in step) for step in steady],
            "collectives": collectives,
            "bytes_match": all(v["counted"] == v["predicted"] and v["every_rank_and_step_equal"]
                               for v in collectives.values())}


def compare(rows: list[dict]) -> list[dict]:
    """SP=2 against SP=1 at each length and checkpointing setting."""
    by = {(r["sp"], r["seq_len"], r["checkpointing"]): r for r in rows}
    pairs = []
    for (sp, n, gc), r in sorted(by.items()):
        ref = by.get((1, n, gc))
        if sp == 1 or ref is None:
            continue
        pairs.append({"seq_len": n, "checkpointing": gc, "sp": sp,
                      "activation_ratio": max(r["activation_bytes"]) / ref["activation_bytes"][0],
                      "peak_rss_ratio": max(r["peak_rss_mib"]) / ref["peak_rss_mib"][0],
                      "time_ratio": ref["tokens_per_s"] / r["tokens_per_s"]})  # step time SP / step time SP=1
    return pairs


FORMULAS = {
    "activation_bytes": "distinct storages autograd saves in one micro-batch's forward (saved_tensors_hooks), "
                        "parameters and buffers excluded; with checkpointing plus the decoder layers' inputs. Per "
                        "layer ~ tokens/SP x (c_h h + c_a heads head_dim + c_m intermediate): SP=2/SP=1 ~ 0.5, plus "
                        "one more [tokens/SP, h] storage per layer under Ulysses (0.52 here without checkpointing)",
    "all_to_all": "gas x (f (2q + 2kv) + first-layer backward + (layers - 1)(f + 1)(2q + 2kv)), q = t heads "
                  "head_dim b, kv = t max(kv_heads, SP) head_dim b, t = rows x padded L / SP, f = 2 with "
                  "checkpointing else 1 (allora_ds.zero_comm.ulysses_bytes)",
    "all_gather": "gas x layers x f x t x SP x 8: the int64 position ids gathered in each attention forward",
    "tokens_per_s": "StepBatch.tokens summed over ranks (each token once per SP group) over steady steps 2..K, "
                    "slowest rank's wall time; CPU time ratios do not transfer to GPUs",
}


def main(argv: list[str] | None = None) -> int:
    ap = worker_parser(__doc__, "tiny model, 128 and 512 tokens: a smoke test", DEFAULT_OUT)
    args = ap.parse_args(argv)
    if args.worker_spec:
        worker(args)
        return 0
    t0 = time.perf_counter()
    shape = QUICK if args.quick else FULL
    lengths = LENGTHS_QUICK if args.quick else LENGTHS_FULL
    steps = STEPS_QUICK if args.quick else STEPS_FULL
    info = machine()
    model_dir, data = build_assets(shape, max(lengths), args.cache_dir)
    rows = []
    with tempfile.TemporaryDirectory(prefix="long-sequence-") as tmp:
        for sp in (1, 2):
            for spec, ranks in run_world(sp, lengths, shape, model_dir, data, Path(tmp), steps):
                rows.append(summarise(sp, spec["seq_len"], spec["checkpointing"], ranks, shape))
    result = {"machine": info, "loadavg_1m_end": os.getloadavg()[0], "quick": args.quick, "shape": shape,
              "dtype": "float32", "act_bytes": ACT_BYTES, "attention": "sdpa", "deepspeed_config": "zero2 (fp32)",
              "micro_batch_size": 1, "gradient_accumulation_steps": 1, "steps": steps,
              "repetitions": steps - 1, "repetitions_note": "steady optimizer steps timed per configuration "
              "(step 1 left out); activation bytes from the last step's micro-batch (exact, no repetition needed)",
              "load_note": "CPU ranks with 1 thread each on a machine of "
              f"{info['usable_cpus']} usable CPUs, load {info['loadavg_1m']:.1f} at start: timings are noisy and "
              "CPU time ratios do not transfer to GPUs; bytes and activation bytes depend on shapes only",
              "formulas": FORMULAS, "configs": rows, "sp2_vs_sp1": compare(rows),
              "bytes_match": all(r["bytes_match"] for r in rows), "wall_s": time.perf_counter() - t0}
    write_json(args.out, result)
    print_report(result, args.out)
    return 0 if result["bytes_match"] else 1


def print_report(res: dict, out: Path) -> None:
    s, m = res["shape"], res["machine"]
    print(f"\n{m['cpu']} ({m['usable_cpus']} usable CPUs, load {m['loadavg_1m']:.1f} at start, "
          f"{res['loadavg_1m_end']:.1f} at end), torch {m['torch']}, deepspeed {m['deepspeed']}; wrote {out}")
    print(f"Llama-3-architecture model: hidden {s['hidden']}, {s['layers']} layers, {s['heads']} heads / "
          f"{s['kv_heads']} KV heads, MLP {s['intermediate']}, vocabulary {s['vocab']}, fp32, ALLoRA r={s['rank']}, "
          f"ZeRO-2, sdpa; one row of L tokens per step; {res['repetitions']} steady steps timed.")
    ratios = {(p["seq_len"], p["checkpointing"]): p for p in res["sp2_vs_sp1"]}
    mib = 2**20
    rows = []
    for r in sorted(res["configs"], key=lambda r: (r["seq_len"], r["checkpointing"], r["sp"])):
        p = ratios.get((r["seq_len"], r["checkpointing"])) if r["sp"] > 1 else None
        a2a, ag = (r["collectives"].get(f"{k}@{r['sp']}") for k in ("all_to_all", "all_gather"))
        cell = lambda v: "-" if v is None else f"{v['counted'] / mib:,.3f} / {v['predicted'] / mib:,.3f}"  # noqa: E731
        rows.append([r["seq_len"], "yes" if r["checkpointing"] else "no", f"SP={r['sp']} x{r['ranks']}",
                     max(r["activation_bytes"]) / mib, "-" if p is None else f"{p['activation_ratio']:.3f}",
                     max(r["peak_rss_mib"]), r["tokens_per_s"], "-" if p is None else f"{p['time_ratio']:.2f}",
                     cell(a2a), cell(ag),
                     "-" if not r["collectives"] else ("yes" if r["bytes_match"] else "NO")])
    print(table(["L", "ckpt", "layout", "act MiB/rank", "act SP2/SP1", "peak RSS MiB", "tok/s", "time SP2/SP1",
                 "all-to-all MiB cnt/pred", "all-gather MiB cnt/pred", "exact"],
                rows, {3: ",.2f", 5: ",.0f", 6: ",.0f"}))
    print("Activation and collective bytes depend on shapes only and transfer to GPUs; CPU time ratios do NOT "
          "transfer to GPUs (2 ranks share 2 cores, gloo all-to-all, CPU attention).")
    print(f"counted == predicted (allora_ds.zero_comm.ulysses_bytes) for every SP=2 configuration: "
          f"{'yes' if res['bytes_match'] else 'NO'}")


if __name__ == "__main__":
    from allora_ds.errors import cli  # each rank ends through errors._exit, never in gloo's teardown abort

    sys.exit(cli(main)())
