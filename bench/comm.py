"""Bytes each rank communicates per optimizer step under each ZeRO layout, measured on CPU ranks
with the real trainer, against the formulas of ``allora_ds.plan`` (what ``allora-plan`` predicts).

    .venv/bin/python bench/comm.py                                  # every layout, 2 and 4 ranks (~25 min on 2 busy cores)
    .venv/bin/python bench/comm.py --quick --out /tmp/comm.json     # CI smoke test: 4 layouts, 2 ranks, a smaller model

Each layout runs ``allora_ds.train.setup`` + ``train_step`` (the trainer's own code path: ZeRO-3
partitioned loading, ALLoRA adapters, the chunked loss, gradient checkpointing when the layout
says so) on a random-weight Llama-3-architecture model in bf16 under ``deepspeed --num_gpus N``.
Every collective is counted where all of them pass, the ``torch.distributed`` functions (wrapped
before DeepSpeed binds them): per call its kind, its buffer bytes and its group size. Bytes are
those of the collective's *buffer*: the gathered output of an all-gather, the input of a
reduce-scatter, the tensor of an all-reduce; what a ring puts on each link follows from it
(``allora_ds.plan.wire_bytes``). DeepSpeed's own comms logger was not used: it records the input
shard of ``all_gather_into_tensor`` (not the gathered size) and misses the gathers DeepSpeed's
coalescing manager issues straight to ``torch.distributed``.

Steps 2..K of every run must communicate identical bytes (step 1 records ZeRO-3's module trace and
gathers differently): that steady step is the figure, and the prediction must be within 5%.
Bytes depend on shapes and settings only, so they transfer to GPU clusters as they are. Writes
bench/results/comm.json and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from bench.common import (  # noqa: E402
    REPO, RESULTS, child_env, deepspeed_cmd, machine, random_llama_assets, run_job, table, worker_parser,
    write_json,
)

DEFAULT_OUT = RESULTS / "comm.json"
GOAL_REL_ERR = 0.05

# The measured model: Llama-3 proportions at toy width (MLP 3.5 h, untied head, vocabulary 32 h as
# in Llama-3-8B) with enough layers that the first and the last, which ZeRO-3 treats differently,
# are a minority. KV width h/2 (Llama-3: h/4) keeps every base weight above the new persistence
# threshold r x 4h at this width, as it is in real models.
FULL = dict(hidden=256, intermediate=896, layers=8, heads=8, kv_heads=4, vocab=8192, rank=16)
QUICK = dict(hidden=128, intermediate=448, layers=3, heads=8, kv_heads=4, vocab=4096, rank=8)
SEQ_LEN, MICRO, GAS, STEPS = 64, 2, 2, 3
LLAMA3_8B_LAYER = 218_103_808  # elements of one Llama-3-8B decoder layer's projections


def before_values(shape: dict) -> dict:
    """The shipped ZeRO-3 values before this benchmark changed them: transformers' heuristics from
    h (persistence 10h, prefetch 0.9 h^2) and fixed 1e9-element reuse distance and live limit.
    1e9 elements is 4.6 Llama-3-8B layers; here it is scaled to 4.6 layers of the measured model,
    so that ZeRO-3 keeps and releases what it would keep and release in 8B."""
    h = shape["hidden"]
    scaled = round(1e9 * layer_numel(shape) / LLAMA3_8B_LAYER)
    return {"stage3_param_persistence_threshold": 10 * h, "stage3_prefetch_bucket_size": int(0.9 * h * h),
            "stage3_max_reuse_distance": scaled, "stage3_max_live_parameters": scaled}


def layer_numel(shape: dict) -> int:
    h, kv = shape["hidden"], shape["hidden"] // shape["heads"] * shape["kv_heads"]
    return 2 * h * h + 2 * h * kv + 3 * h * shape["intermediate"]


# name -> (shipped DeepSpeed config, gradient checkpointing, what it is)
LAYOUTS = {
    "zero3_before": ("zero3_bf16", False, "ZeRO-3 as shipped before (persistence 10h, prefetch 0.9h^2)"),
    "zero3_before_gc": ("zero3_bf16", True, "the same + gradient checkpointing (the Llama-3 configs had it)"),
    "zero3": ("zero3_bf16", False, "ZeRO-3 now: adapters persistent (r x 4h), prefetch one layer"),
    "zero3_gc": ("zero3_bf16", True, "ZeRO-3 now + gradient checkpointing"),
    "zero2": ("zero2_bf16", False, "ZeRO-2: base replicated on every rank"),
    "hpz": ("zero3_hpz_bf16", False, "ZeRO-3 + hpZ: secondary copy within a node (2 emulated nodes of 2)"),
    "hpz_gc": ("zero3_hpz_bf16", True, "ZeRO-3 + hpZ + gradient checkpointing"),
}
# one launch per world size; hpZ needs two "nodes" of at least 2 ranks
RUNS_FULL = {2: ["zero3_before", "zero3_before_gc", "zero3", "zero3_gc", "zero2"], 4: ["zero3_gc", "zero2", "hpz", "hpz_gc"]}
RUNS_QUICK = {2: ["zero3", "zero3_gc", "zero2", "hpz_gc"]}  # hpZ over both ranks: its code path, not its grouping


# ---------------------------------------------------------------------------------------------
# counting collectives (worker side)

COLLECTIVES = {  # torch.distributed function -> kind
    "all_gather_into_tensor": "all_gather", "_all_gather_base": "all_gather", "all_gather": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter", "_reduce_scatter_base": "reduce_scatter", "reduce_scatter": "reduce_scatter",
    "all_reduce": "all_reduce", "all_reduce_coalesced": "all_reduce", "reduce": "reduce", "broadcast": "broadcast",
    "all_to_all_single": "all_to_all", "all_to_all": "all_to_all",
}


class Counter:
    """Totals per (kind, group size) of what the wrapped collectives were called with."""

    def __init__(self) -> None:
        self.totals: dict[tuple[str, int], list[int]] = {}
        self.trace: list | None = None

    def reset(self) -> dict:
        out = {f"{k}@{g}": {"calls": c, "bytes": b} for (k, g), (c, b) in sorted(self.totals.items())}
        self.totals = {}
        return out

    def add(self, kind: str, nbytes: int, group_size: int) -> None:
        slot = self.totals.setdefault((kind, group_size), [0, 0])
        slot[0] += 1
        slot[1] += nbytes


def _nbytes(x) -> int:
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return x.numel() * x.element_size()


def buffer_bytes(name: str, args: tuple, kwargs: dict) -> int:
    """The collective's buffer: gathered output, reduce-scatter input, all-reduce/broadcast tensor."""
    def arg(i, *names):
        for n in names:
            if n in kwargs:
                return kwargs[n]
        return args[i]

    if name in ("all_gather_into_tensor", "_all_gather_base"):
        return _nbytes(arg(0, "output_tensor"))
    if name == "all_gather":
        return _nbytes(arg(0, "tensor_list"))
    if name in ("reduce_scatter_tensor", "_reduce_scatter_base"):
        return _nbytes(arg(1, "input", "input_tensor"))
    if name == "reduce_scatter":
        return _nbytes(arg(1, "input_list"))
    if name == "all_reduce_coalesced":
        return _nbytes(arg(0, "tensors"))
    if name in ("all_to_all_single", "all_to_all"):
        return _nbytes(arg(1, "input", "input_tensor_list"))
    return _nbytes(arg(0, "tensor"))


def install_counter() -> Counter:
    """Wrap torch.distributed's collectives; must run before DeepSpeed initialises its backend
    (it keeps references to ``all_gather_into_tensor`` and ``reduce_scatter_tensor``)."""
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    counter = Counter()

    def wrap(name, fn, kind):
        def counted(*args, **kwargs):
            group = kwargs.get("group")
            counter.add(kind, buffer_bytes(name, args, kwargs), dist.get_world_size(group))
            return fn(*args, **kwargs)

        counted.__wrapped__ = fn
        return counted

    for name, kind in COLLECTIVES.items():
        fn = getattr(c10d, name, None)
        if fn is None:
            continue
        w = wrap(name, fn, kind)
        setattr(c10d, name, w)
        if getattr(dist, name, None) is fn:
            setattr(dist, name, w)
    return counter


def gather_trace(engine, counter: Counter) -> None:
    """Debug aid (--trace): log which parameters ZeRO-3's coordinator gathers, in order."""
    opt = getattr(engine, "optimizer", None)
    offload = getattr(opt, "parameter_offload", None)
    if offload is None:
        return
    names = {p.ds_id: n for n, p in engine.module.named_parameters()}
    coord = offload.get_param_coordinator()
    key = "_PartitionedParameterCoordinator__all_gather_params"
    orig = getattr(coord, key)
    counter.trace = []

    def traced(params, forward):
        todo = [p for p in params if p.ds_status.name == "NOT_AVAILABLE"]
        if todo:
            counter.trace.append(("F" if forward else "B", sorted(names[p.ds_id] for p in todo)))
        return orig(params, forward)

    setattr(coord, key, traced)
    modules = {id(m): n or "<root>" for n, m in engine.module.named_modules()}
    for method, tag in (("fetch_sub_module", "fetch"), ("release_sub_module", "release")):
        orig_m = getattr(coord, method)

        def logged(module, forward=False, _orig=orig_m, _tag=tag):
            counter.trace.append((_tag, modules.get(id(module), "?"), bool(forward)))
            return _orig(module, forward)

        setattr(coord, method, logged)


def worker(args) -> None:
    counter = install_counter()  # first: before deepspeed binds torch.distributed's functions
    import gc

    import torch.distributed as dist

    from allora_ds import train as T
    from allora_ds.config import load_config
    from allora_ds.distributed import leave_process_group

    layouts = json.loads(Path(args.worker_spec).read_text())
    out = Path(args.worker_out)
    for spec in layouts:
        counter.reset()
        t0 = time.perf_counter()
        run = T.setup(load_config(None, base=spec["config"]))
        setup = counter.reset()
        if args.trace:
            gather_trace(run.engine, counter)
        steps = []
        for _ in range(spec["steps"]):
            if counter.trace is not None:
                counter.trace.clear()
            T.train_step(run)
            run.step += 1
            steps.append(counter.reset())
        engine = run.engine
        persistent = sorted(n for n, p in engine.module.named_parameters() if getattr(p, "ds_persist", False))
        rec = {"layout": spec["name"], "rank": run.rank, "world": run.world, "setup": setup, "steps": steps,
               "persistent": persistent, "trace": counter.trace, "seconds": time.perf_counter() - t0,
               "ds_config": json.loads((Path(spec["config"]["train"]["output_dir"]) / "ds_config.json").read_text())
               if run.rank == 0 else None}
        (out / f"{spec['name']}.rank{run.rank}.json").write_text(json.dumps(rec))
        dist.barrier()
        engine.destroy()
        del run, engine
        gc.collect()
        # DeepSpeed makes hpZ's intra-node group once per process; the next layout makes its own
        from deepspeed.utils import groups

        groups._ZERO_PARAM_INTRA_PARALLEL_GROUP = None
    leave_process_group()


# ---------------------------------------------------------------------------------------------
# driver


def build_assets(shape: dict, cache: Path) -> tuple[Path, Path]:
    """Random-weight bf16 model + the demo tokenizer (HF format) and a text file, built once per shape."""
    import torch

    def rows(lines):
        return [{"text": " ".join(lines[i * 6:(i + 1) * 6])} for i in range(64)]  # > SEQ_LEN tokens each

    return random_llama_assets(cache, "comm", shape, rows, dtype=torch.bfloat16)


def layout_ds(name: str, shape: dict, work: Path) -> Path:
    """The shipped config of ``name`` with this benchmark's overrides, written to ``work``."""
    ds = json.loads((REPO / "ds_configs" / f"{LAYOUTS[name][0]}.json").read_text())
    z = ds["zero_optimization"]
    if name.startswith("zero3_before"):
        z.update(before_values(shape))
    if name.startswith("hpz"):
        z["zero_hpz_partition_size"] = 2  # one machine: ranks {0,1} and {2,3} play two nodes
    path = work / f"{name}.ds.json"
    path.write_text(json.dumps(ds, indent=2))
    return path


def layout_config(name: str, shape: dict, model_dir: Path, data: Path, work: Path) -> dict:
    return {"model": {"path": str(model_dir), "dtype": "bfloat16", "gradient_checkpointing": LAYOUTS[name][1]},
            "adapter": {"method": "allora", "rank": shape["rank"]},
            "data": {"train": str(data), "format": "text", "max_seq_len": SEQ_LEN},
            "train": {"output_dir": str(work / f"run-{name}"), "deepspeed": str(layout_ds(name, shape, work)),
                      "micro_batch_size": MICRO, "gradient_accumulation_steps": GAS, "max_steps": STEPS,
                      "resume": "never", "seed": 0}}


def run_world(world: int, names: list[str], shape: dict, model_dir: Path, data: Path, tmp: Path) -> list[dict]:
    work = tmp / f"world{world}"
    work.mkdir(parents=True, exist_ok=True)
    specs = [{"name": n, "steps": STEPS, "config": layout_config(n, shape, model_dir, data, work)} for n in names]
    (work / "spec.json").write_text(json.dumps(specs))
    cmd = deepspeed_cmd(world, Path(__file__).resolve(), "--worker-spec", work / "spec.json", "--worker-out", work)
    t0 = time.perf_counter()
    run_job(cmd, work / "log.txt", child_env(threads=1), timeout=3600)
    print(f"{world} ranks: {', '.join(names)} in {time.perf_counter() - t0:.0f} s", flush=True)
    return [[json.loads((work / f"{n}.rank{r}.json").read_text()) for r in range(world)] for n in names]


def compare(name: str, ranks: list[dict], shape: dict) -> dict:
    """Measured bytes of the steady step against ``allora_ds.zero_comm.step_bytes``."""
    from allora_ds.zero_comm import Shape, step_bytes, wire_bytes

    first = ranks[0]
    steady = [r["steps"][1:] for r in ranks]
    bytes_of = lambda step: {k: v["bytes"] for k, v in step.items()}  # noqa: E731
    measured = bytes_of(first["steps"][-1])
    # every steady step of every rank communicates the same bytes (ranks hold equal shards)
    identical = all(bytes_of(s) == measured for r in steady for s in r)
    world, ds = first["world"], first["ds_config"]
    s = Shape(shape["hidden"], shape["intermediate"], shape["layers"], shape["heads"], shape["kv_heads"],
              shape["hidden"] // shape["heads"], shape["vocab"])
    predicted = step_bytes(s, shape["rank"], ds, world, GAS, LAYOUTS[name][1])
    keys = sorted(set(measured) | set(predicted))
    per_key = {k: {"measured": measured.get(k, 0), "predicted": predicted.get(k, 0)} for k in keys}
    for v in per_key.values():
        v["rel_err"] = abs(v["predicted"] - v["measured"]) / max(v["measured"], 1)
    for k, v in per_key.items():
        v["calls"] = first["steps"][-1].get(k, {}).get("calls", 0)
    wire = {k: wire_bytes(k.split("@")[0], v["measured"], int(k.split("@")[1])) for k, v in per_key.items()}
    return {"layout": name, "world": world, "what": LAYOUTS[name][2], "checkpointing": LAYOUTS[name][1],
            "deepspeed_config": LAYOUTS[name][0], "zero_optimization": ds["zero_optimization"],
            "steady_steps_identical": identical, "bytes": per_key,
            "total_measured": sum(measured.values()), "total_predicted": sum(predicted.values()),
            "max_rel_err": max(v["rel_err"] for v in per_key.values()), "wire_bytes": wire,
            "first_step": bytes_of(first["steps"][0]), "persistent_params": len(first["persistent"]),
            "seconds": max(r["seconds"] for r in ranks)}


FORMULAS = {
    "all_gather (ZeRO-3)": "m x sum_p g_p x 2 x pad_N(n_p) + 2 x sum_{persistent p} pad_N(n_p) + m x 2 x pad_N(V h): "
                           "g_p = gathers of frozen weight p per micro-batch, from DeepSpeed's coordinator replayed over "
                           "the module-hook trace (allora_ds.zero_comm.Zero3Replay); persistent parameters (norms, "
                           "and the adapters at r x 4h) are gathered once per step after the optimizer; the chunked "
                           "loss gathers the LM head (V x h) once per micro-batch",
    "all_gather (ZeRO-2)": "2 x pad_2N(A): the updated adapters once per step",
    "reduce_scatter (ZeRO-3)": "m x 4 x sum_a pad_N(n_a): every adapter gradient in fp32 after each micro-batch",
    "all_reduce": "ZeRO-2: m x 4 x A + 13 (gradients in fp32 after each micro-batch, scalars); ZeRO-3: 16 (scalars)",
    "hpZ": "gathers of weights with a secondary copy (every frozen weight after zero.Init) run within the node "
           "(group hpz); the LM head (GatheredParameters) and the persistent parameters still use all ranks",
    "wire": "a ring sends (n-1)/n of an all-gather or reduce-scatter buffer per rank, 2 (n-1)/n of an all-reduce",
}


def main(argv: list[str] | None = None) -> dict:
    ap = worker_parser(__doc__, "smaller model, 2 ranks, 4 layouts: a smoke test", DEFAULT_OUT)
    ap.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker_spec:
        worker(args)
        return {}
    t0 = time.perf_counter()
    shape = QUICK if args.quick else FULL
    runs = RUNS_QUICK if args.quick else RUNS_FULL
    info = machine()
    model_dir, data = build_assets(shape, args.cache_dir)
    rows = []
    with tempfile.TemporaryDirectory(prefix="comm-") as tmp:
        for world, names in runs.items():
            for name, ranks in zip(names, run_world(world, names, shape, model_dir, data, Path(tmp))):
                rows.append(compare(name, ranks, shape))
    result = {"machine": info, "quick": args.quick, "shape": shape, "seq_len": SEQ_LEN, "micro_batch_size": MICRO,
              "gradient_accumulation_steps": GAS, "steps": STEPS, "dtype": "bfloat16", "formulas": FORMULAS,
              "layouts": rows, "goal_max_rel_err": GOAL_REL_ERR,
              "met": all(r["max_rel_err"] <= GOAL_REL_ERR and r["steady_steps_identical"] for r in rows),
              "wall_s": time.perf_counter() - t0}
    write_json(args.out, result)
    print_report(result, args.out)
    return result


def print_report(res: dict, out: Path) -> None:
    s, m = res["shape"], res["machine"]
    print(f"\n{m['cpu']}, torch {m['torch']}, deepspeed {m['deepspeed']}; wrote {out}")
    print(f"Llama-3-architecture model: hidden {s['hidden']}, {s['layers']} layers, MLP {s['intermediate']}, vocabulary "
          f"{s['vocab']}, bf16, ALLoRA r={s['rank']} on the 7 projections; micro-batch {res['micro_batch_size']} x "
          f"{res['seq_len']} tokens, {res['gradient_accumulation_steps']} micro-batches per step. Bytes per rank per "
          f"optimizer step (collective buffers), measured in step {res['steps']} / predicted by allora_ds.zero_comm:")
    kb = 1024
    rows = []
    for r in res["layouts"]:
        b = r["bytes"]
        cell = lambda kind: " + ".join(  # noqa: E731
            (f"{v['measured'] / kb:,.0f}" if v["measured"] >= kb else f"{v['measured']} B")
            + (f" (in {k.split('@')[1]})" if int(k.split('@')[1]) != r["world"] else "")
            for k, v in b.items() if k.startswith(kind)) or "0"
        calls = sum(v["calls"] for k, v in b.items() if k.startswith("all_gather"))
        rows.append([r["layout"], r["world"], "yes" if r["checkpointing"] else "no", cell("all_gather"), calls,
                     cell("reduce_scatter"), cell("all_reduce"), r["total_measured"] / kb, r["total_predicted"] / kb,
                     f"{100 * r['max_rel_err']:.2f}%"])
    print(table(["layout", "ranks", "ckpt", "all-gather KiB", "calls", "reduce-scatter KiB", "all-reduce KiB",
                 "total KiB", "predicted KiB", "max error"], rows, {7: ",.0f", 8: ",.0f"}))
    print(f"goal: every figure within {100 * res['goal_max_rel_err']:.0f}% of its prediction, steady steps identical: "
          f"{'met' if res['met'] else 'NOT met'}")


if __name__ == "__main__":
    from allora_ds.errors import cli  # each rank ends through errors._exit, never in gloo's teardown abort

    cli(main)()
