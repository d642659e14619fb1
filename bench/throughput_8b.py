"""Training throughput on a model with Llama-3-8B's FLOP split: allora_ds vs HF Trainer + PEFT vs a
plain PyTorch loop, and each as a share of the machine's matmul rate.

    .venv/bin/python bench/throughput_8b.py                      # both workloads, 3 repetitions
    .venv/bin/python bench/throughput_8b.py --workloads alpaca --reps 5
    .venv/bin/python bench/throughput_8b.py --quick --out /tmp/t8b.json --cache-dir /tmp/c   # CI smoke

bench/throughput.py's models are small and their LM head large (60M and 158.6M parameters, the head
and embedding 54% and 83% of them), so what a step spends in the head, and what the chunked loss
saves there, is far more than on Llama-3-8B. The model here has 8B's shares instead: hidden 512,
8 layers, MLP 3.5x (1792), 8 query / 2 KV heads (8B's 4:1), and a 4,096-word vocabulary, which
makes the LM head 7.1% of the matmul FLOPs per token (8B: 7.0%). Attention is a larger share than
on 8B at the same sequence lengths (its FLOPs per token scale with the length times the hidden size,
the projections' with the hidden size squared); the output states both, per workload.

Two workloads of alpaca-format rows, packed by allora_ds, flattened by the Trainer:
  * ``alpaca``: prompts of 60-250 tokens, responses of 20-300 (about half the tokens labelled);
  * ``commonsense``: commonsense-170k-like, prompts of 60-200 tokens and a response of 6-10
    ("the correct answer is ..."): about 6% labelled.
Systems, side by side, 2 CPU ranks x 1 thread, fp32, rank-16 adapters on the 7 projections, the same
rows, AdamW, cosine schedule, clipping; each at its best padding-free setting under the layout an
8B user on 80 GB GPUs runs (ds_configs/zero2_bf16.json: the base replicated, what allora-plan picks
for 8B there; bf16 off on CPU):
  * ``allora`` / ``lora``: ``deepspeed --module allora_ds.train`` (the real CLI), packing, chunked loss;
  * ``hf_flat``: transformers.Trainer + PEFT LoRA with ``DataCollatorWithFlattening``
    (bench/hf_baseline.py), as many examples per micro-batch as a packed row holds on average;
  * ``plain`` / ``plain_lora``: the framework-overhead limit (bench/plain_loop.py): a plain
    PyTorch loop over the same model, adapters, packed rows, loss and optimizer, with gradients
    averaged by torch DDP over the same 2 ranks; no DeepSpeed, no trainer around it.
Timing as in bench/throughput.py: steps ``timed_from+1 .. steps`` on rank 0 between two
collectives, examples counted exactly, wall clock and CPU time of the window, repetitions in a
rotated order, ratios the medians of per-repetition (paired) ratios.

The matmul rate: every rank's GEMMs of one packed row (each projection's forward ``x W^T`` and
input gradient ``g W``, the LM head's forward), timed with one thread in ``world`` processes at once,
as the ranks run. Each system's model FLOPs (allora_ds/flops.py: 4N + 2N_trainable per token plus
causal attention, the LM head counted at every position) per second per rank are reported as a share
of it.

Goals (the issue): allora_ds >= 1.25x HF + PEFT and >= 0.9x the plain loop in examples/s; ALLoRA
step time <= 1.03x LoRA's. Writes bench/results/throughput_8b.json and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from allora_ds.distributed import free_port  # noqa: E402
from bench.common import (  # noqa: E402
    REPO, RESULTS, child_env, deepspeed_cmd, machine, median, paired_ratio, run_job, table, write_json,
)
from bench.throughput import (  # noqa: E402
    TARGETS, Setting, allora_config, allora_window, bench_ds_config, build_assets, run_allora, run_hf,
)

OUT = RESULTS / "throughput_8b.json"
SYSTEMS = ("allora", "lora", "hf_flat", "plain", "plain_lora")
EXTRA_SYSTEMS = ("allora_bfd",)  # on request (--systems): allora with data.packing=bfd instead of greedy
GOALS = {"allora_over_hf_flat_min": 1.25, "allora_over_plain_min": 0.9, "allora_time_over_lora_max": 1.03}
LLAMA3_8B = {"hidden": 4096, "layers": 32, "heads": 32, "kv_heads": 8, "intermediate": 14336, "vocab": 128256}
_SPLIT = dict(hidden=512, layers=8, heads=8, kv_heads=2, vocab=4096, micro=1, gas=1, steps=12, timed_from=4,
              reps=3, pack_len=1280, layout="zero2_bf16")
WORKLOADS = {
    # seq_len: the longest example (the Trainer truncates there); a packed row holds about as many
    # tokens as hf_micro examples
    "alpaca": Setting(**_SPLIT, workload="alpaca", seq_len=550, rows=512, hf_micro=4,
                      prompt_tokens=(60, 250), response_tokens=(20, 300)),
    "commonsense": Setting(**_SPLIT, workload="commonsense", seq_len=256, rows=768, hf_micro=9,
                           prompt_tokens=(60, 200), response_tokens=(6, 10)),
}
QUICK = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 512, "rows": 48, "steps": 4, "timed_from": 2,
         "reps": 1}


def shape_of(s: Setting) -> dict:
    return {"hidden": s.hidden, "layers": s.layers, "heads": s.heads, "kv_heads": s.kv_heads,
            "intermediate": int(3.5 * s.hidden), "vocab": s.vocab}


def flop_model_of(shape: dict, rank: int):
    """allora_ds.flops.FlopModel of a Llama-3-architecture shape (untied head), without building it
    (flops.flop_model counts every parameter but the input embedding, the RMSNorm weights too)."""
    from allora_ds.flops import FlopModel

    h, kv = shape["hidden"], shape["hidden"] * shape["kv_heads"] // shape["heads"]
    proj = [(h, h), (h, kv), (h, kv), (h, h), (h, shape["intermediate"]), (h, shape["intermediate"]),
            (shape["intermediate"], h)]
    per_layer = sum(i * o for i, o in proj)
    adapters = sum(rank * (i + o) for i, o in proj)
    norms = (2 * shape["layers"] + 1) * h
    return FlopModel(matmul_params=shape["layers"] * (per_layer + adapters) + h * shape["vocab"] + norms,
                     trainable_params=shape["layers"] * adapters, n_layers=shape["layers"], attn_dim=h)


def checked_flop_model(model_dir: Path, shape: dict, rank: int):
    """``flop_model_of(shape)``, checked against flops.flop_model of the benchmark's model with its
    adapters (built on the meta device: shapes only), so that the shares printed are the model's."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from allora_ds.adapters import AdapterSpec, inject_adapters
    from allora_ds.flops import flop_model

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
        inject_adapters(model, AdapterSpec(rank=rank, target_modules=list(TARGETS)), verbose=False)
    fm = flop_model_of(shape, rank)
    if fm != flop_model(model):
        raise SystemExit(f"the FLOP model of {shape} is {fm}, the built model's {flop_model(model)}")
    return fm


def flop_split(shape: dict, rank: int, tokens: int, pairs: int) -> dict:
    """Shares of the model FLOPs of ``tokens`` tokens in examples with ``pairs`` causal query-key pairs:
    the LM head's of the matmul FLOPs, attention's of all (every position counted, as flops.py counts)."""
    fm = flop_model_of(shape, rank)
    linear, attention = fm.linear_flops(tokens), fm.attention_flops(pairs)
    head = 4 * shape["hidden"] * shape["vocab"] * tokens
    return {"head_of_matmul": head / linear, "attention_of_all": attention / (linear + attention)}


def gemm_shapes(shape: dict, tokens: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of one rank's frozen-weight GEMMs for a micro-batch of ``tokens``: every projection's
    forward and input gradient, and the LM head's forward; the adapters' rank-r GEMMs are left out."""
    h, kv, f = shape["hidden"], shape["hidden"] * shape["kv_heads"] // shape["heads"], shape["intermediate"]
    proj = [(h, h), (h, kv), (h, kv), (h, h), (h, f), (h, f), (f, h)]
    return [(tokens, i, o) for i, o in proj] + [(tokens, o, i) for i, o in proj] + [(tokens, h, shape["vocab"])]


def matmul_worker(shape: dict, tokens: int, reps: int, out: Path) -> None:
    """GFLOP/s of ``gemm_shapes`` in one thread: the FLOPs of all of them over the median time of a pass."""
    import torch

    torch.set_num_threads(1)
    gemms = [(torch.randn(m, k), torch.randn(k, n)) for m, k, n in gemm_shapes(shape, tokens)]
    flop = sum(2 * a.shape[0] * a.shape[1] * b.shape[1] for a, b in gemms)
    times = []
    for rep in range(reps + 1):  # the first pass warms up
        t0 = time.perf_counter()
        for a, b in gemms:
            torch.mm(a, b)
        if rep:
            times.append(time.perf_counter() - t0)
    out.write_text(json.dumps({"gflops": flop / median(times) / 1e9, "flop_per_pass": flop, "pass_s": times}))


def matmul_rate(shape: dict, tokens: int, world: int, reps: int, work: Path) -> dict:
    """``matmul_worker`` in ``world`` processes at once (each rank has one core, and they share the
    memory system); the mean of their rates."""
    outs = [work / f"matmul-{i}.json" for i in range(world)]
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--matmul-worker", str(o),
                               "--matmul-shape", json.dumps(shape), "--matmul-tokens", str(tokens), "--reps", str(reps)],
                              env=child_env(threads=1), cwd=REPO) for o in outs]
    if any(p.wait() for p in procs):
        raise SystemExit("the matmul-rate worker failed")
    rates = [json.loads(o.read_text())["gflops"] for o in outs]
    return {"gflops_per_rank": sum(rates) / len(rates), "per_process": rates, "tokens": tokens, "reps": reps}


def run_plain(s: Setting, method: str, model_dir: Path, data: Path, ds_path: Path, work: Path, env: dict,
              window: dict) -> dict:
    import yaml

    cfg_path, out, marks = work / "config.yaml", work / "timing.json", work / "marks.txt"
    cfg_path.write_text(yaml.safe_dump(allora_config(s, method, model_dir, data, work / "run", ds_path)))
    t0 = time.perf_counter()
    cpu = run_job(deepspeed_cmd(s.world, REPO / "bench" / "plain_loop.py", "--config", cfg_path, "--out", out,
                                "--marks", marks, "--timed-from", s.timed_from), work / "log.txt", env,
                  timeout=3600, marks=marks)
    wall = time.perf_counter() - t0
    r = json.loads(out.read_text())
    assert r["tokens"] == window["tokens"], f"plain loop counts {r['tokens']} tokens, the data order {window['tokens']}"
    return {"tokens": r["tokens"], "seconds": r["seconds"], "tokens_per_s": r["tokens_per_s"], "cpu_s": cpu[1] - cpu[0],
            "wall_s": wall, "final_loss": r["final_loss"], "examples": window["examples"],
            "examples_per_s": window["examples"] / r["seconds"], "causal_pairs": window["causal_pairs"]}


def method_ab_worker(kind: str, configs: dict[str, str], steps: int, out: Path) -> None:
    """One process, one thread, a world of one: per method, the plain loop (``kind`` plain) or the
    allora_ds trainer's engine and ``train_step`` (``kind`` trainer) over the same packed rows, their
    steps interleaved (the order swapped every step), CPU time per step. What ALLoRA's rule costs in
    a whole model, with the drift of a shared machine falling on both alike."""
    import torch

    torch.set_num_threads(1)
    if kind == "plain":
        import deepspeed

        from bench.plain_loop import PlainLoop

        deepspeed.init_distributed(dist_backend="gloo")  # a world of one (see plain_loop.main)
        loops = {m: PlainLoop(c).step for m, c in configs.items()}
    else:
        from allora_ds import train as T
        from allora_ds.config import load_config

        runs = {m: T.setup(load_config(c)) for m, c in configs.items()}  # two engines, one process

        def trainer_step(run):
            def step(_):
                T.train_step(run)
                run.step += 1
            return step
        loops = {m: trainer_step(r) for m, r in runs.items()}
    names = list(loops)
    cpu: dict[str, list[float]] = {m: [] for m in names}
    for step in range(steps + 2):  # the first two are warmup
        for m in names if step % 2 else names[::-1]:
            c0 = time.process_time()
            loops[m](step)
            if step >= 2:
                cpu[m].append(time.process_time() - c0)
    out.write_text(json.dumps(cpu))


def method_ab(s: Setting, model_dir: Path, data: Path, ds_path: Path, work: Path, steps: int) -> dict:
    """``method_ab_worker`` for the plain loop and for the trainer: paired ratios of step CPU time."""
    import yaml

    from allora_ds.config import load_config
    from allora_ds.ds_config import fill_ds_config, read_ds_config

    res = {"steps": steps}
    for kind in ("plain", "trainer"):
        configs = {}
        for method in ("allora", "lora"):
            one = replace(s, world=1, steps=steps + 2)
            cfg = allora_config(one, method, model_dir, data, work / f"ab-{kind}-{method}", work / "ds_config_1.json")
            cfg["train"]["log_steps"] = steps + 2
            configs[method] = str(work / f"ab-{kind}-{method}.yaml")
            Path(configs[method]).write_text(yaml.safe_dump(cfg))
        # the bench's DeepSpeed JSON with its batch fields for a world of one
        (work / "ds_config_1.json").write_text(json.dumps(fill_ds_config(
            read_ds_config(ds_path), load_config(configs["allora"]), 1, s.hidden, ds_path)))
        out = work / f"ab-{kind}.json"
        run_job([sys.executable, str(Path(__file__).resolve()), "--method-ab-worker", str(out), "--method-ab-kind", kind,
                 "--method-ab-configs", json.dumps(configs), "--method-ab-steps", str(steps)],
                work / f"ab-{kind}-log.txt", child_env(threads=1, RANK=0, LOCAL_RANK=0, WORLD_SIZE=1, LOCAL_SIZE=1,
                                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port()),
                timeout=3600)
        cpu = json.loads(out.read_text())
        ratios = sorted(a / b for a, b in zip(cpu["allora"], cpu["lora"]))
        q = len(ratios) // 4
        res[kind] = {"cpu_s": cpu, "allora_time_over_lora": median(ratios), "p25_p75": [ratios[q], ratios[-1 - q]],
                     "sum_ratio": sum(cpu["allora"]) / sum(cpu["lora"])}
    return res


def run_system(system: str, s: Setting, model_dir: Path, data: Path, ds_path: Path, work: Path, env: dict,
               window: dict) -> dict:
    if system == "hf_flat":
        return run_hf(s, model_dir, data, ds_path, work, env, collator="flat")
    method = "lora" if system in ("lora", "plain_lora") else "allora"
    if system.startswith("plain"):
        return run_plain(s, method, model_dir, data, ds_path, work, env, window)
    if system == "allora_bfd":  # other rows, so another window
        bfd = replace(s, packing="bfd")
        return run_allora(bfd, method, model_dir, data, ds_path, work, env,
                          window=allora_window(bfd, model_dir, data, ds_path, work))
    return run_allora(s, method, model_dir, data, ds_path, work, env, window=window)


RATIOS = {  # name: (numerator, denominator) of examples/s; *_time_over_*: step time, i.e. the inverse
    "allora_over_hf_flat": ("allora", "hf_flat"), "lora_over_hf_flat": ("lora", "hf_flat"),
    "allora_over_plain": ("allora", "plain"), "lora_over_plain_lora": ("lora", "plain_lora"),
    "allora_time_over_lora": ("lora", "allora"), "plain_allora_time_over_plain_lora": ("plain_lora", "plain"),
    "allora_bfd_over_allora": ("allora_bfd", "allora"),
}


def summarise(runs: list[dict]) -> dict:
    out = {}
    for metric in ("examples_per_s", "cpu_examples_per_s", "share_of_matmul_rate"):
        v = {k: [r[metric] for r in runs if r["system"] == k] for k in SYSTEMS + EXTRA_SYSTEMS}
        out[metric] = {"median": {k: median(x) for k, x in v.items() if x},
                       **{name: paired_ratio(v[a], v[b]) for name, (a, b) in RATIOS.items() if v[a] and v[b]}}
    return out


def bench_workload(name: str, s: Setting, systems: tuple[str, ...], cache: Path, root: Path, matmul_reps: int,
                   ab_steps: int) -> dict:
    t_start = time.perf_counter()
    model_dir, data = build_assets(s, cache)
    info = json.loads((model_dir.parent / "info.json").read_text())
    env = child_env(threads=1)
    root.mkdir(parents=True, exist_ok=True)
    ds_path = root / "ds_config.json"
    ds = bench_ds_config(s, model_dir, data, ds_path)
    window = allora_window(s, model_dir, data, ds_path, root)
    shape = shape_of(s)
    fm = checked_flop_model(model_dir, shape, s.rank)
    rate = matmul_rate(shape, s.pack_len, s.world, matmul_reps, root)
    ab = method_ab(s, model_dir, data, ds_path, root, ab_steps) if ab_steps else None
    for kind in ("plain", "trainer") if ab else ():
        print(f"{name}: {kind}, one process, steps interleaved: ALLoRA step / LoRA step = "
              f"{ab[kind]['allora_time_over_lora']:.3f} (quartiles {ab[kind]['p25_p75'][0]:.3f}-"
              f"{ab[kind]['p25_p75'][1]:.3f}, {ab_steps} pairs)", flush=True)
    runs = []
    for rep in range(s.reps if systems else 0):
        order = systems[rep % len(systems):] + systems[: rep % len(systems)]
        for system in order:
            work = root / f"rep{rep}-{system}"
            work.mkdir(parents=True, exist_ok=True)
            r = run_system(system, s, model_dir, data, ds_path, work, env, window)
            r["cpu_examples_per_s"] = r["examples"] / (r["cpu_s"] / s.world)
            r["gflops_per_rank"] = fm.step_flops(r["tokens"], r["causal_pairs"]) / r["seconds"] / s.world / 1e9
            r["share_of_matmul_rate"] = r["gflops_per_rank"] / rate["gflops_per_rank"]
            runs.append({"rep": rep, "system": system, **r})
            print(f"{name} rep {rep} {system:>10}: {r['examples_per_s']:6.3f} examples/s, {r['tokens_per_s']:7.1f} "
                  f"tokens/s, {r['share_of_matmul_rate']:.1%} of the matmul rate (window {r['seconds']:.1f} s, "
                  f"launch to exit {r['wall_s']:.0f} s, loss {r['final_loss']:.4f}, load {os.getloadavg()[0]:.1f})",
                  flush=True)
    losses = {k: [r["final_loss"] for r in runs if r["system"] == k] for k in systems}
    return {
        "setting": asdict(s), "parameters": info["parameters"], "deepspeed_config": ds,
        "data": {**info["data"], "window": window},
        # on the examples of the timing window (the same tokens and lengths for Llama-3-8B)
        "flop_split": {"this_model": flop_split(shape, s.rank, window["tokens"], window["causal_pairs"]),
                       "llama3_8b": flop_split(LLAMA3_8B, s.rank, window["tokens"], window["causal_pairs"])},
        "matmul_rate": rate, "method_ab": ab, "runs": runs, "summary": summarise(runs),
        # the same rows, model and seed: the plain loop and allora_ds apply the same updates
        "loss_rel_diff": {m: max(abs(a - b) / abs(b) for a, b in zip(losses[p], losses[m]))
                          for m, p in (("allora", "plain"), ("lora", "plain_lora")) if losses.get(m) and losses.get(p)},
        "wall_s": time.perf_counter() - t_start,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, 4 steps, 1 repetition: a smoke test")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=f"of {', '.join(WORKLOADS)}")
    ap.add_argument("--systems", default=",".join(SYSTEMS),
                    help=f"subset of {', '.join(SYSTEMS)}; also {', '.join(EXTRA_SYSTEMS)}")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3; 1 with --quick)")
    ap.add_argument("--cache-dir", type=Path, default=REPO / "bench" / "cache")
    ap.add_argument("--keep-runs", type=Path, default=None, help="keep run directories (logs, metrics) here")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--ab-steps", type=int, default=None,
                    help="interleaved ALLoRA/LoRA step pairs in one process (default 16; 2 with --quick; 0: skip)")
    ap.add_argument("--method-ab-worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--method-ab-configs", help=argparse.SUPPRESS)
    ap.add_argument("--method-ab-kind", choices=("plain", "trainer"), help=argparse.SUPPRESS)
    ap.add_argument("--method-ab-steps", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--matmul-worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--matmul-shape", help=argparse.SUPPRESS)
    ap.add_argument("--matmul-tokens", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.matmul_worker:
        matmul_worker(json.loads(args.matmul_shape), args.matmul_tokens, args.reps, args.matmul_worker)
        return {}
    if args.method_ab_worker:
        method_ab_worker(args.method_ab_kind, json.loads(args.method_ab_configs), args.method_ab_steps,
                         args.method_ab_worker)
        return {}
    ab_steps = args.ab_steps if args.ab_steps is not None else (2 if args.quick else 16)
    systems = tuple(x for x in SYSTEMS + EXTRA_SYSTEMS if x in args.systems.split(","))
    t_start = time.perf_counter()
    result = {"machine": machine(), "goals": GOALS, "targets": list(TARGETS), "workloads": {}}
    with tempfile.TemporaryDirectory(prefix="throughput-8b-") as tmp:
        for name in args.workloads.split(","):
            s = replace(WORKLOADS[name], **(QUICK if args.quick else {}))
            s = replace(s, reps=args.reps or s.reps)
            root = (args.keep_runs or Path(tmp)) / name
            result["workloads"][name] = bench_workload(name, s, systems, args.cache_dir, root,
                                                       matmul_reps=3 if args.quick else 20, ab_steps=ab_steps)
            write_json(args.out, {**result, "wall_s": time.perf_counter() - t_start})  # each workload as it ends
    result.update(loadavg_1m_end=os.getloadavg()[0], wall_s=time.perf_counter() - t_start)
    write_json(args.out, result)
    print_report(result, args.out)
    return result


LABELS = {"allora": "allora_ds allora (ZeRO-2, packing, chunked loss)", "lora": "allora_ds lora (same)",
          "hf_flat": "HF Trainer + PEFT LoRA, DataCollatorWithFlattening", "plain": "plain PyTorch + DDP, allora",
          "plain_lora": "plain PyTorch + DDP, lora", "allora_bfd": "allora_ds allora, data.packing=bfd"}
RATIO_LABELS = {"allora_over_hf_flat": ("allora_ds allora / HF flattening", "allora_over_hf_flat_min"),
                "lora_over_hf_flat": ("allora_ds lora / HF flattening", None),
                "allora_over_plain": ("allora_ds allora / plain loop (allora)", "allora_over_plain_min"),
                "lora_over_plain_lora": ("allora_ds lora / plain loop (lora)", None),
                "allora_time_over_lora": ("allora step time / lora (allora_ds)", "allora_time_over_lora_max"),
                "plain_allora_time_over_plain_lora": ("allora step time / lora (plain loop)", None),
                "allora_bfd_over_allora": ("allora_ds bfd packing / greedy", None)}


def print_report(res: dict, out: Path) -> None:
    m = res["machine"]
    print(f"\n{m['cpu']} ({m['logical_cpus']} logical CPUs, load {m['loadavg_1m']:.1f} at start, "
          f"{res['loadavg_1m_end']:.1f} at end), torch {m['torch']}, deepspeed {m['deepspeed']}, transformers "
          f"{m['transformers']}, peft {m.get('peft')}; wrote {out}")
    for name, w in res["workloads"].items():
        s, d, fs = w["setting"], w["data"], w["flop_split"]
        print(f"\n{name}: {w['parameters'] / 1e6:.1f}M parameters (hidden {s['hidden']}, {s['layers']} layers, vocabulary "
              f"{s['vocab']}), fp32, {s['layout']}, {s['world']} CPU ranks x 1 thread; prompt "
              f"{d['prompt_tokens_mean']:.0f} / response {d['response_tokens_mean']:.0f} tokens on average, "
              f"{d['labelled_fraction']:.0%} labelled; steps {s['timed_from'] + 1}-{s['steps']} timed, "
              f"{s['reps']} repetition(s)")
        print(f"LM head share of matmul FLOPs {fs['this_model']['head_of_matmul']:.1%} (Llama-3-8B "
              f"{fs['llama3_8b']['head_of_matmul']:.1%}); attention share on these examples "
              f"{fs['this_model']['attention_of_all']:.1%} (Llama-3-8B {fs['llama3_8b']['attention_of_all']:.1%}); "
              f"matmul rate {w['matmul_rate']['gflops_per_rank']:.1f} GFLOP/s per rank")
        rows = []
        for system in SYSTEMS + EXTRA_SYSTEMS:
            mine = [r for r in w["runs"] if r["system"] == system]
            if mine:
                ex = [r["examples_per_s"] for r in mine]
                rows.append([LABELS[system], median(ex), f"{min(ex):.2f}-{max(ex):.2f}",
                             median([r["tokens_per_s"] for r in mine]), median([r["cpu_examples_per_s"] for r in mine]),
                             median([r["gflops_per_rank"] for r in mine]),
                             f"{median([r['share_of_matmul_rate'] for r in mine]):.1%}"])
        print(table(["system", "examples/s", "range", "tokens/s", "examples/CPU-s/rank", "GFLOP/s/rank", "of matmul"],
                    rows, {1: ".3f", 3: ".1f", 4: ".3f", 5: ".1f"}))
        wall, cpu = w["summary"]["examples_per_s"], w["summary"]["cpu_examples_per_s"]
        print(table(["paired ratio (median over repetitions)", "wall clock", "CPU time", "goal"],
                    [[label, wall[k], cpu[k], _goal(res["goals"], g)] for k, (label, g) in RATIO_LABELS.items() if k in wall],
                    {1: ".3f", 2: ".3f"}))
        for kind in ("plain", "trainer") if w.get("method_ab") else ():
            ab = w["method_ab"][kind]
            print(f"ALLoRA step / LoRA step, {kind}, one process, {w['method_ab']['steps']} interleaved pairs: "
                  f"{ab['allora_time_over_lora']:.3f} (quartiles {ab['p25_p75'][0]:.3f}-{ab['p25_p75'][1]:.3f})")
        for k, v in w["loss_rel_diff"].items():
            print(f"final loss, {k} vs its plain loop: largest relative difference {v:.1e}")


def _goal(goals: dict, key: str | None) -> str:
    if key is None:
        return "-"
    return (">= " if key.endswith("_min") else "<= ") + str(goals[key])


if __name__ == "__main__":
    main()
