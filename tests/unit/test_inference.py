"""Merging a training checkpoint's adapters into a model loaded with a device map."""

import pytest
import torch

from allora_ds.errors import UserError
from allora_ds.inference import merge_adapters


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    d = tmp_path_factory.mktemp("base")
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def _pairs(model, names, r=2):
    g = torch.Generator().manual_seed(1)
    out = {}
    for n in names:
        w = model.get_submodule(n).weight
        out[n] = (torch.randn(r, w.shape[1], generator=g), torch.randn(w.shape[0], r, generator=g))
    return out


def _load(base_dir, device_map, offload_folder=None):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, device_map=device_map,
                                                offload_folder=offload_folder)


TARGETS = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_merge_into_a_device_mapped_model(base_dir):
    model = _load(base_dir, {"": "cpu"})
    before = {n: model.get_submodule(n).weight.detach().clone() for n in TARGETS}
    pairs = _pairs(model, TARGETS)
    assert merge_adapters(model, pairs, 0.5, "checkpoint X", "base") == 2
    for n, (A, B) in pairs.items():
        assert torch.equal(model.get_submodule(n).weight, before[n] + 0.5 * (B @ A))


def test_merge_into_offloaded_layers_is_refused_before_anything_changes(base_dir, tmp_path):
    """A CPU stand-in for ``--device-map auto`` on GPUs too small for the model: layer 1 is offloaded
    to disk by accelerate (its weights are on meta in the module); a copy into it would be a no-op."""
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = _load(base_dir, device_map, tmp_path / "offload")
    assert model.get_submodule(TARGETS[1]).weight.device.type == "meta"
    before = model.get_submodule(TARGETS[0]).weight.detach().clone()
    with pytest.raises(UserError, match=r"--device-map: model\.layers\.1\.self_attn\.q_proj is offloaded.*allora-export"):
        merge_adapters(model, _pairs(_load(base_dir, {"": "cpu"}), TARGETS), 0.5, "checkpoint X", "base")
    assert torch.equal(model.get_submodule(TARGETS[0]).weight, before), "a layer was merged before the refusal"
