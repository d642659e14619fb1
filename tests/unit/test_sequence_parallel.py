"""Sequence-parallel slicing, layout and the checks that refuse what Ulysses cannot run."""

import importlib.util
import types

import pytest
import torch

from allora_ds import sequence_parallel as sp
from allora_ds.config import load_config
from allora_ds.data import IGNORE, collate
from allora_ds.ds_config import fill_ds_config
from allora_ds.errors import UserError

PAD = 0
# DeepSpeed's Ulysses and TiledMLP (0.17+; the floor, 0.16, has neither: checked by check_model/tiled_mlp.check)
needs_ulysses = pytest.mark.skipif(importlib.util.find_spec("deepspeed.runtime.sequence_parallel") is None,
                                   reason="this DeepSpeed has no deepspeed.runtime.sequence_parallel")


def _rows():
    return [{"input_ids": [5, 6, 7, 8, 9], "labels": [IGNORE, IGNORE, 7, 8, 9]},
            {"input_ids": [11, 12, 13], "labels": [IGNORE, 12, 13]}]


def _all_slices(batch, size):
    return [sp.shard(batch, sp.Layout.of(r, size, size), PAD) for r in range(size)]


def test_slices_put_back_together_are_the_whole_shifted_row():
    batch = collate(_rows(), PAD)
    slices = _all_slices(batch, 2)
    ids = torch.cat([s["input_ids"] for s, _ in slices], dim=1)
    shifted = torch.cat([s["shift_labels"] for s, _ in slices], dim=1)
    positions = torch.cat([s["position_ids"] for s, _ in slices], dim=1)
    # 5 tokens padded to 6; labels shifted on the whole row, so slice 0's last position predicts
    # the first token of slice 1
    assert ids.tolist() == [[5, 6, 7, 8, 9, PAD], [11, 12, 13, PAD, PAD, PAD]]
    assert shifted.tolist() == [[IGNORE, 7, 8, 9, IGNORE, IGNORE], [12, 13, IGNORE, IGNORE, IGNORE, IGNORE]]
    assert slices[0][0]["shift_labels"][0, -1].item() == 8  # position 2 predicts token 3, held by slice 1
    assert positions.tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]]
    assert all("attention_mask" not in s for s, _ in slices)
    assert all(s["labels"] is s["shift_labels"] for s, _ in slices)
    # the real tokens of every slice add up to the batch's, each counted once
    assert sum(n for _, n in slices) == 8


def test_slices_match_the_labelled_positions_of_the_whole_batch():
    """Every labelled (position, target) pair of SP=1 is in exactly one slice."""
    from allora_ds.loss import label_positions

    batch = collate(_rows(), PAD)
    rows, n = batch["input_ids"].shape
    whole_rows, whole_targets = label_positions(batch["labels"])
    whole = {(int(r) // n, int(r) % n, int(t)) for r, t in zip(whole_rows, whole_targets)}
    size = 4
    seen = []
    for k, (s, _) in enumerate(_all_slices(batch, size)):
        width = s["input_ids"].shape[1]
        pos, tgt = label_positions(s["labels"], s["shift_labels"])
        seen += [(int(p) // width, k * width + int(p) % width, int(t)) for p, t in zip(pos, tgt)]
    assert sorted(seen) == sorted(whole)


def test_flattened_rows_keep_global_boundaries_and_pad_as_one_more_example():
    batch = collate(_rows(), PAD, flatten=True)  # 8 tokens, examples of 5 and 3
    slices = _all_slices(batch, 3)  # padded to 9
    for s, _ in slices:
        assert s["cu_seq_lens_q"].tolist() == [0, 5, 8, 9] and s["max_length_q"] == 5
    positions = torch.cat([s["position_ids"] for s, _ in slices], dim=1)
    assert positions.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0]]
    assert sum(n for _, n in slices) == 8


def test_layout_groups_consecutive_ranks():
    assert [sp.Layout.of(r, 8, 2) for r in (0, 1, 2, 7)] == [
        sp.Layout(2, 0, 0, 4), sp.Layout(2, 1, 0, 4), sp.Layout(2, 0, 1, 4), sp.Layout(2, 1, 3, 4)]


@pytest.mark.parametrize("size, world, per_node, error", [
    (2, 8, 8, None), (8, 16, 8, None), (16, 16, 8, None), (1, 3, 3, None),
    (3, 8, 8, "does not divide the 8 ranks"),
    (4, 12, 6, "would span part of a node"),
])
def test_check_layout(size, world, per_node, error):
    if error is None:
        sp.check_layout(size, world, per_node)
    else:
        with pytest.raises(UserError, match=error):
            sp.check_layout(size, world, per_node)


def _model_config(heads, kv):
    return types.SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv)


@needs_ulysses
@pytest.mark.parametrize("size, heads, kv, attn, error", [
    (2, 32, 8, None, None), (8, 32, 8, "flash_attention_2", None), (16, 32, 8, "sdpa", None),  # 8 kv heads replicated
    (2, 32, 8, "eager", "eager would need"),
    (3, 32, 8, "sdpa", "32 attention heads do not split over 3"),
    (4, 12, 6, "sdpa", "6 key/value heads neither split over 4"),
])
def test_check_model(size, heads, kv, attn, error):
    if error is None:
        sp.check_model(size, _model_config(heads, kv), attn)
    else:
        with pytest.raises(UserError, match=error):
            sp.check_model(size, _model_config(heads, kv), attn)


def test_gradient_divisor_is_the_world_on_zero3_reduce_scatter_else_the_data_parallel_size():
    lay = sp.Layout.of(0, 8, 2)
    assert sp.gradient_divisor({"zero_optimization": {"stage": 3}}, lay) == 8
    assert sp.gradient_divisor({"zero_optimization": {"stage": 2}}, lay) == 4
    assert sp.gradient_divisor({}, lay) == 4
    assert sp.gradient_divisor({"zero_optimization": {"stage": 3}}, sp.Layout.of(0, 8, 1)) == 8
    with pytest.raises(UserError, match="reduce_scatter must be true"):
        sp.check_ds_config({"zero_optimization": {"stage": 3, "reduce_scatter": False}}, 2, "my.json")
    sp.check_ds_config({"zero_optimization": {"stage": 3, "reduce_scatter": False}}, 1, "my.json")


def _cfg(tmp_path, *overrides):
    return load_config(None, ["model.path=/m", f"data.train={tmp_path / 'd.jsonl'}", *overrides])


def test_config_refuses_packing_without_flash_attention(tmp_path):
    with pytest.raises(UserError, match="data.packing: packed rows with train.sequence_parallel_size > 1 need"):
        _cfg(tmp_path, "train.sequence_parallel_size=2", "data.packing=greedy")
    _cfg(tmp_path, "train.sequence_parallel_size=2", "data.packing=greedy", "model.attn_implementation=flash_attention_2")
    _cfg(tmp_path, "train.sequence_parallel_size=1", "data.packing=greedy")
    with pytest.raises(UserError, match="train.sequence_parallel_size: must be >= 1"):
        _cfg(tmp_path, "train.sequence_parallel_size=0")


def test_deepspeed_batch_counts_data_parallel_ranks(tmp_path):
    cfg = _cfg(tmp_path, "train.sequence_parallel_size=4", "train.micro_batch_size=1", "train.gradient_accumulation_steps=2")
    ds = fill_ds_config({"train_batch_size": "auto", "zero_optimization": {"stage": 3}}, cfg, 8, 64, "x.json")
    assert ds["train_batch_size"] == 1 * 2 * 2 and ds["sequence_parallel_size"] == 4


@needs_ulysses
@pytest.mark.parametrize("rows, tokens", [(1, 30), (2, 9), (1, 64), (3, 7)])
def test_every_row_count_runs_exactly_the_configured_tiles(tiny_model, rows, tokens):
    """ZeRO-3 gathers the MLP's weights on every call of its projections: ranks whose rows differ in
    length must still call them equally often, in forward and in backward (torch.chunk alone makes
    30 slices of 30 tokens asked for 50, 3 of 9 asked for 4)."""
    from transformers import AutoModelForCausalLM

    from allora_ds import tiled_mlp

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    tiled_mlp.install(model, 50 if tokens == 30 else 4)
    calls = []
    model.model.layers[0].mlp.gate_proj.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    model.train()
    ids = torch.randint(3, model.config.vocab_size, (rows, tokens), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    tiles = 50 if tokens == 30 else 4
    assert len(calls) == 2 * tiles, calls  # forward and the backward's recompute
    assert sum(calls) == 2 * -(-rows * tokens // tiles) * tiles


@needs_ulysses
def test_tiled_mlp_gradients_equal_the_untiled_ones(tiny_model):
    """Tiles over the flattened rows (9 tokens x 2 rows in 4 tiles: 4 backward slices, 3 forward)."""
    from transformers import AutoModelForCausalLM

    from allora_ds import tiled_mlp
    from allora_ds.adapters import AdapterSpec, adapter_modules, inject_adapters

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    inject_adapters(model, AdapterSpec(method="allora", rank=4, eta=2.0), seed=1, verbose=False)
    torch.manual_seed(0)
    for m in adapter_modules(model).values():
        torch.nn.init.normal_(m.lora_B, std=0.02)
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    model.train()

    def grads():
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref = grads()
    assert tiled_mlp.install(model, 4) == model.config.num_hidden_layers
    got = grads()
    for k in ref:  # fp32 sums in another order
        assert (got[k] - ref[k]).abs().max() <= 1e-5 * ref[k].abs().max(), k
    with torch.no_grad():  # eval runs the plain MLP
        assert torch.equal(model.model.layers[0].mlp(torch.ones(1, 3, model.config.hidden_size)),
                           type(model.model.layers[0].mlp).forward(model.model.layers[0].mlp,
                                                                   torch.ones(1, 3, model.config.hidden_size)))
