"""The backends, one module per pool type, and the one registry of them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from vsfs.model import PoolSource

from .base import Backend, Snapshot
from .dir import DirBackend
from .disk import DiskBackend
from .fs import FsBackend
from .iscsi import IscsiBackend
from .iscsi import find_sources as find_iscsi_sources
from .iscsi_direct import IscsiDirectBackend
from .iscsi_direct import find_sources as find_iscsi_direct_sources
from .logical import LogicalBackend
from .logical import find_sources as find_logical_sources
from .netfs import NetfsBackend
from .netfs import find_sources as find_netfs_sources
from .rbd import RbdBackend

BACKENDS: dict[str, type[Backend]] = {
    "dir": DirBackend,
    "fs": FsBackend,
    "disk": DiskBackend,
    "logical": LogicalBackend,
    "netfs": NetfsBackend,
    "iscsi": IscsiBackend,
    "iscsi-direct": IscsiDirectBackend,
    "rbd": RbdBackend,
}

# virConnectFindStoragePoolSources: what pools of a type could be made here, given
# what the user said of the source (a host to ask, an initiator).
SOURCE_FINDERS: dict[str, Callable[[PoolSource], Awaitable[list[PoolSource]]]] = {
    "logical": find_logical_sources,
    "netfs": find_netfs_sources,
    "iscsi": find_iscsi_sources,
    "iscsi-direct": find_iscsi_direct_sources,
}
# The finders that cannot work without a host to ask.
SOURCES_NEED_HOST = frozenset({"netfs", "iscsi", "iscsi-direct"})

__all__ = ["BACKENDS", "SOURCES_NEED_HOST", "SOURCE_FINDERS", "Backend", "Snapshot"]
