"""The backends, one module per pool type, and the one registry of them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

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

# The one registry of pool types: a new type is its module and one line here.
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



@dataclass(frozen=True)
class SourceFinder:
    """virConnectFindStoragePoolSources for one pool type: what pools of the type could
    be made here, given what the user said of the source (a host to ask, an initiator);
    ``sources/TYPE`` in the mount."""

    find: Callable[[PoolSource], Awaitable[list[PoolSource]]]
    # It cannot work without a host to ask: ``sources/TYPE`` is written to first.
    needs_host: bool
    # What ``cat sources/TYPE`` shows, for the mount's README (vsfs.tree.FILES).
    about: str


SOURCE_FINDERS: dict[str, SourceFinder] = {
    "logical": SourceFinder(find_logical_sources, False,
                            "<sources> XML: the volume groups here and their devices"),
    "netfs": SourceFinder(find_netfs_sources, True,
                          "the NFS exports of the host written into it (HOST)"),
    "iscsi": SourceFinder(find_iscsi_sources, True,
                          "the targets of the portal written into it (HOST[:PORT])"),
    "iscsi-direct": SourceFinder(find_iscsi_direct_sources, True,
                                 "the same without a kernel initiator: write a <source> "
                                 "with host and initiator"),
}

__all__ = ["BACKENDS", "SOURCE_FINDERS", "Backend", "Snapshot", "SourceFinder"]
