"""Smoke tests of the training benchmarks: the --quick / --tiny-cpu paths of bench/throughput.py,
bench/memory.py and bench/gpu.py end to end, outputs present and sane.

No timing assertions (CI machines vary and are shared); each benchmark runs once per session into a
temporary directory, so the committed results under bench/results/ are never touched.
"""

import json
import math
import sys

import pytest

from tests.conftest import REPO, run


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
    assert [r["method"] for r in res["results"]] == ["allora", "lora"]
    for r in res["results"]:
        assert _positive(r["step_s"]) and _positive(r["tokens_per_s"]) and len(r["step_s_all"]) == 2, r
        assert all(math.isfinite(x) for x in r["losses"]) and r["trainable"] > 0, r
        assert r["mfu"] is None  # no GPU: no peak to divide by
    assert _positive(res["allora_time_over_lora"])
    assert stdout.rstrip().splitlines()[-1].startswith("allora / lora step time")
