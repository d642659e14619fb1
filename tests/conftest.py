"""Shared fixtures: the tiny model built once per session, the shared 2-rank run; markers."""

from pathlib import Path

import pytest

from tests.helpers import run, train_cmd, write_config


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny Llama-3-architecture model + tokenizer in HF format, briefly pretrained (offline, ~10 s)."""
    from allora_ds.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "model", pretrain_steps=120)


@pytest.fixture(scope="session")
def trained(tiny_model, tmp_path_factory):
    """One real 2-rank ZeRO-3 run of 8 steps (checkpoints at 4 and 8, export at the end), shared by
    the trainer, export and reliability tests. Returns (run_dir, config_path, completed_process)."""
    d = tmp_path_factory.mktemp("e2e")
    cfg = write_config(d / "cfg.yaml", tiny_model, d / "run", export={"merged": True, "adapter": True})
    proc = run(train_cmd(cfg))
    return d / "run", cfg, proc


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """The demo's sentencepiece tokenizer alone (Llama-3 special tokens and chat template)."""
    from allora_ds.tiny import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def llama3_dir() -> Path:
    """A tiny Llama-3.1 model directory around Meta's real tokenizer (tests/llama3.py), cached between runs."""
    from tests.llama3 import llama3_model_dir, missing_requirement

    why = missing_requirement()
    if why:
        pytest.skip(why)
    return llama3_model_dir()


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (make gpu-check)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
