"""Process-group plumbing: join the launcher's world, release DeepSpeed's CPU buffers, sum over
ranks, one rank first (with a wait of its own), stop signals, leave the group."""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import socket
import threading
from pathlib import Path

import torch
import torch.distributed as dist


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now (a rendezvous on this machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_allreduce_buffers(port) -> list[Path]:
    """DeepSpeed's CPU all-reduce buffers in /dev/shm of this user's job on ``port``.

    Every rank creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank> (66 MB) at
    ``init_distributed`` and never unlinks it (see ``release_cpu_allreduce_buffer``).
    """
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))


def init_distributed(timeout_minutes: float = 30.0) -> tuple[int, int, int]:
    """Join the process group the launcher (deepspeed, torchrun, srun) describes, or form one of 1.

    ``timeout_minutes``: how long a rank may wait in one collective before NCCL's watchdog (or gloo)
    aborts the job.
    """
    import deepspeed

    if "RANK" not in os.environ:  # plain `python -m allora_ds.train`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    deepspeed.init_distributed(dist_init_required=True, timeout=datetime.timedelta(minutes=timeout_minutes))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    release_cpu_allreduce_buffer()
    return dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])


def release_cpu_allreduce_buffer() -> None:
    """Unlink this rank's /dev/shm buffer of DeepSpeed's CPU all-reduce once every rank mapped it.

    DeepSpeed's CPU backend creates one 66 MB shared-memory file per rank at init and never
    deletes it, so every CPU run would leave host memory behind until reboot. Each rank maps all
    its peers' files inside ``init_distributed``; after a barrier the names can go, and the
    mappings stay valid until the processes exit.
    """
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    dist.barrier()  # on every rank alike, whether or not its file exists
    name = "_".join(["deepspeed_allreduce_buffer", str(os.getuid()), os.environ.get("MASTER_ADDR", ""),
                     os.environ.get("MASTER_PORT", ""), str(dist.get_rank())])
    Path("/dev/shm", name).unlink(missing_ok=True)


def wait_group(timeout_minutes: float):
    """A gloo group of every rank whose collectives may wait ``timeout_minutes``: for waits on work
    one rank does alone (tokenizing a dataset), which the default group's timeout (and NCCL's
    watchdog) would abort. Called by every rank."""
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=timeout_minutes))


@contextlib.contextmanager
def first_then_others(first: bool, group):
    """Ranks with ``first`` run the body, then the others do; the wait is a barrier of ``group``."""
    if not first:
        dist.barrier(group=group)
    yield
    if first:
        dist.barrier(group=group)


def all_see(directory: Path, group) -> bool:
    """Whether every rank sees a file that rank 0 creates in ``directory``: a filesystem all ranks share.

    A node that cannot see it yet (NFS caching) counts as not sharing: the safe answer."""
    import uuid

    name = [f".allora_ds-probe-{uuid.uuid4().hex}"]
    dist.broadcast_object_list(name, src=0, group=group)
    probe = Path(directory) / name[0]
    if dist.get_rank() == 0:
        try:
            probe.parent.mkdir(parents=True, exist_ok=True)
            probe.touch()
        except OSError:
            pass
    dist.barrier(group=group)
    seen = torch.tensor([float(probe.exists())])
    dist.all_reduce(seen, op=dist.ReduceOp.MIN, group=group)
    dist.barrier(group=group)  # every rank has looked
    if dist.get_rank() == 0:
        probe.unlink(missing_ok=True)
    return bool(seen.item())


def all_reduce_sum(values: list, device) -> list[float]:
    """Sum a few numbers (floats or 0-d tensors) over ranks: one collective, one host sync."""
    stacked = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    dist.all_reduce(stacked)
    return stacked.tolist()


def install_stop_handlers() -> threading.Event:
    """SIGTERM/SIGUSR1 (what Slurm sends before preemption or the time limit) ask for a clean stop.

    The handler only sets a flag; ranks act on it together after the next step's all-reduce, so a
    signal that reaches one rank mid-step cannot make the ranks diverge. Installed before setup:
    a signal that arrives while the model loads stops the run after its first step.
    """
    flag = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: flag.set())
    return flag


def leave_process_group() -> None:
    if dist.is_initialized():
        # All ranks past their last collective before any tears its connections down: a gloo peer
        # that still has an operation in flight when the other side closes can abort at exit.
        dist.barrier()
        dist.destroy_process_group()
