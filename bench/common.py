"""Helpers shared by the training benchmarks (throughput.py, memory.py, gpu.py): machine
description, the environment and launcher of child processes, medians of paired ratios, tables."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from allora_ds.distributed import cpu_allreduce_buffers, free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the virtualenv's bin/: deepspeed launcher, python
RESULTS = REPO / "bench" / "results"
CACHE = REPO / "bench" / "cache"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    """What produced the numbers: CPU, cores, memory, library versions, load at the time."""
    import deepspeed
    import torch
    import transformers

    mem_gb = None
    try:
        kb = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
        mem_gb = round(kb / 2**20, 1)
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "mem_gb": mem_gb, "python": platform.python_version(), "torch": torch.__version__,
            "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
            "loadavg_1m": os.getloadavg()[0]}
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def child_env(threads: int = 1, **extra) -> dict:
    """Environment of benchmark child processes: offline, CPU DeepSpeed, ``threads`` per rank,
    the repository importable (a fresh checkout works without ``pip install -e``)."""
    env = dict(os.environ)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}".rstrip(os.pathsep),
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
        DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", PYTHONHASHSEED="0",
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


def deepspeed_cmd(nprocs: int, *script_and_args) -> list[str]:
    """The real ``deepspeed`` launcher, one node, ``nprocs`` processes."""
    return [str(BIN / "deepspeed"), "--num_gpus", str(nprocs), "--master_port", str(free_port()),
            *map(str, script_and_args)]


def remove_shm_buffers(port) -> None:
    """Delete the shared-memory files DeepSpeed's CPU backend made for the job on ``port``.

    Every rank creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank> (66 MB) at
    ``init_distributed`` and never unlinks it, so each CPU run would leave RAM behind for good.
    The allora_ds trainer releases its own (``allora_ds.distributed.release_cpu_allreduce_buffer``);
    this catches the HF baseline's and those of a job that died before it got there.
    """
    for f in cpu_allreduce_buffers(port):
        f.unlink(missing_ok=True)


def run_job(cmd: list[str], log: Path, env: dict, timeout: float, marks: Path | None = None,
            poll_s: float = 0.02) -> list[float]:
    """Run ``cmd`` with stdout+stderr to ``log``; on failure exit with the log's tail.

    With ``marks``: return, for every line the job appends to that file, the CPU seconds (user +
    system) its process tree had used when the line appeared (polled every ``poll_s``). The
    trainers write a line at each end of their timing window, so differences of these give the CPU
    time of the window, which other jobs on a shared machine hardly affect (unlike wall time).
    """
    import psutil

    log.parent.mkdir(parents=True, exist_ok=True)
    cpu_at_line: list[float] = []

    def cpu_seconds(tree) -> float:
        total = 0.0
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    t_end = time.monotonic() + timeout
    try:
        with log.open("w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
            root, size, refreshed = psutil.Process(proc.pid), -1, 0.0
            tree = [root]
            while proc.poll() is None:
                if time.monotonic() > t_end:
                    for p in reversed(tree):  # the ranks first, then the launchers
                        with contextlib.suppress(psutil.NoSuchProcess):
                            p.kill()
                    proc.wait()
                    raise SystemExit(f"timed out after {timeout:.0f} s: {' '.join(cmd)} (log: {log})")
                if time.monotonic() - refreshed > 1.0:  # the launcher starts the ranks: list them now and then
                    with contextlib.suppress(psutil.NoSuchProcess):
                        tree = [root] + root.children(recursive=True)
                    refreshed = time.monotonic()
                new_size = marks.stat().st_size if marks is not None and marks.is_file() else -1
                if new_size != size:  # cheap check first (stat); count lines only when it changed
                    size = new_size
                    n = marks.read_text().count("\n")
                    if n > len(cpu_at_line):
                        cpu_at_line += [cpu_seconds(tree)] * (n - len(cpu_at_line))
                time.sleep(poll_s)
    finally:
        if "--master_port" in cmd:  # a deepspeed_cmd
            remove_shm_buffers(cmd[cmd.index("--master_port") + 1])
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise SystemExit(f"command failed (rc={proc.returncode}): {' '.join(cmd)}\n--- {log} (tail) ---\n{tail}")
    return cpu_at_line


def median(xs) -> float:
    return statistics.median(xs)


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over repetitions of num[i]/den[i]: each repetition's pair ran back to back."""
    return statistics.median(a / b for a, b in zip(num, den))


def table(headers: list[str], rows: list[list], fmt: dict[int, str] | None = None) -> str:
    """A plain-text table, right-aligned; ``fmt`` maps a column index to a format spec."""
    fmt = fmt or {}
    cells = [[h for h in headers]] + [
        [format(v, fmt.get(i, "")) if isinstance(v, (int, float)) and v is not None else str(v) for i, v in enumerate(r)]
        for r in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def random_llama_assets(cache: Path, name: str, shape: dict, rows, dtype=None, max_positions: int | None = None
                        ) -> tuple[Path, Path]:
    """A random-weight Llama-3-architecture model of ``shape`` with the demo tokenizer (HF format) and
    a text-format train.jsonl from ``rows(corpus_lines)``, built once under ``cache/name-<shape>``
    (written to a temporary directory first, so that an interrupted build is never reused)."""
    import shutil

    key = "-".join(f"{k}{v}" for k, v in sorted(shape.items()) if k != "rank")
    d = cache / f"{name}-{key}"
    model_dir, data = d / "model", d / "train.jsonl"
    if (model_dir / "config.json").is_file() and data.is_file():
        return model_dir, data
    import torch
    from transformers import LlamaForCausalLM

    from allora_ds.tiny import ASSETS, build_tokenizer, tiny_llama_config

    tmp = d.with_name(d.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    build_tokenizer(tmp / "model")
    extra = {"max_positions": max_positions} if max_positions else {}
    config = tiny_llama_config(shape["vocab"], hidden=shape["hidden"], layers=shape["layers"], heads=shape["heads"],
                               kv_heads=shape["kv_heads"], intermediate=shape["intermediate"], **extra)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    (model.to(dtype) if dtype is not None else model).save_pretrained(tmp / "model")
    lines = (ASSETS / "corpus.txt").read_text(encoding="utf-8").splitlines()
    (tmp / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows(lines)) + "\n", encoding="utf-8")
    shutil.rmtree(d, ignore_errors=True)
    tmp.rename(d)
    return model_dir, data


def worker_parser(doc: str, quick_help: str, out: Path):
    """The command line of a benchmark that re-runs itself as its ranks' worker (``--worker-spec``)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--cache-dir", type=Path, default=CACHE)
    ap.add_argument("--out", type=Path, default=out)
    ap.add_argument("--worker-spec", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return ap
