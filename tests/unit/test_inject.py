"""inject_adapters on a Hugging Face Llama: which modules, what is frozen, and clear refusals."""

import pytest
import torch

from allora_ds.adapters import AdapterLinear, AdapterSpec, adapter_modules, inject_adapters, merged_weight
from allora_ds.tiny import tiny_llama_config


@pytest.fixture
def llama():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(vocab_size=64, hidden=32, layers=2))


def test_default_targets_wrap_all_seven_projections_and_freeze_the_rest(llama):
    counts = inject_adapters(llama, AdapterSpec(rank=4), verbose=False)
    mods = adapter_modules(llama)
    assert counts["adapted_modules"] == len(mods) == 2 * 7
    assert {n.rsplit(".", 1)[1] for n in mods} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    trainable = [n for n, p in llama.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    expected = sum(4 * (m.in_features + m.out_features) for m in mods.values())
    assert counts["trainable"] == expected
    k = mods["model.layers.0.self_attn.k_proj"]
    assert (k.in_features, k.out_features) == (32, 16), "GQA: k_proj maps hidden to n_kv_heads * head_dim"


def test_adapter_init_is_per_module_and_seeded(llama):
    from transformers import LlamaForCausalLM

    inject_adapters(llama, AdapterSpec(rank=4), seed=5, verbose=False)
    other = LlamaForCausalLM(tiny_llama_config(vocab_size=64, hidden=32, layers=2))
    inject_adapters(other, AdapterSpec(rank=4), seed=5, verbose=False)
    a, b = adapter_modules(llama), adapter_modules(other)
    for name in a:
        assert torch.equal(a[name].lora_A, b[name].lora_A) and torch.count_nonzero(a[name].lora_B) == 0
    assert not torch.equal(a["model.layers.0.self_attn.q_proj"].lora_A, a["model.layers.1.self_attn.q_proj"].lora_A)
    bound = 1 / 32**0.5
    assert a["model.layers.0.mlp.up_proj"].lora_A.abs().max() <= bound


def test_merged_weight_reproduces_the_adapted_layer(llama):
    inject_adapters(llama, AdapterSpec(method="lora", rank=4, alpha=8.0), verbose=False)
    layer = adapter_modules(llama)["model.layers.0.mlp.down_proj"]
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, layer.in_features)
    W = merged_weight(layer.base_layer.weight, layer.lora_A, layer.lora_B, layer.spec.scale)
    assert torch.allclose(layer(x), x @ W.t(), atol=1e-5)


@pytest.mark.parametrize(
    "targets, message",
    [
        (("q_proj", "qkv_proj"), r"adapter target\(s\) 'qkv_proj' match no module of LlamaForCausalLM"),
        (("self_attn",), r"target 'self_attn' matched 'model.layers.0.self_attn', a LlamaAttention, not an nn.Linear"),
        (("act_fn",), r"a SiLU.*not an nn.Linear"),
    ],
)
def test_bad_targets_are_refused_by_name(llama, targets, message):
    with pytest.raises(ValueError, match=message):
        inject_adapters(llama, AdapterSpec(target_modules=targets), verbose=False)


def test_injecting_twice_is_refused(llama):
    inject_adapters(llama, AdapterSpec(rank=2), verbose=False)
    with pytest.raises(ValueError, match="already has an adapter"):
        inject_adapters(llama, AdapterSpec(rank=2), verbose=False)
    assert isinstance(llama.model.layers[0].self_attn.q_proj, AdapterLinear)
