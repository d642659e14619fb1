"""Smoke test of bench/long_sequence.py --quick: SP=1 on 1 CPU rank and SP=2 on 2, with and without
gradient checkpointing, at two lengths, through the real trainer.

Bytes depend on shapes only, so the figures themselves are asserted: Ulysses' collectives as
counted equal allora_ds.zero_comm.ulysses_bytes to the byte, and SP=2 holds fewer activation bytes
per rank than SP=1. No timing assertions. Writes to a temporary directory: the committed
bench/results/long_sequence.json is never touched."""

import json
import sys

import pytest

from tests.helpers import REPO, run

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]  # the benchmark runs in child processes

pytest.importorskip("deepspeed.runtime.sequence_parallel.ulysses_sp", reason="this DeepSpeed has no Ulysses for HF models")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("long_sequence")
    out = tmp / "long_sequence_quick.json"
    proc = run([sys.executable, REPO / "bench" / "long_sequence.py", "--quick", "--out", out,
                "--cache-dir", tmp / "cache"], timeout=600)
    return json.loads(out.read_text()), proc.stdout


def test_report_has_its_fields(result):
    res, stdout = result
    for key in ("machine", "load_note", "repetitions", "formulas", "configs", "sp2_vs_sp1", "bytes_match"):
        assert key in res, key
    assert {(r["sp"], r["checkpointing"]) for r in res["configs"]} == {(1, False), (1, True), (2, False), (2, True)}
    for r in res["configs"]:
        assert len(r["activation_bytes"]) == len(r["peak_rss_mib"]) == r["ranks"] == r["sp"], r["name"]
        assert r["tokens_per_s"] > 0 and r["steady_steps"] == res["repetitions"] >= 1, r["name"]
        assert r["steady_tokens"] == r["steady_steps"] * r["seq_len"], r["name"]  # each token once per SP group
    assert "do NOT transfer to GPUs" in stdout


def test_counted_collective_bytes_equal_the_prediction(result):
    res, _ = result
    sp2 = [r for r in res["configs"] if r["sp"] == 2]
    assert sp2 and res["bytes_match"]
    for r in sp2:
        assert set(r["collectives"]) == {"all_to_all@2", "all_gather@2"}, r["name"]
        for key, v in r["collectives"].items():
            assert v["counted"] > 0 and v["counted"] == v["predicted"] and v["rel_err"] == 0, (r["name"], key, v)
            assert v["every_rank_and_step_equal"], (r["name"], key)


def test_sequence_parallelism_splits_the_activations(result):
    res, _ = result
    longest = max(r["seq_len"] for r in res["configs"])
    for gc in (False, True):
        by_sp = {r["sp"]: r for r in res["configs"] if r["seq_len"] == longest and r["checkpointing"] == gc}
        # below SP=1's, and near half of it: each rank holds its half of every per-token activation
        assert max(by_sp[2]["activation_bytes"]) < 0.6 * by_sp[1]["activation_bytes"][0], (gc, by_sp)
