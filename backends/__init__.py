"""The backends, one module per pool type, and the one registry of them."""

from __future__ import annotations

from .base import Backend, Snapshot
from .dir import DirBackend
from .disk import DiskBackend
from .fs import FsBackend

BACKENDS: dict[str, type[Backend]] = {
    "dir": DirBackend,
    "fs": FsBackend,
    "disk": DiskBackend,
}

__all__ = ["BACKENDS", "Backend", "Snapshot"]
