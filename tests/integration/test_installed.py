"""`pip install .` (not editable) and a 2-rank run of the installed `allora-train` outside the checkout.

The new virtualenv sees the project venv's third-party packages through a .pth line (so nothing
is downloaded) but not the checkout: that directory's editable-install hook is a .pth file of its
own, which Python processes only in a site directory, never in one that a .pth line adds.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.helpers import ASSETS, BIN, REPO, free_port, read_metrics, run, test_env

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]  # the trainer or its ranks run in child processes


def _source_copy(dest: Path) -> Path:
    """The files a clone of the repository has (tracked and new, not ignored), copied to ``dest``."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, names):
        src = REPO / name
        if src.is_file():  # a file deleted but not yet committed is still listed
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def _outside_env(venv: Path, **extra) -> dict:
    # The project venv's bin/ stays next on PATH for its ninja: DeepSpeed's op cache, built with
    # that ninja, would be rebuilt by another one (their build logs differ).
    env = test_env(PATH=os.pathsep.join([str(venv / "bin"), str(BIN), os.environ.get("PATH", "")]), **extra)
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv holding a non-editable install of the project; returns its directory."""
    tmp = tmp_path_factory.mktemp("installed")
    src = _source_copy(tmp / "src")
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    site = next((venv / "lib").glob("python3*/site-packages"))
    deps = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    (site / "project_deps.pth").write_text("".join(f"{d}\n" for d in sorted(deps)))
    # --ignore-installed: the project venv's own (editable) allora-ds is visible and must stay untouched.
    run([venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--no-build-isolation",
         "--ignore-installed", "."], cwd=src, env=_outside_env(venv))
    return venv


def test_installed_package_ships_the_deepspeed_configs(installed, tmp_path):
    code = ("import allora_ds, allora_ds.ds_config as d; "
            "print(allora_ds.__file__); print(d.resolve_ds_config('zero3_bf16')); print(' '.join(d.shipped_names()))")
    proc = run([installed / "bin" / "python", "-c", code], cwd=tmp_path, env=_outside_env(installed))
    pkg, resolved, names = proc.stdout.splitlines()
    assert Path(pkg).is_relative_to(installed), f"allora_ds imported from {pkg}, not from the installed venv"
    assert Path(resolved) == Path(pkg).parent / "ds_configs" / "zero3_bf16.json"
    assert names.split() == sorted(p.stem for p in (REPO / "ds_configs").glob("*.json"))
    for shipped in (Path(pkg).parent / "ds_configs").glob("*.json"):
        assert shipped.read_bytes() == (REPO / "ds_configs" / shipped.name).read_bytes()


def test_installed_cli_trains_with_the_default_deepspeed_config_outside_the_checkout(installed, tiny_model, tmp_path):
    """A new user's first run: the default train.deepspeed (zero3_bf16) from a directory of their own."""
    import yaml

    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(ASSETS / "demo_train.jsonl", work / "train.jsonl")
    (work / "run.yaml").write_text(yaml.safe_dump({
        "model": {"path": str(tiny_model), "dtype": "bfloat16"},
        "adapter": {"rank": 4},
        "data": {"train": "train.jsonl", "max_seq_len": 64},
        "train": {"output_dir": "out", "micro_batch_size": 2, "max_steps": 2, "log_steps": 1},
    }))
    cmd = [installed / "bin" / "python", "-m", "deepspeed.launcher.runner", "--num_gpus", 2,
           "--master_port", free_port(), installed / "bin" / "allora-train", "run.yaml"]
    run(cmd, cwd=work, env=_outside_env(installed))
    ds = json.loads((work / "out" / "ds_config.json").read_text())
    shipped = json.loads((REPO / "ds_configs" / "zero3_bf16.json").read_text())
    assert ds["zero_optimization"]["stage"] == shipped["zero_optimization"]["stage"] == 3
    assert ds["bf16"] == {"enabled": True} and ds["train_batch_size"] == 2 * 2
    assert [r["step"] for r in read_metrics(work / "out")] == [1, 2]
    assert (work / "out" / "checkpoints" / "latest").is_file()
