"""CI smoke run of bench/adapter_overhead.py --quick: the script works and its numbers are sane."""

import json
import math

import pytest

from tests.helpers import BIN, REPO, run

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]  # the benchmarks run in child processes


def test_adapter_overhead_quick(tmp_path):
    out = tmp_path / "overhead.json"
    proc = run([BIN / "python", REPO / "bench" / "adapter_overhead.py", "--quick", "--threads", "1", "--out", out])
    r = json.loads(out.read_text())
    assert len(r["layer_fwd_bwd"]) == 4 and len(r["row_norms"]) == 4
    for row in r["layer_fwd_bwd"] + [r["decoder_block"]]:
        for key in ("base_ms", "lora_ms", "allora_ms", "allora_over_lora"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["proj"], key, row[key])
    for row in r["row_norms"]:
        assert row["gram_max_rel_err"] < 1e-5 and row["speedup"] > 0
    assert "decoder block" in proc.stdout, "the results table was not printed"
