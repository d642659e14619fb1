"""Adapters under ZeRO-3/2/0 with 2 real processes equal a single-process reference."""

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import BIN, REPO, deepspeed_cmd, run

WORKER = REPO / "tests" / "integration" / "adapter_equivalence_worker.py"


@pytest.fixture(scope="module")
def references(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    refs = {}
    for method in ("allora", "lora"):
        path = out / f"{method}.safetensors"
        run([BIN / "python", WORKER, tiny_model, path, "--reference", "--world", 2, "--method", method])
        refs[method] = load_file(path)
    return refs


@pytest.mark.parametrize(
    "stage, method, gc",
    [(3, "allora", False), (3, "allora", True), (2, "allora", False), (0, "allora", False), (3, "lora", False)],
)
def test_adapters_match_single_process_reference(tiny_model, references, tmp_path, stage, method, gc):
    out = tmp_path / "dist.safetensors"
    run(deepspeed_cmd([WORKER, tiny_model, out, "--stage", stage, "--method", method] + (["--gc"] if gc else [])))
    got, ref = load_file(out), references[method]
    assert got.keys() == ref.keys()
    for k in ref:
        rel = ((got[k] - ref[k]).abs().max() / ref[k].abs().max()).item()
        assert rel < 1e-5, f"{k}: ZeRO-{stage} differs from the reference by {rel:.2e} (relative)"
    # The reference must itself differ from the other method, or the comparison proves little.
    other = references["lora" if method == "allora" else "allora"]
    assert max((other[k] - ref[k]).abs().max().item() for k in ref if "lora_A" in k) > 1e-4
