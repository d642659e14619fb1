"""Model FLOPs of a training step and the GPU peaks they are measured against (MFU).

Per token, with a frozen base and trainable adapters (N = parameters that take part in a matmul:
everything but the input embedding, plus the LM head when it is tied to it):

    forward 2N  +  gradient w.r.t. activations 2N  +  adapter weight gradients 2 N_trainable

The frozen base gets no weight gradients, hence 4N instead of the usual 6N. Causal attention adds,
per layer and per token at position p (0-based), 2 * 2 * d_attn * (p + 1) in forward (Q K^T and
A V) and twice that in backward; summed over an example of L tokens:

    6 * n_layers * d_attn * L * (L + 1)

Gradient-checkpointing recompute is not useful work and is not counted (that would be HFU).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, in TFLOP/s per GPU.
# Matched against torch.cuda.get_device_name() in order: the first pattern that matches wins, so
# the specific variants come before the family name.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"GH200", 989.0),
    (r"H100.*NVL", 835.0),
    (r"H100.*PCIe", 756.0),
    (r"H100|H800", 989.0),  # SXM: "NVIDIA H100 80GB HBM3"
    (r"H200.*NVL", 835.0),
    (r"H200", 989.0),
    (r"B200", 2250.0),
    (r"A100|A800", 312.0),  # 40 and 80 GB, SXM and PCIe alike
    (r"L40S", 362.0),
    (r"L40\b", 181.0),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),
)


def peak_tflops(device_name: str) -> float | None:
    """Datasheet dense bf16 peak of a GPU by its CUDA name, or None when it is not in the table."""
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return tflops
    return None


@dataclass(frozen=True)
class FlopModel:
    """What the FLOP count of a step depends on, read once from the model."""

    matmul_params: int  # N: parameters used in a matmul per token
    trainable_params: int
    n_layers: int
    attn_dim: int  # num_attention_heads * head_dim

    def linear_flops(self, tokens: int) -> float:
        return (4 * self.matmul_params + 2 * self.trainable_params) * tokens

    def attention_flops(self, causal_pairs: int) -> float:
        """``causal_pairs``: sum over examples of L(L+1)/2 (query-key pairs a causal mask keeps)."""
        return 12 * self.n_layers * self.attn_dim * causal_pairs

    def step_flops(self, tokens: int, causal_pairs: int) -> float:
        return self.linear_flops(tokens) + self.attention_flops(causal_pairs)


def causal_pairs(lengths) -> int:
    return sum(n * (n + 1) // 2 for n in lengths)


def full_numel(p) -> int:
    """Full element count, also for a ZeRO-3 partitioned parameter (whose .numel() is 0)."""
    return int(getattr(p, "ds_numel", p.numel()))


def flop_model(model) -> FlopModel:
    """The FlopModel of a transformers causal LM (works on ZeRO-3 partitioned parameters)."""
    cfg = model.config
    total = sum(full_numel(p) for p in model.parameters())
    trainable = sum(full_numel(p) for p in model.parameters() if p.requires_grad)
    embed = full_numel(model.get_input_embeddings().weight)
    head = model.get_output_embeddings()
    head = getattr(head, "base_layer", head)  # an adapter on lm_head wraps it
    tied = getattr(head, "weight", None) is model.get_input_embeddings().weight
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return FlopModel(matmul_params=total - (0 if tied else embed), trainable_params=trainable,
                     n_layers=cfg.num_hidden_layers, attn_dim=cfg.num_attention_heads * head_dim)


def mfu(flops: float, seconds: float, world: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation of ``world`` devices of ``peak`` TFLOP/s each (None without a peak)."""
    if not peak or seconds <= 0:
        return None
    return flops / (seconds * world * peak * 1e12)
