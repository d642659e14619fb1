"""Smoke run of bench/throughput_8b.py --quick on the commonsense workload.

The benchmark checks its FLOP model against the built model's itself; here, Llama-3-8B's head
share is checked (about 7%), and that every system ran and trained the same thing: the plain PyTorch loop and allora_ds read the same rows in the same
order, so their losses agree to rounding (a system that trained a different method or other rows
would not). No timing assertions; the committed bench/results/throughput_8b.json is never touched.
"""

import json
import math
import sys

import pytest

from tests.helpers import REPO, run

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]  # the benchmark runs in child processes

SYSTEMS = ("allora", "lora", "hf_flat", "plain", "plain_lora")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("throughput_8b")
    out = tmp / "t8b_quick.json"
    proc = run([sys.executable, REPO / "bench" / "throughput_8b.py", "--quick", "--workloads", "commonsense",
                "--out", out, "--cache-dir", tmp / "cache"], timeout=1200)
    return json.loads(out.read_text()), proc.stdout


def test_every_system_trains_the_same_rows(result):
    res, stdout = result
    w = res["workloads"]["commonsense"]
    s, window = w["setting"], w["data"]["window"]
    runs = {r["system"]: r for r in w["runs"]}
    assert sorted(runs) == sorted(SYSTEMS)
    for name in ("allora", "lora", "plain", "plain_lora"):  # one data order: the trainer's
        assert runs[name]["examples"] == window["examples"] > 0 and runs[name]["tokens"] == window["tokens"], name
    assert runs["hf_flat"]["examples"] == (s["steps"] - s["timed_from"]) * s["hf_micro"] * s["world"]
    assert set(w["loss_rel_diff"]) == {"allora", "lora"}
    assert all(v < 1e-5 for v in w["loss_rel_diff"].values()), w["loss_rel_diff"]
    assert runs["allora"]["final_loss"] != runs["lora"]["final_loss"], "allora and lora must train differently"
    assert 0.06 < w["flop_split"]["llama3_8b"]["head_of_matmul"] < 0.08, w["flop_split"]
    assert w["matmul_rate"]["gflops_per_rank"] > 0
    for r in runs.values():
        assert r["share_of_matmul_rate"] > 0 and math.isfinite(r["final_loss"]), r
    for key in ("allora_over_hf_flat", "allora_over_plain", "allora_time_over_lora"):
        assert w["summary"]["examples_per_s"][key] > 0, key
    assert w["deepspeed_config"]["zero_optimization"]["stage"] == 2
    for kind in ("plain", "trainer"):  # ALLoRA vs LoRA interleaved in one process
        ab = w["method_ab"][kind]
        assert len(ab["cpu_s"]["allora"]) == len(ab["cpu_s"]["lora"]) == w["method_ab"]["steps"] > 0, kind
        assert ab["allora_time_over_lora"] > 0, kind
    assert "allora_ds allora / plain loop (allora)" in stdout
