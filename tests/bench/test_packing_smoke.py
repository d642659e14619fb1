"""Smoke test of bench/packing.py --quick: both strategies on both distributions, results sane."""

import json
import sys

import pytest

from tests.helpers import REPO, run

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]  # the benchmark runs in a child process


def test_packing_bench_measures_both_strategies(tmp_path):
    out = tmp_path / "packing.json"
    run([sys.executable, REPO / "bench" / "packing.py", "--quick", "--out", out], timeout=600)
    runs = json.loads(out.read_text())["runs"]
    assert {(r["distribution"], r["strategy"]) for r in runs} == {(d, s) for d in ("alpaca", "commonsense_170k")
                                                                for s in ("greedy", "bfd")}
    for r in runs:
        assert r["lower_bound_rows"] <= r["rows_per_epoch"] <= r["examples"] and 0 < r["efficiency"] <= 1, r
    for greedy, bfd in zip(runs[::2], runs[1::2]):
        assert greedy["strategy"] == "greedy" and bfd["rows_per_epoch"] <= greedy["rows_per_epoch"]
