"""Documented dataclass fields: each carries its help text, and the config schema is made of them."""

from __future__ import annotations

from dataclasses import field
from typing import Any

REQUIRED = object()


def documented(default: Any, help: str, choices: tuple | None = None):
    """A documented field; ``REQUIRED`` marks one without default."""
    meta = {"help": help, "choices": choices}
    if default is REQUIRED:
        return field(default=None, metadata={**meta, "required": True})
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)
