"""The storage service: pools, their state and volumes, and every action on them.

This is where the contract's rules live (what may happen to an active pool,
ENOSPC, EEXIST, rollback of half-done work). It knows nothing of FUSE; the
tree calls it and the FUSE adapter only translates.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Collection, Iterator
from dataclasses import dataclass, field

import trio

from .backends import BACKENDS, Backend
from .backends.base import Services, Snapshot, T
from .backends.blockdev import filesystem_type
from .backends.dir import LOCAL_FILESYSTEMS
from .backends.host import HostDevices
from .errors import (
    Busy,
    CrossDevice,
    Exists,
    Invalid,
    NotFound,
    Unsupported,
    VsfsError,
)
from .feed import Change, Feed, ref
from .jobs import Job, Jobs, report
from .model import (
    Permissions,
    PoolDef,
    PoolState,
    PoolStatus,
    Room,
    Volume,
    VolumeDef,
    VolumeTable,
    backing_key,
    check_name,
    check_space,
    data_format,
)
from .paths import runtime_dir
from .secrets import SecretStore
from .state import JOURNAL_NAME, InFlight, StateDir, UploadJournal, remove_temporaries
from .uploads import Uploads, identity
from .xmlio import LIBVIRT_POOL_TYPES, normalize_uuid, parse_pool, parse_volume

log = logging.getLogger(__name__)

# Called with the path of a symlink and its target, whose target the kernel must read again.
LinkForgetter = Callable[[tuple[str, ...], str], Awaitable[None]]


class _Held:
    """``async with`` for a trio Lock that does not pass through the scheduler when
    the lock is free: a FUSE handler that never waits is served without a task
    switch (see the pyfuse3 fast-loop patch), and most volume operations take
    their pool's lock uncontended."""

    __slots__ = ("entry",)

    def __init__(self, entry: PoolEntry) -> None:
        self.entry = entry

    async def __aenter__(self) -> None:
        lock = self.entry.lock
        try:
            lock.acquire_nowait()
            return
        except trio.WouldBlock:
            pass
        await lock.acquire()
        if self.entry.undefined:
            # Undefined while we waited (and maybe defined anew: another entry). What was
            # asked of this pool has nothing left to act on.
            lock.release()
            raise NotFound(f"pool {self.entry.pool.name!r} was undefined meanwhile")

    async def __aexit__(self, *exc: object) -> None:
        self.entry.lock.release()


@dataclass
class PoolEntry:
    pool: PoolDef
    backend: Backend
    autostart: bool = False
    state: PoolState = PoolState.INACTIVE
    status: PoolStatus = field(default_factory=PoolStatus)
    live_perms: Permissions | None = None
    volumes: VolumeTable = field(default_factory=VolumeTable)
    lock: trio.Lock = field(default_factory=trio.Lock)
    # When each volume, or the whole pool, was last read from the backend.
    read_at: dict[str, float] = field(default_factory=dict)
    scanned_at: float = float("-inf")
    # Undefined: a task that waited for its lock must not act on it any more.
    undefined: bool = False
    # The job that builds it, while one does.
    building: Job | None = None

    @property
    def running(self) -> bool:
        return self.state in (PoolState.RUNNING, PoolState.DEGRADED)

    def locked(self) -> _Held:
        """The pool's lock, held for one change of the pool or its volumes."""
        return _Held(self)


# A volume being made when vsfs died, recorded before the backend could say what it made,
# is taken for the volume found under its name only if that is as the backend would have
# left it, and made no sooner than the record (the file's ctime, on a coarse clock) nor
# much later (the daemon died within the creation).
_CLOCK_SLACK_NS = 1_000_000_000
_MAKING_BOUND_NS = 60_000_000_000
# LVM rounds a size up to whole extents.
_ROUNDING = 64 << 20


def _cut_short(rec: InFlight, vol: Volume) -> bool | None:
    """Whether ``vol`` is the volume ``rec`` records as being made when vsfs died; None
    when its pool cannot tell (a path served on demand). Blocking."""
    if rec.kind == "other":
        return None
    if rec.kind == "block" or (not rec.kind and rec.size >= 0):
        try:
            st = os.stat(vol.path)  # through its link (/dev/VG/LV)
        except OSError:
            return False
        if not stat.S_ISBLK(st.st_mode):
            return False
        if rec.kind == "block":
            return st.st_rdev == rec.dev and vol.key == rec.key
        # Killed while the backend made it: a device of the size asked.
        return rec.size <= vol.capacity < rec.size + _ROUNDING
    try:
        fd = os.open(vol.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False  # gone, or a link: not what vsfs made
    try:
        st, gen = identity(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(st.st_mode):
        return False
    if rec.kind == "file":
        # The generation, where there is one, rather than the device number: a filesystem
        # mounted again (a netfs pool, an image on another loop device) gets a new one.
        same = gen == rec.gen if rec.gen >= 0 else st.st_dev == rec.dev
        return same and st.st_ino == rec.ino
    # Killed while the backend made it: an empty file, made since the record.
    return (st.st_size == 0 and rec.since_ns - _CLOCK_SLACK_NS <= st.st_ctime_ns
            <= rec.since_ns + _MAKING_BOUND_NS)


class Manager:
    """Pools and volumes, and every action on them.

    Locks (docs/architecture.md): a pool's lock is held for its own lifecycle (start,
    stop, refresh, ...) and for short changes of its volumes (one backend call that
    makes, removes or resizes one); never for a long one. A long operation (clone,
    wipe, snapshot, a volume made from XML, build, an upload) is a job (vsfs.jobs):
    its checks and its reservation of names and space are made under the lock, its
    work outside it, holding only its volumes; any action on those gets EBUSY at
    once, naming the job. Every change is published on ``feed``.
    """

    def __init__(self, state: StateDir) -> None:
        self.state = state
        self.pools: dict[str, PoolEntry] = {}
        self.feed = Feed()
        self.jobs = Jobs(self.feed.publish)
        self.uploads = Uploads(self)
        self._forget_link: LinkForgetter | None = None
        self._define_lock = trio.Lock()
        self.host = HostDevices()
        self.services = Services(SecretStore(state.path / "secrets"), runtime_dir(state.path))
        self.journal = UploadJournal(state.path / JOURNAL_NAME)
        # Whether the state directory is on a local filesystem: the journal's few syscalls
        # then run inline, as Backend.quick_io does (set by load).
        self._journal_inline = False

    def shutdown(self) -> None:
        """The daemon is asked to stop: cancel every running job (each removes what it
        half made, and its writer gets ECANCELED) and end every wait for events, so that
        no request keeps the main loop from ending."""
        for job in self.jobs.running():
            job.cancel()
        self.feed.close()

    def set_link_forgetter(self, forget_link: LinkForgetter) -> None:
        """Who makes the kernel read a symlink's target again (reap: not a change of
        the storage, so not on the feed)."""
        self._forget_link = forget_link

    def _pool_changed(self, entry: PoolEntry, event: str,
                      gone: Collection[str] = ()) -> None:
        self.feed.publish(Change("pool", (entry.pool.name,), event,
                                 touches=tuple((entry.pool.name, v) for v in gone)))

    def volume_changed(self, pool: str, name: str, event: str, detail: str = "") -> None:
        self.feed.publish(Change("volume", (pool, name), event, detail))

    def _job_in_pool(self, entry: PoolEntry, doing: str) -> None:
        """EBUSY, naming the job, if one works in the pool (or builds it)."""
        job = entry.building or self.jobs.in_pool(entry.pool.name)
        if job is not None:
            raise Busy(f"pool {entry.pool.name!r} cannot be {doing} while job {job.id} "
                       f"runs: {job.what}")

    def check_new_name(self, entry: PoolEntry, name: str) -> None:
        """A new volume's name must be free: not listed, not being made by a job."""
        pool = entry.pool.name
        if name in entry.volumes:
            raise Exists(f"volume {name!r} already exists in pool {pool!r}")
        job = self.jobs.holder(pool, name)
        if job is not None:
            raise Busy(job.conflict(pool, name))

    # ---------------------------------------------------------------- loading

    async def load(self) -> None:
        """Read every definition, adopt pools that are already up, start autostart ones."""
        await trio.to_thread.run_sync(self.state.ensure)

        def after_a_crash() -> None:
            # What killed writes left: temporary files (here and in the runtime directory,
            # per pool), links of undefined pools, uploads in flight (dealt with as each
            # pool starts: _activate).
            self.state.remove_litter()
            run = self.services.run_dir
            for directory in [run, *(run.iterdir() if run.is_dir() else [])]:
                if directory.is_dir() and not directory.is_symlink():
                    remove_temporaries(directory)
            self.journal.recover()
            self._journal_inline = filesystem_type(str(self.state.path)) in LOCAL_FILESYSTEMS
        await trio.to_thread.run_sync(after_a_crash)
        await self.host.refresh()
        stored = await trio.to_thread.run_sync(lambda: list(self.state.load()))
        uuids: dict[str, str] = {}
        for sp in stored:
            cls = BACKENDS.get(sp.pool.type)
            if cls is None:
                log.error("pool %s: type %r is not supported; left out", sp.pool.name,
                          sp.pool.type)
                continue
            other = uuids.setdefault(sp.pool.uuid, sp.pool.name)
            if other != sp.pool.name:
                # As libvirt does: the first definition (by name) keeps the UUID.
                log.error("pool %s: UUID %s is pool %s's already; left out", sp.pool.name,
                          sp.pool.uuid, other)
                continue
            self.pools[sp.pool.name] = PoolEntry(sp.pool, cls(sp.pool, self.services), sp.autostart)
        for entry in self.pools.values():
            try:
                if await entry.backend.is_running():
                    await self._activate(entry, start=False)
                elif entry.autostart:
                    await self._activate(entry, start=True)
            except VsfsError as e:
                log.error("pool %s: autostart failed: %s", entry.pool.name, e)

    # ---------------------------------------------------------------- lookups

    def entry(self, name: str) -> PoolEntry:
        """A defined pool; ENOENT for a name never defined (or undefined)."""
        try:
            return self.pools[name]
        except KeyError:
            raise NotFound(f"no pool named {name!r}") from None

    def running_entry(self, name: str) -> PoolEntry:
        """A running pool; EINVAL (with the command that starts it) for an inactive one."""
        entry = self.entry(name)
        if not entry.running:
            raise Invalid(f"pool {name!r} is not active (echo start > pools/{name}/ctl)")
        return entry

    def volume(self, pool: str, name: str) -> Volume:
        """A listed volume of a running pool, as last read (no backend call)."""
        entry = self.running_entry(pool)
        try:
            return entry.volumes[name]
        except KeyError:
            raise NotFound(f"no volume {name!r} in pool {pool!r}") from None

    def all_volumes(self) -> Iterator[tuple[str, Volume]]:
        """Every listed volume of every running pool, with its pool's name."""
        for name, entry in self.pools.items():
            if entry.running:
                for vol in entry.volumes.values():
                    yield name, vol

    def by_uuid(self, uuid: str) -> str | None:
        """The pool with this UUID, spelled any way libvirt takes (upper case, no dashes)."""
        try:
            uuid = normalize_uuid(uuid)
        except Invalid:
            return None
        for name, entry in self.pools.items():
            if entry.pool.uuid == uuid:
                return name
        return None

    def _first_running(self, find: Callable[[VolumeTable], Volume | None]
                       ) -> tuple[str, Volume] | None:
        for name, entry in self.pools.items():
            if entry.running:
                vol = find(entry.volumes)
                if vol is not None:
                    return name, vol
        return None

    def by_key(self, key: str) -> tuple[str, Volume] | None:
        """A running pool's volume with this key (libvirt's virStorageVolLookupByKey)."""
        return self._first_running(lambda vols: vols.with_key(key))

    def by_path(self, path: str) -> tuple[str, Volume] | None:
        """A running pool's volume with this path, as listed (virStorageVolLookupByPath)."""
        return self._first_running(lambda vols: vols.with_path(path))

    def by_normal_path(self, path: str) -> tuple[str, Volume] | None:
        """A running pool's volume whose path, normalised (model.normal_path), is ``path``."""
        return self._first_running(lambda vols: vols.with_normal_path(path))

    def has_volumes_below(self, directory: str) -> bool:
        """Whether a running pool has a volume below ``directory`` (normalised)."""
        return any(e.running and e.volumes.has_below(directory) for e in self.pools.values())

    def source_users(self, path: str) -> list[str]:
        """Running pools whose source device is ``path`` (pools nest)."""
        devices = [(name, d.path) for name, e in self.pools.items() if e.running
                   for d in e.pool.source.devices]
        if not devices:
            return []
        real = os.path.realpath(path)
        return list(dict.fromkeys(name for name, dev in devices
                                  if os.path.realpath(dev) == real))

    def in_use(self, pool: str, vol: Volume) -> str | None:
        """Why ``vol`` may not be deleted or renamed now, if anything."""
        if self.uploads.writing(pool, vol.name) is not None:
            return f"volume {vol.name!r} is still being written"
        job = self.jobs.holder(pool, vol.name)
        if job is not None:
            return job.conflict(pool, vol.name)
        users = self.source_users(vol.path)
        if users:
            return f"volume {vol.name!r} is the source of running pool {users[0]!r}"
        if not any(e.running and e.volumes.has_backing() for e in self.pools.values()):
            return None  # no overlays at all: spare the realpath below (rm of thousands)
        # Overlays name their backing file as they please (/a/./b, through a symlink).
        key = backing_key(vol.path)
        real = os.path.realpath(vol.path) if vol.path.startswith("/") else key
        overlay = self._first_running(lambda vols: vols.backed_by(key) or vols.backed_by(real))
        if overlay is not None:
            return f"volume {vol.name!r} is the backing store of {overlay[0]}/{overlay[1].name}"
        return None

    async def held(self, entry: PoolEntry, vols: Collection[Volume]) -> str | None:
        """Why one of ``vols`` is in use on this host as only its backend can tell (its
        local path open in a process, a device mounted, held or under a loop), if it is.
        Asked after ``in_use``; the pool's lock must be held."""
        users = await entry.backend.volume_users(vols)
        if not users:
            return None
        vol = next(v for v in vols if v.name in users)
        why = users[vol.name]
        more = f"; and {len(why) - 3} more" if len(why) > 3 else ""
        return f"volume {vol.name!r} is in use: {'; '.join(why[:3])}{more}"

    async def _not_in_use(self, entry: PoolEntry, vol: Volume, done: str) -> None:
        """Refuse to destroy what an overlay, a running pool, a writer or any process on
        this host relies on."""
        why = self.in_use(entry.pool.name, vol) or await self.held(entry, [vol])
        if why is not None:
            raise Busy(f"{why}: it cannot be {done}")

    # ---------------------------------------------------------------- pools

    async def define_pool(self, xml: bytes) -> PoolDef:
        """Define a pool from libvirt XML (``pools/define``), saved atomically in the
        state directory; inactive. EINVAL for XML that does not parse or cannot work for
        its type, EOPNOTSUPP for a libvirt type without a backend, EEXIST for a name,
        UUID, target directory or source device another pool has."""
        pool = parse_pool(xml)
        cls = self._backend_class(pool)
        async with self._define_lock:
            if pool.name in self.pools:
                raise Exists(f"pool {pool.name!r} already exists")
            await self._check_unique(pool, cls)
            await trio.to_thread.run_sync(self.state.save, pool)
            entry = self.pools[pool.name] = PoolEntry(pool, cls(pool, self.services))
        self._pool_changed(entry, "defined")
        log.info("pool %s defined (%s)", pool.name, pool.type)
        return pool

    def _backend_class(self, pool: PoolDef) -> type[Backend]:
        cls = BACKENDS.get(pool.type)
        if cls is None:
            if pool.type in LIBVIRT_POOL_TYPES:
                raise Unsupported(f"pools of type {pool.type!r} are not supported yet")
            raise Invalid(f"unknown pool type {pool.type!r}")
        cls.validate(pool)
        return cls

    async def _check_unique(self, pool: PoolDef, cls: type[Backend],
                            replacing: str | None = None) -> None:
        others = [(name, entry.pool) for name, entry in self.pools.items() if name != replacing]
        # A target spelled another way (/a/./b, /a/c/../b, a symlink to it) is the same
        # directory: compare where each leads. realpath may touch a slow mount: a thread.
        mounted = cls.volumes_in_target and pool.target_path is not None
        same_type = [p.target_path for _, p in others
                     if mounted and p.type == pool.type and p.target_path is not None]
        real = await trio.to_thread.run_sync(
            lambda: [os.path.realpath(t) for t in [pool.target_path or "", *same_type]])
        taken = dict(zip(same_type, real[1:], strict=True))
        for name, other in others:
            if other.uuid == pool.uuid:
                raise Exists(f"pool {name!r} already has UUID {pool.uuid}")
            if (other.target_path in taken and other.type == pool.type
                    and taken[other.target_path] == real[0]):
                raise Exists(f"pool {name!r} already uses target {other.target_path}"
                             + ("" if other.target_path == pool.target_path
                                else f" (the same directory as {pool.target_path})"))
            shared = {d.path for d in pool.source.devices} & {
                d.path for d in other.source.devices}
            if shared and cls.owns_source_devices:
                raise Exists(f"pool {name!r} already uses source device {shared.pop()}")

    async def redefine_pool(self, name: str, xml: bytes) -> PoolDef:
        """Replace an inactive pool's definition (``pools/P/xml``): same name, same
        UUID (kept when the XML has none). EBUSY while the pool is active or a job works
        in it; refused, the old definition stays."""
        entry = self.entry(name)
        new = parse_pool(xml, default_uuid=entry.pool.uuid)
        if new.name != name:
            raise Invalid(f"the XML names pool {new.name!r}, not {name!r}; pools are not "
                          "renamed through xml")
        if new.uuid != entry.pool.uuid:
            raise Invalid(f"pool {name!r} has UUID {entry.pool.uuid}, not {new.uuid}")
        cls = self._backend_class(new)
        async with entry.locked():
            self._job_in_pool(entry, "redefined")
            if entry.state != PoolState.INACTIVE:
                raise Busy(f"pool {name!r} is active; stop it before redefining it")
            await self._check_unique(new, cls, replacing=name)
            await trio.to_thread.run_sync(self.state.save, new)
            entry.pool = new
            entry.backend = cls(new, self.services)
        self._pool_changed(entry, "defined")
        log.info("pool %s redefined", name)
        return new

    async def undefine_pool(self, name: str) -> None:
        """Forget an inactive pool's definition (``rmdir pools/P``); its storage
        stays. EBUSY while it is active or a job works in it."""
        entry = self.entry(name)
        async with entry.locked():
            self._job_in_pool(entry, "undefined")
            if entry.state != PoolState.INACTIVE:
                raise Busy(f"pool {name!r} is active; stop it before undefining it")
            await trio.to_thread.run_sync(self.state.remove, name)
            del self.pools[name]
            entry.undefined = True
            for rec in self.journal.left_in(entry.pool.uuid):
                # Its storage stays, and no start of it will come to remove the volume.
                log.warning("pool %s: volume %s was being written when vsfs stopped and "
                            "may be incomplete; it stays, as the pool's storage does", name,
                            rec.name)
                with contextlib.suppress(VsfsError):
                    await self.journal_io(self.journal.forget, rec)
        self._pool_changed(entry, "undefined")
        log.info("pool %s undefined", name)

    async def set_autostart(self, name: str, on: bool) -> None:
        """Whether the pool starts when vsfs mounts (``pools/P/autostart``), kept as
        libvirt keeps it (a link in ``autostart/``)."""
        entry = self.entry(name)
        async with entry.locked():
            await trio.to_thread.run_sync(self.state.set_autostart, name, on)
            entry.autostart = on

    async def start_pool(self, name: str) -> None:
        """Activate an inactive pool (``start``): the backend's start, then its leftovers
        removed and its volumes read. EBUSY if it is active or a job builds it; failed,
        the backend's stop undoes the start."""
        entry = self.entry(name)
        async with entry.locked():
            self._job_in_pool(entry, "started")
            if entry.running:
                raise Busy(f"pool {name!r} is already active")
            await self._activate(entry, start=True)
        self._pool_changed(entry, "started")

    async def stop_pool(self, name: str) -> None:
        """Deactivate a running pool (``stop``). EBUSY, changing nothing, while a volume
        is being written, a job works in the pool, a volume is the source of a running
        pool or anything on the host holds one (``Backend.volume_users``)."""
        entry = self.entry(name)
        async with entry.locked():
            if not entry.running:
                raise Invalid(f"pool {name!r} is not active")
            busy = self.uploads.in_pool(name)
            if busy is not None:
                raise Busy(f"volume {busy.name!r} of pool {name!r} is still being written")
            self._job_in_pool(entry, "stopped")
            for vol in entry.volumes.values():
                users = self.source_users(vol.path)
                if users:
                    raise Busy(f"volume {vol.name!r} of pool {name!r} is the source of "
                               f"running pool {users[0]!r}; stop that first")
            # Stopping takes every local path away (an export, a LUN, a loop): not
            # from under a process that holds one.
            why = await self.held(entry, entry.volumes.values())
            if why is not None:
                raise Busy(f"{why}; pool {name!r} cannot be stopped")
            await entry.backend.stop()
            self._deactivate(entry)
        log.info("pool %s stopped", name)

    async def refresh_pool(self, name: str) -> None:
        """Read a running pool's volumes and sizes again (``refresh``); what changed
        outside vsfs is published as the pool poll would."""
        entry = self.entry(name)
        async with entry.locked():
            if not entry.running:
                raise Invalid(f"pool {name!r} is not active")
            await self._refresh(entry)
        self._pool_changed(entry, "refreshed")

    async def delete_pool(self, name: str) -> None:
        """Delete an inactive pool's storage (``delete``: the directory, the VG, the
        label); its definition stays (``rmdir`` undefines it)."""
        entry = self.entry(name)
        async with entry.locked():
            self._job_in_pool(entry, "deleted")
            if entry.state != PoolState.INACTIVE:
                raise Busy(f"pool {name!r} is active; stop it before deleting its storage")
            await entry.backend.delete()
        self._pool_changed(entry, "deleted")
        log.info("pool %s: storage deleted", name)

    async def build_pool(self, name: str, overwrite: bool = False) -> None:
        """Build an inactive pool's storage (``build``: mkfs, a label, a VG); with
        ``overwrite``, even over what a device holds. A job: the pool is ``building``
        meanwhile and every other action on it is EBUSY rather than a wait."""
        entry = self.entry(name)
        async with entry.locked():
            self._job_in_pool(entry, "built")
            if entry.state != PoolState.INACTIVE:
                raise Busy(f"pool {name!r} is active; stop it before building it")
            job = self.jobs.begin(f"build {ref(name)}", "built", (), reserved={name: 0})
            entry.state = PoolState.BUILDING
            entry.building = job
        try:
            async with self.jobs.run(job):
                await entry.backend.build(overwrite)
        finally:
            entry.state = PoolState.INACTIVE
            entry.building = None
        self._pool_changed(entry, "built")
        log.info("pool %s built", name)

    async def _activate(self, entry: PoolEntry, start: bool) -> None:
        if start:
            await entry.backend.start()
        try:
            # What a killed daemon left half-made (a copy under a temporary name), at a
            # start and at the adoption of a pool still up (a mounted fs pool) alike.
            await entry.backend.remove_leftovers()
            snap = await entry.backend.refresh()
        except BaseException:
            if start:
                with trio.CancelScope(shield=True):
                    try:
                        await entry.backend.stop()
                    except VsfsError as e:
                        log.error("pool %s: undoing start failed: %s", entry.pool.name, e)
            raise
        self._apply(entry, snap)
        if self.journal.left:
            await self._remove_cut_short(entry)
        entry.state = PoolState.RUNNING
        log.info("pool %s active with %d volumes", entry.pool.name, len(entry.volumes))

    async def _remove_cut_short(self, entry: PoolEntry) -> None:
        """Remove the volumes a killed daemon was still making through a file handle (the
        journal's records it left in flight): a volume of partial size would look like
        any other, and a VM given it would boot a truncated disk. Only the volume that
        was recorded, never one made since under the same name."""
        for rec in self.journal.left_in(entry.pool.uuid):
            vol = entry.volumes.get(rec.name)
            if vol is not None:
                ours = await trio.to_thread.run_sync(_cut_short, rec, vol)
                if ours is None:
                    log.warning("pool %s: volume %s may be incomplete: vsfs stopped while it "
                                "was being written, and a %s pool cannot tell whether it is "
                                "still that volume; check it", entry.pool.name, rec.name,
                                entry.pool.type)
                elif not ours:
                    log.info("pool %s: volume %s is not the one vsfs was writing when it "
                             "stopped: left alone", entry.pool.name, rec.name)
                elif await self.discard(entry, vol):
                    log.warning("pool %s: volume %s removed: vsfs stopped while it was being "
                                "written through a file handle, so it is incomplete",
                                entry.pool.name, rec.name)
                else:
                    continue  # still recorded: tried again at the next start
            try:
                await self.journal_io(self.journal.forget, rec)
            except VsfsError as e:
                log.error("pool %s: %s", entry.pool.name, e)

    def _deactivate(self, entry: PoolEntry) -> None:
        names = list(entry.volumes)
        entry.volumes.clear()
        entry.status = PoolStatus()
        entry.live_perms = None
        entry.state = PoolState.INACTIVE
        self._pool_changed(entry, "stopped", names)

    def _apply(self, entry: PoolEntry, snap: Snapshot) -> None:
        """Take what a refresh found. On a pool that was running, what changed outside
        vsfs is published; volumes a job is still making are left out (their job lists
        them when it ends well), as are uploads (listed from their start)."""
        pool = entry.pool.name
        making = self.jobs.creating(pool)
        found = [v for v in snap.volumes if v.name not in making]
        new = VolumeTable(found)
        if entry.running:
            uploading = self.uploads.names_in(pool)
            for vname in sorted(entry.volumes.keys() - new.keys() - uploading):
                self.volume_changed(pool, vname, "deleted")
            for vname in sorted(new.keys() - entry.volumes.keys() - uploading):
                self.volume_changed(pool, vname, "created")
            for vname in sorted(new.keys() & entry.volumes.keys() - uploading):
                if new[vname].capacity != entry.volumes[vname].capacity:
                    self.volume_changed(pool, vname, "resized", str(new[vname].capacity))
        entry.volumes = new
        entry.status = snap.status
        entry.live_perms = snap.live_perms
        entry.scanned_at = trio.current_time()
        entry.read_at.clear()

    async def _refresh(self, entry: PoolEntry) -> None:
        snap = await entry.backend.refresh()
        self._apply(entry, snap)

    async def watch_host(self) -> None:
        """Keep host/ current with the kernel's block device events."""
        def changed(kname: str, added: bool) -> None:
            self.feed.publish(Change("host", (kname,), "added" if added else "removed"))
        await self.host.watch(changed)

    async def poll(self) -> None:
        """Pick up changes made by other tools, as often as each backend asks."""
        while True:
            await trio.sleep(1.0)
            for entry in list(self.pools.values()):
                if not entry.running or entry.backend.poll_interval <= 0 or entry.lock.locked():
                    continue
                try:
                    async with entry.locked():
                        if entry.running and await entry.backend.changed():
                            log.debug("pool %s changed outside vsfs: rescanning",
                                      entry.pool.name)
                            await self._refresh(entry)
                        if entry.running and entry.backend.on_demand_paths:
                            await self._reap(entry)
                except VsfsError as e:
                    log.warning("pool %s: refresh failed: %s", entry.pool.name, e)
                except Exception:
                    # One pool's fault must not stop the others' polls.
                    log.exception("pool %s: looking for outside changes failed",
                                  entry.pool.name)

    async def _reap(self, entry: PoolEntry) -> None:
        for name in await entry.backend.reap():
            vol = entry.volumes.get(name)
            if vol is not None and self._forget_link is not None:
                # The kernel keeps symlink targets: it must ask again, so that the
                # next use makes the local path again.
                await self._forget_link(("pools", entry.pool.name, "volumes", name), vol.path)

    async def prepare_volume(self, pool: str, name: str) -> None:
        """Make a volume's local path usable (backends whose paths come on demand)."""
        entry = self.running_entry(pool)
        if not entry.backend.on_demand_paths:
            return
        async with entry.locked():
            await entry.backend.prepare_volume(self.volume(pool, name))

    async def pool_status(self, name: str) -> PoolStatus:
        """Current sizes of a running pool (cheap: no volume listing)."""
        entry = self.entry(name)
        if entry.running:
            entry.status = await entry.backend.status()
        return entry.status

    # ---------------------------------------------------------------- volumes

    def room(self, entry: PoolEntry) -> Room:
        """The pool's room rule as of now (vsfs.model.check_space): what the pool has
        free, less what running jobs have reserved there."""
        name, reserved = entry.pool.name, self.jobs.reserved(entry.pool.name)

        def check(status: PoolStatus, needed: int) -> None:
            check_space(name, status, needed, reserved)
        return check

    async def check_room(self, entry: PoolEntry, needed: int) -> None:
        """ENOSPC unless ``needed`` bytes fit in what the pool has free and running jobs
        have not reserved."""
        entry.status = await entry.backend.status()
        self.room(entry)(entry.status, needed)

    @staticmethod
    def _reserve(entry: PoolEntry, needed: int) -> int:
        """What a job making a volume of ``needed`` bytes reserves in the pool until it
        ends: all of it where the volume fills as the job writes (files, thin images);
        nothing where the backend takes it all at once when it makes the volume (an LV,
        a partition), which the pool then counts as used, and where two made at once
        cannot both get it (the second is ENOSPC from the backend)."""
        return 0 if entry.backend.sized_at_creation else needed

    def _not_held(self, pool: str, name: str) -> None:
        """EBUSY, naming the job, if a job holds the volume."""
        job = self.jobs.holder(pool, name)
        if job is not None:
            raise Busy(job.conflict(pool, name))

    async def _commit(self, entry: PoolEntry, vol: Volume) -> None:
        """List a volume a job made, before the job ends: under the pool's lock, so that
        a refresh in flight (which left it out as still being made) cannot drop it, and
        shielded, since once made whole it must not be lost to a cancel."""
        with trio.CancelScope(shield=True):
            async with entry.locked():
                entry.volumes[vol.name] = vol
        self.volume_changed(entry.pool.name, vol.name, "created")

    async def create_volume(self, pool: str, vdef: VolumeDef) -> Volume:
        """Create a volume from a definition (XML, mkdir). A job: a preallocated image or
        a volume a command makes may take long, and blocks no other volume meanwhile."""
        check_name(vdef.name, "volume name")
        entry = self.running_entry(pool)
        async with entry.locked():
            if not entry.running:
                raise Invalid(f"pool {pool!r} is not active")
            self.check_new_name(entry, vdef.name)
            entry.backend.require("create_volume", "create volumes")
            needed = entry.backend.space_needed(vdef)
            await self.check_room(entry, needed)
            job = self.jobs.begin(f"create {ref(pool, vdef.name)}", "created",
                                  [((pool, vdef.name), True)], creates=[(pool, vdef.name)],
                                  reserved={pool: self._reserve(entry, needed)})
        async with self.jobs.run(job):
            report(0, vdef.capacity)
            vol = await entry.backend.create_volume(vdef)
            await self._commit(entry, vol)
        log.info("volume %s/%s created (%s, %d bytes)", pool, vol.name, vol.format, vol.capacity)
        return vol

    async def create_volume_xml(self, pool: str, xml: bytes) -> Volume:
        """A volume from libvirt XML (``pools/P/volumes/define``): as
        ``create_volume``."""
        return await self.create_volume(pool, parse_volume(xml))

    async def journal_io(self, fn: Callable[..., T], *args: object) -> T:
        """A call on the journal of uploads: a few syscalls, inline when the state
        directory is local, else in a worker thread (a network filesystem may hang)."""
        if self._journal_inline:
            return fn(*args)
        return await trio.to_thread.run_sync(fn, *args)

    async def discard(self, entry: PoolEntry, vol: Volume) -> bool:
        """Remove a volume that must not stay (a failed upload); whether it is gone. One
        that stays (in use, say) stays listed: the journal has it removed at the next start."""
        try:
            await entry.backend.delete_volume(vol)
        except NotFound:
            pass
        except VsfsError as e:
            log.error("volume %s/%s: could not remove it: %s", entry.pool.name, vol.name, e)
            return False
        entry.volumes.pop(vol.name, None)
        return True

    async def delete_volume(self, pool: str, name: str) -> None:
        """Remove a volume and its data (``rm``, ``delete``). EBUSY, changing
        nothing, while it is written, held by a job, the source of a pool or of an
        overlay, or in use on the host (the holder named in MNT/error)."""
        entry = self.running_entry(pool)
        async with entry.locked():
            vol = self.volume(pool, name)
            why = self.in_use(pool, vol) or await self.held(entry, [vol])
            if why is not None:
                raise Busy(why)
            await entry.backend.delete_volume(vol)
            entry.volumes.pop(name, None)
        self.volume_changed(pool, name, "deleted")
        log.info("volume %s/%s deleted", pool, name)

    async def rename_volume(self, pool: str, name: str, new_pool: str, new_name: str) -> None:
        """Rename a volume within its pool (``mv``). EXDEV across pools (``clone
        NEW POOL`` copies), EEXIST for a taken name, EBUSY while it is in use."""
        check_name(new_name, "volume name")
        if new_pool != pool:
            raise CrossDevice("volumes move between pools with 'clone NEW POOL', not mv")
        entry = self.running_entry(pool)
        async with entry.locked():
            vol = self.volume(pool, name)
            if new_name == name:
                return
            self.check_new_name(entry, new_name)
            why = self.in_use(pool, vol)
            if why is not None:
                raise Busy(why)
            new = await entry.backend.rename_volume(vol, new_name)
            del entry.volumes[name]
            entry.volumes[new_name] = new
        self.volume_changed(pool, name, "renamed", ref(pool, new_name))
        log.info("volume %s/%s renamed to %s", pool, name, new_name)

    async def resize_volume(self, pool: str, name: str, capacity: int) -> Volume:
        """Give a volume ``capacity`` bytes (``volinfo/V/capacity``): growth must
        fit (ENOSPC), a smaller size only when nothing uses the volume (EBUSY)."""
        entry = self.running_entry(pool)
        async with entry.locked():
            self.volume(pool, name)
            self._not_held(pool, name)
            entry.backend.require("resize_volume", "resize volumes")
            # Its size now, not as last read: grown behind vsfs's back (a guest's
            # block_resize), a smaller capacity is a shrink and must meet the in-use check.
            vol = await self._current(entry, name)
            if capacity > vol.capacity:
                await self.check_room(entry, capacity - vol.capacity)
            elif capacity < vol.capacity:
                await self._not_in_use(entry, vol, "shrunk")
            new = await entry.backend.resize_volume(vol, capacity)
            entry.volumes[name] = new
        self.volume_changed(pool, name, "resized", str(new.capacity))
        log.info("volume %s/%s resized to %d bytes", pool, name, capacity)
        return new

    async def _current(self, entry: PoolEntry, name: str) -> Volume:
        """A volume as the backend has it now, for an action that goes by its size or
        format: both change behind vsfs's back without a rescan (a guest's block_resize,
        `qemu-img create` over the file). ENOENT for a name vsfs does not list. The pool's
        lock must be held."""
        self.volume(entry.pool.name, name)
        vol = entry.volumes[name] = await entry.backend.volume(name)
        return vol

    async def refresh_volume(self, pool: str, name: str) -> Volume:
        """One volume for a value file, re-read unless read in the last second.

        Sizes change as guests write; a second is what the kernel's attribute
        cache allows elsewhere, and it spares a backend call per file when a
        script reads every volume's values.
        """
        entry = self.running_entry(pool)
        now = trio.current_time()
        cached = entry.volumes.get(name)
        fresh = entry.backend.values_fresh_for
        if cached is not None and now - max(entry.scanned_at,
                                            entry.read_at.get(name, -fresh)) < fresh:
            return cached
        # Changed behind vsfs's back (a guest grew it, a tool removed it): told, unless
        # it is being written or made here, which tells its own changes.
        ours = self.uploads.writing(pool, name) is not None or self.jobs.holder(pool, name)
        try:
            vol = await entry.backend.volume(name)
        except NotFound:
            if entry.volumes.pop(name, None) is not None and not ours:
                self.volume_changed(pool, name, "deleted")
            raise
        before = entry.volumes.get(name)
        entry.volumes[name] = vol
        entry.read_at[name] = now
        if before is not None and before.capacity != vol.capacity and not ours:
            self.volume_changed(pool, name, "resized", str(vol.capacity))
        return vol

    async def shrink_volume(self, pool: str, name: str, capacity: int) -> Volume:
        """Shrink a volume (``shrink SIZE``), cutting off what lies past ``capacity``:
        only on this explicit command, never through ``capacity`` (which only grows).
        EBUSY while anything uses the volume."""
        entry = self.running_entry(pool)
        async with entry.locked():
            vol = await self._current(entry, name)
            await self._not_in_use(entry, vol, "shrunk")
            vol = entry.volumes[name] = await entry.backend.shrink_volume(vol, capacity)
        self.volume_changed(pool, name, "resized", str(vol.capacity))
        log.info("volume %s/%s shrunk to %d bytes", pool, name, capacity)
        return vol

    async def wipe_volume(self, pool: str, name: str) -> None:
        """Zero a volume: a job holding it alone (a cancelled wipe leaves it partly
        zeroed, which is what was asked of its data anyway)."""
        entry = self.running_entry(pool)
        async with entry.locked():
            vol = await self._current(entry, name)  # an image made over it: a fresh one
            await self._not_in_use(entry, vol, "wiped")
            job = self.jobs.begin(f"wipe {ref(pool, name)}", "wiped", [((pool, name), True)])
        async with self.jobs.run(job):
            report(0, vol.capacity)
            await entry.backend.wipe_volume(vol)
            entry.volumes[name] = await entry.backend.volume(name)
        log.info("volume %s/%s wiped", pool, name)

    async def clone_volume(self, pool: str, name: str, dest_pool: str, new_name: str) -> Volume:
        """Copy a volume into a new one, in its pool or another: a job holding the source
        (shared: others may copy it too, nothing may change it) and the new name."""
        check_name(new_name, "volume name")
        self.volume(pool, name)
        # Its size and format now, not as last read (a file still being written, an
        # image made over it): what the copy takes, and the space it reserves.
        src = await self.running_entry(pool).backend.volume(name)
        # The copy reads the source through its local path, which may come on demand.
        await self.prepare_volume(pool, name)
        dest = self.running_entry(dest_pool)
        async with dest.locked():
            self.check_new_name(dest, new_name)
            dest.backend.require("clone_volume", "hold copies of volumes")
            await self.check_room(dest, src.capacity)
            self.volume(pool, name)  # still there
            vdef = VolumeDef(name=new_name, capacity=src.capacity,
                             format=None if src.format == "dir" else data_format(src.format),
                             perms=Permissions(src.mode, src.owner, src.group))
            job = self.jobs.begin(
                f"clone {ref(pool, name)} -> {ref(dest_pool, new_name)}", "cloned",
                [((pool, name), False), ((dest_pool, new_name), True)],
                creates=[(dest_pool, new_name)],
                reserved={dest_pool: self._reserve(dest, src.capacity)})
        async with self.jobs.run(job):
            report(0, src.capacity)
            # A volume made at its size (an LV, a partition) has its name while the bytes
            # go in (file pools copy under a temporary name): in the journal of uploads
            # until the copy is done, so that a kill meanwhile leaves no half-copied volume.
            rec = (await self.journal_io(self.journal.begin, dest.pool.uuid, new_name,
                                          src.capacity)
                   if dest.backend.sized_at_creation else None)
            try:
                vol = await dest.backend.clone_volume(vdef, src)
            finally:
                if rec is not None:
                    with trio.CancelScope(shield=True):
                        await self.journal_io(self.journal.end, rec)
            await self._commit(dest, vol)
        log.info("volume %s/%s cloned to %s/%s", pool, name, dest_pool, new_name)
        return vol

    async def snapshot_volume(self, pool: str, name: str, new_name: str) -> Volume:
        """A copy-on-write snapshot (or the backend's copy): a job, as a clone is."""
        check_name(new_name, "volume name")
        entry = self.running_entry(pool)
        async with entry.locked():
            # Its format now: an overlay that took a qcow2 for raw would show its header.
            vol = await self._current(entry, name)
            self.check_new_name(entry, new_name)
            needed = entry.backend.snapshot_space(vol)
            if needed:
                await self.check_room(entry, needed)
            job = self.jobs.begin(
                f"snapshot {ref(pool, name)} -> {ref(pool, new_name)}", "snapshotted",
                [((pool, name), False), ((pool, new_name), True)],
                creates=[(pool, new_name)], reserved={pool: needed})
        async with self.jobs.run(job):
            snap = await entry.backend.snapshot_volume(vol, new_name)
            # Named by the backend: RBD's are IMAGE@SNAP.
            await self._commit(entry, snap)
        log.info("volume %s/%s: snapshot %s made", pool, name, new_name)
        return snap

