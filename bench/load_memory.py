"""Host peak memory of one rank loading the base for ZeRO-0/1/2: before (no device_map: into host
memory, then moved) and after (``modeling.base_load_kwargs``: straight onto the rank's device).

    python bench/load_memory.py                  # a ~0.2 GB bf16 Llama-3-architecture model, CPU

Each variant loads in a fresh process (its peak resident set is its own) and reports the peak RSS
above the RSS before the load. On CPU ranks the device *is* host memory, so both variants must
hold one copy of the weights there: the figure checks that loading through ``device_map`` costs no
extra host copy. On a GPU the "after" variant holds no copy in host memory (the file's pages are
in the page cache, shared by the node's ranks, and not counted against any one of them): the
prediction is a saving of the bf16 model per rank, 16 GB for Llama-3-8B, 128 GB per 8-GPU node.
Writes bench/results/load_memory.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPE = dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=4, vocab_size=16384)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def child(model_dir: str, variant: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    before = rss_mb()
    kwargs = {"device_map": {"": "cpu"}} if variant == "device_map" else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, **kwargs)
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"variant": variant, "weights_mb": weights_mb, "peak_above_start_mb": peak - before}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    if a.child:
        return child(*a.child)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.common import RESULTS, machine, table, write_json

    with tempfile.TemporaryDirectory(prefix="load-memory-") as tmp:
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**SHAPE)).to(torch.bfloat16).save_pretrained(tmp)
        rows = []
        for variant in ("host_then_device", "device_map"):
            out = subprocess.run([sys.executable, __file__, "--child", tmp, variant], capture_output=True, text=True,
                                 check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    res = {"machine": machine(), "shape": SHAPE, "dtype": "bfloat16", "results": rows,
           "device_map_over_host": rows[1]["peak_above_start_mb"] / rows[0]["peak_above_start_mb"]}
    write_json(a.out or RESULTS / "load_memory.json", res)
    print(table(["variant", "weights MB", "peak RSS above start MB"],
                [[r["variant"], r["weights_mb"], r["peak_above_start_mb"]] for r in rows], {1: ".0f", 2: ".0f"}))
    print(f"device_map / host-then-device peak: {res['device_map_over_host']:.2f} (CPU: the device is host memory)")


if __name__ == "__main__":
    main()
