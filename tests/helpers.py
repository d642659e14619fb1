"""Helpers shared by the tests: child-process environment, launchers, configs, metrics."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from allora_ds.distributed import cpu_allreduce_buffers, free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_env(**extra) -> dict:
    """Environment for child processes: deterministic, offline, CPU, one thread per rank."""
    env = dict(os.environ)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONHASHSEED="0",
        DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="",
        # Where DeepSpeed's CPU ops are already built; named explicitly because the sbatch scripts
        # would otherwise point jobs at a node-local directory and build them again there.
        TORCH_EXTENSIONS_DIR=env.get("TORCH_EXTENSIONS_DIR") or default_extensions_dir(),
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


def default_extensions_dir() -> str:
    """torch's own choice when TORCH_EXTENSIONS_DIR is unset: BUILD_ROOT/pyXY_cpu."""
    from torch.utils.cpp_extension import get_default_build_root

    return os.path.join(get_default_build_root(), f"py{sys.version_info.major}{sys.version_info.minor}_cpu")


test_env.__test__ = False  # a helper, not a test


def run(cmd, timeout=600, check=True, env=None, cwd=None) -> subprocess.CompletedProcess:
    """Run a command, fail the test with the tail of its output if it fails."""
    cmd = [str(c) for c in cmd]
    port = cmd[cmd.index("--master_port") + 1] if "--master_port" in cmd else None  # a deepspeed_cmd
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or test_env(),
                              cwd=cwd or REPO)
    finally:
        left = cpu_allreduce_buffers(port) if port else []
        for f in left:  # ranks killed before the end of init leave theirs; the trainer releases its own
            f.unlink(missing_ok=True)
    if port and proc.returncode == 0:
        assert not left, f"the job left DeepSpeed's CPU all-reduce buffers in /dev/shm: {left}"
    if check and proc.returncode != 0:
        out = (proc.stdout + "\n" + proc.stderr)[-6000:]
        pytest.fail(f"command failed (rc={proc.returncode}): {' '.join(map(str, cmd))}\n{out}")
    return proc


def deepspeed_cmd(script_and_args, nprocs=2):
    """The real ``deepspeed`` launcher, single node, ``nprocs`` CPU processes."""
    return [BIN / "deepspeed", "--num_gpus", nprocs, "--master_port", free_port(), *script_and_args]


ASSETS = REPO / "allora_ds" / "assets"


def write_config(path: Path, model_dir: Path, out_dir: Path, **sections) -> Path:
    """A small training config for the tiny model and the shipped demo data; ``sections`` override."""
    import yaml

    cfg = {
        "model": {"path": str(model_dir), "dtype": "float32"},
        "adapter": {"method": "allora", "rank": 4, "eta": 2.0},
        "data": {"train": str(ASSETS / "demo_train.jsonl"), "eval": str(ASSETS / "demo_eval.jsonl"),
                 "format": "alpaca", "max_seq_len": 96},
        "train": {"output_dir": str(out_dir), "deepspeed": str(REPO / "ds_configs" / "zero3_cpu.json"),
                  "micro_batch_size": 4, "gradient_accumulation_steps": 2, "lr": 5e-3, "max_steps": 8,
                  "warmup_steps": 2, "log_steps": 1, "save_steps": 4, "keep_last": 3, "seed": 3},
    }
    for sec, body in sections.items():
        cfg.setdefault(sec, {}).update(body)
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_cmd(config: Path, *overrides, nprocs=2):
    """``allora-train`` under the deepspeed launcher (nprocs > 0) or as one plain process (nprocs=0)."""
    if nprocs == 0:
        return [BIN / "python", "-m", "allora_ds.train", config, *overrides]
    return deepspeed_cmd(["--module", "allora_ds.train", config, *overrides], nprocs)


def read_metrics(run_dir: Path, kind="train") -> list[dict]:
    import json

    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]
