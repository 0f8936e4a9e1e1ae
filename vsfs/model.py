"""Pools and volumes as plain data, the way libvirt's storage model has them.

Definitions (what a user asked for) are frozen; runtime facts (sizes, state)
live in separate objects that a backend's refresh produces.
"""

from __future__ import annotations

import enum
import posixpath
from collections.abc import (
    Callable,
    ItemsView,
    Iterable,
    Iterator,
    KeysView,
    MutableMapping,
    ValuesView,
)
from dataclasses import dataclass, field
from typing import TypeVar, overload

from .errors import Invalid, NoSpace

_T = TypeVar("_T")

NAME_MAX = 255


def check_name(name: str, what: str = "name") -> str:
    """Refuse names that cannot be a single path component we own."""
    if not name:
        raise Invalid(f"empty {what}")
    if "/" in name:
        raise Invalid(f"{what} {name!r} contains '/'")
    if "\0" in name:
        raise Invalid(f"{what} {name!r} contains a NUL byte")
    if name.startswith("."):
        raise Invalid(f"{what} {name!r} starts with '.'")
    if len(name.encode("utf-8", "surrogateescape")) > NAME_MAX:
        raise Invalid(f"{what} is longer than {NAME_MAX} bytes")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in name):
        raise Invalid(f"{what} {name!r} contains a control character")
    try:
        name.encode("utf-8")  # undecodable bytes come as surrogates (os.fsdecode)
    except UnicodeEncodeError:
        raise Invalid(f"{what} {name!r} is not UTF-8 (libvirt's XML could not carry it)") \
            from None
    return name


def volume_name_ok(name: str) -> bool:
    """Whether a file found in a pool can be a volume under its own name."""
    try:
        check_name(name)
    except Invalid:
        return False
    return True


# Names a pool cannot have: they are files of pools/.
RESERVED_POOL_NAMES = frozenset({"define"})


def check_pool_name(name: str) -> str:
    """A pool's name is also its state file's, NAME.xml, in the state directory."""
    check_name(name, "pool name")
    if name in RESERVED_POOL_NAMES:
        raise Invalid(f"pool name {name!r} is reserved (pools/{name} is a file of vsfs)")
    if len(name.encode("utf-8", "surrogateescape")) > NAME_MAX - len(".xml"):
        raise Invalid(f"pool name is longer than {NAME_MAX - len('.xml')} bytes "
                      "(its state file is NAME.xml)")
    return name


class PoolState(enum.Enum):
    INACTIVE = "inactive"
    BUILDING = "building"
    RUNNING = "running"
    DEGRADED = "degraded"
    INACCESSIBLE = "inaccessible"


@dataclass(frozen=True)
class Permissions:
    """``<permissions>``: None means "not given" (libvirt's -1)."""

    mode: int | None = None
    owner: int | None = None
    group: int | None = None
    label: str | None = None


@dataclass(frozen=True)
class SourceHost:
    name: str
    port: int | None = None


@dataclass(frozen=True)
class SourceDevice:
    path: str
    part_separator: bool | None = None


@dataclass(frozen=True)
class SourceAuth:
    type: str
    username: str
    secret_uuid: str | None = None
    secret_usage: str | None = None


@dataclass(frozen=True)
class PoolSource:
    hosts: tuple[SourceHost, ...] = ()
    devices: tuple[SourceDevice, ...] = ()
    dir: str | None = None
    name: str | None = None
    format: str | None = None
    vendor: str | None = None
    product: str | None = None
    initiator_iqn: str | None = None
    auth: SourceAuth | None = None
    protocol_ver: str | None = None


@dataclass(frozen=True)
class PoolDef:
    """A pool definition, as parsed from ``<pool>`` XML."""

    type: str
    name: str
    uuid: str
    source: PoolSource = field(default_factory=PoolSource)
    target_path: str | None = None
    target_perms: Permissions = field(default_factory=Permissions)
    cow: bool | None = None
    # Namespaced extras libvirt keeps (fs:mount_opts, rbd:config_opts).
    mount_opts: tuple[str, ...] = ()
    config_opts: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class PoolStatus:
    capacity: int = 0
    allocation: int = 0
    available: int = 0
    # Free extents (start, end inclusive) of a partitioned disk, in bytes.
    extents: tuple[tuple[int, int], ...] = ()


def check_space(pool: str, status: PoolStatus, needed: int, reserved: int = 0) -> None:
    """The one rule for room in a pool: ``needed`` bytes must fit in what is available
    and not ``reserved`` by running jobs (vsfs does not overcommit). Everything that
    makes or grows a volume comes here: the manager (``Manager.room``) with the jobs'
    reservations, a backend's ``truncate_upload`` through the ``Room`` it is given."""
    free = max(0, status.available - reserved)
    if needed > free:
        held = f" ({reserved} more reserved by running jobs)" if reserved else ""
        raise NoSpace(f"pool {pool!r} has {free} bytes free{held}, {needed} needed")


# A pool's room rule, bound to its pool and the reservations of the moment:
# room(status, needed) raises NoSpace when ``needed`` bytes do not fit (check_space).
Room = Callable[[PoolStatus, int], None]


# Formats of volumes that are plain block devices: their bytes are raw data.
BLOCK_FORMATS = frozenset({"none", "partition", "lvm2"})


def data_format(fmt: str) -> str:
    """The qemu-img format of a volume's bytes."""
    return "raw" if fmt in BLOCK_FORMATS else fmt


@dataclass(frozen=True)
class BackingStore:
    path: str
    format: str | None = None
    # Where path leads (symlinks resolved), where the backend could tell; not compared.
    real: str | None = field(default=None, compare=False)


@dataclass(frozen=True)
class VolumeDef:
    """A request to create a volume, as parsed from ``<volume>`` XML or a shell verb."""

    name: str
    capacity: int
    allocation: int | None = None
    format: str | None = None
    type: str | None = None
    perms: Permissions = field(default_factory=Permissions)
    backing: BackingStore | None = None
    # What libvirt's XML calls the volume's path when the local path differs
    # (a network volume: "POOL/IMAGE" for RBD).
    xml_path: str | None = None
    # qcow2's <compat>, <features><lazy_refcounts/>, and <clusterSize> (qcow2, qed).
    compat: str | None = None
    lazy_refcounts: bool = False
    cluster_size: int | None = None


@dataclass(frozen=True)
class Volume:
    """A volume as a backend sees it now."""

    name: str
    key: str
    path: str
    type: str  # file | dir | block | network
    format: str
    capacity: int
    allocation: int
    physical: int
    mode: int | None = None
    owner: int | None = None
    group: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None
    ctime_ns: int | None = None
    backing: BackingStore | None = None
    # What libvirt's XML calls the volume's path when the local path differs
    # (a network volume: "POOL/IMAGE" for RBD).
    xml_path: str | None = None


def normal_path(path: str) -> str:
    """An absolute path as a path walk through by-path/ spells it: without empty or "."
    components, ".." taken lexically ("/a//b/./c/../d/" is "/a/b/d"), as the kernel
    takes ".." within the mount."""
    return "/" + posixpath.normpath(path).lstrip("/")


def _parents(path: str) -> list[str]:
    """The directories above an absolute path, normalised: "/a/b/c" gives "/a", "/a/b"."""
    parts = [c for c in normal_path(path).split("/") if c]
    return ["/" + "/".join(parts[:i]) for i in range(1, len(parts))]


def backing_key(path: str) -> str:
    """How an overlay's backing store is indexed and looked up."""
    return normal_path(path) if path.startswith("/") else path


class VolumeTable(MutableMapping[str, Volume]):
    """A pool's volumes by name, also indexed by path, key and backing store, so that a
    lookup in ``by-path/`` or ``by-key/`` and the in-use check of a delete do not walk
    every volume of every pool."""

    def __init__(self, volumes: Iterable[Volume] = ()) -> None:
        self._vols: dict[str, Volume] = {}
        # value -> names holding it, in insertion order (a dict used as an ordered set)
        self._by_path: dict[str, dict[str, None]] = {}
        self._by_key: dict[str, dict[str, None]] = {}
        self._by_backing: dict[str, dict[str, None]] = {}
        # by-path/ spells paths normalised, and its directories are every volume's parents.
        self._by_normal_path: dict[str, dict[str, None]] = {}
        self._below: dict[str, int] = {}  # directory -> volumes somewhere below it
        for vol in volumes:
            self[vol.name] = vol

    def _indexes(self, vol: Volume) -> Iterator[tuple[dict[str, dict[str, None]], str]]:
        yield self._by_path, vol.path
        if vol.path.startswith("/"):
            yield self._by_normal_path, normal_path(vol.path)
        yield self._by_key, vol.key
        if vol.backing is not None:
            yield self._by_backing, vol.backing.real or backing_key(vol.backing.path)

    def __getitem__(self, name: str) -> Volume:
        return self._vols[name]

    def __setitem__(self, name: str, vol: Volume) -> None:
        if name in self._vols:
            del self[name]
        self._vols[name] = vol
        for index, value in self._indexes(vol):
            index.setdefault(value, {})[name] = None
        if vol.path.startswith("/"):
            for parent in _parents(vol.path):
                self._below[parent] = self._below.get(parent, 0) + 1

    def __delitem__(self, name: str) -> None:
        vol = self._vols.pop(name)
        for index, value in self._indexes(vol):
            names = index[value]
            del names[name]
            if not names:
                del index[value]
        if vol.path.startswith("/"):
            for parent in _parents(vol.path):
                left = self._below[parent] - 1
                if left:
                    self._below[parent] = left
                else:
                    del self._below[parent]

    def __iter__(self) -> Iterator[str]:
        return iter(self._vols)

    def __len__(self) -> int:
        return len(self._vols)

    def __contains__(self, name: object) -> bool:
        return name in self._vols

    @overload
    def get(self, name: str, /) -> Volume | None: ...
    @overload
    def get(self, name: str, /, default: Volume | _T) -> Volume | _T: ...

    def get(self, name: str, /, default: object = None) -> object:
        return self._vols.get(name, default)

    # The Mapping mixins would go through __getitem__ for each volume.
    def keys(self) -> KeysView[str]:
        return self._vols.keys()

    def values(self) -> ValuesView[Volume]:
        return self._vols.values()

    def items(self) -> ItemsView[str, Volume]:
        return self._vols.items()

    def clear(self) -> None:
        for index in (self._vols, self._by_path, self._by_key, self._by_backing,
                      self._by_normal_path, self._below):
            index.clear()

    def with_path(self, path: str) -> Volume | None:
        return self._first(self._by_path, path)

    def with_normal_path(self, path: str) -> Volume | None:
        """A volume whose path, normalised (normal_path), is ``path``."""
        return self._first(self._by_normal_path, path)

    def has_below(self, directory: str) -> bool:
        """Whether some volume's path lies below ``directory`` (normalised)."""
        return directory in self._below

    def with_key(self, key: str) -> Volume | None:
        return self._first(self._by_key, key)

    def has_backing(self) -> bool:
        """Whether any volume here is an overlay."""
        return bool(self._by_backing)

    def backed_by(self, path: str) -> Volume | None:
        """A volume whose backing store is ``path`` (an overlay of it), if any: give the
        path normalised (backing_key) or resolved (realpath)."""
        return self._first(self._by_backing, path)

    def _first(self, index: dict[str, dict[str, None]], value: str) -> Volume | None:
        names = index.get(value)
        return self._vols[next(iter(names))] if names else None
