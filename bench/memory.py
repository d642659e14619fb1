"""Per-rank memory of model states under ZeRO-3 with 1 and 2 ranks, against DeepSpeed's estimator.

    .venv/bin/python bench/memory.py                        # Llama-3.2-1B shape, bf16 (~10 min, ~8 GB RAM on 2 CPUs)
    .venv/bin/python bench/memory.py --quick --out /tmp/memory_quick.json    # tiny shape: CI smoke test

For each world size N in (1, 2), ``deepspeed --num_gpus N bench/memory.py --worker`` runs the
trainer's model path on every rank: random-weight Llama-3.2-1B-shaped model (hidden 2048, 16
layers, 32 heads, 8 KV heads, MLP 8192, vocab 128256, tied embeddings; 1.24 B parameters) built by
``from_config`` under ``zero.Init`` (partitioned on construction, as the trainer's ``from_pretrained``
is), ALLoRA r=16 adapters on the 7 projections injected under ``zero.Init``, both by the trainer's
``allora_ds.modeling.load_model``, then its ``build_engine`` with ds_configs/zero3_bf16.json
(its "auto" values filled by the trainer's filler) and one optimizer step, so that gradients and
AdamW states exist. On CPU (DS_ACCELERATOR=cpu) the "device" is host memory, so per rank we measure:

  * measured: the process's resident memory after the step minus before the model was built
    (after ``gc`` and ``malloc_trim``, so freed activations do not count), and its peaks during the
    build and during the step (the kernel's high-water mark, reset before each phase);
  * accounted: bytes of the distinct tensor storages the rank holds for model states (its
    partitions of every parameter, whole copies of ZeRO's small "persistent" parameters, and every
    tensor the ZeRO optimizer holds: fp32 master partitions, Adam moments, gradient buffers).

Compared with total/N (the N=1 value divided by N; goal: per-rank <= 1.1 x total/N) and with
DeepSpeed's ``estimate_zero3_model_states_mem_needs`` (no offload, zero_init), which assumes every
parameter is trained in mixed precision (18 bytes/parameter/N + 4 x the largest layer). Prints a
table last and writes JSON (default bench/results/memory.json).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from bench.common import REPO, RESULTS, child_env, deepspeed_cmd, machine, run_job, table, write_json  # noqa: E402

GOAL = 1.1
DEFAULT_OUT = RESULTS / "memory.json"
# Llama-3.2-1B (config.json of meta-llama/Llama-3.2-1B), and a tiny model of the same form for --quick.
LLAMA_3_2_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                    tie_word_embeddings=True)
TINY = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, vocab_size=1024, max_position_embeddings=1024,
            tie_word_embeddings=True)
RANK = 16


def llama_config(shape: dict):
    from transformers import LlamaConfig

    return LlamaConfig(**shape, rms_norm_eps=1e-5, hidden_act="silu", bos_token_id=1, eos_token_id=2,
                       rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 8192})


# ---------------------------------------------------------------------------------------------
# worker: one rank


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))


def settle() -> int:
    """Resident bytes once freed memory is really given back (Python garbage, glibc's free lists)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return rss_bytes()


def reset_peak() -> None:
    """Restart the kernel's resident high-water mark (VmHWM) from the current size."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def tensors_in(obj, depth: int = 3):
    """Tensors held by ``obj`` directly or in lists/tuples/dicts (a few levels deep)."""
    import torch

    if torch.is_tensor(obj):
        yield obj
        if obj.grad is not None:
            yield obj.grad
    elif depth > 0 and isinstance(obj, (list, tuple)):
        for x in obj:
            yield from tensors_in(x, depth - 1)
    elif depth > 0 and isinstance(obj, dict):
        for x in obj.values():
            yield from tensors_in(x, depth - 1)


def account(model, optimizer) -> dict:
    """Bytes of distinct storages by category: what this rank holds for model states."""
    seen: set[int] = set()
    out = {"base_params": 0, "adapter_params": 0, "optimizer": 0}

    def add(t, key):
        st = t.untyped_storage()
        if st.data_ptr() in seen or st.nbytes() == 0:
            return
        seen.add(st.data_ptr())
        out[key] += st.nbytes()

    for p in model.parameters():
        key = "adapter_params" if p.requires_grad else "base_params"
        add(p.ds_tensor, key)
        if p.ds_persist and p.numel():  # small parameters ZeRO-3 keeps whole on every rank
            add(p.data, key)
    for value in vars(optimizer).values():
        for t in tensors_in(value):
            add(t, "optimizer")
    for state in optimizer.optimizer.state.values():
        for t in tensors_in(state):
            add(t, "optimizer")
    out["total"] = sum(out.values())
    return out


def ds_estimate(total_params: int, largest_layer_params: int, world: int) -> int:
    """DeepSpeed's per-device estimate for ZeRO-3 without offload, with zero.Init."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    _, per_device, _ = estimate_zero3_model_states_mem_needs(
        total_params, largest_layer_params, num_gpus_per_node=world, num_nodes=1, cpu_offload=False,
        cpu_offload_params=False, zero_init=True)
    return per_device


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from allora_ds.config import load_config
    from allora_ds.distributed import init_distributed, leave_process_group
    from allora_ds.ds_config import fill_ds_config, read_ds_config
    from allora_ds.modeling import build_engine, load_model

    rank, world, _ = init_distributed()
    shape = TINY if args.quick else LLAMA_3_2_1B
    src = REPO / "ds_configs" / "zero3_bf16.json"
    cfg = load_config(None, base={"model": {"path": "unused", "dtype": "bfloat16"},
                                  "adapter": {"method": "allora", "rank": RANK},
                                  "data": {"train": "unused"},
                                  # transformers' loss, as this table was first measured with
                                  "train": {"micro_batch_size": 1, "chunked_loss": False}})
    ds = fill_ds_config(read_ds_config(src), cfg, world, shape["hidden_size"], src)
    torch.manual_seed(0)

    dist.barrier()
    before = settle()
    peaks = {}
    t0 = time.perf_counter()

    reset_peak()
    model, keepalive, _ = load_model(cfg, ds, verbose=rank == 0, architecture=llama_config(shape))
    peaks["build"] = hwm_bytes() - before
    built = settle()

    reset_peak()
    engine = build_engine(cfg, ds, model, total_steps=1)
    optimizer = engine.optimizer
    peaks["initialize"] = hwm_bytes() - before
    initialized = settle()

    # One step on a short sequence: gradients and the AdamW moments now exist.
    reset_peak()
    ids = torch.randint(0, shape["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(rank))
    loss = engine(input_ids=ids.to(engine.device), labels=ids.to(engine.device)).loss
    engine.backward(loss)
    engine.step()
    peaks["step"] = hwm_bytes() - before
    after = settle()
    del keepalive

    params = {id(p): p for p in model.parameters()}.values()
    total_params = sum(p.ds_numel for p in params)
    trainable = sum(p.ds_numel for p in params if p.requires_grad)
    largest_layer = max(sum(p.ds_numel for p in m.parameters(recurse=False)) for m in model.modules())
    rec = {
        "rank": rank, "world": world, "dtype": "bfloat16", "setup_s": time.perf_counter() - t0,
        "total_params": total_params, "trainable_params": trainable, "largest_layer_params": largest_layer,
        "rss_before": before, "rss_built": built - before, "rss_initialized": initialized - before,
        "rss_after_step": after - before, "rss_peak": peaks,
        "accounted": account(engine.module, optimizer), "ds_estimate": ds_estimate(total_params, largest_layer, world),
        "loss": float(loss),
    }
    Path(args.worker_out, f"rank{rank}.json").write_text(json.dumps(rec))
    leave_process_group()


# ---------------------------------------------------------------------------------------------
# driver


def run_world(world: int, quick: bool, tmp: Path) -> list[dict]:
    out = tmp / f"world{world}"
    out.mkdir(parents=True, exist_ok=True)
    cmd = deepspeed_cmd(world, Path(__file__).resolve(), "--worker", "--worker-out", out, *(["--quick"] if quick else []))
    # torch's intra-op threads: all cores between the ranks (the build's random init is the slow part)
    threads = max(1, len(os.sched_getaffinity(0)) // world)
    run_job(cmd, tmp / f"world{world}.log", child_env(threads=threads), timeout=3600)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


GB = 2**30


def summarise(per_world: dict[int, list[dict]]) -> dict:
    one = per_world[1][0]
    rows = {}
    for world, ranks in per_world.items():
        worst = lambda key: max(r[key] if not isinstance(key, tuple) else r[key[0]][key[1]] for r in ranks)  # noqa: E731
        rows[world] = {
            "measured_rss_after_step": worst("rss_after_step"),
            "measured_peak_build": max(r["rss_peak"]["build"] for r in ranks),
            "measured_peak_step": max(r["rss_peak"]["step"] for r in ranks),
            "accounted": worst(("accounted", "total")),
            "accounted_base": worst(("accounted", "base_params")),
            "accounted_adapters_and_optimizer": max(r["accounted"]["adapter_params"] + r["accounted"]["optimizer"]
                                                     for r in ranks),
            "ds_estimate": ranks[0]["ds_estimate"],
            # the 1-rank value spread over N ranks: the ideal of ZeRO-3
            "ideal_measured": one["rss_after_step"] / world,
            "ideal_accounted": one["accounted"]["total"] / world,
        }
        rows[world]["measured_over_ideal"] = rows[world]["measured_rss_after_step"] / rows[world]["ideal_measured"]
        rows[world]["accounted_over_ideal"] = rows[world]["accounted"] / rows[world]["ideal_accounted"]
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tiny model of the same form: a smoke test")
    ap.add_argument("--worlds", default="1,2", help="world sizes to measure (must include 1)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return {}

    t0 = time.perf_counter()
    info = machine()
    worlds = [int(w) for w in args.worlds.split(",")]
    if 1 not in worlds:
        ap.error("--worlds must include 1 (the total that N ranks share)")
    with tempfile.TemporaryDirectory(prefix="memory-") as tmp:
        per_world = {w: run_world(w, args.quick, Path(tmp)) for w in worlds}
    summary = summarise(per_world)
    first = per_world[1][0]
    result = {
        "machine": info, "quick": args.quick, "shape": TINY if args.quick else LLAMA_3_2_1B, "dtype": "bfloat16",
        "adapter": {"method": "allora", "rank": RANK}, "deepspeed_config": "ds_configs/zero3_bf16.json",
        "total_params": first["total_params"], "trainable_params": first["trainable_params"],
        "largest_layer_params": first["largest_layer_params"], "per_rank": per_world,
        "summary": {str(w): v for w, v in summary.items()}, "goal_per_rank_over_ideal_max": GOAL,
        "met": {kind: all(v[f"{kind}_over_ideal"] <= GOAL for v in summary.values()) for kind in ("accounted", "measured")},
        "wall_s": time.perf_counter() - t0,
    }
    write_json(args.out, result)
    print_report(result, args.out)
    return result


def print_report(res: dict, out: Path) -> None:
    m = res["machine"]
    print(f"\n{m['cpu']} ({m['logical_cpus']} logical CPUs, {m['mem_gb']} GB), torch {m['torch']}, deepspeed "
          f"{m['deepspeed']}, transformers {m['transformers']}; wrote {out}")
    print(f"{'tiny' if res['quick'] else 'Llama-3.2-1B'}-shaped model: {res['total_params'] / 1e6:,.1f}M parameters "
          f"({res['trainable_params'] / 1e6:.2f}M trainable: allora r={res['adapter']['rank']}), bf16, ZeRO-3; "
          f"GiB per rank (worst rank) after one optimizer step; total/N = the 1-rank value / N")
    rows = []
    for w, v in res["summary"].items():
        rows.append([w, v["accounted_base"] / GB, v["accounted_adapters_and_optimizer"] / GB, v["accounted"] / GB,
                     v["accounted_over_ideal"], v["measured_rss_after_step"] / GB, v["measured_over_ideal"],
                     v["measured_peak_step"] / GB, v["measured_peak_build"] / GB, v["ds_estimate"] / GB])
    print(table(["ranks", "base", "adapters+optim", "accounted", "/(total/N)", "measured", "/(total/N)",
                 "peak in step", "peak in build", "DS estimate"], rows, {i: ".3f" for i in range(1, 10)}))
    verdict = ", ".join(f"{kind} {'met' if ok else 'NOT met'}" for kind, ok in res["met"].items())
    print(f"goal: per rank <= {res['goal_per_rank_over_ideal_max']} x total/N -> {verdict}")


if __name__ == "__main__":
    from allora_ds.errors import cli  # each rank ends through errors._exit, never in gloo's teardown abort

    cli(main)()
