"""Where the base model's weights are put at load, per ZeRO stage (the load itself runs in every
trainer test; tests/integration/test_layouts.py covers ZeRO-2 with its device_map on CPU ranks)."""

from allora_ds import modeling
from allora_ds.config import ModelConfig


def test_zero2_ranks_read_the_base_onto_their_device_and_zero3_leaves_it_to_zero_init(monkeypatch):
    """Under ZeRO-0/1/2 every rank holds the whole base: transformers must read it from the file onto
    the rank's device (``device_map``), not into host memory first, which costs 8 x 16 GB of RAM per
    8B node before deepspeed.initialize moves it. Under ZeRO-3, zero.Init partitions the weights as
    they are created, and transformers refuses a device_map. DeepSpeed's accelerator reports rank
    1's GPU here."""
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(type(get_accelerator()), "current_device_name", lambda self, device_index=None: "cuda:1")
    mc = ModelConfig(path="base", dtype="bfloat16")
    assert modeling.base_load_kwargs(mc, zero3=False)["device_map"] == {"": "cuda:1"}
    assert "device_map" not in modeling.base_load_kwargs(mc, zero3=True)
