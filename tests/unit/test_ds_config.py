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
