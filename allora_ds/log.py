"""The one logger of allora_ds: ``[allora_ds] message`` lines on stdout, from rank 0 only.

    from allora_ds import log
    log.info("resumed from ...")                     # rank 0 of the process group (else $RANK)
    log.info("...", every_rank=True)                 # a caller that already chose who prints
    log.info("...", above_bar=True)                  # above a live tqdm progress bar

It is the standard ``logging`` logger named ``allora_ds`` (``logging.getLogger("allora_ds")``
silences or redirects it); errors a CLI reports go to stderr through ``errors.cli`` instead.
"""

from __future__ import annotations

import logging
import os
import sys

PREFIX = "[allora_ds]"


def rank() -> int:
    """This process's rank: the process group's once initialized, else the launcher's $RANK."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


class _Stdout(logging.Handler):
    """Writes to the ``sys.stdout`` of the moment (pytest and tqdm replace it) and flushes."""

    def emit(self, record: logging.LogRecord) -> None:
        text = self.format(record)
        if getattr(record, "above_bar", False):
            from tqdm import tqdm

            tqdm.write(text)
            sys.stdout.flush()
        else:
            # After a progress bar the cursor is at the end of its line: start a line of our own.
            print(("\n" if getattr(record, "after_bar", False) else "") + text, flush=True)


class _RankZero(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "every_rank", False) or rank() == 0


logger = logging.getLogger("allora_ds")
logger.setLevel(logging.INFO)
logger.propagate = False
_handler = _Stdout()
_handler.setFormatter(logging.Formatter(f"{PREFIX} %(message)s"))
_handler.addFilter(_RankZero())
logger.addHandler(_handler)


def info(msg: str, every_rank: bool = False, above_bar: bool = False, after_bar: bool = False) -> None:
    """Log ``msg`` on rank 0 (every rank with ``every_rank``); see the module docstring."""
    logger.info(msg, extra={"every_rank": every_rank, "above_bar": above_bar, "after_bar": after_bar})
