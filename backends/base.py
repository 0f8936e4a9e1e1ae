"""What every backend is: a table of optional callbacks, as in libvirt.

Only ``refresh`` is required. A callback a backend does not have raises
Unsupported, which the user sees as EOPNOTSUPP. Backends get parsed
definitions (vsfs.model), never XML, and know nothing of FUSE.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, TypeVar

import trio

from vsfs.errors import NotFound, Unsupported
from vsfs.model import (
    Permissions,
    PoolDef,
    PoolStatus,
    Room,
    Volume,
    VolumeDef,
    data_format,
)
from vsfs.proc import QemuImgProgress, run
from vsfs.secrets import SecretStore

from . import blockdev

T = TypeVar("T")


@dataclass(frozen=True)
class Services:
    """What the daemon lends every backend."""

    secrets: SecretStore
    # Runtime files of this mount (sockets, export points): gone at reboot, and
    # separate for each state directory, so two mounts never share them.
    run_dir: Path


@dataclass(frozen=True)
class Snapshot:
    """What one refresh found: the pool's sizes and every volume."""

    status: PoolStatus
    volumes: tuple[Volume, ...]
    live_perms: Permissions | None = None


class Backend(ABC):
    # ---- What the pool type is and can do, asked for by name. The manager and the tree
    # test these, never a type's name: a new pool type is its module, one line in
    # BACKENDS (backends/__init__.py) and its tests.

    # libvirt's name of the type (<pool type='...'>), as BACKENDS registers it.
    pool_type: ClassVar[str]
    # Its volumes are the files in the pool's target directory (dir, fs, netfs): no two
    # pools of the type may name one directory, however the path is spelled.
    volumes_in_target: ClassVar[bool] = False
    # Directories in the target are volumes too, and `mkdir volumes/D` makes one.
    directory_volumes: ClassVar[bool] = False
    # It takes its source devices whole (mkfs, a partition table, a PV): a device one
    # pool of such a type names may be no other's.
    owns_source_devices: ClassVar[bool] = False
    # How often (s) the manager asks ``changed`` whether a refresh is due;
    # 0 means only explicit refreshes see outside changes.
    poll_interval: ClassVar[float] = 0.0
    # Volumes that cannot exist empty (partitions, LVs): `truncate` makes them
    # once it gives the size.
    sized_at_creation: ClassVar[bool] = False

    # How long a volume's values, once read, are served without asking the backend
    # again (a read costs a stat here, a command to a cluster elsewhere).
    values_fresh_for: ClassVar[float] = 1.0
    # Volumes whose local path exists only while used (an export made on demand):
    # prepare_volume makes it when the path is asked for, reap withdraws idle ones.
    on_demand_paths: ClassVar[bool] = False

    def __init__(self, pool: PoolDef, services: Services | None = None) -> None:
        self.pool = pool
        self.services = services

    @property
    def secrets(self) -> SecretStore:
        """Where the credentials named in <auth> are looked up."""
        if self.services is None:
            raise NotFound("no secret store to read credentials from")
        return self.services.secrets

    def run_dir(self, create: bool = True) -> Path:
        """A directory of this pool's runtime files (sockets, export points), made on use."""
        if self.services is None:
            raise NotFound("no runtime directory")
        path = self.services.run_dir / self.pool.uuid
        if create:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return path

    async def quick_io(self, fn: Callable[..., T], *args: object) -> T:
        """A few syscalls on a volume's file (open, ftruncate, close) in a worker thread,
        since storage may be slow to answer; local filesystems run them inline."""
        return await trio.to_thread.run_sync(fn, *args)

    async def clone_by_copy(self, vdef: VolumeDef, source: Volume) -> Volume:
        """A new raw volume of the source's size, holding its data (any image format read):
        for volumes made at a fixed size (partitions, LVs, images). Progress: qemu-img's
        own, of the source's capacity. Failed or cancelled (the copy is killed), the new
        volume is deleted."""
        if source.type == "dir":
            raise Unsupported(f"a directory cannot be copied into a {self.pool_type} volume")
        vol = await self.create_volume(VolumeDef(name=vdef.name, capacity=source.capacity))
        try:
            # Killed with the daemon: the half-copied volume is removed at the next start
            # (the manager's journal), which a copy still writing would keep in use.
            await run(["qemu-img", "convert", "-U", "-p", "-n", "-f",
                       data_format(source.format), "-O", "raw", source.path, vol.path],
                      timeout=3600, dies_with_daemon=True,
                      progress=QemuImgProgress(source.capacity))
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.delete_volume(vol)
            raise
        return vol

    def require(self, callback: str, what: str) -> None:
        """Refuse up front (EOPNOTSUPP) what this backend does not implement, so that the
        answer does not depend on checks made before the callback (free space, say)."""
        if getattr(type(self), callback) is getattr(Backend, callback):
            raise Unsupported(f"{self.pool_type} pools cannot {what}")

    @classmethod
    def validate(cls, pool: PoolDef) -> None:
        """Raise Invalid when the definition cannot work for this type."""

    # ---- pools

    async def is_running(self) -> bool:
        """Whether the pool is already active at mount time (e.g. still mounted)."""
        return False

    async def build(self, overwrite: bool) -> None:
        raise Unsupported(f"{self.pool_type} pools cannot be built")

    async def start(self) -> None:
        """Activate the pool; the default has nothing to do."""

    async def remove_leftovers(self) -> None:
        """Remove what a daemon killed in the middle of an action left half-made in the
        pool (a copy under a temporary name). Called once the pool is up, before its first
        refresh: after ``start``, and when a pool still up is adopted at mount time."""

    async def stop(self) -> None:
        """Deactivate the pool; the default has nothing to do. Called only once
        ``volume_users`` found none of the pool's listed volumes in use; volumes it has not
        listed yet (a LUN that just appeared) the backend checks itself."""

    async def delete(self) -> None:
        raise Unsupported(f"{self.pool_type} pools cannot be deleted")

    @abstractmethod
    async def refresh(self) -> Snapshot:
        """Read the pool's sizes and all its volumes: one pass, not one per volume."""

    async def status(self) -> PoolStatus:
        """The pool's sizes alone; backends with a cheaper way override this."""
        return (await self.refresh()).status

    async def changed(self) -> bool:
        """Cheap check whether the volumes may have changed behind our back."""
        return False

    # ---- volumes

    async def prepare_volume(self, vol: Volume) -> None:
        """Make sure the volume's local path works (on_demand_paths backends)."""

    async def reap(self) -> list[str]:
        """Withdraw local paths nobody has used for a while; the volumes whose went."""
        return []

    async def volume_users(self, vols: Collection[Volume]) -> dict[str, list[str]]:
        """What holds each of ``vols`` on this host, where vsfs cannot see it: its local path
        (a device, an exported file) open in a process, a device mounted or held by the
        kernel, a loop device on it. Volume name -> one phrase per use, e.g.
        ``/dev/sdc is open in process 812 (qemu-img)``; volumes nothing holds are left out.

        The manager asks before ``rm``, a shrink, ``wipe`` and the pool's ``stop``, and
        refuses them (EBUSY, the phrases in MNT/error) while anything is listed; uploads,
        overlays and nested pools it checks itself, before this. Called with the pool's
        lock held, on a running pool, with one volume or with all of them at once (stop):
        look at them in one pass (one scan of /proc), never one per volume. It only looks,
        so it has nothing to undo; blocking work (sysfs, /proc) runs in a worker thread,
        never on trio's. The default finds nothing; dir, fs and netfs pools ask the
        kernel file by file (a write lease, blockdev.opened_elsewhere) and read /proc only to
        name a holder, so that ``rm`` of thousands of files makes no scan.
        """
        return {}

    async def volume(self, name: str) -> Volume:
        """Re-read one volume (after it was written to, say)."""
        for vol in (await self.refresh()).volumes:
            if vol.name == name:
                return vol
        raise NotFound(f"no volume {name!r} in pool {self.pool.name!r}")

    def space_needed(self, vdef: VolumeDef) -> int:
        """Bytes of free space a new volume must find (vsfs does not overcommit)."""
        return vdef.capacity

    def snapshot_space(self, vol: Volume) -> int:
        """Bytes of free space a snapshot of ``vol`` must find: none where the storage
        shares the volume's blocks and grows only as they are written (LVM, Ceph)."""
        return 0

    async def create_volume(self, vdef: VolumeDef) -> Volume:
        """Create a volume; failed or cancelled (a job's cancel), nothing of it may be left
        behind: clean-ups run shielded (trio.CancelScope(shield=True))."""
        raise Unsupported(f"{self.pool_type} pools cannot create volumes")

    async def clone_volume(self, vdef: VolumeDef, source: Volume) -> Volume:
        """Create ``vdef`` holding a copy of ``source`` (which may be in another pool).

        A job: the copy reports its progress (vsfs.proc.run's ``progress``) and stops when
        cancelled; failed or cancelled, nothing of the new volume is left."""
        raise Unsupported(f"{self.pool_type} pools cannot clone volumes")

    async def snapshot_volume(self, vol: Volume, name: str) -> Volume:
        """A job, as clone_volume: failed or cancelled, no snapshot is left."""
        raise Unsupported(f"{self.pool_type} pools cannot snapshot volumes")

    async def delete_volume(self, vol: Volume) -> None:
        raise Unsupported(f"{self.pool_type} pools cannot delete volumes")

    async def rename_volume(self, vol: Volume, new_name: str) -> Volume:
        raise Unsupported(f"{self.pool_type} pools cannot rename volumes")

    async def resize_volume(self, vol: Volume, capacity: int) -> Volume:
        raise Unsupported(f"{self.pool_type} pools cannot resize volumes")

    async def shrink_volume(self, vol: Volume, capacity: int) -> Volume:
        """Shrink even where that cuts off data: only ever on an explicit command."""
        raise Unsupported(f"{self.pool_type} volumes are shrunk by writing capacity")

    async def wipe_volume(self, vol: Volume) -> None:
        """Zero the volume's data. A job: cancelled, it stops (what was zeroed stays so)."""
        raise Unsupported(f"{self.pool_type} pools cannot wipe volumes")

    async def create_upload(self, vdef: VolumeDef) -> tuple[Volume, int] | None:
        """Create an empty volume and open it read-write, for ``truncate``/``cp``.

        None means the volume can only be made once its size is known
        (``create_sized_upload``, when truncate sets it): partitions and LVs.
        Backends that can do both steps at once override this.
        """
        if self.sized_at_creation:
            return None
        return await self.create_sized_upload(vdef)

    async def create_sized_upload(self, vdef: VolumeDef) -> tuple[Volume, int]:
        vol = await self.create_volume(vdef)
        try:
            fd = await trio.to_thread.run_sync(self.open_volume, vol, os.O_RDWR)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.delete_volume(vol)
            raise
        return vol, fd

    async def truncate_upload(self, fd: int, size: int, room: Room) -> None:
        """Set the size of a volume being uploaded. Growth must pass ``room`` (the
        manager's rule, given the pool's status and the growth: ENOSPC) before the file
        grows; refused, the size stays as it was."""
        if self.sized_at_creation:
            cur = await trio.to_thread.run_sync(lambda: os.lseek(fd, 0, os.SEEK_END))
            if size != cur:
                raise Unsupported(f"a {self.pool_type} volume's size is set once, when it "
                                  "is made; resize it through volinfo/V/capacity")
            return
        cur = (await trio.to_thread.run_sync(os.fstat, fd)).st_size
        if size > cur:
            room(await self.status(), size - cur)
        await trio.to_thread.run_sync(os.ftruncate, fd, size)

    def open_volume(self, vol: Volume, flags: int) -> int:
        """A file descriptor on the volume's bytes, for uploads. Blocking."""
        if vol.type not in ("file", "block"):
            raise Unsupported(f"volume {vol.name!r} holds no bytes to write")
        return os.open(vol.path, flags | os.O_CLOEXEC)


class BlockBackend(Backend):
    """A backend whose volumes are block devices made at a fixed size (partitions, LVs)."""

    sized_at_creation: ClassVar[bool] = True

    async def volume_users(self, vols: Collection[Volume]) -> dict[str, list[str]]:
        # A partition or LV opened but not mounted is in use too: parted would drop it from
        # the table, lvreduce and blkdiscard would go ahead under the process using it.
        return await blockdev.volume_users(vols)

    async def clone_volume(self, vdef: VolumeDef, source: Volume) -> Volume:
        return await self.clone_by_copy(vdef, source)
