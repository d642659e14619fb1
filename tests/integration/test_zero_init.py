"""Adapter init under ``deepspeed.zero.Init`` as on a GPU node, reproduced on CPU.

On CUDA, ``zero.Init`` places tensors made without ``device=`` on the GPU and casts them to bf16;
an init that draws into such a tensor from a CPU generator crashes there and nowhere else. The
worker makes DeepSpeed's constructor wrapper target ``meta`` so that the same mistake fails here.
"""

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import BIN, REPO, run

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]  # the trainer or its ranks run in child processes

WORKER = REPO / "tests" / "integration" / "zero_init_worker.py"


def inject(tmp_path, *args) -> dict[str, torch.Tensor]:
    out = tmp_path / f"{'_'.join(a.strip('-') for a in args)}.safetensors"
    run([BIN / "python", WORKER, out, *args], timeout=300)
    return load_file(out)


@pytest.fixture(scope="module")
def fp32_reference(tmp_path_factory):
    return inject(tmp_path_factory.mktemp("ref"), "--stage", "0", "--dtype", "float32")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_zero3_init_off_the_cpu_equals_the_fp32_draw(tmp_path, fp32_reference, dtype):
    got = inject(tmp_path, "--stage", "3", "--dtype", dtype, "--target-meta")
    assert got.keys() == fp32_reference.keys()
    for k, ref in fp32_reference.items():
        want = ref.to(getattr(torch, dtype))
        assert got[k].dtype == want.dtype, f"{k}: {got[k].dtype}, expected {want.dtype}"
        assert torch.equal(got[k], want), f"{k}: ZeRO-3 {dtype} init differs from the fp32 draw cast to {dtype}"
    assert any(ref.abs().max() > 0 for k, ref in fp32_reference.items() if k.endswith("lora_A"))
