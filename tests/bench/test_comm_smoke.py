"""Smoke test of bench/comm.py --quick: ZeRO-3, ZeRO-3 with gradient checkpointing, ZeRO-2 and
hpZ (over both ranks: its code path in the trainer, not its grouping) on 2 CPU ranks with the real
trainer, every collective counted and compared with allora_ds.zero_comm.

Bytes do not depend on the machine, so unlike the timing benchmarks this one asserts the figures
themselves (within 5% of the prediction; in practice they are equal). Writes to a temporary
directory: the committed bench/results/comm.json is never touched."""

import json
import sys

import pytest

from tests.helpers import REPO, run

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]  # the benchmarks run in child processes


@pytest.fixture(scope="module")
def comm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("comm")
    out = tmp / "comm_quick.json"
    proc = run([sys.executable, REPO / "bench" / "comm.py", "--quick", "--out", out, "--cache-dir", tmp / "cache"],
               timeout=1200)
    return json.loads(out.read_text()), proc.stdout


def test_counted_bytes_match_the_prediction(comm):
    res, stdout = comm
    rows = {r["layout"]: r for r in res["layouts"]}
    assert set(rows) == {"zero3", "zero3_gc", "zero2", "hpz_gc"}
    for name, r in rows.items():
        assert r["steady_steps_identical"], f"{name}: steps 2 and 3 (or the two ranks) communicated different bytes"
        for key, v in r["bytes"].items():
            assert v["measured"] > 0 and v["rel_err"] <= 0.05, f"{name} {key}: {v}"
    assert res["met"] and stdout.rstrip().splitlines()[-1].startswith("goal:")


def test_layouts_move_what_they_are_for(comm):
    """ZeRO-3 gathers the frozen base every micro-batch, a third time with checkpointing (which also
    shows that the trainer trains in train mode: transformers skips checkpointing in eval mode);
    ZeRO-2 moves only the adapters; every adapter matrix stays whole under the shipped "auto"."""
    res, _ = comm
    rows = {r["layout"]: r for r in res["layouts"]}
    gathered = {n: sum(v["measured"] for k, v in r["bytes"].items() if k.startswith("all_gather")) for n, r in rows.items()}
    assert gathered["zero3_gc"] > 1.3 * gathered["zero3"], gathered
    assert gathered["zero3"] > 20 * gathered["zero2"], gathered
    # hpZ whose "node" is every rank gathers exactly what ZeRO-3 does
    measured = {n: {k: v["measured"] for k, v in rows[n]["bytes"].items()} for n in ("hpz_gc", "zero3_gc")}
    assert measured["hpz_gc"] == measured["zero3_gc"], measured
    layers = res["shape"]["layers"]
    assert rows["zero3"]["persistent_params"] == 7 * 2 * layers + 2 * layers + 1  # adapters and norms
