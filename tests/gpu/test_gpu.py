"""On a CUDA GPU (`make gpu-check`; skipped elsewhere): the trainer under the deepspeed launcher,
ZeRO-3 in bf16, packing per attention backend, and the export round trip.

Child processes see the real GPU: no DS_ACCELERATOR=cpu here, unlike tests/conftest.py's test_env.
"""

import importlib.util
import json
import math
import os
import sys

import pytest
import torch

from tests.helpers import REPO, free_port, read_metrics, run, write_config
from tests.unit.test_data import _per_token_loss

pytestmark = pytest.mark.gpu

HAS_FLASH = importlib.util.find_spec("flash_attn") is not None
ATTENTION = ["sdpa", pytest.param("flash_attention_2", marks=pytest.mark.skipif(not HAS_FLASH, reason="no flash-attn"))]


def gpu_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR",)}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}")
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture(scope="module", params=ATTENTION)
def gpu_run(request, tiny_model, tmp_path_factory):
    """12 steps of the real CLI on one GPU: deepspeed launcher, shipped zero3_bf16 config, bf16,
    packed data, accumulation 2, export of both forms. TORCH_EXTENSIONS_DIR is a fresh directory:
    nothing may be JIT-built into it."""
    d = tmp_path_factory.mktemp(f"gpu-{request.param}")
    cfg = write_config(d / "cfg.yaml", tiny_model, d / "run",
                       model={"dtype": "bfloat16", "attn_implementation": request.param},
                       data={"packing": True, "max_seq_len": 256},
                       train={"deepspeed": "zero3_bf16", "max_steps": 12, "save_steps": 0, "log_steps": 2},
                       export={"merged": True, "adapter": True, "dtype": "float32"})
    ext = d / "torch_extensions"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", 1, "--master_port", free_port(),
           "--module", "allora_ds.train", cfg]
    proc = run(cmd, env=gpu_env(TORCH_EXTENSIONS_DIR=ext), timeout=600)
    return d / "run", ext, proc


def test_zero3_bf16_run_trains_with_fp32_reduction_and_nothing_to_compile(gpu_run):
    run_dir, ext, _ = gpu_run
    rows = read_metrics(run_dir)
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"], [r["loss"] for r in rows]
    assert all(r.get("mfu", 0) > 0 for r in rows), "MFU is reported on a GPU of known peak"
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["communication_data_type"] == "fp32" and ds["data_types"]["grad_accum_dtype"] == "fp32"
    assert ds["optimizer"]["params"]["torch_adam"] is True and ds["bf16"]["enabled"] is True
    built = [p.name for p in ext.glob("**/*") if p.is_dir()] if ext.exists() else []
    assert not built, f"ops were JIT-compiled during the run: {built}"


def test_export_round_trip_on_cuda(gpu_run, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir, _, _ = gpu_run
    ids = torch.tensor([[1, 40, 41, 42, 43, 50, 51]], device="cuda")
    kw = dict(dtype=torch.float32, attn_implementation="sdpa")
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "export" / "merged", **kw).cuda().eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model, **kw).cuda()
    peft = PeftModel.from_pretrained(base, run_dir / "export" / "adapter").eval()
    with torch.no_grad():
        a, b = merged(input_ids=ids).logits, peft(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model, **kw).cuda().eval()(input_ids=ids).logits
    assert (a - b).abs().max() < 1e-3, f"merged vs base+PEFT: {(a - b).abs().max():.2e}"
    assert (a - plain).abs().max() > 1e-3, "the adapters changed nothing: the round trip proves little"


@pytest.mark.parametrize("attn", ["eager", "sdpa", pytest.param(
    "flash_attention_2", marks=pytest.mark.skipif(not HAS_FLASH, reason="no flash-attn"))])
def test_packed_micro_batch_scores_every_example_as_if_alone_on_cuda(tiny_model, attn):
    """The collator's layouts on CUDA: flattened (what flash attention gets) and, for sdpa/eager,
    one packed row per sequence. Under flash attention the multi-row layout is the known fault
    (examples attend to each other), which the assertion at the end shows."""
    from transformers import AutoModelForCausalLM

    from allora_ds.data import IGNORE, collate

    dtype = torch.bfloat16 if attn.startswith("flash") else torch.float32
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=dtype, attn_implementation=attn).cuda().eval()
    examples = [[1, 40, 41, 42, 43], [1, 50, 51, 52], [1, 60, 61], [1, 70, 71, 72, 73, 74]]
    rows = [{"input_ids": e, "labels": [IGNORE] + e[1:]} for e in examples]
    packed = [{"input_ids": a["input_ids"] + b["input_ids"], "labels": a["labels"] + b["labels"],
               "position_ids": list(range(len(a["input_ids"]))) + list(range(len(b["input_ids"])))}
              for a, b in (rows[:2], rows[2:])]

    def loss(batch):
        return _per_token_loss(model, {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()})

    with torch.no_grad():
        alone = torch.cat([loss(collate([r], pad_id=0)) for r in rows])
        layouts = {"flattened": collate(packed, pad_id=0, flatten=True)}
        if not attn.startswith("flash"):
            layouts["one row per packed sequence"] = collate(packed, pad_id=0)
        for name, batch in layouts.items():
            err = (loss(batch) - alone).abs().max().item()
            assert err < tol, f"{attn}, {name}: {err:.2e} from the examples alone"
        if attn.startswith("flash"):
            err = (loss(collate(packed, pad_id=0)) - alone).abs().max().item()
            assert err > tol, f"flash attention with 2 packed rows matched the examples alone ({err:.2e})"


def _launch_one_gpu(cfg, tmp_path, script, *args, **env):
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", 1, "--master_port", free_port(), *script,
           cfg, *args]
    return run(cmd, env=gpu_env(TORCH_EXTENSIONS_DIR=tmp_path / "torch_extensions", **env), timeout=600)


def test_zero2_bf16_applies_the_step_after_a_skipped_one_on_cuda(tiny_model, tmp_path):
    """The 8B default layout (ZeRO-2, bf16, fp32 gradient accumulation) with step 3 non-finite and
    train.nonfinite=skip: DeepSpeed must not skip step 4 as an overflow (docs/gpu.md, fault 1)."""
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model, tmp_path / "run", model={"dtype": "bfloat16"},
                       train={"deepspeed": "zero2_bf16", "max_steps": 6, "save_steps": 0, "nonfinite": "skip"},
                       export={"merged": False, "adapter": False})
    proc = _launch_one_gpu(cfg, tmp_path, ["--module", "allora_ds.train"], ALLORA_DS_FAULT="nonfinite_loss@3")
    assert "OVERFLOW" not in proc.stdout + proc.stderr
    rows = {r["step"]: r for r in read_metrics(tmp_path / "run")}
    assert rows[3]["loss"] is None and rows[3]["lr"] == rows[2]["lr"]
    assert rows[4]["grad_norm"] is not None and math.isfinite(rows[4]["grad_norm"]) and rows[4]["lr"] != rows[3]["lr"]


@pytest.mark.parametrize("layout", ["zero3_bf16", "zero2_bf16"])
def test_host_syncs_per_step_on_cuda(tiny_model, tmp_path, layout):
    """What tests/integration/test_gpu_path.py counts on CPU ranks, counted on CUDA itself."""
    gas = 4
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model, tmp_path / "run", model={"dtype": "bfloat16"},
                       train={"deepspeed": layout, "gradient_accumulation_steps": gas, "micro_batch_size": 2})
    _launch_one_gpu(cfg, tmp_path, [REPO / "tests" / "integration" / "trainer_probe_worker.py"], tmp_path / "probe")
    syncs = {k: n for k, n in json.loads((tmp_path / "probe" / "rank-0.json").read_text())["per_step"].items() if n}
    print(f"{layout}: host syncs per step of {gas} micro-batches: {syncs}")
    assert {k: n for k, n in syncs.items() if k.startswith("ours.")} == {"ours.all_reduce": 1, "ours.tolist": 1}, syncs
    assert sum(n for k, n in syncs.items() if k.startswith("transformers.")) <= 2 * gas, syncs
