"""Sequence parallelism (DeepSpeed Ulysses, the attention half of ALST, arXiv 2506.13996): each
sequence is split over the ``train.sequence_parallel_size`` (SP) ranks of a group, so a rank
holds 1/SP of every activation; around each attention an all-to-all turns "my tokens, all heads"
into "all tokens, my heads" and back (``deepspeed.runtime.sequence_parallel.ulysses_sp``).

What this module owns, and why it is not DeepSpeed's data-loader adapter:

* **Layout.** DeepSpeed's groups: SP groups of consecutive ranks ``[0..SP-1], [SP..2SP-1], ...``,
  gradients reduced over the whole world (divided by what ``gradient_divisor`` says). So the
  data-parallel rank is ``rank // SP``: the ranks of one group take the same rows (the
  trainer's own order, a pure function of seed and step) and each keeps its slice of them.
* **Sharding** (``shard``): labels are shifted on the whole sequence *before* it is cut (a slice's
  last token predicts the next slice's first), positions stay global, the length is padded to a
  multiple of SP (padding is unlabelled), and the attention mask is dropped: Ulysses runs the core
  attention causal over the whole gathered sequence and discards any mask (right padding is
  harmless under a causal mask: no real token looks at it).
* **Loss.** Each rank's chunked loss covers its slice's labelled tokens, summed and normalised by
  the labels of the whole global batch; DeepSpeed sums the gradients over all ranks and divides
  by a count the trainer cancels (``gradient_divisor``), so the loss and every gradient are those
  of SP=1. The adapters see no difference: ALLoRA's row norms are per weight, not per token.

Packed rows need the core attention to keep examples apart after the all-to-all: flash attention
does (one flattened row, global ``cu_seq_lens``); DeepSpeed's sdpa and flex paths mask causally
over the whole row, so packing with them is refused (config._validate).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from allora_ds.loss import IGNORE_INDEX as IGNORE
from allora_ds.errors import UserError

# Core attentions DeepSpeed's Ulysses wraps (eager would build a [tokens, tokens] mask it discards).
ULYSSES_ATTENTION = ("sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")
PACKED_ULYSSES_ATTENTION = ("flash_attention_2", "flash_attention_3")  # keep packed examples apart under SP


@dataclass(frozen=True)
class Layout:
    """Where this rank sits: data-parallel rank/size, and its place in its sequence-parallel group."""

    size: int = 1  # SP: ranks that share each sequence
    rank: int = 0  # this rank's place in its SP group (which slice of each sequence it holds)
    dp_rank: int = 0  # which rows it trains on (the same for every rank of an SP group)
    dp_world: int = 1  # groups of SP ranks: the data-parallel size

    @classmethod
    def of(cls, rank: int, world: int, size: int) -> "Layout":
        return cls(size=size, rank=rank % size, dp_rank=rank // size, dp_world=world // size)


def check_layout(size: int, world: int, per_node: int) -> None:
    """SP groups must tile the world and must not straddle a node boundary part-way."""
    if world % size:
        raise UserError(f"train.sequence_parallel_size={size} does not divide the {world} ranks of this run")
    if size > 1 and per_node % size and size % per_node:
        raise UserError(f"train.sequence_parallel_size={size}: with {per_node} ranks per node a group of {size} "
                        f"would span part of a node; use a divisor or a multiple of {per_node}")


def check_model(size: int, model_config, attn_implementation: str | None) -> None:
    """What DeepSpeed's Ulysses refuses deep inside its setup, as one line naming the key."""
    if size == 1:
        return
    try:
        import deepspeed.runtime.sequence_parallel.ulysses_sp  # noqa: F401
    except ImportError:
        import deepspeed

        raise UserError(f"train.sequence_parallel_size={size}: the installed DeepSpeed {deepspeed.__version__} has no "
                        "Ulysses for Hugging Face models (deepspeed.runtime.sequence_parallel.ulysses_sp); "
                        "upgrade deepspeed") from None
    attn = attn_implementation or "sdpa"  # transformers' default where torch has it
    if attn not in ULYSSES_ATTENTION:
        raise UserError(f"model.attn_implementation={attn}: sequence parallelism wraps "
                        f"{', '.join(ULYSSES_ATTENTION)} only (eager would need a full [tokens, tokens] mask)")
    cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    if heads % size:
        raise UserError(f"train.sequence_parallel_size={size}: the model's {heads} attention heads do not split "
                        f"over {size} ranks; use a divisor of {heads}")
    if kv % size and size % kv:
        raise UserError(f"train.sequence_parallel_size={size}: the model's {kv} key/value heads neither split over "
                        f"{size} ranks nor divide {size}")


def gradient_divisor(ds_config: dict, layout: Layout) -> int:
    """What DeepSpeed divides the sum over all ranks of each gradient by.

    Without SP it is the world. With SP, DeepSpeed 0.19 divides by the data-parallel size
    (world / SP) under ZeRO-0/1/2 and on ZeRO-3's all-reduce path, but by the whole world on
    ZeRO-3's reduce-scatter path (stage3.py ``__avg_scatter_grads``, which ignores SP); without
    reduce_scatter ZeRO-3 picks the path per bucket, by size, so only reduce_scatter gives one
    divisor for all gradients (``check_ds_config``). tests/integration/test_sequence_parallel.py
    holds ZeRO-3 (zero3_cpu) and ZeRO-2 to SP=1's gradients, so a DeepSpeed that changes this
    fails there; hpZ and offload under SP are not tested.
    """
    zero = ds_config.get("zero_optimization", {})
    if layout.size > 1 and int(zero.get("stage", 0)) == 3:
        return layout.dp_world * layout.size
    return layout.dp_world


def check_ds_config(ds_config: dict, size: int, path) -> None:
    zero = ds_config.get("zero_optimization", {})
    if size > 1 and int(zero.get("stage", 0)) == 3 and not zero.get("reduce_scatter", True):
        raise UserError(f"{path}: zero_optimization.reduce_scatter must be true with train.sequence_parallel_size > 1 "
                        "(without it DeepSpeed scales ZeRO-3 gradients by bucket size differently)")


@contextlib.contextmanager
def ulysses_attention(model, layout: Layout, rows_per_micro_batch: int):
    """Route ``model``'s attention through Ulysses for the duration; yields DeepSpeed's mpu (None at SP=1).

    DeepSpeed replaces the core attention function in transformers' registry, for every model in
    the process; the original is put back on exit, so that code after training (export) runs the
    plain attention with no process group.
    """
    if layout.size == 1:
        yield None
        return
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = model.config._attn_implementation
    original = ALL_ATTENTION_FUNCTIONS[impl]
    try:
        yield UlyssesSPAttentionHF.register_with_transformers(
            model, core_attn_implementation=impl, sequence_parallel_size=layout.size,
            micro_batch_size=rows_per_micro_batch, seq_length_is_variable=True)
    finally:
        ALL_ATTENTION_FUNCTIONS[impl] = original
        import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu

        mpu._release_sequence_parallel_groups()


def shard(batch: dict, layout: Layout, pad_id: int) -> tuple[dict, int]:
    """This rank's slice of a collated micro-batch (``data.collate``), and its real tokens.

    The result carries ``shift_labels`` (position ``t`` predicts the whole row's ``t + 1``) and, as
    ``labels``, the same tensor: transformers computes a loss only when ``labels`` is given, and
    with ``shift_labels`` present it does not shift again. The ``labels`` of padding and of a row's
    last position are ``IGNORE``.
    """
    ids, labels = batch["input_ids"], batch["labels"]
    rows, n = ids.shape
    padded = math.ceil(n / layout.size) * layout.size
    pad = padded - n
    shift = F.pad(labels, (0, 1 + pad), value=IGNORE)[:, 1:]
    valid = batch.get("attention_mask", torch.ones_like(ids))
    if "position_ids" in batch:
        positions = batch["position_ids"]
        # Flattened rows (flash attention) describe their examples by cu_seq_lens: the padding is one more.
        tail = torch.arange(pad).expand(rows, pad) if "cu_seq_lens_q" in batch else positions[:, -1:] + 1 + torch.arange(pad)
    else:
        positions = torch.arange(n).expand(rows, n)
        tail = torch.arange(n, padded).expand(rows, pad)
    positions = torch.cat([positions, tail], dim=1)
    ids = F.pad(ids, (0, pad), value=pad_id)
    valid = F.pad(valid, (0, pad), value=0)
    span = slice(layout.rank * padded // layout.size, (layout.rank + 1) * padded // layout.size)
    out = {"input_ids": ids[:, span].contiguous(), "position_ids": positions[:, span].contiguous(),
           "labels": shift[:, span].contiguous()}
    out["shift_labels"] = out["labels"]
    if "cu_seq_lens_q" in batch:
        cu = batch["cu_seq_lens_q"]
        if pad:
            cu = torch.cat([cu, cu.new_tensor([padded])])
        longest = max(batch["max_length_q"], pad)
        out.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    return out, int(valid[:, span].sum())
