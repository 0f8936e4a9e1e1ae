"""Uploads: volumes made through a file handle (``truncate``, ``cp``, a shell's ``>``).

Everything about them is here: their state, their bytes (the adapter hands each
request over and only translates), the journal that keeps a killed daemon from
leaving a half-written volume, their jobs and their events. The manager, its
in-use checks and the tree ask this module whether a name is being written.

An upload's state (``Phase``):

- OPEN: made and open; ``volumes/NAME`` is a regular file, and its job runs.
- LISTED: closed once (``truncate`` and ``cp`` have returned): ``volumes/NAME``
  is the volume's symlink, ``created`` is published; descriptors still open (a
  shell's redirection closes its first copy before writing) go on writing, and
  each later close settles what they did.
- CLOSED: the last descriptor is closed; its job has ended.

Apart from the phase, an upload is *orphaned* once its volume is not its own
(removed after a failed write, replaced behind vsfs's back): nothing more is
settled for it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import logging
import os
import stat
import struct
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import TYPE_CHECKING

import trio

from .errors import Canceled, Invalid, NoSpace, NotFound, VsfsError
from .feed import ref
from .jobs import Job
from .model import Volume, VolumeDef, check_name
from .state import InFlight

if TYPE_CHECKING:
    from .manager import Manager, PoolEntry

log = logging.getLogger(__name__)

_serials = itertools.count(1)

Key = tuple[str, str]  # (pool, volume)


class Phase(StrEnum):
    OPEN = "open"
    LISTED = "listed"
    CLOSED = "closed"


class WriteFailed(VsfsError):
    """A write into an upload failed: the errno is the system's own (ENOSPC, EIO…)."""

    def __init__(self, message: str, err: int) -> None:
        super().__init__(message)
        self.errno = err


@dataclass(eq=False)
class Upload:
    """A volume being created through a file handle."""

    pool: str
    name: str
    fd: int
    phase: Phase = Phase.OPEN
    failed: bool = False
    # Bytes came in since it was last settled.
    written: bool = False
    # Its last resize was refused (no space) and nothing succeeded since.
    refused: bool = False
    # Why it failed or was refused (its job's error).
    reason: str = ""
    # Its volume is not its own any more: later closes settle nothing.
    orphaned: bool = False
    # Each upload is a file of its own: one deleted while still open and a new one of
    # the same name must not share an inode.
    serial: int = field(default_factory=lambda: next(_serials))
    # What the journal of uploads says of it (state.UploadJournal), and whether it says
    # "in flight": from before its volume is made until it is settled, so that a daemon
    # killed meanwhile leaves no half-written volume behind.
    record: InFlight | None = None
    in_flight: bool = False
    # Its job (jobs/<id>/): from its creation to its last close.
    job: Job | None = None

    def size(self) -> int:
        """The size of its file now; 0 once it is closed (or has no file yet)."""
        if self.fd < 0:
            return 0
        try:
            return os.fstat(self.fd).st_size
        except OSError:  # closed meanwhile by a worker thread: it has no size any more
            return 0

    @property
    def cancelled(self) -> bool:
        return self.job is not None and self.job.cancelled

    @property
    def bad(self) -> bool:
        """Its volume must not stay: a write failed, its size was refused, or it was
        cancelled."""
        return self.failed or self.refused or self.cancelled


def _same_file(fd: int, path: str) -> bool:
    """Whether an open descriptor is (still) the file or device at path."""
    st = os.fstat(fd)
    try:
        there = os.stat(path)
    except OSError:
        return False
    if stat.S_ISBLK(st.st_mode):
        return stat.S_ISBLK(there.st_mode) and st.st_rdev == there.st_rdev
    return (st.st_dev, st.st_ino) == (there.st_dev, there.st_ino)


# FS_IOC_GETVERSION (linux/fs.h): the generation of an inode on ext2/3/4, xfs and btrfs.
_FS_IOC_GETVERSION = 0x80087601


def identity(fd: int) -> tuple[os.stat_result, int]:
    """An open file's stat and its inode's generation, which tells it from a later file
    given the same inode number (ext4 gives a freed number to the next file at once); -1
    where the filesystem keeps none (tmpfs, which does not give numbers again soon).
    Blocking."""
    buf = bytearray(8)
    try:
        fcntl.ioctl(fd, _FS_IOC_GETVERSION, buf)
        gen: int = struct.unpack("=I", buf[:4])[0]  # the kernel writes an int
    except OSError:
        gen = -1
    return os.fstat(fd), gen


def _set_owner(fd: int, mode: int | None, uid: int, gid: int) -> None:
    """fchmod and fchown of an open file; None and -1 leave that part as it is."""
    if uid != -1 or gid != -1:
        os.fchown(fd, uid, gid)
    if mode is not None:
        os.fchmod(fd, mode)


def _append(fd: int, data: bytes) -> int:
    """Write at the file's end as it is now (the descriptor is not O_APPEND)."""
    return os.pwrite(fd, data, os.fstat(fd).st_size)


def _set_times(fd: int, atime_ns: int | None, mtime_ns: int | None) -> None:
    """utime() of an open file; None keeps that time as it is."""
    st = os.fstat(fd)
    os.utime(fd, ns=(st.st_atime_ns if atime_ns is None else atime_ns,
                     st.st_mtime_ns if mtime_ns is None else mtime_ns))


class Uploads:
    """The uploads of one manager, OPEN or LISTED, by (pool, volume)."""

    def __init__(self, m: Manager) -> None:
        self.m = m
        self._live: dict[Key, Upload] = {}

    # ------------------------------------------------------------- questions

    def opening(self, pool: str, name: str) -> Upload | None:
        """The upload whose regular file ``volumes/NAME`` is (OPEN), if any."""
        up = self._live.get((pool, name))
        return up if up is not None and up.phase is Phase.OPEN else None

    def writing(self, pool: str, name: str) -> Upload | None:
        """The upload still written under this name (OPEN, or LISTED with descriptors
        open): the volume is in use."""
        return self._live.get((pool, name))

    def names_in(self, pool: str) -> set[str]:
        return {n for p, n in self._live if p == pool}

    def in_pool(self, pool: str) -> Upload | None:
        return next((u for (p, _), u in self._live.items() if p == pool), None)

    # ------------------------------------------------------------- lifecycle

    async def begin(self, pool: str, name: str) -> Upload:
        """Create an empty raw volume and open it, for ``truncate`` and ``cp``."""
        m = self.m
        check_name(name, "volume name")
        entry = m.running_entry(pool)
        async with entry.locked():
            if not entry.running:
                raise Invalid(f"pool {pool!r} is not active")
            m.check_new_name(entry, name)
            # In the journal before it is made, so that a daemon killed before it is
            # settled leaves no half-written volume (volumes made at their size are
            # recorded when truncate makes them).
            rec = (None if entry.backend.sized_at_creation
                   else await m.journal_io(m.journal.begin, entry.pool.uuid, name))
            try:
                # Empty at first: its size is checked against free space when set.
                made = await entry.backend.create_upload(VolumeDef(name=name, capacity=0,
                                                                   format="raw"))
            except BaseException:
                if rec is not None:
                    with trio.CancelScope(shield=True):
                        await m.journal_io(m.journal.end, rec)
                raise
            fd = -1
            if made is not None:
                vol, fd = made
                entry.volumes[name] = vol
                if rec is not None:
                    rec = await self._made(entry, rec, vol, fd)
            elif rec is not None:
                await m.journal_io(m.journal.end, rec)
                rec = None
        upload = Upload(pool, name, fd, record=rec, in_flight=rec is not None)
        self._live[(pool, name)] = upload
        # A job until its last close: progress is the bytes written so far (of a total
        # nobody knows), and its cancel fails the writer's next write and removes it.
        upload.job = m.jobs.begin(f"upload {ref(pool, name)}", "written",
                                  [((pool, name), True)])
        upload.job.on_cancel = lambda: trio.lowlevel.spawn_system_task(self._cancelled, upload)
        log.info("volume %s/%s created for writing", pool, name)
        return upload

    async def _cancelled(self, upload: Upload) -> None:
        """Its job was cancelled: it ends now, and its volume is removed now where the
        backend can while the writer still holds it open (a file), else at its close.
        The writer's next write, truncate or close gets ECANCELED. A task of its own
        (nothing waits for it): it must never raise."""
        try:
            if upload.job is not None:
                self.m.jobs.finish(upload.job, Canceled("cancelled"))
            if upload.phase is not Phase.CLOSED:
                await self.settle(upload)
        except Exception:
            log.exception("volume %s/%s: stopping its cancelled upload failed", upload.pool,
                          upload.name)

    def _check_cancelled(self, upload: Upload) -> None:
        """ECANCELED once the upload's job was cancelled: it fails, and its volume is
        removed at its next close."""
        if upload.cancelled and upload.job is not None:
            upload.failed = True
            raise Canceled(f"job {upload.job.id} was cancelled: {upload.job.what}")

    async def truncate(self, upload: Upload, size: int) -> None:
        """Set the volume's size (``truncate -s``, and ``cp``'s first step)."""
        m = self.m
        self._check_cancelled(upload)
        entry = m.entry(upload.pool)
        try:
            if upload.fd < 0:
                # Backends whose volumes need a size (partitions) make them now.
                async with entry.locked():
                    await m.check_room(entry, size)
                    rec = await m.journal_io(m.journal.begin, entry.pool.uuid,
                                             upload.name, size)
                    try:
                        made, fd = await entry.backend.create_sized_upload(
                            VolumeDef(name=upload.name, capacity=size, format="raw"))
                    except BaseException:
                        with trio.CancelScope(shield=True):
                            await m.journal_io(m.journal.end, rec)
                        raise
                    entry.volumes[made.name] = made
                    upload.record = await self._made(entry, rec, made, fd)
                    upload.fd, upload.in_flight = fd, True
                return
            await self._changing(upload)
            await entry.backend.truncate_upload(upload.fd, size, m.room(entry))
        except (NoSpace, Invalid) as e:
            # Refused before anything changed: the writer may try another size. A volume
            # left at a refused size when it is closed is removed, as after a failure.
            upload.refused, upload.reason = True, e.message
            raise
        except BaseException as e:
            upload.failed = True
            upload.reason = e.message if isinstance(e, VsfsError) else "setting its size failed"
            raise
        upload.refused = False
        current = None if upload.orphaned else entry.volumes.get(upload.name)
        if current is not None and current.format == "raw":
            entry.volumes[upload.name] = replace(current, capacity=size, physical=size)

    async def write(self, upload: Upload, off: int, data: bytes, append: bool) -> int:
        """Write bytes into the volume (at its end as it is now, for O_APPEND)."""
        self._check_cancelled(upload)
        if upload.fd < 0:
            upload.failed = True
            upload.reason = (f"volume {upload.name} needs a size before data: truncate -s "
                             "SIZE first")
            raise Invalid(upload.reason)
        if upload.failed and upload.orphaned:
            raise WriteFailed(f"volume {upload.name} was removed after a failed write",
                              errno.EIO)
        # Written after it was settled (a shell's `> V` closed its first descriptor before
        # any data came): in flight again, so a daemon killed now leaves no half volume.
        await self._changing(upload)
        upload.written = True
        fd = upload.fd
        try:
            # Data always in a worker thread, even on a local disk (not quick_io): a
            # write may wait for writeback (dirty-page throttling) for a long time.
            if append:
                n = await trio.to_thread.run_sync(_append, fd, data)
            else:
                n = await trio.to_thread.run_sync(os.pwrite, fd, data, off)
        except OSError as e:
            upload.failed = True
            upload.reason = f"writing volume {upload.name}: {e.strerror}"
            raise WriteFailed(upload.reason, e.errno or errno.EIO) from None
        upload.refused = False  # the writer went on after a refused size
        if upload.job is not None:
            upload.job.done += n
        return n

    async def read(self, upload: Upload, off: int, size: int) -> bytes:
        fd = upload.fd
        if fd < 0:
            return b""
        return await trio.to_thread.run_sync(os.pread, fd, size, off)

    async def set_owner(self, upload: Upload, mode: int | None, uid: int, gid: int) -> None:
        """``cp -p``, ``install -m``: a volume being written is the writer's file."""
        try:
            await self.m.entry(upload.pool).backend.quick_io(
                _set_owner, upload.fd, mode, uid, gid)
        except OSError as e:
            raise WriteFailed(f"setting the mode or owner of volume {upload.name}: "
                              f"{e.strerror}", e.errno or errno.EIO) from None

    async def set_times(self, upload: Upload, atime_ns: int | None,
                        mtime_ns: int | None) -> None:
        """``touch -d``, ``cp -p``: the times go to the new volume's file."""
        try:
            await self.m.entry(upload.pool).backend.quick_io(
                _set_times, upload.fd, atime_ns, mtime_ns)
        except OSError as e:
            raise WriteFailed(f"setting the times of volume {upload.name}: {e.strerror}",
                              e.errno or errno.EIO) from None

    async def sync(self, upload: Upload, datasync: bool) -> None:
        if upload.fd >= 0:
            await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, upload.fd)

    async def flush(self, upload: Upload) -> None:
        """A close of one of its descriptors (the writer waits for it): settle it; a
        cancelled upload's writer learns it here if not before (ECANCELED)."""
        await self.settle(upload)
        self._check_cancelled(upload)

    async def _changing(self, upload: Upload) -> None:
        """Before an upload's volume changes after it was settled (through a descriptor
        still open): in flight again until the next close settles it, so that a daemon
        killed meanwhile leaves nothing half-written."""
        self._check_cancelled(upload)
        if upload.record is not None and not upload.in_flight and not upload.orphaned:
            await self.m.journal_io(self.m.journal.put, upload.record)
            upload.in_flight = True

    async def _made(self, entry: PoolEntry, rec: InFlight, vol: Volume, fd: int) -> InFlight:
        """Record in the journal what the backend made for an upload: its inode, or its
        device, so that only that is ever removed after a crash, never a volume made later
        under the same name. What cannot be recorded is undone."""
        m = self.m
        try:
            st, gen = await entry.backend.quick_io(identity, fd)
            if stat.S_ISBLK(st.st_mode):
                return await m.journal_io(m.journal.identify, rec, "block",
                                          st.st_rdev, 0, -1, vol.key)
            if stat.S_ISREG(st.st_mode) and not entry.backend.on_demand_paths:
                return await m.journal_io(m.journal.identify, rec, "file",
                                          st.st_dev, st.st_ino, gen, vol.key)
            # A path served on demand (an export): its inode says nothing later.
            return await m.journal_io(m.journal.identify, rec, "other", 0, 0, -1, vol.key)
        except BaseException:
            with trio.CancelScope(shield=True):
                with contextlib.suppress(OSError):
                    await entry.backend.quick_io(os.close, fd)
                await m.discard(entry, vol)
                with contextlib.suppress(VsfsError):
                    await m.journal_io(m.journal.end, rec)
            raise

    async def settle(self, upload: Upload, last: bool = False) -> None:
        """Settle the volume at a close of the upload.

        Runs on every close (flush, which the writer waits for), so that when
        ``truncate`` or ``cp`` returns the volume is either complete and listed as
        a symlink, or gone. The first close lists it (LISTED); a descriptor still open
        keeps working, and a later close settles what it did: bytes written are probed
        again, and a failed write removes the volume. The descriptor itself stays open
        until the last release (*last*).
        """
        if upload.orphaned:
            return
        m = self.m
        key = (upload.pool, upload.name)
        first = upload.phase is Phase.OPEN
        if first:
            upload.phase = Phase.LISTED
            if last and self._live.get(key) is upload:
                del self._live[key]
        entry = m.pools.get(upload.pool)
        vol = entry.volumes.get(upload.name) if entry is not None else None
        removed = False
        kept = False  # a bad volume that could not be removed: left to the next start
        if entry is not None and vol is not None and (upload.bad or upload.written):
            async with entry.locked():
                if upload.fd >= 0 and not await entry.backend.quick_io(
                        _same_file, upload.fd, vol.path):
                    # Replaced behind vsfs's back: that volume is not this upload's.
                    self._let_go(upload)
                elif upload.bad:
                    kept = not await m.discard(entry, vol)
                    self._let_go(upload)
                    removed = not kept
                    if removed:
                        log.info("volume %s/%s removed: its upload %s", upload.pool, upload.name,
                                 "was cancelled" if upload.cancelled else
                                 "failed" if upload.failed else "was refused its size")
                        if not first:  # listed (and told as created) before
                            m.volume_changed(upload.pool, upload.name, "deleted")
                else:
                    upload.written = False
                    # Bytes came in: they may be an image (a qcow2 copied in).
                    try:
                        entry.volumes[upload.name] = await entry.backend.volume(upload.name)
                    except NotFound:
                        entry.volumes.pop(upload.name, None)
        if upload.in_flight and upload.record is not None and not kept:
            # Settled (complete, gone, or not its own) before the writer's close returns:
            # a crash from now on must not take it away.
            await m.journal_io(m.journal.end, upload.record)
            upload.in_flight = False
        if first and not removed and not upload.orphaned:
            # Listed from now on, as a symlink: a volume to use (the adapter drops the
            # regular file's entry). Its job goes on until the last close.
            m.volume_changed(upload.pool, upload.name, "created")

    def _let_go(self, upload: Upload) -> None:
        """Settle nothing more for an upload: its volume is gone, or not its own."""
        upload.orphaned = True
        key = (upload.pool, upload.name)
        if self._live.get(key) is upload:
            del self._live[key]

    async def close(self, upload: Upload) -> None:
        """The last descriptor of an upload is closed (CLOSED); its job ends."""
        m = self.m
        key = (upload.pool, upload.name)
        # At once, before any wait: a delete right after `cp` must not find it in use.
        if upload.phase is not Phase.OPEN and self._live.get(key) is upload:
            del self._live[key]
        if upload.job is not None:
            why = (Canceled("cancelled") if upload.cancelled else
                   VsfsError(upload.reason or "a write failed")
                   if upload.failed or upload.refused else None)
            m.jobs.finish(upload.job, why)
        try:
            await self.settle(upload, last=True)
        finally:
            upload.phase = Phase.CLOSED
            # No longer this upload's before it is closed: a listing made meanwhile (a
            # stale node of a directory snapshot) must not fstat a number that another
            # open may be given next.
            fd, upload.fd = upload.fd, -1
            if fd >= 0:
                entry = m.pools.get(upload.pool)
                if entry is not None:
                    await entry.backend.quick_io(os.close, fd)
                else:
                    await trio.to_thread.run_sync(os.close, fd)
