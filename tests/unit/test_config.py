"""Config parsing: YAML + overrides -> typed dataclasses, and errors that name file, line and key."""

import pytest

from allora_ds.config import load_config, schema_text
from allora_ds.errors import UserError

BASE = """\
model:
  path: some/model
adapter:
  method: allora
  rank: 8
data:
  train: data.jsonl
train:
  lr: 2e-4
  max_steps: 10
"""


def _cfg(tmp_path, text=BASE, overrides=()):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return load_config(p, list(overrides))


def test_yaml_values_are_typed_and_defaults_filled(tmp_path):
    cfg = _cfg(tmp_path)
    assert cfg.adapter.rank == 8 and cfg.adapter.eta == 2.0
    assert cfg.train.lr == 2e-4 and isinstance(cfg.train.lr, float)  # YAML reads 2e-4 as a string
    assert cfg.train.max_steps == 10 and cfg.train.scheduler == "cosine"
    assert cfg.adapter.target_modules[0] == "q_proj" and cfg.model.trust_remote_code is False


def test_overrides_win_and_are_parsed_as_yaml(tmp_path):
    cfg = _cfg(tmp_path, overrides=["adapter.rank=16", "train.lr=1e-3", "model.gradient_checkpointing=true",
                                    "adapter.target_modules=q_proj,v_proj", "data.eval=ev.jsonl"])
    assert cfg.adapter.rank == 16 and cfg.train.lr == 1e-3 and cfg.model.gradient_checkpointing is True
    assert cfg.adapter.target_modules == ["q_proj", "v_proj"] and cfg.data.eval == "ev.jsonl"


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        (BASE.replace("rank: 8", "rnak: 8"), (), r"run.yaml:5: unknown key adapter.rnak \(did you mean 'adapter.rank'\?\)"),
        (BASE, ["train.lrr=1"], r"override: unknown key train.lrr \(did you mean 'train.lr'\?\)"),
        (BASE.replace("adapter:", "adaptr:"), (), r"run.yaml:3: adaptr: unknown section \(did you mean 'adapter'\?\)"),
        (BASE.replace("rank: 8", "rank: eight"), (), r"run.yaml:5: adapter.rank: expected an integer, got 'eight'"),
        (BASE.replace("rank: 8", "rank: 0"), (), r"run.yaml:5: adapter.rank: rank must be a positive integer, got 0"),
        (BASE, ["adapter.eta=-1"], r"adapter.eta: eta must be > 0, got -1.0"),
        (BASE, ["adapter.method=dora"], r"override: adapter.method: 'dora' is not one of allora, allora_od, lora"),
        (BASE.replace("  path: some/model\n", ""), (), r"model.path: is required"),
        (BASE, ["train.max_steps=0"], r"override: train.max_steps: must be -1 \(use epochs\) or >= 1, got 0"),
        (BASE + "  micro_batch_size: 0\n", (), r"train.micro_batch_size: must be >= 1, got 0"),
        (BASE, ["lr=1"], r"override 'lr=1': expected section.key=value"),
        ("model: [1, 2\n", (), r"run.yaml:2: invalid YAML"),
        (BASE, ["train.scheduler=step"], r"'step' is not one of cosine, linear, constant"),
        (BASE, ["data.packing=true", "model.attn_implementation=paged|sdpa"],
         r"override: model.attn_implementation: 'paged\|sdpa' is not known to keep packed examples apart"),
        (BASE, ["train.collective_timeout_minutes=0"], r"train.collective_timeout_minutes: must be > 0"),
    ],
)
def test_mistakes_name_file_line_and_key(tmp_path, text, overrides, message):
    with pytest.raises(UserError, match=message):
        _cfg(tmp_path, text, overrides)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(UserError, match=r"config file .*nope.yaml: No such file"):
        load_config(tmp_path / "nope.yaml")


def test_schema_documents_every_section():
    text = schema_text()
    for key in ("model:", "  path: str = (required)", "adapter:", "  eta: float = 2.0", "train:", "  resume: str = 'auto'"):
        assert key in text
