"""Peak memory and time of the LM-head + loss path: allora_ds's chunked loss vs transformers' full logits.

    .venv/bin/python bench/loss_path.py              # Llama-3-8B head (hidden 4096, vocab 128,256), ~35 min
    .venv/bin/python bench/loss_path.py --quick --out /tmp/loss_path_quick.json    # CI smoke, ~40 s

What one measurement runs, forward and backward, from the final hidden states ``h`` ``[T, 4096]``
(a leaf that requires grad) and the frozen head weight ``W`` ``[128256, 4096]`` to ``dloss/dh``:
  * ``hf``:     ``ForCausalLMLoss(h @ W.T, labels, vocab, num_items_in_batch)`` (what
    ``LlamaForCausalLM.forward`` does with labels), then ``backward``;
  * ``chunked``: ``allora_ds.loss.linear_cross_entropy(h, W, labels, num_items_in_batch=...)``.
for T = 1k, 4k, 8k tokens in rows of 1024, each row's last 100% or ~20% of positions labelled
(a response after its prompt). fp32: bf16 matmul backward at this shape is pathologically slow on
this CPU (see /work/shared/ENVIRONMENT.md), and fp32 is the largest logits transformers makes.

Memory: each configuration runs in a fresh child process, one at a time. Peak = the process's
resident-set high-water mark (``VmHWM``, kept by the kernel: no sampling), reset through
``/proc/self/clear_refs`` just before the loss path, minus its resident set at that moment (``h``,
``W`` and the libraries in place).
The children run with ``MALLOC_MMAP_THRESHOLD_=65536``: every tensor above 64 KiB is mmapped by
glibc and unmapped when freed, so the resident set follows the live tensors (``tracemalloc`` does
not see torch's allocations and torch keeps no CPU peak counter).
Predicted (fp32): hf ``3 x T x V x 4`` bytes (logits and log-softmax in forward; the
log-softmax output, its incoming and its outgoing gradient in backward) + ``T x H x 4`` (dloss/dh);
chunked ``chunk x V x 4`` (one buffer: logits -> probabilities -> gradient) + ``T x H x 4``.

Time: wall clock and CPU time (the child's, 1 thread: hardly changed by other load on a shared
machine) of forward + backward, medians over repetitions in the same child (as many as fit in
``--budget-s`` after the first, at most ``--reps``). Both paths' losses and gradients
are compared in the parent (they must agree to fp32 rounding). Writes JSON (default
bench/results/loss_path.json) and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from bench.common import RESULTS, child_env, machine, median, table, write_json  # noqa: E402

DEFAULT_OUT = RESULTS / "loss_path.json"
ROW = 1024  # tokens per row (each row: prompt, then the labelled response)
FULL = {"hidden": 4096, "vocab": 128256, "tokens": [1024, 4096, 8192], "fractions": [1.0, 0.2],
        "chunk_elements": None}
QUICK = {"hidden": 256, "vocab": 32768, "tokens": [2048], "fractions": [1.0, 0.2], "chunk_elements": 2**23}
GOAL_RATIO_AT_4K = 8.0
# glibc serves allocations above this from mmap and unmaps them on free. Fixed, it also turns off
# glibc's dynamic threshold, which would move freed blocks of up to 32 MiB to the heap, where the
# resident set no longer follows the live tensors.
MMAP_THRESHOLD = 65536


def status_bytes(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (resident high-water) of this process, from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    """Reset the kernel's resident high-water mark to the current resident set (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def make_inputs(tokens: int, hidden: int, vocab: int, fraction: float, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    # Filled in place: no temporary of W's size, so nothing before the loss path exceeds its baseline.
    w = torch.empty(vocab, hidden).normal_(0.0, hidden**-0.5, generator=g)
    row = min(ROW, tokens)
    h = torch.empty(tokens // row, row, hidden).normal_(0.0, 1.0, generator=g).requires_grad_(True)
    labels = torch.randint(0, vocab, (tokens // row, row), generator=g)
    labels[:, : row - max(1, round(fraction * row))] = -100  # the prompt part of each row
    return h, w, labels


def child(cfg: dict) -> dict:
    """One configuration in this process: peak RSS above the baseline, times, loss and a gradient digest."""
    import torch
    from transformers.loss.loss_utils import ForCausalLMLoss

    from allora_ds.loss import chunk_rows, linear_cross_entropy

    torch.set_num_threads(cfg["threads"])
    h, w, labels = make_inputs(cfg["tokens"], cfg["hidden"], cfg["vocab"], cfg["fraction"])
    n_items = float((labels[:, 1:] != -100).sum())
    chunk = chunk_rows(cfg["vocab"], cfg["chunk_elements"]) if cfg["chunk_elements"] else chunk_rows(cfg["vocab"])

    def run():
        h.grad = None
        if cfg["path"] == "hf":
            loss = ForCausalLMLoss(h @ w.t(), labels, cfg["vocab"], num_items_in_batch=n_items)
        else:
            loss = linear_cross_entropy(h, w, labels, num_items_in_batch=n_items, chunk=chunk)
        loss.backward()
        return loss.detach()

    # Library start-up (thread pools, MKL buffers, first use of each kernel) on 16 tokens and the real
    # weight, before the baseline: it would otherwise count as loss-path memory in the first run.
    small, small_labels = torch.randn(1, 16, cfg["hidden"], requires_grad=True), labels[:1, :16]
    ForCausalLMLoss(small @ w.t(), small_labels, cfg["vocab"], num_items_in_batch=1.0).backward()
    linear_cross_entropy(small, w, small_labels, num_items_in_batch=1.0).backward()
    del small
    reset_peak()  # imports and start-up peaked higher than what is resident now
    base = status_bytes("VmRSS")
    times, cpu, loss = [], [], None
    while True:
        t0, c0 = time.perf_counter(), time.process_time()
        loss = run()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if len(times) >= cfg["reps"] or sum(times[1:]) + times[-1] > cfg["budget_s"]:
            break
    peak = status_bytes("VmHWM")
    grad = h.grad.reshape(-1, cfg["hidden"])
    return {"peak_bytes": peak - base, "baseline_bytes": base, "times_s": times, "time_s": median(times),
            "cpu_times_s": cpu, "cpu_s": median(cpu),
            "loss": loss.item(), "labelled": int(n_items), "chunk_rows": chunk,
            # a digest of dloss/dh to compare the two paths: its norm and a fixed projection
            "grad_norm": grad.norm().item(), "grad_proj": (grad.double() @ torch.linspace(-1, 1, cfg["hidden"],
                                                                                           dtype=torch.float64)).sum().item()}


def predicted(path: str, tokens: int, fraction: float, hidden: int, vocab: int, chunk: int) -> int:
    """fp32 bytes by the formulas in the module docstring (a chunk never exceeds the labelled rows)."""
    logits = tokens * vocab * 4 if path == "hf" else min(chunk, round(fraction * tokens)) * vocab * 4
    return (3 if path == "hf" else 1) * logits + tokens * hidden * 4


def available_bytes() -> int:
    import psutil

    return psutil.virtual_memory().available


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small head (256 x 32768), 2048 tokens: a smoke test")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3, help="at most this many timed repetitions per configuration")
    ap.add_argument("--budget-s", type=float, default=30.0, help="repeat while the repetitions after the first fit")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        cfg = json.loads(args.child)
        Path(cfg["result"]).write_text(json.dumps(child(cfg)))
        return {}
    spec = QUICK if args.quick else FULL
    from allora_ds.loss import CHUNK_ELEMENTS, chunk_rows

    chunk = chunk_rows(spec["vocab"], spec["chunk_elements"] or CHUNK_ELEMENTS)
    t_start = time.perf_counter()
    info = machine()
    results = []
    with tempfile.TemporaryDirectory(prefix="loss-path-") as tmp:
        for tokens in spec["tokens"]:
            for fraction in spec["fractions"]:
                for path in ("hf", "chunked") if len(results) % 4 == 0 else ("chunked", "hf"):
                    cfg = {"path": path, "tokens": tokens, "fraction": fraction, "hidden": spec["hidden"],
                           "vocab": spec["vocab"], "chunk_elements": spec["chunk_elements"], "threads": args.threads,
                           "reps": args.reps, "budget_s": args.budget_s, "result": str(Path(tmp) / "r.json")}
                    need = predicted(path, tokens, fraction, spec["hidden"], spec["vocab"], chunk) \
                        + 2 * tokens * spec["hidden"] * 4 + spec["vocab"] * spec["hidden"] * 4
                    rec = {"path": path, "tokens": tokens, "fraction": fraction,
                           "predicted_bytes": predicted(path, tokens, fraction, spec["hidden"], spec["vocab"], chunk),
                           "loadavg_1m": os.getloadavg()[0]}
                    if need > 0.9 * available_bytes():
                        rec["skipped"] = f"needs ~{need / 2**30:.1f} GiB, {available_bytes() / 2**30:.1f} GiB available"
                        print(f"{path:>7} {tokens:>5} tokens {fraction:4.0%}: skipped ({rec['skipped']})", flush=True)
                        results.append(rec)
                        continue
                    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(cfg)]
                    proc = subprocess.run(cmd, env=child_env(threads=args.threads, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD),
                                          capture_output=True, text=True)
                    if proc.returncode != 0:
                        raise SystemExit(f"child failed: {cfg}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
                    rec.update(json.loads(Path(cfg["result"]).read_text()))
                    results.append(rec)
                    print(f"{path:>7} {tokens:>5} tokens {fraction:4.0%}: peak {rec['peak_bytes'] / 2**20:8.1f} MiB "
                          f"(predicted {rec['predicted_bytes'] / 2**20:8.1f}), {rec['time_s']:7.2f} s "
                          f"({len(rec['times_s'])} rep), loss {rec['loss']:.6f}, load {rec['loadavg_1m']:.1f}", flush=True)
    res = {"machine": info, "setting": {**spec, "chunk_rows": chunk, "row": ROW, "dtype": "float32",
                                        "threads": args.threads}, "results": results,
           "comparisons": compare(results), "loadavg_1m_end": os.getloadavg()[0],
           "wall_s": time.perf_counter() - t_start}
    write_json(args.out, res)
    report(res, args.out)
    return res


def compare(results: list[dict]) -> list[dict]:
    """Per (tokens, fraction): memory and time ratios hf / chunked, and the agreement of the two."""
    out = []
    keys = sorted({(r["tokens"], r["fraction"]) for r in results}, key=lambda k: (k[0], -k[1]))
    for tokens, fraction in keys:
        pair = {r["path"]: r for r in results if (r["tokens"], r["fraction"]) == (tokens, fraction)}
        hf, ours = pair.get("hf"), pair.get("chunked")
        row = {"tokens": tokens, "fraction": fraction}
        if hf and ours and "skipped" not in hf and "skipped" not in ours:
            row.update(memory_ratio=hf["peak_bytes"] / ours["peak_bytes"], time_ratio=hf["time_s"] / ours["time_s"],
                       cpu_time_ratio=hf["cpu_s"] / ours["cpu_s"],
                       loss_rel_diff=abs(hf["loss"] - ours["loss"]) / abs(hf["loss"]),
                       grad_norm_rel_diff=abs(hf["grad_norm"] - ours["grad_norm"]) / hf["grad_norm"],
                       grad_proj_rel_diff=abs(hf["grad_proj"] - ours["grad_proj"]) / abs(hf["grad_proj"]))
        out.append(row)
    return out


def report(res: dict, out: Path) -> None:
    s, m = res["setting"], res["machine"]
    print(f"\n{m['cpu']} ({m['logical_cpus']} logical CPUs, load {m['loadavg_1m']:.1f} at start, "
          f"{res['loadavg_1m_end']:.1f} at end), torch {m['torch']}, transformers {m['transformers']}; wrote {out}")
    print(f"LM head {s['hidden']} x {s['vocab']}, fp32, {s['threads']} thread(s), rows of {s['row']} tokens, "
          f"chunk {s['chunk_rows']} rows; peak = RSS high-water above the baseline, MiB")
    mib = lambda r, k: r[k] / 2**20 if r and k in r else None  # noqa: E731
    rows = []
    for c in res["comparisons"]:
        pair = {r["path"]: r for r in res["results"] if (r["tokens"], r["fraction"]) == (c["tokens"], c["fraction"])}
        hf, ours = pair.get("hf"), pair.get("chunked")
        rows.append([f"{c['tokens']} tokens, {c['fraction']:.0%} labelled",
                     mib(hf, "peak_bytes") if hf and "skipped" not in hf else "skipped", mib(ours, "peak_bytes"),
                     c.get("memory_ratio", "-"), hf.get("time_s", "-") if hf else "-", ours.get("time_s", "-"),
                     c.get("time_ratio", "-"), c.get("cpu_time_ratio", "-"), c.get("loss_rel_diff", "-")])
    print(table(["configuration", "hf MiB", "chunked MiB", "mem hf/ours", "hf s", "chunked s", "time hf/ours",
                 "CPU time hf/ours", "loss rel diff"], rows,
                {1: ".0f", 2: ".0f", 3: ".1f", 4: ".2f", 5: ".2f", 6: ".2f", 7: ".2f", 8: ".1e"}))


if __name__ == "__main__":
    main()
