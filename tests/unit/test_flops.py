"""MFU: the FLOP count of a step against a hand computation for Llama-3-8B, and the GPU peak table."""

import pytest
import torch

from allora_ds import flops
from allora_ds.adapters import AdapterSpec, inject_adapters


def llama3_8b_on_meta():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    inject_adapters(model, AdapterSpec(rank=16), verbose=False)
    return model


def test_llama3_8b_step_flops_match_a_hand_computation():
    fm = flops.flop_model(llama3_8b_on_meta())
    # By hand. Per layer: q, o 4096x4096; k, v 4096x1024; gate, up, down 4096x14336; 2 norms of 4096.
    layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096
    assert layer == 218_112_000
    embedding = 128256 * 4096  # the input embedding: a lookup, no FLOPs
    lm_head = 128256 * 4096  # untied: a matmul every token
    adapters = 32 * 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))
    assert adapters == 41_943_040  # r=16 on the 7 projections
    assert 32 * layer + 4096 + embedding + lm_head == 8_030_261_248  # Llama-3-8B's published size
    n = 32 * layer + 4096 + lm_head + adapters
    assert (fm.matmul_params, fm.trainable_params, fm.n_layers, fm.attn_dim) == (n, adapters, 32, 4096)
    # One 2048-token sequence: 4N + 2N_trainable per token, and causal attention
    # 12 * layers * d_attn * L(L+1)/2 (QK^T and AV, forward + twice that in backward).
    tokens = 2048
    linear = (4 * 7_546_867_712 + 2 * 41_943_040) * tokens
    attention = 12 * 32 * 4096 * (2048 * 2049 // 2)
    assert n == 7_546_867_712
    total = fm.step_flops(tokens, flops.causal_pairs([2048]))
    assert total == linear + attention == pytest.approx(6.5296e13, rel=1e-4)  # 6.200e13 linear + 3.30e12 attention
    # Packed: two 1024-token examples do half the attention work of one 2048-token sequence.
    assert fm.attention_flops(flops.causal_pairs([1024, 1024])) == 12 * 32 * 4096 * 2 * (1024 * 1025 // 2)
    # That step in 0.1 s on 8 H100 SXM (989 TFLOP/s each), i.e. 8 such sequences per step:
    assert flops.mfu(8 * total, 0.1, 8, 989.0) == pytest.approx(total / (0.1 * 989e12))


def test_tied_lm_head_is_counted_once_as_a_matmul():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    total = sum(p.numel() for p in model.parameters())  # the shared weight once
    assert flops.flop_model(model).matmul_params == total
    inject_adapters(model, AdapterSpec(rank=2, target_modules=("lm_head",)), verbose=False)  # wraps the head
    assert flops.flop_model(model).matmul_params == total + 2 * (64 + 1000)


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0),  # SXM
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0),
    ("NVIDIA H200 NVL", 835.0),
    ("NVIDIA GH200 480GB", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100-PCIE-40GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA L40S", 362.0),
    ("NVIDIA L40", 181.0),
    ("NVIDIA L4", 121.0),
    ("NVIDIA A10", 125.0),
    ("NVIDIA A10G", None),  # not in the table: no guess, train.peak_tflops says it
    ("Tesla V100-SXM2-32GB", None),
])
def test_device_names_map_to_their_own_datasheet_peak(name, peak):
    assert flops.peak_tflops(name) == peak
