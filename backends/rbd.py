"""``rbd`` pools: a Ceph RADOS pool; volumes are its RBD images.

Ceph is asked through its own CLI (``rbd``, ``rados``, JSON output), with a
configuration vsfs writes from the pool's XML (monitors, ``rbd:config_opts``,
the cephx user and a key file readable only by root). Images have no local
device, so each one is exported by the pool's qemu-storage-daemon over FUSE
onto a file: ``volumes/IMAGE`` points there and any tool can use it, while
the XML keeps libvirt's ``POOL/IMAGE``.

RBD snapshots are volumes named ``IMAGE@SNAP``: read-only, exported too,
deleted with ``rm``; ``snapshot NEW`` makes one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from pathlib import Path
from typing import Any, ClassVar

import trio

from vsfs.errors import (
    BackendFailed,
    Busy,
    Exists,
    Invalid,
    NotEmpty,
    NotFound,
    Unsupported,
    VsfsError,
)
from vsfs.model import PoolDef, PoolStatus, Room, Volume, VolumeDef
from vsfs.proc import ProgressWatch, RbdProgress, run
from vsfs.state import atomic_write

from .base import Services, Snapshot
from .cmdout import integer, json_list, json_object, objects, string, unexpected
from .exports import ExportingBackend

log = logging.getLogger(__name__)

MSGR1_PORT = 6789
# The advisory lock each mount takes on an image it exports writable.
LOCK_OBJECT = "vsfs_lock."
LOCK_NAME = "vsfs"
TOOLS = ("rbd", "rados", "qemu-storage-daemon", "fallocate")
# Other hosts' changes (images made, resized, removed there) are looked for this often.
POLL_EVERY = 5.0


def _rbd_error(e: BackendFailed, what: str) -> VsfsError:
    msg = e.stderr or e.message
    errors = [ln for ln in msg.splitlines() if "rbd: " in ln or "error" in ln.lower()]
    last = (errors or msg.strip().splitlines() or [e.message])[-1].strip()
    if "still has watchers" in msg:
        return Busy(f"{what}: the image is open elsewhere (another host uses it)")
    if "Device or resource busy" in msg or "already held" in msg:
        return Busy(f"{what}: {last}")
    if "has snapshots" in msg:
        return NotEmpty(f"{what}: the image has snapshots; remove them first (rm IMAGE@SNAP)")
    if "File exists" in msg or "already exists" in msg:
        return Exists(f"{what}: {last}")
    if "No such file or directory" in msg or "does not exist" in msg:
        return NotFound(f"{what}: {last}")
    return BackendFailed(f"{what}: {last}")


def _mon_address(name: str, port: int | None) -> str:
    host = f"[{name}]" if ":" in name and not name.startswith("[") else name
    if port is None:
        return host  # Ceph tries msgr2 on 3300, then msgr1 on 6789
    return f"{'v1' if port == MSGR1_PORT else 'v2'}:{host}:{port}"


# rados df --format json (Ceph 16), one line; total_* in KiB, a pool's size_bytes in bytes:
#   {"pools":[{"name":"vsfs","id":1,"size_bytes":19,"size_kb":1,"num_objects":1,...}],
#    "total_objects":1,"total_used":17,"total_avail":1048558,"total_space":1048576}
def parse_df(text: str, rados_pool: str) -> PoolStatus:
    """The pool's status as libvirt gives it: the cluster's raw size and room, the pool's
    own bytes."""
    what = "rados df"
    df = json_object(text, what)
    used = next((integer(p, "size_bytes", what) for p in objects(df.get("pools", []), what)
                 if p.get("name") == rados_pool), 0)
    return PoolStatus(capacity=integer(df, "total_space", what) * 1024, allocation=used,
                      available=integer(df, "total_avail", what) * 1024)


# rbd ls -l --format json (Ceph 16): images, and each snapshot after its image; nothing
# printed (or []) for an empty pool:
#   [{"image":"big","id":"10798ae0ff4","size":1073741824,"format":2},
#    {"image":"disk1","id":"10773c4212ca","snapshot":"s1","snapshot_id":4,
#     "size":67108864,"format":2,"protected":"false"}]
def parse_ls(text: str) -> list[dict[str, Any]]:
    """Rows of image (str), size (int) and, for a snapshot, snapshot (str)."""
    if not text.strip():
        return []
    what = "rbd ls"
    rows = objects(json_list(text, what), what)
    return [_row(string(r, "image", what), integer(r, "size", what), r.get("snapshot"), what)
            for r in rows]


def _row(image: str, size: int, snap: object, what: str) -> dict[str, Any]:
    if snap is not None and not isinstance(snap, str):
        raise unexpected(what, f"snapshot={snap!r}")
    return {"image": image, "size": size, **({"snapshot": snap} if snap else {})}


# rbd info --format json IMAGE[@SNAP] (Ceph 16), one line:
#   {"name":"disk1","id":"10773c4212ca","size":67108864,"objects":16,"order":22,...}
def parse_info(text: str, name: str) -> dict[str, Any]:
    """The one row of ``name`` (IMAGE or IMAGE@SNAP), as parse_ls gives it."""
    what = f"rbd info {name}"
    image, _, snap = name.partition("@")
    return _row(image, integer(json_object(text, what), "size", what), snap or None, what)


# rbd du --format json [IMAGE] (Ceph 16), one line; a snapshot's row names it:
#   {"images":[{"name":"disk1","id":"10773c4212ca","snapshot":"s1","snapshot_id":4,
#     "provisioned_size":67108864,"used_size":67108864},
#    {"name":"disk1","id":"10773c4212ca","provisioned_size":67108864,"used_size":0}]}
def parse_du(text: str) -> dict[tuple[str, str], int]:
    """(image, snapshot or "") -> the bytes it has allocated."""
    what = "rbd du"
    rows = objects(json_object(text, what).get("images", []), what)
    return {(string(r, "name", what), str(r.get("snapshot") or "")): integer(r, "used_size", what)
            for r in rows}


# rados lock info OBJECT NAME --format json (Ceph 16), one line:
#   {"name":"vsfs","type":"exclusive","tag":"","lockers":[{"name":"client.4258",
#    "cookie":"host1/abc","description":"vsfs on host1/abc","expiration":"0.000000",
#    "addr":"127.0.0.1:0/2848129643"}]}
def parse_lockers(text: str) -> list[dict[str, str]]:
    """Each holder of the lock: its client name and cookie."""
    if not text:
        return []
    what = "rados lock info"
    return [{"name": string(r, "name", what), "cookie": string(r, "cookie", what)}
            for r in objects(json_object(text, what).get("lockers", []), what)]


# rbd snap ls --format json IMAGE (Ceph 16), one line; [] when there are none:
#   [{"id":4,"name":"s1","size":67108864,"protected":"false","timestamp":"Wed Dec  2..."}]
def parse_snapshots(text: str) -> list[str]:
    what = "rbd snap ls"
    return [string(r, "name", what) for r in objects(json_list(text or "[]", what), what)]


# rbd status --format json IMAGE (Ceph 16): {"watchers":[]}; a watcher is an object with
# its client's "address".
def parse_watchers(text: str) -> list[str]:
    """The addresses of the clients that watch an image."""
    what = "rbd status"
    watchers = objects(json_object(text or "{}", what).get("watchers", []), what)
    return [a for w in watchers if isinstance(a := w.get("address"), str) and a]


class RbdBackend(ExportingBackend):
    pool_type: ClassVar[str] = "rbd"
    poll_interval: ClassVar[float] = 1.0

    def __init__(self, pool: PoolDef, services: Services | None = None) -> None:
        super().__init__(pool, services)
        self._next_poll = 0.0
        self._seen: dict[str, int] | None = None
        # Exported volumes and when their path was last asked for.

    @classmethod
    def validate(cls, pool: PoolDef) -> None:
        if not pool.source.name:
            raise Invalid("an rbd pool needs the RADOS pool in <source><name>")
        if pool.source.auth is not None and pool.source.auth.type != "ceph":
            raise Invalid(f"rbd pools take <auth type='ceph'>, not {pool.source.auth.type!r}")

    @property
    def rados_pool(self) -> str:
        assert self.pool.source.name is not None
        return self.pool.source.name

    # ---------------------------------------------------------------- configuration

    def _conf_path(self) -> Path:
        return self.run_dir() / "ceph.conf"

    def _key_path(self) -> Path:
        return self.run_dir() / "key"

    def _write_config(self) -> None:
        """The Ceph configuration (and key file) for this pool's commands. Blocking."""
        lines = ["[global]"]
        hosts = self.pool.source.hosts
        if hosts:
            lines.append("mon_host = " + ",".join(_mon_address(h.name, h.port) for h in hosts))
        auth = self.pool.source.auth
        if auth is None:
            lines.append("auth_client_required = none")
        for key, value in self.pool.config_opts:
            if "\n" in key or "\n" in value:
                raise Invalid("rbd:config_opts may not hold newlines")
            lines.append(f"{key} = {value}")
        atomic_write(self._conf_path(), ("\n".join(lines) + "\n").encode())
        if auth is not None:
            atomic_write(self._key_path(), (self.secrets.ceph_key(auth) + "\n").encode())

    def _cli(self) -> list[str]:
        argv = ["--conf", str(self._conf_path())]
        auth = self.pool.source.auth
        if auth is not None:
            argv += ["--id", auth.username.removeprefix("client."),
                     "--keyfile", str(self._key_path())]
        return argv

    async def _rbd(self, *args: str, what: str, timeout: float = 120,
                   progress: ProgressWatch | None = None) -> str:
        try:
            return await run(["rbd", *self._cli(), "--pool", self.rados_pool, *args],
                             timeout=timeout, progress=progress)
        except BackendFailed as e:
            raise _rbd_error(e, what) from None

    def writable(self, name: str) -> bool:
        return "@" not in name  # snapshots are read-only

    def blockdev(self, name: str) -> dict[str, Any]:
        image, _, snap = name.partition("@")
        return self._blockdev(image, snap or None)

    def _blockdev(self, image: str, snap: str | None = None) -> dict[str, Any]:
        dev: dict[str, Any] = {"driver": "rbd", "pool": self.rados_pool, "image": image,
                               "conf": str(self._conf_path()), "discard": "unmap"}
        auth = self.pool.source.auth
        if auth is not None:
            dev["user"] = auth.username.removeprefix("client.")
            dev["key-secret"] = "cephkey"
        if snap is not None:
            dev["snapshot"] = snap
            dev["read-only"] = True
        return dev

    def qsd_objects(self) -> list[str]:
        if self.pool.source.auth is None:
            return []
        return [f"secret,id=cephkey,file={self._key_path()},format=base64"]

    # ---------------------------------------------------------------- pools

    async def is_running(self) -> bool:
        if not await self.daemon_running():
            return False
        await trio.to_thread.run_sync(self._write_config)
        return True

    async def check_storage(self) -> None:
        self.require_tools(TOOLS, "ceph-common, qemu-system-common, qemu-block-extra")
        await trio.to_thread.run_sync(self._write_config)
        await self._rbd("ls", what=f"RADOS pool {self.rados_pool}", timeout=60)

    async def stop(self) -> None:
        await self.stop_exports()  # the key file goes with the runtime directory
        self._seen = None

    async def _status(self) -> PoolStatus:
        try:
            out = await run(["rados", *self._cli(), "df", "--format", "json"], timeout=60)
        except BackendFailed as e:
            raise _rbd_error(e, "rados df") from None
        return parse_df(out, self.rados_pool)

    async def status(self) -> PoolStatus:
        return await self._status()

    async def _images(self, image: str | None = None) -> list[dict[str, Any]]:
        """Every image and snapshot (or one image's) with its size: one ``rbd ls -l``, and
        one ``rbd du`` for what each has allocated."""
        if image is None:
            out = await self._rbd("ls", "-l", "--format", "json",
                                  what=f"listing {self.rados_pool}")
            rows = parse_ls(out)
        else:
            rows = [parse_info(await self._rbd("info", "--format", "json", image,
                                               what=f"image {image}"), image)]
        try:
            out = await self._rbd("du", "--format", "json", *([image] if image else []),
                                  what="allocation", timeout=300)
            used = parse_du(out)
        except VsfsError as e:
            # rbd du fails on an image of size 0 (Ceph 16): count images as allocated.
            log.debug("pool %s: rbd du: %s", self.pool.name, e.message)
            used = {}
        for row in rows:
            row["used"] = used.get((row["image"], row.get("snapshot") or ""), int(row["size"]))
        return rows

    @staticmethod
    def _name_of(row: dict[str, Any]) -> str:
        return str(row["image"]) + (f"@{row['snapshot']}" if row.get("snapshot") else "")

    def _volume(self, row: dict[str, Any], path: str) -> Volume:
        name = self._name_of(row)
        size = int(row["size"])
        return Volume(name=name, key=f"{self.rados_pool}/{name}", path=path, type="network",
                      format="raw", capacity=size, allocation=int(row["used"]),
                      physical=size, xml_path=f"{self.rados_pool}/{name}")

    async def refresh(self) -> Snapshot:
        rows = await self._images()
        status = await self._status()
        vols = [self._volume(row, self.qsd.path_of(self._name_of(row))) for row in rows]
        for gone in set(self._exports) - {v.name for v in vols}:  # removed elsewhere
            await self._unexport(gone)
        self._seen = {v.name: v.capacity for v in vols}
        self._next_poll = trio.current_time() + POLL_EVERY
        return Snapshot(status, tuple(sorted(vols, key=lambda v: v.name)))

    # ---------------------------------------------------------------- local paths

    @property
    def lock_cookie(self) -> str:
        """Names this mount (host and state directory) in the advisory locks."""
        tag = self.services.run_dir.name if self.services is not None else "-"
        return f"{socket.gethostname()}/{tag}"

    async def _rados(self, *args: str, what: str) -> str:
        try:
            return await run(["rados", *self._cli(), "--pool", self.rados_pool, *args],
                             timeout=60)
        except BackendFailed as e:
            raise _rbd_error(e, what) from None

    async def _lockers(self, image: str) -> list[dict[str, str]]:
        try:
            out = await self._rados("lock", "info", LOCK_OBJECT + image, LOCK_NAME,
                                    "--format", "json", what=f"lock of {image}")
        except NotFound:
            return []
        return parse_lockers(out)

    async def claim(self, name: str) -> None:
        if "@" not in name:
            await self._lock(name)

    async def release(self, name: str) -> None:
        if "@" not in name:
            with contextlib.suppress(NotFound):
                await self._unlock(name)

    async def _lock(self, image: str) -> None:
        """Claim the image for this mount: EBUSY while another mount (host) has it.

        An exclusive RADOS lock on an object of our own beside the image (RBD's own
        advisory locks would fight librbd's exclusive-lock feature, which QEMU uses).
        """
        try:
            await self._rados("lock", "get", LOCK_OBJECT + image, LOCK_NAME, "--lock-cookie",
                              self.lock_cookie, "--lock-type", "exclusive",
                              "--lock-description", f"vsfs on {self.lock_cookie}",
                              what=f"locking {image}")
        except Busy:
            holders = [lk["cookie"] for lk in await self._lockers(image)]
            if self.lock_cookie in holders:
                return  # ours already (a restart of vsfs)
            raise Busy(f"image {image!r} is in use by vsfs on {holders[0] if holders else '?'}; "
                       f"if that host is gone for good: rados -p {self.rados_pool} lock "
                       f"break {LOCK_OBJECT}{image} {LOCK_NAME} LOCKER") from None

    async def _unlock(self, image: str) -> None:
        for lk in await self._lockers(image):
            if lk["cookie"] == self.lock_cookie:
                await self._rados("lock", "break", LOCK_OBJECT + image, LOCK_NAME, lk["name"],
                                  "--lock-cookie", self.lock_cookie, what=f"unlocking {image}")

    async def _drop_lock_object(self, image: str) -> None:
        with contextlib.suppress(NotFound):
            await self._rados("rm", LOCK_OBJECT + image, what=f"lock of {image}")

    async def changed(self) -> bool:
        """Every few seconds, one ``rbd ls -l``: images other hosts made, resized or removed."""
        if trio.current_time() < self._next_poll:
            return False
        self._next_poll = trio.current_time() + POLL_EVERY
        out = await self._rbd("ls", "-l", "--format", "json", what="listing images")
        now = {self._name_of(r): int(r["size"]) for r in parse_ls(out)}
        return now != self._seen

    async def volume(self, name: str) -> Volume:
        rows = await self._images(name)
        return self._volume(rows[0], self.qsd.path_of(name))

    # ---------------------------------------------------------------- volumes

    def space_needed(self, vdef: VolumeDef) -> int:
        # Images are thin: nothing is taken from the cluster until written.
        return 0

    async def create_volume(self, vdef: VolumeDef) -> Volume:
        if (vdef.format or "raw") != "raw":
            raise Unsupported(f"rbd images are raw, not {vdef.format}")
        if "@" in vdef.name:
            raise Invalid("an image name cannot hold '@' (it names snapshots)")
        await self._rbd("create", "--size", f"{vdef.capacity}B", vdef.name,
                        what=f"creating {vdef.name}")
        try:
            # Exported at once: it is about to be written (cp, a clone).
            await self._export(vdef.name)
            return await self.volume(vdef.name)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._remove(vdef.name)
            raise

    async def _remove(self, name: str) -> None:
        await self._unexport(name)
        image, _, snap = name.partition("@")
        if snap:
            await self._rbd("snap", "rm", "--no-progress", f"{image}@{snap}",
                            what=f"removing {name}")
        else:
            await self._rbd("rm", "--no-progress", image, what=f"removing {name}")
            await self._drop_lock_object(image)

    async def delete_volume(self, vol: Volume) -> None:
        image, _, snap = vol.name.partition("@")
        if not snap:
            out = await self._rbd("snap", "ls", "--format", "json", image,
                                  what=f"image {image}")
            if parse_snapshots(out):
                raise NotEmpty(f"image {image!r} has snapshots; remove them first "
                               "(rm IMAGE@SNAP)")
        await self._remove(vol.name)

    async def rename_volume(self, vol: Volume, new_name: str) -> Volume:
        if "@" in vol.name or "@" in new_name:
            raise Unsupported("snapshots are not renamed here")
        # The export goes with the old name: not from under a process using it.
        held = (await self.volume_users([vol])).get(vol.name)
        if held:
            raise Busy(f"volume {vol.name!r} is in use: {'; '.join(held)}")
        await self._unexport(vol.name)
        await self._rbd("mv", f"{self.rados_pool}/{vol.name}", f"{self.rados_pool}/{new_name}",
                        what=f"renaming {vol.name}")
        await self._drop_lock_object(vol.name)
        return await self.volume(new_name)

    async def _resize(self, vol: Volume, capacity: int) -> Volume:
        if "@" in vol.name:
            raise Unsupported("snapshots cannot be resized")
        if vol.name in self._exports:
            # Through the export, which QEMU resizes together with the image: the kernel
            # takes the new size from the reply, where after a QMP block_resize it would
            # serve the old one from its attribute cache for another second.
            await self.qsd.resize(vol.name, capacity)
        else:
            await self._rbd("resize", "--no-progress", "--allow-shrink", "--size",
                            f"{capacity}B", vol.name, what=f"resizing {vol.name}")
        return await self.volume(vol.name)

    async def resize_volume(self, vol: Volume, capacity: int) -> Volume:
        if capacity < vol.capacity:
            raise Unsupported("shrinking an image cuts off its end: use 'shrink SIZE' in "
                              "volinfo/V/ctl")
        return await self._resize(vol, capacity)

    async def shrink_volume(self, vol: Volume, capacity: int) -> Volume:
        return await self._resize(vol, capacity)

    async def snapshot_volume(self, vol: Volume, name: str) -> Volume:
        if "@" in vol.name:
            raise Unsupported("a snapshot of a snapshot: clone it first")
        if "@" in name or "/" in name:
            raise Invalid(f"bad snapshot name {name!r}")
        full = f"{vol.name}@{name}"
        await self._rbd("snap", "create", "--no-progress", full, what=f"snapshot of {vol.name}")
        return await self._made(full)

    async def _made(self, name: str) -> Volume:
        """The image (or snapshot) just made under ``name``, or, if vsfs cannot read it back
        or is being cancelled meanwhile, nothing: it is removed again."""
        try:
            return await self.volume(name)
        except BaseException:
            await self._discard(name)
            raise

    async def _fence_watchers(self, image: str) -> None:
        """Blocklist the clients that still watch an image only vsfs's own killed command
        had open (the copy it was making), so that it can be removed at once rather than
        after Ceph's watch time-out. As Ceph's documentation says to for a client that is
        gone; an rbd user's `profile rbd` may do it. Each address names one process."""
        try:
            out = await self._rbd("status", "--format", "json", image, what=f"image {image}",
                                  timeout=30)
            watchers = parse_watchers(out)
        except VsfsError:
            return
        for addr in watchers:
            try:
                await run(["ceph", *self._cli(), "osd", "blocklist", "add", addr],
                          timeout=30)
                log.info("pool %s: %s was still watched by %s (a killed copy): blocklisted",
                         self.pool.name, image, addr)
            except VsfsError as e:
                log.warning("pool %s: could not blocklist %s, which still watches %s: %s",
                            self.pool.name, addr, image, e.message)

    async def _discard(self, name: str) -> None:
        """Remove what a failed or cancelled action made (or half made), even while being
        cancelled; what cannot be removed is logged."""
        with trio.CancelScope(shield=True):
            try:
                await self._remove(name)
            except NotFound:
                pass
            except VsfsError as e:
                log.warning("pool %s: %s is left half made: %s", self.pool.name, name,
                            e.message)

    async def clone_volume(self, vdef: VolumeDef, source: Volume) -> Volume:
        """A full, independent copy: ``rbd cp`` inside the pool, else QEMU copies the bytes.

        Progress: rbd's own (each whole percent) or qemu-img's. Failed or cancelled (the
        copy is killed), the new image is removed, unless it was there before (EEXIST)."""
        if source.key == f"{self.rados_pool}/{source.name}":
            try:
                await self._rbd("cp", f"{self.rados_pool}/{source.name}",
                                f"{self.rados_pool}/{vdef.name}",
                                what=f"copying {source.name}", timeout=3600,
                                progress=RbdProgress(source.capacity))
            except Exists:
                raise  # another's: not ours to remove
            except BaseException:
                # The copy made it, or part of it. A killed `rbd cp` (a cancel) still
                # watches it until the OSDs time the watch out (30 s): fenced first.
                with trio.CancelScope(shield=True):
                    await self._fence_watchers(vdef.name)
                await self._discard(vdef.name)
                raise
            return await self._made(vdef.name)
        return await self.clone_by_copy(vdef, source)

    def open_volume(self, vol: Volume, flags: int) -> int:
        if "@" in vol.name:
            raise Unsupported("snapshots are read-only")
        return os.open(vol.path, flags | os.O_CLOEXEC)  # the export: QEMU serves the bytes

    async def truncate_upload(self, fd: int, size: int, room: Room) -> None:
        # Thin, as at creation (room is not asked): the export passes the new size on.
        await trio.to_thread.run_sync(os.ftruncate, fd, size)
