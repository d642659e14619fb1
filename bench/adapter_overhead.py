"""Cost of ALLoRA in one adapted layer, against LoRA and the frozen base layer, and of its row norms.

    .venv/bin/python bench/adapter_overhead.py                 # full run: 512 tokens, 20 repetitions
    .venv/bin/python bench/adapter_overhead.py --quick         # smoke test (CI): about 10 s on an idle 2-CPU machine
    .venv/bin/python bench/adapter_overhead.py --threads 1 --out /tmp/x.json  # as in docs/benchmarks.md

Measures, at the Llama-3-8B projection shapes with r=16, fp32 on CPU:
  * forward+backward of one ``AdapterLinear`` for method ``allora``, method ``lora`` (dropout 0) and
    the frozen ``nn.Linear`` alone. The input requires grad, so each variant also pays the backward
    to ``x``, as inside a network; the base weight is frozen, so no variant computes its gradient.
  * ALLoRA's per-row norms ``||(BA)_i||``: ``row_norms_of_product`` (Gram matrix of A) against
    materialising ``B @ A`` and taking its row norms.
Each repetition runs every variant once, in an order rotated from one repetition to the next, so
load from other processes hits all variants alike. Ratios are medians of the per-repetition
(paired) ratios; times are medians. Writes JSON (default bench/results/adapter_overhead.json) and
prints a table last. Issue targets: allora/lora <= 1.03, Gram >= 50x faster than materialising.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from allora_ds.adapters import AdapterLinear, AdapterSpec, row_norms_of_product  # noqa: E402
from bench.common import cpu_model  # noqa: E402

# Llama-3-8B projections (in, out) and how many of each a decoder block holds, for the per-block total.
SHAPES = (
    ("q_proj,o_proj", 4096, 4096, 2),
    ("k_proj,v_proj", 4096, 1024, 2),
    ("gate_proj,up_proj", 4096, 14336, 2),
    ("down_proj", 14336, 4096, 1),
)
RANK = 16
VARIANTS = ("base", "lora", "allora")
TARGET_ALLORA_OVER_LORA = 1.03
TARGET_GRAM_SPEEDUP = 50.0
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "adapter_overhead.json"


def make_layers(n_in: int, n_out: int, gen: torch.Generator) -> dict[str, nn.Module]:
    """The three variants, sharing one frozen base weight and one (A, B) so they do identical work."""
    # Llama projections have no bias; skip_init because the default init of 58 M weights is slow.
    base = torch.nn.utils.skip_init(nn.Linear, n_in, n_out, bias=False)
    with torch.no_grad():
        base.weight.uniform_(-0.035, 0.035, generator=gen)  # std 0.02; uniform_ is cheaper than normal_
    base.weight.requires_grad_(False)
    allora = AdapterLinear(base, AdapterSpec(method="allora", rank=RANK), generator=gen)
    lora = AdapterLinear(base, AdapterSpec(method="lora", rank=RANK, dropout=0.0), generator=gen)
    with torch.no_grad():
        # B = 0 would let ALLoRA's scale be the constant eta; a trained-looking B keeps the work real.
        allora.lora_B.normal_(0.0, 0.01, generator=gen)
        lora.lora_A.copy_(allora.lora_A)
        lora.lora_B.copy_(allora.lora_B)
    return {"base": base, "lora": lora, "allora": allora}


def time_fwd_bwd(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> float:
    """Seconds for one forward and backward; gradients are cleared outside the timed region."""
    x.grad = None
    for p in layer.parameters():
        p.grad = None
    t0 = time.perf_counter()
    layer(x).backward(g)
    return time.perf_counter() - t0


def time_call(fn, min_s: float = 0.0) -> float:
    """Mean seconds per call, calling back to back until ``min_s`` has passed (the Gram path is too
    short to time once; a time budget rather than a call count keeps a loaded machine from stalling)."""
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= min_s:
            return dt / n


def materialised_row_norms(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The paper's way: form the full [n_out, n_in] product, then its row norms."""
    return torch.linalg.vector_norm(B @ A, dim=1)


def rotated(seq, k: int):
    k %= len(seq)
    return seq[k:] + seq[:k]


def bench_layers(tokens: int, reps: int, warmup: int, gen: torch.Generator) -> tuple[list[dict], dict]:
    setups = []
    for name, n_in, n_out, count in SHAPES:
        layers = make_layers(n_in, n_out, gen)
        # [batch=1, tokens, n_in], as a real model feeds it (exercises the adapters' reshapes).
        x = torch.randn(1, tokens, n_in, generator=gen, requires_grad=True)
        g = torch.randn(1, tokens, n_out, generator=gen)
        setups.append((name, n_in, n_out, count, layers, x, g))

    samples = {(s[0], v): [] for s in setups for v in VARIANTS}
    for rep in range(warmup + reps):
        for name, _, _, _, layers, x, g in setups:
            for v in rotated(VARIANTS, rep):
                t = time_fwd_bwd(layers[v], x, g)
                if rep >= warmup:  # warmup: allocator, MKL/oneDNN kernel selection, page faults
                    samples[(name, v)].append(t)

    def paired_ratio(num: list[float], den: list[float]) -> float:
        return statistics.median(a / b for a, b in zip(num, den))

    def ratio_quartiles(num: list[float], den: list[float]) -> list[float]:
        # The spread of the paired ratio shows how much of a few-percent difference is noise.
        q = statistics.quantiles([a / b for a, b in zip(num, den)], n=4) if len(num) > 1 else [num[0] / den[0]] * 3
        return [q[0], q[2]]

    rows = []
    for name, n_in, n_out, _, _, _, _ in setups:
        s = {v: samples[(name, v)] for v in VARIANTS}
        rows.append(
            {
                "proj": name, "n_in": n_in, "n_out": n_out,
                **{f"{v}_ms": 1e3 * statistics.median(s[v]) for v in VARIANTS},
                "allora_over_lora": paired_ratio(s["allora"], s["lora"]),
                "allora_over_lora_p25_p75": ratio_quartiles(s["allora"], s["lora"]),
                "allora_over_base": paired_ratio(s["allora"], s["base"]),
                "lora_over_base": paired_ratio(s["lora"], s["base"]),
            }
        )
    # One decoder block: the 7 projections, each repetition summed before taking the ratio.
    block = {v: [sum(cnt * samples[(nm, v)][i] for nm, _, _, cnt, *_ in setups) for i in range(reps)] for v in VARIANTS}
    block_row = {
        "proj": "decoder block (7 proj)",
        **{f"{v}_ms": 1e3 * statistics.median(block[v]) for v in VARIANTS},
        "allora_over_lora": paired_ratio(block["allora"], block["lora"]),
        "allora_over_lora_p25_p75": ratio_quartiles(block["allora"], block["lora"]),
        "allora_over_base": paired_ratio(block["allora"], block["base"]),
        "lora_over_base": paired_ratio(block["lora"], block["base"]),
    }
    return rows, block_row


def bench_row_norms(reps: int, warmup: int, gen: torch.Generator) -> list[dict]:
    cases = []
    for name, n_in, n_out, _ in SHAPES:
        A = torch.rand(RANK, n_in, generator=gen).sub_(0.5).mul_(2.0 / n_in**0.5)
        B = torch.randn(n_out, RANK, generator=gen).mul_(0.01)
        cases.append((name, n_in, n_out, A, B))
    samples = {(c[0], m): [] for c in cases for m in ("gram", "materialised")}
    for rep in range(warmup + reps):
        for name, _, _, A, B in cases:
            for m in rotated(["gram", "materialised"], rep):
                if m == "gram":
                    t = time_call(lambda: row_norms_of_product(A, B), min_s=0.01)
                else:
                    t = time_call(lambda: materialised_row_norms(A, B))
                if rep >= warmup:
                    samples[(name, m)].append(t)
    rows = []
    for name, n_in, n_out, A, B in cases:
        gram, mat = samples[(name, "gram")], samples[(name, "materialised")]
        # Sanity check on the first 512 rows (all of them in fp64 would cost more than the timing).
        ref = materialised_row_norms(A.double(), B[:512].double())
        err = ((row_norms_of_product(A, B)[:512].double() - ref).abs().max() / ref.abs().max()).item()
        rows.append(
            {
                "proj": name, "n_in": n_in, "n_out": n_out,
                "gram_us": 1e6 * statistics.median(gram),
                "materialised_ms": 1e3 * statistics.median(mat),
                "speedup": statistics.median(m / g for m, g in zip(mat, gram)),
                "gram_max_rel_err": err,  # sanity: both paths compute the same norms
            }
        )
    return rows


def format_table(layer_rows: list[dict], block_row: dict, norm_rows: list[dict]) -> str:
    out = [
        f"{'projection (in->out)':<32}{'base ms':>10}{'lora ms':>10}{'allora ms':>11}"
        f"{'allora/lora':>13}{'(p25-p75)':>13}{'allora/base':>13}{'lora/base':>11}"
    ]
    for r in layer_rows + [block_row]:
        label = f"{r['proj']} ({r['n_in']}->{r['n_out']})" if "n_in" in r else r["proj"]
        out.append(
            f"{label:<32}{r['base_ms']:>10.2f}{r['lora_ms']:>10.2f}{r['allora_ms']:>11.2f}"
            f"{r['allora_over_lora']:>13.3f}{'%.3f-%.3f' % tuple(r['allora_over_lora_p25_p75']):>13}"
            f"{r['allora_over_base']:>13.3f}{r['lora_over_base']:>11.3f}"
        )
    out += ["", f"{'row norms r=16 (n_out x n_in)':<32}{'gram us':>10}{'B@A ms':>10}{'speedup':>11}{'max rel err':>13}"]
    for r in norm_rows:
        label = f"{r['proj']} ({r['n_out']}x{r['n_in']})"
        out.append(
            f"{label:<32}{r['gram_us']:>10.1f}{r['materialised_ms']:>10.2f}"
            f"{r['speedup']:>10.0f}x{r['gram_max_rel_err']:>13.1e}"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=None, help="tokens per forward (default 512; 16 with --quick)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 20; 2 with --quick)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed repetitions first (default 2; 1 with --quick)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="torch threads (default: all cores)")
    ap.add_argument("--quick", action="store_true", help="small token count, few repetitions: a smoke test")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    tokens = args.tokens or (16 if args.quick else 512)
    reps = args.reps or (2 if args.quick else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    load_start = os.getloadavg()[0]  # recorded because other jobs on the machine shift absolute times
    t0 = time.perf_counter()
    with torch.no_grad():
        norm_rows = bench_row_norms(reps, warmup, gen)
    layer_rows, block_row = bench_layers(tokens, reps, warmup, gen)

    result = {
        "machine": {
            "cpu": cpu_model(),
            "logical_cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "loadavg_1m_start_end": [load_start, os.getloadavg()[0]],
        },
        "config": {"tokens": tokens, "reps": reps, "warmup": warmup, "rank": RANK, "dtype": "float32",
                   "quick": args.quick, "seed": args.seed},
        "targets": {"allora_over_lora_max": TARGET_ALLORA_OVER_LORA, "gram_speedup_min": TARGET_GRAM_SPEEDUP},
        "layer_fwd_bwd": layer_rows,
        "decoder_block": block_row,
        "row_norms": norm_rows,
        "met": {
            "allora_over_lora": all(r["allora_over_lora"] <= TARGET_ALLORA_OVER_LORA for r in layer_rows + [block_row]),
            "gram_speedup": all(r["speedup"] >= TARGET_GRAM_SPEEDUP for r in norm_rows),
        },
        "wall_s": time.perf_counter() - t0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    m, c = result["machine"], result["config"]
    print(f"{m['cpu']}, torch {m['torch']}, {m['threads']} threads; {c['tokens']} tokens, r={RANK}, fp32, "
          f"{c['reps']} reps (+{c['warmup']} warmup); wrote {args.out}")
    print(format_table(layer_rows, block_row, norm_rows))
    return result


if __name__ == "__main__":
    main()
