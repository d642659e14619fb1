"""bench/throughput_8b.py: its FLOP split, and a smoke run of --quick on the commonsense workload.

The split is checked against the model allora_ds builds (its FlopModel) and against Llama-3-8B's
shares, which the benchmark's shape exists to reproduce. The smoke run checks that every system
ran and trained the same thing: the plain PyTorch loop and allora_ds read the same rows in the same
order, so their losses agree to rounding (a system that trained a different method or other rows
would not). No timing assertions; the committed bench/results/throughput_8b.json is never touched.
"""

import json
import math
import sys

import pytest

from tests.helpers import REPO, run

sys.path.insert(0, str(REPO))
from bench.throughput_8b import LLAMA3_8B, SYSTEMS, WORKLOADS, flop_model_of, flop_split, shape_of  # noqa: E402


def test_the_shape_has_llama3_8b_head_share():
    ours = flop_split(shape_of(WORKLOADS["alpaca"]), 16, tokens=1000, pairs=0)["head_of_matmul"]
    theirs = flop_split(LLAMA3_8B, 16, tokens=1000, pairs=0)["head_of_matmul"]
    assert abs(ours - theirs) < 0.005 and 0.06 < theirs < 0.08, (ours, theirs)


def test_flop_model_of_a_shape_is_that_of_the_built_model():
    import torch
    from transformers import LlamaForCausalLM

    from allora_ds.adapters import AdapterSpec, inject_adapters
    from allora_ds.flops import flop_model
    from allora_ds.tiny import tiny_llama_config

    shape = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 224, "vocab": 512}
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(512, hidden=64, layers=2, heads=4, kv_heads=2))
    inject_adapters(model, AdapterSpec(rank=16), verbose=False)
    assert flop_model_of(shape, 16) == flop_model(model)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("throughput_8b")
    out = tmp / "t8b_quick.json"
    proc = run([sys.executable, REPO / "bench" / "throughput_8b.py", "--quick", "--workloads", "commonsense",
                "--out", out, "--cache-dir", tmp / "cache"], timeout=1200)
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.multiprocess
@pytest.mark.slow
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
