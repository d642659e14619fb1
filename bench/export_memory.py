"""Peak memory of the merged export (streamed shard by shard) vs loading the model whole to merge,
and the export's time per GB of model (what a 70B export costs: ~141 GB in bf16).

    python bench/export_memory.py                      # ~240 MB fp32 model in 20 MB shards
    python bench/export_memory.py --hidden 2048 --layers 8 --shard-mb 200 --dtype bfloat16 \
        --json bench/results/export_time_bf16.json     # ~1 GB bf16: the time per GB

Builds a random Llama-3-architecture model saved as sharded safetensors and a checkpoint with
random rank-16 adapters on every projection, then measures the peak RSS of two child processes:
``allora-export --merged`` and the whole-model alternative (transformers load + merge in memory +
save_pretrained). Each is reported as the increase over a child that only imports the same
libraries. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from allora_ds.adapters import LLAMA_TARGETS
from allora_ds.checkpoint import ADAPTER_FILE, DS_DIR, DS_TAG, STATE_FILE
from allora_ds.tiny import tiny_llama_config

IMPORTS = "import torch, safetensors, transformers, allora_ds.export"
WHOLE_MODEL_MERGE = """
import sys, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
base, ckpt, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
ad = load_file(f"{ckpt}/adapter_model.safetensors")
params = dict(model.named_parameters())
with torch.no_grad():
    for k in ad:
        if k.endswith(".lora_A"):
            name = k[: -len(".lora_A")]
            params[name + ".weight"] += ad[name + ".lora_B"] @ ad[k]
model.save_pretrained(out, max_shard_size="{shard}MB")
"""


def peak_rss_mb(cmd: list[str]) -> tuple[float, float]:
    """Peak resident memory of a child process (its VmHWM, polled until it exits) and its wall time.

    (rusage's ru_maxrss would not do: Linux carries the parent's high-water mark over fork+exec.)
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    status, hwm_kb = Path(f"/proc/{proc.pid}/status"), 0
    while proc.poll() is None:
        try:
            line = next(ln for ln in status.read_text().splitlines() if ln.startswith("VmHWM:"))
            hwm_kb = max(hwm_kb, int(line.split()[1]))
        except (OSError, StopIteration):  # exiting: no memory map left to report
            pass
        time.sleep(0.01)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed:\n{proc.stderr.read().decode()[-2000:]}")
    return hwm_kb / 1024, time.perf_counter() - t0


def build(out: Path, hidden: int, layers: int, shard_mb: int, rank: int, dtype: str) -> tuple[Path, Path, int]:
    from transformers import LlamaForCausalLM

    base, ckpt = out / "base", out / "checkpoint"
    config = tiny_llama_config(32000, hidden=hidden, layers=layers, heads=hidden // 64, kv_heads=max(hidden // 256, 1))
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(base, max_shard_size=f"{shard_mb}MB")
    adapters = {}
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] in LLAMA_TARGETS:
            adapters[f"{name}.lora_A"] = torch.randn(rank, mod.in_features) * 0.01
            adapters[f"{name}.lora_B"] = torch.randn(mod.out_features, rank) * 0.01
    (ckpt / DS_DIR / DS_TAG).mkdir(parents=True, exist_ok=True)  # the layout export checks; its contents are not read
    save_file(adapters, str(ckpt / ADAPTER_FILE))
    state = {"adapter": {"method": "allora", "rank": rank, "scale": 1.0, "target_modules": list(LLAMA_TARGETS)},
             "config": {"model": {"path": str(base)}}}
    (ckpt / STATE_FILE).write_text(json.dumps(state))
    return base, ckpt, sum(p.numel() for p in model.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench/cache/export_memory"))
    p.add_argument("--json", type=Path, default=Path("bench/results/export_memory.json"))
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--shard-mb", type=int, default=20)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="dtype of the base model")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    base, ckpt, n_params = build(a.out, a.hidden, a.layers, a.shard_mb, a.rank, a.dtype)
    model_mb = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 2**20
    shard_mb = max(f.stat().st_size for f in base.glob("*.safetensors")) / 2**20
    py = sys.executable
    baseline, import_s = peak_rss_mb([py, "-c", IMPORTS])
    streamed, export_s = peak_rss_mb([py, "-m", "allora_ds.export", "--checkpoint", str(ckpt), "--output",
                                      str(a.out / "merged"), "--merged", "--overwrite"])
    whole, _ = peak_rss_mb([py, "-c", WHOLE_MODEL_MERGE.replace("{shard}", str(a.shard_mb)), str(base), str(ckpt),
                            str(a.out / "merged_whole")])
    # Time per GB of model, without the interpreter start and imports (a run pays those once).
    s_per_gb = (export_s - import_s) / (model_mb / 1024)
    result = {
        "params": n_params, "dtype": a.dtype, "model_mb": round(model_mb, 1),
        "n_shards": len(list(base.glob("*.safetensors"))), "export_s": round(export_s, 2),
        "import_s": round(import_s, 2), "export_s_per_gb": round(s_per_gb, 2),
        "llama3_70b_bf16_export_min_at_this_rate": round(s_per_gb * 141.1 / 60, 1),
        "largest_shard_mb": round(shard_mb, 1), "import_baseline_rss_mb": round(baseline, 1),
        "export_peak_rss_delta_mb": round(streamed - baseline, 1),
        "whole_model_merge_peak_rss_delta_mb": round(whole - baseline, 1),
    }
    result["whole_over_streamed"] = round(result["whole_model_merge_peak_rss_delta_mb"] /
                                          max(result["export_peak_rss_delta_mb"], 1e-9), 2)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=2))
    print(f"model {model_mb:.0f} MB fp32 ({n_params / 1e6:.1f} M params) in {result['n_shards']} shards "
          f"(largest {shard_mb:.0f} MB); rank-{a.rank} adapters on all projections")
    print(f"{'method':<36}{'peak RSS over imports (MB)':>28}")
    print(f"{'allora-export --merged (streamed)':<36}{result['export_peak_rss_delta_mb']:>28.0f}")
    print(f"{'load whole model, merge, save':<36}{result['whole_model_merge_peak_rss_delta_mb']:>28.0f}")
    print(f"whole/streamed: {result['whole_over_streamed']}x   -> {a.json}")
    print(f"export time: {export_s:.1f} s ({s_per_gb:.1f} s per GB of model after {import_s:.1f} s of imports); "
          f"a Llama-3-70B bf16 export (141 GB) at this rate: {result['llama3_70b_bf16_export_min_at_this_rate']} min")


if __name__ == "__main__":
    main()
