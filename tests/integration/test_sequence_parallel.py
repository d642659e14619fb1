"""Sequence parallelism (train.sequence_parallel_size) against SP=1, with real processes.

The real trainer's setup and train_step run under the deepspeed launcher; the whole reduced
adapter gradient of every step (before the optimizer applies it), the loss and the eval loss are
compared with SP=1 on the same global batch: 2 ranks SP=2 and 4 ranks SP=4 vs 1 rank, and 4 ranks
DP=2 x SP=2 vs 2 ranks DP=2. Then a whole allora-train run under SP=2 with eval, checkpoints, a SIGKILL, a resume
and the export.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO, deepspeed_cmd, read_metrics, run, test_env, train_cmd, write_config

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

pytest.importorskip("deepspeed.runtime.sequence_parallel.ulysses_sp", reason="this DeepSpeed has no Ulysses for HF models")

WORKER = REPO / "tests" / "integration" / "sequence_parallel_worker.py"


@pytest.fixture(scope="module")
def prompt_heavy(tmp_path_factory):
    """Long instructions, short answers, odd and even lengths: with micro-batches of one row, the
    first half of many rows holds no label (that rank's slice has nothing to learn from), and
    many lengths are odd (SP=2 pads them)."""
    path = tmp_path_factory.mktemp("data") / "prompt_heavy.jsonl"
    words = "the river runs past the old mill where a miller once ground wheat into flour for the town".split()
    with path.open("w") as f:
        for i in range(48):
            instruction = " ".join(words[j % len(words)] for j in range(i, i + 18 + i % 7))
            f.write(json.dumps({"instruction": f"Summarise: {instruction}", "input": "", "output": words[i % len(words)]}) + "\n")
    return path


@pytest.fixture(scope="module")
def zero2_fp32(tmp_path_factory):
    ds = json.loads((REPO / "ds_configs" / "zero2_bf16.json").read_text())
    ds["bf16"] = {"enabled": "auto"}
    path = tmp_path_factory.mktemp("ds") / "zero2_fp32.json"
    path.write_text(json.dumps(ds))
    return path


CASES = {  # name: (config sections, data)
    "zero3-allora": ({}, "demo"),
    "zero3-lora": ({"adapter": {"method": "lora", "rank": 4, "alpha": 4.0}}, "demo"),
    "zero2-allora": ({"train": {"deepspeed": "ZERO2"}}, "demo"),
    "zero3-allora-prompt-heavy": ({"train": {"micro_batch_size": 1, "gradient_accumulation_steps": 4}}, "prompt_heavy"),
}


@pytest.fixture(scope="module")
def setups(tiny_model, tmp_path_factory, zero2_fp32, prompt_heavy):
    """Per case: its config, and SP=1 on one rank (the reference), run once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            d = tmp_path_factory.mktemp(name)
            sections, data = json.loads(json.dumps(CASES[name][0])), CASES[name][1]
            train = sections.setdefault("train", {})
            train.update(save_steps=0, warmup_steps=0)  # step 1 moves the adapters: step 2 sees nonzero B
            if train.get("deepspeed") == "ZERO2":
                train["deepspeed"] = str(zero2_fp32)
            if data == "prompt_heavy":
                sections["data"] = {"train": str(prompt_heavy), "eval": str(prompt_heavy)}
            config = write_config(d / "config.yaml", tiny_model, d / "run", **sections)
            cache[name] = config, _worker(config, d / "ref.safetensors", 1)
        return cache[name]

    return get


def _worker(config, out, nprocs, *overrides):
    run(deepspeed_cmd([WORKER, config, out, f"train.output_dir={out.parent / out.stem}", *overrides], nprocs=nprocs))
    return load_file(out)


def _assert_same(got: dict, ref: dict, what: str):
    grads = [k for k in ref if k.startswith("step")]
    assert grads and set(grads) == {k for k in got if k.startswith("step")}
    for k in grads:  # lora_A's first gradient is 0 (B starts at 0): compared absolutely
        rel = ((got[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-30)).item()
        assert rel < 1e-5, f"{what}: gradient {k} differs from SP=1 by {rel:.2e} (relative)"
    assert torch.allclose(got["loss"], ref["loss"], rtol=1e-6), (got["loss"], ref["loss"])
    assert got["eval"][1] == ref["eval"][1] and torch.allclose(got["eval"][0], ref["eval"][0], rtol=1e-6)
    # The metrics count each token and each attention pair once, whatever the split.
    assert got["counts"][0] == ref["counts"][0], "tokens counted differently"
    assert torch.isclose(got["counts"][1], ref["counts"][1]), "attention pairs counted differently"


@pytest.mark.parametrize("name", list(CASES))
def test_sp2_gradients_equal_one_rank(setups, tmp_path, name):
    config, ref = setups(name)
    got = _worker(config, tmp_path / "sp2.safetensors", 2, "train.sequence_parallel_size=2")
    _assert_same(got, ref, name)
    if name.endswith("prompt-heavy"):
        assert got["counts"][2] > 0, "no micro-batch had a length SP=2 does not divide"
        assert got["counts"][3] > 0, "no rank ever held a slice without labels"
        assert ref["counts"][3] == 0
    if name == "zero3-lora":  # the comparison tells the methods apart
        allora = setups("zero3-allora")[1]
        a_keys = [k for k in ref if k.startswith("step2") and "lora_A" in k]
        assert max((allora[k] - ref[k]).abs().max().item() for k in a_keys) > 1e-3 * max(
            ref[k].abs().max().item() for k in a_keys)


def test_dp2_sp2_gradients_equal_dp2(setups, tmp_path):
    """4 ranks as 2 data-parallel groups of 2 sequence-parallel ranks vs 2 data-parallel ranks."""
    config, _ = setups("zero3-allora")
    ref = _worker(config, tmp_path / "dp2.safetensors", 2)
    got = _worker(config, tmp_path / "dp2sp2.safetensors", 4, "train.sequence_parallel_size=2")
    _assert_same(got, ref, "DP=2 x SP=2")


def test_sp4_repeating_kv_heads_equals_one_rank(setups, tmp_path):
    """SP=4 over the tiny model's 2 KV heads: DeepSpeed repeats each KV head on 2 ranks, and the
    backward sums the repeats' gradients."""
    config, ref = setups("zero3-allora")
    got = _worker(config, tmp_path / "sp4.safetensors", 4, "train.sequence_parallel_size=4")
    _assert_same(got, ref, "SP=4")


@pytest.mark.parametrize("nprocs, overrides", [
    (2, ["train.sequence_parallel_size=2", "model.gradient_checkpointing=true"]),  # ZeRO-3
    (1, ["train.deepspeed=ZERO2"]),
])
def test_tiled_mlp_gradients_equal_untiled(setups, tmp_path, zero2_fp32, nprocs, overrides):
    """50 tiles of micro-batches of 4 rows: torch.chunk alone cuts most of them into fewer slices
    (e.g. 384 rows into 48), which with DeepSpeed's own tile count would leave the MLP adapters'
    gradients unreduced under ZeRO-3; the rows are padded to whole tiles (tiled_mlp.py)."""
    config, ref = setups("zero3-allora")
    overrides = [o.replace("ZERO2", str(zero2_fp32)) for o in overrides]
    got = _worker(config, tmp_path / "tiled.safetensors", nprocs, "model.mlp_tiles=50", *overrides)
    _assert_same(got, ref, f"tiled MLP {overrides}")


def test_tiled_mlp_under_zero3_on_ranks_whose_rows_differ_in_length(setups, tmp_path):
    """2 data-parallel ZeRO-3 ranks, one row of its own length per micro-batch, 50 tiles of rows of
    25-45 tokens: without the padding to whole tiles each rank ran as many slices as its row had
    tokens, so the ranks gathered the MLP weights a different number of times (gloo broke off)."""
    config, _ = setups("zero3-allora-prompt-heavy")
    ref = _worker(config, tmp_path / "dp2.safetensors", 2)
    got = _worker(config, tmp_path / "dp2-tiled.safetensors", 2, "model.mlp_tiles=50")
    _assert_same(got, ref, "tiled MLP, ZeRO-3 DP=2")


@pytest.mark.parametrize("nprocs, overrides", [
    (2, ["train.sequence_parallel_size=2"]),  # ZeRO-3
    (1, ["train.deepspeed=ZERO2", "model.mlp_tiles=3"]),
])
def test_activation_offload_gradients_equal(setups, tmp_path, zero2_fp32, nprocs, overrides):
    """model.activation_offload with DeepSpeed's engine offloading for real (the worker makes it
    treat the CPU as a device): each step, every checkpointed layer input but the newest is copied
    to a host buffer and back, and the gradients are still those of the run that keeps them."""
    config, ref = setups("zero3-allora")
    overrides = [o.replace("ZERO2", str(zero2_fp32)) for o in overrides]
    got = _worker(config, tmp_path / "offload.safetensors", nprocs, "--emulate-offload-device",
                  "model.gradient_checkpointing=true", "model.activation_offload=true", *overrides)
    _assert_same(got, ref, f"activation offload {overrides}")
    offloaded, restored, kept, skipped = got["offload"].tolist()
    micro = 2 * 2 * 2  # steps x micro-batches per step (the demo config) x the tiny model's 2 layers
    assert skipped == 0 and kept + offloaded == micro * nprocs, got["offload"]
    assert offloaded == restored == micro * nprocs / 2, "not every input but the newest went to host and back"


@pytest.mark.parametrize("layout, changes", [
    ("zero3_hpz_bf16", {"zero_hpz_partition_size": 2}),  # hpZ's secondary copy over both ranks
    ("zero3_offload_bf16", {}),  # optimizer and parameters in host memory, DeepSpeedCPUAdam
])
def test_sp2_with_offload_on_the_other_shipped_zero3_layouts(setups, tmp_path, layout, changes):
    """The shipped hpZ and CPU-offload layouts (in fp32 here, to compare at fp32 tolerance) under
    SP=2 with gradient checkpointing and activation offload: the gradients of plain ZeRO-3 on one
    rank."""
    config, ref = setups("zero3-allora")
    ds = json.loads((REPO / "ds_configs" / f"{layout}.json").read_text())
    ds["bf16"] = {"enabled": "auto"}
    ds["zero_optimization"].update(changes)
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    got = _worker(config, tmp_path / "layout.safetensors", 2, "--emulate-offload-device", f"train.deepspeed={tmp_path / 'ds.json'}",
                  "train.sequence_parallel_size=2", "model.gradient_checkpointing=true", "model.activation_offload=true")
    _assert_same(got, ref, layout)
    assert got["offload"][0] > 0, "no layer input went to host"
    assert (got["secondary"] > 0) == ("zero_hpz_partition_size" in changes), "hpZ's secondary copies"


def test_sp2_run_resumes_bitwise_and_exports(tiny_model, tmp_path):
    """allora-train under SP=2: eval, checkpoints, a SIGKILL mid-run and a resume end bitwise equal
    to the uninterrupted run; the export is the one PEFT/transformers load (tested elsewhere)."""
    common = {"train": {"save_steps": 2, "eval_steps": 4, "max_steps": 6, "sequence_parallel_size": 2},
              "export": {"adapter": True, "merged": True}}
    whole = write_config(tmp_path / "whole.yaml", tiny_model, tmp_path / "whole", **common)
    run(train_cmd(whole))
    cut = write_config(tmp_path / "cut.yaml", tiny_model, tmp_path / "cut", **common)
    first = run(train_cmd(cut), check=False, env=test_env(ALLORA_DS_FAULT="sigkill@5:1"))
    assert first.returncode != 0
    run(train_cmd(cut))
    a, b = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "cut")
    assert [r["step"] for r in b] == list(range(1, 7)) and [r["loss"] for r in a] == [r["loss"] for r in b]
    assert read_metrics(tmp_path / "whole", "eval")[-1]["eval_loss"] == read_metrics(tmp_path / "cut", "eval")[-1]["eval_loss"]
    for d in ("adapter", "merged"):
        wa = {f.name: f.read_bytes() for f in (tmp_path / "whole" / "export" / d).glob("*.safetensors")}
        wb = {f.name: f.read_bytes() for f in (tmp_path / "cut" / "export" / d).glob("*.safetensors")}
        assert wa and wa == wb, f"export/{d} differs after the resume"
