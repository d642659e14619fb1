"""Process-group plumbing: joining the launcher's world, DeepSpeed's CPU all-reduce buffers."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now (a rendezvous on this machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_allreduce_buffers(port) -> list[Path]:
    """DeepSpeed's CPU all-reduce buffers in /dev/shm of this user's job on ``port``.

    Every rank creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank> (66 MB) at
    ``init_distributed`` and never unlinks it (see ``allora_ds.train.release_cpu_allreduce_buffer``).
    """
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))
