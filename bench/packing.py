"""Packing strategies side by side: greedy (in order) vs best-fit decreasing (allora_ds/packing.py).

    python bench/packing.py                 # both distributions, full size -> bench/results/packing.json
    python bench/packing.py --quick --out /tmp/packing.json   # 2,000 examples each (CI smoke test)

For each length distribution and max_seq_len: packing efficiency (real tokens / row slots), rows per
epoch (the optimizer steps an epoch takes at a fixed batch of rows), examples per row, and how fast
the trainer's own ``packing.pack`` turns tokenized examples into rows (bins + datasets.map),
examples/s. No hub data is reachable here, so the example lengths are drawn from distributions
shaped like the two datasets (seeded; described in ``DISTRIBUTIONS`` and docs/benchmarks.md), in
Llama-3 tokens of the trainer's prompts.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from allora_ds import packing  # noqa: E402
from bench.common import RESULTS, machine  # noqa: E402


def alpaca_like(n: int, rng: random.Random) -> list[int]:
    """Stanford Alpaca (52,002 rows): the prompt template (~40 tokens, ~60 with an input), a short
    instruction, an input on 40% of rows, a long-tailed response (median ~70 tokens, a few near 1k)."""
    out = []
    for _ in range(n):
        has_input = rng.random() < 0.4
        n_tok = 60 if has_input else 40
        n_tok += int(rng.lognormvariate(math.log(16), 0.5))
        n_tok += int(rng.lognormvariate(math.log(22), 0.8)) if has_input else 0
        n_tok += int(rng.lognormvariate(math.log(70), 1.0)) + 1  # response + EOS
        out.append(n_tok)
    return out


# LLM-Adapters' commonsense_170k: eight tasks' training sets in one prompt template, answers of a
# few tokens ("the correct answer is option2"); (share, mean tokens, sd) per task.
COMMONSENSE_TASKS = {"boolq": (0.055, 190, 60), "piqa": (0.095, 95, 25), "siqa": (0.196, 85, 12),
                     "hellaswag": (0.234, 175, 30), "winogrande": (0.237, 75, 8), "arc_e": (0.013, 100, 25),
                     "arc_c": (0.007, 110, 25), "obqa": (0.029, 80, 12), "other": (0.134, 90, 20)}


def commonsense_like(n: int, rng: random.Random) -> list[int]:
    tasks = list(COMMONSENSE_TASKS.values())
    weights = [t[0] for t in tasks]
    return [max(20, int(rng.gauss(mean, sd))) for _, mean, sd in rng.choices(tasks, weights, k=n)]


DISTRIBUTIONS = {"alpaca": (alpaca_like, 52_002, [512, 2048]), "commonsense_170k": (commonsense_like, 170_420, [256, 2048])}


def measure(lengths: list[int], max_len: int, strategy: str) -> dict:
    import datasets

    lengths = [min(n, max_len) for n in lengths]  # the trainer truncates before packing
    ds = datasets.Dataset.from_dict({"input_ids": [[1] * n for n in lengths], "labels": [[1] * n for n in lengths],
                                     "n_labels": lengths})
    t0 = time.perf_counter()
    bins = packing.STRATEGIES[strategy](lengths, max_len)
    t_bins = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows = packing.pack(ds, max_len, strategy)
    t_pack = time.perf_counter() - t0
    assert len(rows) == len(bins)
    return {"strategy": strategy, "max_seq_len": max_len, "examples": len(lengths), "tokens": sum(lengths),
            "rows_per_epoch": len(bins), "lower_bound_rows": -(-sum(lengths) // max_len),
            "efficiency": packing.efficiency(sum(lengths), len(bins), max_len),
            "examples_per_row": len(lengths) / len(bins), "bins_seconds": t_bins,
            "pack_seconds": t_pack, "pack_examples_per_s": len(lengths) / t_pack}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2,000 examples per distribution")
    p.add_argument("--out", type=Path, default=RESULTS / "packing.json")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    runs = []
    for name, (draw, n, max_lens) in DISTRIBUTIONS.items():
        lengths = draw(2000 if a.quick else n, random.Random(a.seed))
        for max_len in max_lens:
            pair = {s: measure(lengths, max_len, s) for s in ("greedy", "bfd")}
            for s, r in pair.items():
                runs.append({"distribution": name, **r})
                print(f"{name:17s} max_len {max_len:5d} {s:6s}: {r['rows_per_epoch']:7,d} rows "
                      f"(bound {r['lower_bound_rows']:,}), efficiency {r['efficiency']:.1%}, "
                      f"{r['examples_per_row']:.1f} examples/row, packed at {r['pack_examples_per_s']:,.0f} examples/s",
                      flush=True)
            print(f"{'':17s} bfd/greedy rows {pair['bfd']['rows_per_epoch'] / pair['greedy']['rows_per_epoch']:.3f}")
    result = {"bench": "packing", "quick": a.quick, "seed": a.seed, "machine": machine(), "runs": runs}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
