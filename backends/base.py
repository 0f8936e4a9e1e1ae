"""What every backend is: a table of optional callbacks, as in libvirt.

Only ``refresh`` is required. A callback a backend does not have raises
Unsupported, which the user sees as EOPNOTSUPP. Backends get parsed
definitions (vsfs.model), never XML, and know nothing of FUSE, paths in the
mount, jobs or the change feed: the manager (vsfs/manager.py) calls them,
keeps the rules (names, free space, in use, who may act when) and tells
everyone what changed.

Each callback's docstring is its contract, in the same four parts:

- **Called**: optional or required, by which manager action, with the pool's
  lock held or not (``PoolEntry.locked()``), in which pool state, as a job or not.
  A job (build, clone, snapshot, wipe, a volume made from a definition) runs
  without the pool's lock, holding only its volumes; it may be cancelled: the
  command it runs is killed (vsfs.proc.run) and trio.Cancelled goes through
  the callback.
- **May assume**: what the manager checked before (name free, room, not in
  use, not held by a job).
- **Raises**: vsfs.errors, each carrying the contract's errno (Invalid EINVAL,
  Exists EEXIST, NotFound ENOENT, Busy EBUSY, NoSpace ENOSPC, Unsupported
  EOPNOTSUPP, Denied EACCES, BackendFailed EIO or the command's own errno);
  anything else is a bug (logged with its traceback, EIO to the caller).
- **Undo**: what must not be left behind when it fails or is cancelled.
  Clean-ups run shielded (``trio.CancelScope(shield=True)``) so that a cancel
  cannot cut them short.

Blocking work (syscalls on storage that may hang, sysfs, /proc) runs in a
worker thread (``trio.to_thread.run_sync``), commands through vsfs.proc.run;
``quick_io`` is the one exception, for a few syscalls on a local filesystem.
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

    # ---- What the backend is given

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

    # ---- Helpers for the manager and for subclasses

    def require(self, callback: str, what: str) -> None:
        """Refuse up front (EOPNOTSUPP) what this backend does not implement, so that the
        answer does not depend on checks made before the callback (free space, say)."""
        if getattr(type(self), callback) is getattr(Backend, callback):
            raise Unsupported(f"{self.pool_type} pools cannot {what}")

    @classmethod
    def validate(cls, pool: PoolDef) -> None:
        """Refuse a definition that cannot work for this type (a dir pool without a
        target path, an iscsi pool without a portal).

        Called: at define and redefine, before anything is saved; no lock, no I/O (a
        pure check of the parsed definition). Raises: Invalid. Undo: nothing."""

    # ---- Pools

    async def is_running(self) -> bool:
        """Whether the pool is already active at mount time (an fs pool still mounted,
        a session still logged in): it is then adopted, not started again.

        Called: optional, at load, once per defined pool, before any other callback;
        no lock. Only looks; raises nothing but a bug. Undo: nothing."""
        return False

    async def build(self, overwrite: bool) -> None:
        """Make the pool's storage: mkfs, a partition label, a volume group (``build``).

        Called: optional, as a job, without the pool's lock; the pool is inactive and
        marked ``building`` (every other action on it is EBUSY). May assume nothing
        of its devices. Must refuse (Busy) a device in use (``blockdev.check_unused``)
        and, unless ``overwrite``, one that holds a signature (``blockdev.signatures``).
        Raises: Busy, Invalid (no device named), BackendFailed. Undo: what it made
        before a failure or a cancel (logical: the PVs it created), never what was
        there before."""
        raise Unsupported(f"{self.pool_type} pools cannot be built")

    async def start(self) -> None:
        """Activate the pool: mount, log in, attach a loop, activate a VG (``start``).

        Called: optional (the default has nothing to do), by ``start`` and autostart,
        with the pool's lock held, on an inactive pool. Raises: Busy, NotFound (the
        source is missing), Denied (credentials), BackendFailed. Undo: a failed start
        leaves nothing started; once it returned, a later failure (leftovers, the
        first refresh) makes the manager call ``stop``."""

    async def remove_leftovers(self) -> None:
        """Remove what a daemon killed in the middle of an action left half-made in the
        pool (a copy under a temporary name).

        Called: optional, once the pool is up, before its first refresh: after
        ``start``, and when a pool still up is adopted at mount time; the pool's lock
        held. Must remove only what vsfs names as its own (a temporary name), never a
        user's volume. Raises: BackendFailed (the start then fails and is undone)."""

    async def stop(self) -> None:
        """Deactivate the pool: unmount, log out, detach, deactivate the VG (``stop``).

        Called: optional (the default has nothing to do), with the pool's lock held,
        on a running pool, once no upload or job works in it and ``volume_users``
        found none of its listed volumes in use. Volumes it has not listed yet (a LUN
        that just appeared) it checks itself. Raises: Busy (something holds it: then
        nothing is stopped), BackendFailed. Undo: a failed stop leaves the pool as
        usable as before."""

    async def delete(self) -> None:
        """Delete the pool's storage: the target directory, the VG, the label
        (``delete``); the definition stays.

        Called: optional, with the pool's lock held, on an inactive pool no job
        works in. Raises: Busy, NotEmpty (volumes left in a directory), BackendFailed.
        Undo: nothing half-deleted that a ``build`` could not make whole again."""
        raise Unsupported(f"{self.pool_type} pools cannot be deleted")

    @abstractmethod
    async def refresh(self) -> Snapshot:
        """Read the pool's sizes and all its volumes (``refresh``, the poll, start).

        Called: required, with the pool's lock held, on a running pool (or one being
        started). One pass over the storage (one ``lvs``, one ``readdir``), never a
        command per volume: listings run no backend command per entry. Volumes a job
        is still making may be in it (the manager leaves them out). Raises:
        BackendFailed (the pool stays as it was listed). Undo: nothing: it only reads."""

    async def status(self) -> PoolStatus:
        """The pool's sizes alone (``capacity``, ``allocation``, ``free``).

        Called: optional (the default refreshes), often: before every check of free
        space, with the lock held, and for a value file, without it. Cheap: one
        ``statvfs``, one ``vgs``. Raises: BackendFailed. Undo: nothing."""
        return (await self.refresh()).status

    async def changed(self) -> bool:
        """Whether the volumes may have changed behind vsfs's back (a dir's mtime),
        asked every ``poll_interval`` seconds; True makes the manager refresh.

        Called: optional, by the poll, with the pool's lock held, on a running pool.
        Cheap (one ``stat``); when in doubt, True. Raises: BackendFailed (logged, the
        poll goes on). Undo: nothing."""
        return False

    # ---- Volumes

    async def prepare_volume(self, vol: Volume) -> None:
        """Make the volume's local path work now (``on_demand_paths`` backends: an
        export made when the path is asked for).

        Called: with the pool's lock held, when a volume's ``path`` is read or its
        link followed, on a running pool. Raises: BackendFailed, Denied. Undo: a
        failed export leaves no mount point or daemon behind."""

    async def reap(self) -> list[str]:
        """Withdraw local paths nobody has used for a while; the names of the volumes
        whose went (their links' targets are then read again by the kernel).

        Called: by the poll, with the pool's lock held, on ``on_demand_paths``
        backends. Must withdraw only what no process holds. Raises: BackendFailed
        (logged). Undo: nothing."""
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
        """Re-read one volume, as the storage has it now (after it was written to, for
        an action that goes by its size or format).

        Called: optional (the default refreshes the whole pool), with or without the
        pool's lock (a value file read does not take it), on a running pool; while a
        job may be changing the volume. Raises: NotFound (gone), BackendFailed.
        Undo: nothing: it only reads."""
        for vol in (await self.refresh()).volumes:
            if vol.name == name:
                return vol
        raise NotFound(f"no volume {name!r} in pool {self.pool.name!r}")

    def space_needed(self, vdef: VolumeDef) -> int:
        """Bytes of free space a new volume must find (vsfs does not overcommit):
        the manager checks them, with the jobs' reservations, before ``create_volume``.
        Pure: no I/O, no lock."""
        return vdef.capacity

    def snapshot_space(self, vol: Volume) -> int:
        """Bytes of free space a snapshot of ``vol`` must find: none where the storage
        shares the volume's blocks and grows only as they are written (LVM, Ceph)."""
        return 0

    async def create_volume(self, vdef: VolumeDef) -> Volume:
        """Create a volume from its definition (XML, ``mkdir``, and the first step of a
        copy or an upload); the volume as made.

        Called: optional, as a job without the pool's lock when the user asked for it
        (XML, mkdir), or with it held from other callbacks of this backend. May
        assume: the pool is running, the name is free and valid, ``space_needed``
        bytes were free (not reserved by other jobs). Raises: Exists (made meanwhile
        outside vsfs), NoSpace (the storage said so), Invalid or Unsupported (a format
        or feature it cannot make), BackendFailed. Undo: failed or cancelled, nothing
        of the volume is left."""
        raise Unsupported(f"{self.pool_type} pools cannot create volumes")

    async def clone_volume(self, vdef: VolumeDef, source: Volume) -> Volume:
        """Create ``vdef`` holding a copy of ``source`` (``clone NEW [POOL]``); the new
        volume. ``source`` may be in another pool, of another type.

        Called: optional, as a job without either pool's lock; the job holds ``source``
        shared (other copies may read it, nothing changes it) and the new name
        exclusively. May assume: the name is free, the room checked and reserved.
        The copy reports its progress (vsfs.proc.run's ``progress``) and stops when
        cancelled. Raises: NoSpace, Unsupported (a source it cannot copy, a
        directory), BackendFailed, trio.Cancelled. Undo: failed or cancelled, nothing
        of the new volume is left; the source is never changed."""
        raise Unsupported(f"{self.pool_type} pools cannot clone volumes")

    async def snapshot_volume(self, vol: Volume, name: str) -> Volume:
        """A snapshot of ``vol`` named ``name`` (``snapshot NEW``): a qcow2 overlay, an
        LVM or RBD snapshot; the snapshot as listed (the backend may name it: RBD's
        are IMAGE@SNAP).

        Called: optional, as a job, as ``clone_volume`` is; ``snapshot_space`` bytes
        were checked free. Raises: Unsupported (not an image), BackendFailed. Undo:
        failed or cancelled, no snapshot is left and ``vol`` is unchanged."""
        raise Unsupported(f"{self.pool_type} pools cannot snapshot volumes")

    async def delete_volume(self, vol: Volume) -> None:
        """Remove a volume and its data (``rm``, ``delete``, and the clean-up of a
        failed upload or copy).

        Called: optional, with the pool's lock held, on a running pool. May assume:
        no job holds it, nothing vsfs knows of uses it and ``volume_users`` found
        nobody. Raises: NotFound (gone already: fine for the caller), Busy (in use
        after all), NotEmpty (a directory with files), BackendFailed. Undo: a failed
        delete leaves the volume whole and usable, never half-removed."""
        raise Unsupported(f"{self.pool_type} pools cannot delete volumes")

    async def rename_volume(self, vol: Volume, new_name: str) -> Volume:
        """Give a volume a new name in its pool (``mv``); the volume as renamed.

        Called: optional, with the pool's lock held. May assume: ``new_name`` is
        free and valid, no job holds the volume or the name. Raises: Exists (taken
        meanwhile outside vsfs), Busy, BackendFailed. Undo: failed, the volume keeps
        its old name; never both names, never neither."""
        raise Unsupported(f"{self.pool_type} pools cannot rename volumes")

    async def resize_volume(self, vol: Volume, capacity: int) -> Volume:
        """Give a volume ``capacity`` bytes (``echo SIZE > volinfo/V/capacity``); the
        volume as resized (rounded up to whole extents, say).

        Called: optional, with the pool's lock held, on a volume no job holds, as
        read just now. May assume: growth fits (room checked); a smaller capacity
        only when nothing uses the volume. Raises: NoSpace, Unsupported (a format
        that cannot change size), BackendFailed. Undo: failed, the size is as it was."""
        raise Unsupported(f"{self.pool_type} pools cannot resize volumes")

    async def shrink_volume(self, vol: Volume, capacity: int) -> Volume:
        """Shrink even where that cuts off data (``shrink SIZE``): only ever on that
        explicit command; the volume as shrunk.

        Called: optional, with the pool's lock held, on a volume nothing uses. Raises:
        Invalid (larger than it is), BackendFailed. Undo: failed, the size is as it
        was."""
        raise Unsupported(f"{self.pool_type} volumes are shrunk by writing capacity")

    async def wipe_volume(self, vol: Volume) -> None:
        """Zero the volume's data (``wipe``); its size and format stay.

        Called: optional, as a job holding the volume alone, without the pool's lock,
        on a volume nothing uses. Reports progress; cancelled, it stops (what was
        zeroed stays so, which is what was asked of the data anyway). Raises:
        Unsupported, BackendFailed, trio.Cancelled. Undo: nothing to undo."""
        raise Unsupported(f"{self.pool_type} pools cannot wipe volumes")

    async def create_upload(self, vdef: VolumeDef) -> tuple[Volume, int] | None:
        """Create an empty volume and open it read-write, for ``truncate``/``cp``/``>``:
        the volume and a file descriptor on its bytes, which vsfs closes.

        Called: with the pool's lock held, on a running pool, the name free, at the
        CREATE of a new entry in ``volumes/``. None means the volume can only be made
        once its size is known (``create_sized_upload``, when truncate sets it):
        partitions and LVs. Backends that can do both steps at once override this.
        Raises: as ``create_volume``. Undo: failed, no volume and no descriptor."""
        if self.sized_at_creation:
            return None
        return await self.create_sized_upload(vdef)

    async def create_sized_upload(self, vdef: VolumeDef) -> tuple[Volume, int]:
        """``create_upload`` with its size known (``vdef.capacity``, room checked): for
        ``sized_at_creation`` backends, at the writer's first truncate. Same contract."""
        vol = await self.create_volume(vdef)
        try:
            fd = await trio.to_thread.run_sync(self.open_volume, vol, os.O_RDWR)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.delete_volume(vol)
            raise
        return vol, fd

    async def truncate_upload(self, fd: int, size: int, room: Room) -> None:
        """Set the size of a volume being uploaded (``truncate -s``, ``cp``'s first step,
        a shell's ``>``) through the descriptor ``create_upload`` gave.

        Called: without the pool's lock, while the upload's job holds the volume (so
        nothing else changes it). Growth must pass ``room`` (the manager's rule, given
        the pool's status and the growth) before the file grows. Raises: NoSpace,
        Unsupported (a size set once, at creation), OSError. Undo: refused or failed,
        the size stays as it was."""
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
        """A file descriptor on the volume's bytes (an existing volume written through
        its entry). Blocking: called in a worker thread. Raises: Unsupported (no bytes
        to write: a directory, a read-only snapshot), OSError. Undo: nothing open."""
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
