"""The backends, one module per pool type, and the one registry of them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from vsfs.model import PoolSource

from .base import Backend, Snapshot
from .dir import DirBackend
from .disk import DiskBackend
from .fs import FsBackend
from .logical import LogicalBackend
from .logical import find_sources as find_logical_sources
from .netfs import NetfsBackend

BACKENDS: dict[str, type[Backend]] = {
    "dir": DirBackend,
    "fs": FsBackend,
    "disk": DiskBackend,
    "logical": LogicalBackend,
    "netfs": NetfsBackend,
}

# virConnectFindStoragePoolSources: what pools of a type could be made here.
SOURCE_FINDERS: dict[str, Callable[[], Awaitable[list[PoolSource]]]] = {
    "logical": find_logical_sources,
}

__all__ = ["BACKENDS", "SOURCE_FINDERS", "Backend", "Snapshot"]
