"""Smoke test of the miniature replication: ``bench/replicate.py --quick`` end to end, outputs sane.

No timing assertions (CI machines vary); the quick base is pretrained into a temporary cache so
the test starts from nothing, as on a fresh checkout.
"""

import json
import math
import sys

import pytest

from bench.replicate import METHODS, OPTIMIZERS, QUICK
from tests.helpers import REPO, run

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]  # the benchmarks run in child processes

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replicate")
    out = tmp / "replicate_quick.json"
    proc = run([sys.executable, REPO / "bench" / "replicate.py", "--quick", "--out", out,
                "--cache-dir", tmp / "cache", "--workers", "2"], timeout=900)
    return json.loads(out.read_text()), tmp / "replicate_quick_docs", proc.stdout


def _finite(xs) -> bool:
    return all(isinstance(x, (int, float)) and math.isfinite(x) for x in xs)


def test_every_cell_is_present_once_with_one_selected_lr(quick):
    res, _, _ = quick
    budgets = [b for b, _ in QUICK.budgets]
    cells = {(r["method"], r["optimizer"], r["budget"]) for r in res["summary"]}
    assert cells == {(m.name, o, b) for m in METHODS for o in OPTIMIZERS for b in budgets}
    for cell in cells:
        chosen = [r for r in res["summary"] if (r["method"], r["optimizer"], r["budget"]) == cell and r["selected"]]
        assert len(chosen) == 1, cell
    expected_runs = len(cells) * QUICK.seeds + QUICK.seeds  # every cell, plus the random-init control
    assert len(res["runs"]) == expected_runs


def test_metrics_are_finite_and_in_range(quick):
    res, _, _ = quick
    for r in res["runs"]:
        assert 0.0 <= r["val_acc"] <= 1.0 and 0.0 <= r["test_acc"] <= 1.0, r
        assert _finite([r["val_loss"], r["test_loss"]]) and r["test_loss"] > 0, r
    for key, curve in res["curves_seed_mean"].items():
        assert _finite(curve["loss"]) and _finite(curve["norm_mean"]) and _finite(curve["norm_max"]), key
        # B = 0 at init: every update starts at exactly zero; norms are never negative.
        assert curve["norm_mean"][0] == 0.0 and min(curve["norm_mean"]) >= 0.0, key
        assert all(mx >= mn for mx, mn in zip(curve["norm_max"], curve["norm_mean"])), key
    for split in ("val", "test"):
        assert 0.0 <= res["step0"][split]["acc"] <= 1.0
    assert 0.0 <= res["control"]["test_acc_mean"] <= 1.0


def test_all_methods_start_from_the_base_and_most_learn(quick):
    res, _, _ = quick
    # Same seed -> same first batch, and B = 0 makes every method's first forward the base model's.
    for opt in OPTIMIZERS:
        firsts = [c["loss"][0] for key, c in res["curves_seed_mean"].items() if key.split("|")[1] == opt]
        assert max(firsts) - min(firsts) < 1e-4, (opt, firsts)
    start = res["step0"]["train"]["loss"]
    longest = QUICK.budgets[-1][0]
    final = [r for r in res["summary"] if r["budget"] == longest]
    fell = [r for r in final if r["train_loss_mean"] < start]
    assert len(fell) >= 0.75 * len(final), (start, [(r["method"], r["optimizer"], r["train_loss_mean"]) for r in final])


def test_report_plots_and_table(quick):
    res, docs, stdout = quick
    for name in ("replicate_accuracy.png", "replicate_loss.png", "replicate_row_norms.png"):
        png = docs / "img" / name
        assert png.read_bytes()[:8] == PNG_MAGIC, png
        assert png.stat().st_size > 10_000, png  # a real figure, not an empty canvas
    md = (docs / "results.md").read_text()
    assert md.count("<!-- replicate:begin -->") == 1 and md.count("<!-- replicate:end -->") == 1
    for m in METHODS:
        assert m.label in md and m.label in stdout
    assert "](img/replicate_accuracy.png)" in md
    # The table is printed last.
    assert stdout.rstrip().splitlines()[-1].startswith(METHODS[-1].label)


def test_report_only_redoes_the_block_and_keeps_the_hand_written_text(quick):
    _, docs, _ = quick
    md = docs / "results.md"
    generated = md.read_text()
    md.write_text("Hand-written intro.\n\n" + generated + "\nHand-written discussion.\n")
    out = docs.parent / "replicate_quick.json"
    run([sys.executable, REPO / "bench" / "replicate.py", "--quick", "--out", out, "--report-only"], timeout=300)
    text = md.read_text()
    assert text.startswith("Hand-written intro.\n\n") and text.endswith("\nHand-written discussion.\n")
    # The same JSON gives the same block.
    assert generated.split("<!-- replicate:begin -->")[1] in text
