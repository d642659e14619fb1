"""Export: merged HF model and PEFT adapter compute the trained model's function."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import BIN, REPO, deepspeed_cmd, run

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]  # the trainer or its ranks run in child processes

WORKER = REPO / "tests" / "integration" / "logits_worker.py"


def export(*args, check=True):
    return run([BIN / "python", "-m", "allora_ds.export", *map(str, args)], check=check)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    run_dir, cfg, _ = trained
    ckpt = run_dir / "checkpoints" / "step-00000008"
    d = tmp_path_factory.mktemp("export")
    run(deepspeed_cmd([WORKER, cfg, ckpt, d / "trainer_logits.safetensors"]))
    return ckpt, d, load_file(d / "trainer_logits.safetensors")


def _logits(model, inputs):
    with torch.no_grad():
        return model(input_ids=inputs, use_cache=False).logits.float()


def test_merged_and_peft_exports_match_the_trained_model(exported, trained, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ckpt, d, ref = exported
    out = trained[0] / "export"  # written by the trainer at the end of the run (export.merged/adapter)
    inputs = ref["inputs"]
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    base_logits = _logits(base, inputs)
    peft = PeftModel.from_pretrained(base, out / "adapter").eval()
    for name, got in (("merged", _logits(merged, inputs)), ("base+PEFT", _logits(peft, inputs))):
        err = (got - ref["logits"]).abs().max().item()
        assert err <= 1e-4, f"{name} logits differ from the trainer's by {err:.2e}"
    assert (base_logits - ref["logits"]).abs().max() > 1e-2, "the adapters changed nothing: the test proves little"
    unloaded = peft.merge_and_unload().state_dict()
    for k, v in merged.state_dict().items():
        assert torch.allclose(unloaded[k], v, atol=1e-6), f"merge_and_unload differs from our merge at {k}"
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["lora_alpha"] == cfg["r"] == 4 and cfg["lora_dropout"] == 0.0


def test_deepspeed_partitions_consolidate_to_the_snapshot(exported, tmp_path):
    ckpt = exported[0]
    export("--checkpoint", ckpt, "--output", tmp_path / "snap", "--adapter")
    export("--checkpoint", ckpt, "--output", tmp_path / "ds", "--adapter", "--from-deepspeed")
    a = load_file(tmp_path / "snap" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ds" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_base_exports_shard_by_shard(exported, trained, tmp_path):
    from transformers import AutoModelForCausalLM

    from allora_ds.tiny import build_tiny

    ckpt, _, _ = exported
    sharded = tmp_path / "sharded-base"
    build_tiny(sharded, pretrain_steps=0, max_shard_size="200KB")
    # Same architecture, different weights: the reference is the single-file merge of *this* base.
    single = tmp_path / "single-base"
    AutoModelForCausalLM.from_pretrained(sharded).save_pretrained(single)
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) >= 3
    export("--checkpoint", ckpt, "--output", tmp_path / "m1", "--merged", "--base", sharded)
    export("--checkpoint", ckpt, "--output", tmp_path / "m2", "--merged", "--base", single)
    assert sorted(p.name for p in (tmp_path / "m1").glob("model-*.safetensors")) == shards
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "m1").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "m2").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_merged_export_dtype_is_converted(exported, tmp_path):
    from transformers import AutoModelForCausalLM

    export("--checkpoint", exported[0], "--output", tmp_path / "bf16", "--merged", "--dtype", "bfloat16")
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert next(m.parameters()).dtype == torch.bfloat16


def test_float32_export_of_a_bf16_base_is_rounded_once(exported, tiny_model, tmp_path):
    """The merge of a bf16 base exported as float32 is the fp32 sum W + sB A, not that sum rounded
    to bf16 first (the adapters' update is mostly below bf16's resolution of W)."""
    from transformers import AutoModelForCausalLM

    from allora_ds.export import adapter_pairs

    ckpt = exported[0]
    bf16_base = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).save_pretrained(bf16_base)
    export("--checkpoint", ckpt, "--output", tmp_path / "fp32", "--merged", "--base", bf16_base, "--dtype", "float32")
    base = load_file(bf16_base / "model.safetensors")
    merged = load_file(tmp_path / "fp32" / "model.safetensors")
    scale = json.loads((ckpt / "trainer_state.json").read_text())["adapter"]["scale"]
    pairs = adapter_pairs(ckpt)
    assert pairs
    for name, (A, B) in pairs.items():
        key = f"{name}.weight"
        want = base[key].float() + scale * (B.float() @ A.float())
        assert merged[key].dtype == torch.float32
        assert torch.equal(merged[key], want), f"{key}: not the fp32 merge"
    key = f"{next(iter(pairs))}.weight"
    assert not torch.equal(merged[key], merged[key].bfloat16().float()), "the merge was rounded to bf16"
    unadapted = next(k for k in base if k.endswith("norm.weight"))
    assert torch.equal(merged[unadapted], base[unadapted].float())


def test_export_refuses_bad_outputs_and_bases(exported, tmp_path, tiny_model):
    from allora_ds.tiny import build_tiny

    ckpt = exported[0]
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    other = build_tiny(tmp_path / "wider", hidden=96, pretrain_steps=0)
    cases = [
        (["--output", taken, "--merged"], r"--output: .*taken exists and is not empty \(pass --overwrite"),
        (["--output", tmp_path / "o1", "--merged", "--base", tmp_path / "none"], r"--base: .*none does not exist"),
        (["--output", tmp_path / "o2", "--merged", "--base", other], r"adapter model.layers.0.mlp.down_proj is 64x224 but base weight .* is \(96, 336\)"),
    ]
    for args, message in cases:
        proc = export("--checkpoint", ckpt, *args, check=False)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert re.search(message, last), last
    assert (taken / "keep.txt").read_text() == "mine" and sorted(p.name for p in taken.iterdir()) == ["keep.txt"]
    assert not (tmp_path / "o2").exists() and not list(tmp_path.glob(".o2.tmp-*")), "partial export left behind"
    export("--checkpoint", ckpt, "--output", taken, "--adapter", "--overwrite")
    assert (taken / "adapter_model.safetensors").is_file() and not (taken / "keep.txt").exists()


def test_merged_export_streams_one_shard_at_a_time(tmp_path):
    """Peak RSS of a merged export stays far below the model size (it would exceed it if loaded whole)."""
    probe = [BIN / "python", REPO / "bench" / "export_memory.py", "--out", tmp_path, "--json", tmp_path / "mem.json",
             "--hidden", "512", "--layers", "8", "--shard-mb", "20"]
    run(probe, timeout=900)
    r = json.loads((tmp_path / "mem.json").read_text())
    assert r["model_mb"] > 150 and r["n_shards"] >= 6
    # Loading whole would need at least the model's size; streaming needs about one shard (+ its merged copy).
    assert r["export_peak_rss_delta_mb"] < min(0.5 * r["model_mb"], 2 * r["largest_shard_mb"] + 32), r
