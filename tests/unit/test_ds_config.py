"""train.deepspeed: a path, or the name of a DeepSpeed config shipped with the package."""

import json
from pathlib import Path

import pytest

from allora_ds.config import TrainConfig, load_config
from allora_ds.ds_config import fill_ds_config, read_ds_config, resolve_ds_config, shipped_names
from allora_ds.errors import UserError

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted(p.stem for p in (REPO / "ds_configs").glob("*.json"))


def _shipped(name: str) -> dict:
    return json.loads((REPO / "ds_configs" / f"{name}.json").read_text())


@pytest.mark.parametrize("name", ["zero3_bf16", "zero3_cpu.json", "zero2_bf16", "zero3_offload_bf16.json"])
def test_bare_name_reads_the_shipped_config_from_any_directory(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert read_ds_config(name) == _shipped(name.removesuffix(".json"))


def test_default_is_a_shipped_name_readable_outside_the_checkout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    default = TrainConfig().deepspeed
    assert default == "zero3_bf16"
    assert read_ds_config(default) == _shipped("zero3_bf16")


def test_shipped_names_are_the_repository_ds_configs():
    assert shipped_names() == SHIPPED and "zero3_cpu" in SHIPPED


def test_an_existing_path_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "zero3_cpu.json").write_text('{"zero_optimization": {"stage": 1}}')
    assert read_ds_config("zero3_cpu.json") == {"zero_optimization": {"stage": 1}}
    assert read_ds_config("zero3_cpu")["zero_optimization"]["stage"] == 3  # no file of that exact name: shipped


@pytest.mark.parametrize("name", ["zero4", "zero4.json", "configs/zero3_bf16.json", "/nonexistent/zero3_cpu.json"])
def test_anything_else_is_one_line_naming_the_shipped_configs(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as e:
        read_ds_config(name)
    msg = str(e.value)
    assert msg.startswith(f"train.deepspeed: cannot read {name}") and "\n" not in msg
    assert f"({', '.join(SHIPPED)})" in msg


def test_fill_names_the_file_a_bare_name_resolved_to(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["model.path=x", "data.train=d.jsonl", "train.micro_batch_size=4", "model.dtype=float32"])
    ds = {**read_ds_config("zero3_cpu"), "train_micro_batch_size_per_gpu": 3}
    with pytest.raises(UserError, match=r"ds_configs/zero3_cpu.json: train_micro_batch_size_per_gpu is 3"):
        fill_ds_config(ds, cfg, 1, 64, "zero3_cpu")
    assert resolve_ds_config("zero3_cpu").samefile(REPO / "ds_configs" / "zero3_cpu.json")


def _filled(name: str, world: int, per_node: int, hidden: int = 4096, rank: int = 16) -> dict:
    cfg = load_config(None, ["model.path=x", "data.train=d.jsonl", f"adapter.rank={rank}"])
    return fill_ds_config(read_ds_config(name), cfg, world, hidden, name, per_node=per_node)["zero_optimization"]


def test_auto_zero3_values_keep_adapters_whole_and_prefetch_a_layer():
    from allora_ds.zero_comm import SHAPES

    z = _filled("zero3_bf16", 16, 8)
    shape = SHAPES["llama3-8b"]
    sizes = {p: o * i for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
             for o, i in [shape.linear_shape(p)]}
    largest_adapter = 16 * max(max(shape.linear_shape(p)) for p in sizes)
    assert largest_adapter <= z["stage3_param_persistence_threshold"] < min(sizes.values()), \
        "every adapter matrix must stay whole and no base weight may"
    assert z["stage3_prefetch_bucket_size"] == shape.layer_numel() - 2 * shape.hidden  # one decoder layer
    assert z["stage3_max_live_parameters"] == 3 * z["stage3_prefetch_bucket_size"]
    assert z["stage3_max_reuse_distance"] == z["stage3_prefetch_bucket_size"]
    assert "zero_hpz_partition_size" not in z  # only the hpZ config asks for it


@pytest.mark.parametrize("world, per_node, want", [(16, 8, 8), (32, 8, 8), (8, 8, 1), (2, 1, 1)])
def test_auto_hpz_partitions_within_a_node_and_is_off_on_one_node(world, per_node, want):
    assert _filled("zero3_hpz_bf16", world, per_node)["zero_hpz_partition_size"] == want
