"""Smoke tests of the training benchmarks: the --quick / --tiny-cpu paths of bench/throughput.py,
bench/memory.py and bench/gpu.py end to end, outputs present and sane.

No timing assertions (CI machines vary and are shared); each benchmark runs once per session into a
temporary directory, so the committed results under bench/results/ are never touched.
"""

import json
import math
import sys

import pytest

from tests.helpers import REPO, run

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]  # the benchmarks run in child processes


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def throughput(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("throughput")
    out = tmp / "throughput_quick.json"
    proc = run([sys.executable, REPO / "bench" / "throughput.py", "--quick", "--out", out, "--cache-dir", tmp / "cache"],
               timeout=1200)
    return json.loads(out.read_text()), proc.stdout


def test_throughput_runs_every_system_and_reports_ratios(throughput):
    res, stdout = throughput
    assert sorted(r["system"] for r in res["runs"]) == ["allora", "hf", "lora"]
    for r in res["runs"]:
        assert _positive(r["tokens_per_s"]) and _positive(r["cpu_tokens_per_s"]), r
        assert r["tokens"] == (res["setting"]["steps"] - res["setting"]["timed_from"]) * res["setting"]["micro"] \
            * res["setting"]["gas"] * res["setting"]["world"] * res["setting"]["seq_len"]
        assert math.isfinite(r["final_loss"]), r
    hf = next(r for r in res["runs"] if r["system"] == "hf")
    assert hf["zero3_partitioned"], "the HF baseline must run under ZeRO-3 like allora_ds"
    for metric in ("tokens_per_s", "cpu_tokens_per_s"):
        s = res["summary"][metric]
        assert all(_positive(s[k]) for k in ("allora_over_hf", "lora_over_hf", "allora_time_over_lora")), s
    # both trainers read the one explicit DeepSpeed config: nothing left to fill
    assert "auto" not in json.dumps(res["deepspeed_config"])
    assert "allora_ds allora / HF" in stdout.splitlines()[-3]  # the ratio table is printed last


@pytest.fixture(scope="module")
def memory(tmp_path_factory):
    out = tmp_path_factory.mktemp("memory") / "memory_quick.json"
    proc = run([sys.executable, REPO / "bench" / "memory.py", "--quick", "--out", out], timeout=900)
    return json.loads(out.read_text()), proc.stdout


def test_memory_measures_both_world_sizes(memory):
    res, stdout = memory
    assert set(res["per_rank"]) == {"1", "2"} and [len(res["per_rank"][w]) for w in ("1", "2")] == [1, 2]
    for ranks in res["per_rank"].values():
        for r in ranks:
            assert r["accounted"]["base_params"] > 0 and r["accounted"]["optimizer"] > 0, r
            assert _positive(r["ds_estimate"]) and math.isfinite(r["loss"]), r
    for v in res["summary"].values():
        assert all(_positive(v[k]) for k in ("accounted", "accounted_over_ideal", "ds_estimate", "ideal_accounted"))
    # ZeRO-3 really partitions: each of 2 ranks holds about half of the base weights (byte accounting)
    one = res["per_rank"]["1"][0]["accounted"]["base_params"]
    for r in res["per_rank"]["2"]:
        assert r["accounted"]["base_params"] <= 0.6 * one
    assert stdout.rstrip().splitlines()[-1].startswith("goal:")


@pytest.fixture(scope="module")
def gpu_tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "gpu_tiny.json"
    proc = run([sys.executable, REPO / "bench" / "gpu.py", "--tiny-cpu", "--warmup", "1", "--steps", "2", "--out", out],
               timeout=600)
    return json.loads(out.read_text()), proc.stdout


def test_gpu_bench_code_path_runs_on_cpu(gpu_tiny):
    res, stdout = gpu_tiny
    assert [(r["method"], r["example_len"]) for r in res["results"]] == [
        ("allora", 64), ("allora", 16), ("lora", 64), ("lora", 16), ("hf_trainer_peft", 64)]
    assert res["results"][-1]["trainable"] == res["results"][2]["trainable"], "HF + PEFT trains other adapters"
    assert all(_positive(v) for v in res["tokens_per_s_over_hf"].values())
    for r in res["results"]:
        assert _positive(r["step_s"]) and _positive(r["tokens_per_s"]) and len(r["step_s_all"]) == 2, r
        assert all(math.isfinite(x) for x in r["losses"]) and r["trainable"] > 0, r
        assert r["mfu"] is None  # no GPU: no peak to divide by
    # Packed rows do the same linear work with less attention: fewer FLOPs per step.
    assert res["results"][1]["step_flops"] < res["results"][0]["step_flops"]
    assert all(_positive(v) for v in res["allora_time_over_lora"].values())
    assert stdout.rstrip().splitlines()[-1].startswith("allora / lora step time")


def test_gpu_long_bench_code_path_runs_on_cpu(tmp_path):
    """bench/gpu_long.py --tiny-cpu: every length trains with every layer input but the newest
    offloaded (the engine copying for real), as many bytes as allora-plan pins; a budget stops it."""
    out = tmp_path / "long.json"
    proc = run([sys.executable, REPO / "bench" / "gpu_long.py", "--tiny-cpu", "--out", out], timeout=600)
    res = json.loads(out.read_text())
    assert [r["seq_len"] for r in res["results"]] == [64, 128, 256] and res["stopped"] == "max"
    layers = res["shape"]["num_hidden_layers"]
    for r in res["results"]:
        assert r["applied"] and math.isfinite(r["loss"]) and _positive(r["tokens_per_s"]), r
        assert r["offloaded_inputs"] == layers - 1, r
        assert r["offloaded_gb"] == pytest.approx(r["planned"]["host_gb"]), r
    assert res["without_offload_at_start"]["offloaded_inputs"] == 0
    assert proc.stdout.rstrip().splitlines()[-1] == "longest: 256 tokens; stopped: max"
    cut = run([sys.executable, REPO / "bench" / "gpu_long.py", "--tiny-cpu", "--budget-s", "0.01"], timeout=600)
    assert "stopped: budget" in cut.stdout.rstrip().splitlines()[-1]


@pytest.fixture(scope="module")
def throughput_alpaca(tmp_path_factory):
    """The --alpaca path on a tiny model: allora_ds (packing, chunked loss) and HF with flattening.
    (allora_full_logits is allora_ds with train.chunked_loss=false; hf_pad swaps the collator.)"""
    tmp = tmp_path_factory.mktemp("throughput_alpaca")
    out = tmp / "alpaca_quick.json"
    proc = run([sys.executable, REPO / "bench" / "throughput.py", "--alpaca", "--quick", "--systems", "allora,hf_flat",
                "--out", out, "--cache-dir", tmp / "cache"], timeout=1200)
    return json.loads(out.read_text()), proc.stdout


def test_throughput_alpaca_counts_examples_of_both_trainers(throughput_alpaca):
    res, stdout = throughput_alpaca
    s, d = res["setting"], res["data"]
    assert s["vocab"] > 1000 and s["workload"] == "alpaca"
    assert 60 <= d["prompt_tokens_min"] and d["prompt_tokens_max"] <= 250 + 2  # word granularity
    assert 20 <= d["response_tokens_min"] and d["response_tokens_max"] <= 300 + 2
    runs = {r["system"]: r for r in res["runs"]}
    assert sorted(runs) == ["allora", "hf_flat"]
    # allora_ds: the examples its data order puts in the window, whose tokens match its own metrics
    assert runs["allora"]["examples"] == d["window"]["examples"] > 0
    assert runs["allora"]["tokens"] == d["window"]["tokens"]
    timed = s["steps"] - s["timed_from"]
    assert runs["hf_flat"]["examples"] == timed * s["hf_micro"] * s["gas"] * s["world"]
    assert runs["hf_flat"]["padded_tokens"] == runs["hf_flat"]["tokens"], "flattening must not pad"
    for r in runs.values():
        assert _positive(r["examples_per_s"]) and _positive(r["cpu_examples_per_s"]) and math.isfinite(r["final_loss"])
    assert _positive(res["summary"]["examples_per_s"]["allora_over_hf_flat"])
    assert "allora_ds / HF flattening" in stdout.splitlines()[-1]


@pytest.fixture(scope="module")
def loss_path(tmp_path_factory):
    out = tmp_path_factory.mktemp("loss_path") / "loss_path_quick.json"
    proc = run([sys.executable, REPO / "bench" / "loss_path.py", "--quick", "--reps", "1", "--out", out], timeout=600)
    return json.loads(out.read_text()), proc.stdout


def test_loss_path_measures_both_paths_and_they_agree(loss_path):
    res, stdout = loss_path
    assert {(r["path"], r["fraction"]) for r in res["results"]} == {
        (p, f) for p in ("hf", "chunked") for f in (1.0, 0.2)}
    for r in res["results"]:
        assert _positive(r["peak_bytes"]) and _positive(r["time_s"]), r
    for c in res["comparisons"]:
        assert c["loss_rel_diff"] < 1e-5 and c["grad_norm_rel_diff"] < 1e-5 and c["grad_proj_rel_diff"] < 1e-4, c
        # memory, not time: the resident-set peak follows the formulas (one chunk vs three full logits)
        assert c["memory_ratio"] > 8, c
    for r in res["results"]:
        assert r["peak_bytes"] < 1.5 * r["predicted_bytes"] + 8 * 2**20, r
    assert "loss rel diff" in stdout.splitlines()[-4]
