"""``dir`` pools: a directory of image files (libvirt's storage_backend_fs, dir part)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import stat
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

import trio

from vsfs.errors import (
    BackendFailed,
    Exists,
    Invalid,
    NoSpace,
    NotEmpty,
    NotFound,
    Unsupported,
    os_failure,
)
from vsfs.model import (
    BackingStore,
    Permissions,
    PoolDef,
    PoolStatus,
    Room,
    Volume,
    VolumeDef,
    data_format,
    volume_name_ok,
)
from vsfs.proc import DEFAULT_TIMEOUT, Growth, ProgressWatch, QemuImgProgress, run

from . import blockdev
from .base import Backend, Services, Snapshot, T
from .cmdout import integer, json_list, json_object, objects, unexpected

log = logging.getLogger(__name__)

# A volume being made by a command, until it is complete (a hidden name: not a volume).
TEMP_PREFIX = ".vsfs-new-"


def image_options(info: dict[str, object]) -> list[str]:
    """The qemu-img create options (for -o) that remake an image as qemu-img info
    describes it (qcow2's cluster size, compat level and lazy refcounts)."""
    opts: list[str] = []
    if info.get("format") not in ("qcow2", "qed"):
        return opts
    size = info.get("cluster-size")
    if isinstance(size, int):
        opts.append(f"cluster_size={size}")
    specific = info.get("format-specific")
    data = specific.get("data") if isinstance(specific, dict) else None
    if isinstance(data, dict) and info.get("format") == "qcow2":
        if isinstance(data.get("compat"), str):
            opts.append(f"compat={data['compat']}")
        if data.get("lazy-refcounts"):
            opts.append("lazy_refcounts=on")
    return opts


def create_options(vdef: VolumeDef, fmt: str) -> list[str]:
    """The qemu-img create options (for -o) a volume's XML asks for."""
    opts = []
    if vdef.allocation and vdef.allocation >= vdef.capacity and fmt in ("qcow2", "qed"):
        opts.append("preallocation=falloc")
    if vdef.compat:
        opts.append(f"compat={vdef.compat}")
    if vdef.lazy_refcounts:
        opts.append("lazy_refcounts=on")
    if vdef.cluster_size:
        opts.append(f"cluster_size={vdef.cluster_size}")
    return opts


def qemu_img_create_argv(fmt: str, path: str, size: int | None, options: Sequence[str] = (),
                         backing: tuple[str, str] | None = None) -> list[str]:
    """qemu-img create of an image at ``path``; ``backing`` is (path, format); no
    ``size``: an overlay as large as its backing file."""
    argv = ["qemu-img", "create", "-q", "-f", fmt]
    if options:
        argv += ["-o", ",".join(options)]
    if backing is not None:
        argv += ["-b", backing[0], "-F", backing[1]]
    return [*argv, path, *([] if size is None else [str(size)])]


def qemu_img_convert_argv(src_fmt: str, fmt: str, src: str, dst: str) -> list[str]:
    """qemu-img convert (with progress) of ``src`` into a new image ``dst``."""
    return ["qemu-img", "convert", "-U", "-p", "-f", src_fmt, "-O", fmt, src, dst]


def qemu_img_resize_argv(fmt: str, path: str, capacity: int, shrink: bool) -> list[str]:
    return ["qemu-img", "resize", "-q", "-f", fmt, *(["--shrink"] if shrink else []), path,
            str(capacity)]


# qemu-img info -U --output=json FILE (qemu-img 7.2), one object (pretty-printed):
#   {
#       "backing-filename-format": "raw",
#       "virtual-size": 20971520,
#       "filename": "relative.qcow2",
#       "cluster-size": 65536,
#       "format": "qcow2",
#       "actual-size": 200704,
#       "format-specific": {"type": "qcow2", "data": {"compat": "1.1", ...}},
#       "full-backing-filename": "raw.img",
#       "backing-filename": "raw.img",
#       "dirty-flag": false
#   }
def parse_image_info(text: str, what: str) -> dict[str, object]:
    return json_object(text, what)


def image_facts(info: dict[str, object], file_size: int,
                what: str) -> tuple[str, int, str | None, str | None]:
    """Format (libvirt's name), capacity, backing file and its format of an image as
    qemu-img info describes it; a file whose size is not given is ``file_size``."""
    fmt = info.get("format", "raw")
    if not isinstance(fmt, str):
        raise unexpected(what, f"format={fmt!r}")
    capacity = integer(info, "virtual-size", what) if "virtual-size" in info else file_size
    bpath = info.get("full-backing-filename") or info.get("backing-filename")
    bfmt = info.get("backing-filename-format")
    return (_QEMU_TO_LIBVIRT.get(fmt, fmt), capacity,
            bpath if isinstance(bpath, str) else None, str(bfmt) if bfmt else None)


# qemu-img map -U --output=json -f qcow2 FILE (qemu-img 7.2), one extent a line:
#   [{ "start": 0, "length": 1048576, "depth": 0, "present": true, "zero": false,
#      "data": true, "offset": 327680},
#   { "start": 1048576, "length": 32505856, "depth": 0, "present": false, "zero": true,
#     "data": false}]
def parse_image_map(text: str) -> list[tuple[int, int, bool]]:
    """(start, length, holds data) of each extent qemu-img map lists."""
    what = "qemu-img map"
    return [(integer(ext, "start", what), integer(ext, "length", what), bool(ext.get("data")))
            for ext in objects(json_list(text, what), what)]


def _put_in_place(tmp: str, path: str) -> None:
    """Give a finished file its volume's name, never replacing one made meanwhile."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise Exists(f"{path} already exists") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            raise BackendFailed(f"{path}: {e.strerror}") from None
        # No hard links here (vfat, say): a rename, after a last look.
        if os.path.lexists(path):
            raise Exists(f"{path} already exists") from None
        os.rename(tmp, path)
        return
    os.unlink(tmp)

def _open_volume(vol: Volume, flags: int) -> int:
    """Open a volume's file to change it: gone behind vsfs's back is ENOENT, a refusal
    (an immutable file, a program running from it) the contract's errno, never EIO."""
    try:
        return os.open(vol.path, flags | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"{vol.path} is gone (removed behind vsfs's back)") from None
    except OSError as e:
        raise os_failure(e, f"opening {vol.path}") from None


def _punch_hole(fd: int, length: int) -> bool:
    """Deallocate the first ``length`` bytes of a file, keeping its size; False where
    the filesystem cannot (then nothing changed). Blocking."""
    if length <= 0:
        return True
    try:
        blockdev.fallocate(fd, blockdev.FALLOC_FL_PUNCH_HOLE | blockdev.FALLOC_FL_KEEP_SIZE,
                           0, length)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
            return False
        raise
    return True


async def _discard_file(path: str) -> None:
    """Remove what a failed action made, in a worker thread: the pool's filesystem may
    be a network one whose server hangs, and the event loop must go on serving. Runs
    to its end even while the action is being cancelled."""
    def unlink() -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    with trio.CancelScope(shield=True):
        await trio.to_thread.run_sync(unlink)


async def make_mount_point(path: str) -> bool:
    """Make a pool's target directory for a mount if it is missing; whether it was made.
    In a worker thread, as everything on paths that may lie on a network filesystem."""
    def make() -> bool:
        if os.path.isdir(path):
            return False
        os.makedirs(path)
        return True
    return await trio.to_thread.run_sync(make)


async def drop_mount_point(path: str) -> None:
    """Undo make_mount_point after a failed mount (even while being cancelled)."""
    def rmdir() -> None:
        with contextlib.suppress(OSError):
            os.rmdir(path)
    with trio.CancelScope(shield=True):
        await trio.to_thread.run_sync(rmdir)


# libvirt's defaults (VIR_STORAGE_DEFAULT_POOL_PERM_MODE / _VOL_PERM_MODE).
DEFAULT_POOL_MODE = 0o711
DEFAULT_VOL_MODE = 0o600
# Deleting a file with at most this much allocated is quick enough to do inline on a
# local filesystem (see quick_io).
INLINE_UNLINK_MAX = 256 << 20

# Header magics of the image formats libvirt's volume XML has, as its
# virStorageFileProbeFormat matches them: a file whose header matches none is raw (a vhdx
# or parallels image too: libvirt's schema has no name for them, and it says raw).
_MAGICS: tuple[tuple[int, bytes, str], ...] = (
    (0, b"QFI\xfb", "qcow2"),
    (0, b"QED\x00", "qed"),
    (0, b"KDMV", "vmdk"),
    (0, b"# Disk DescriptorFile", "vmdk"),
    (0, b"conectix", "vpc"),
    (64, b"\x7f\x10\xda\xbe", "vdi"),
    (0, b"LUKS\xba\xbe", "luks"),
    (0, b"Bochs Virtual HD Image", "bochs"),
    (0, b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop", "cloop"),
)
_HEADER_BYTES = 512
# qemu-img names some formats differently from libvirt's volume XML.
_QEMU_TO_LIBVIRT = {"vpc": "vpc", "file": "raw"}
# What `qemu-img create -f` makes of libvirt's formats; "raw" and "dir" we make ourselves.
# luks needs an encryption secret, which vsfs does not take.
QEMU_CREATE_FORMATS = frozenset({"qcow2", "qcow", "qed", "vmdk", "vpc", "vdi"})


def probe_header(header: bytes) -> str:
    for offset, magic, fmt in _MAGICS:
        if header[offset:offset + len(magic)] == magic:
            return fmt
    return "raw"


@dataclass(frozen=True)
class _Probe:
    """What the header of one file said, valid while (ino, size, mtime) hold."""

    sig: tuple[int, int, int]
    format: str
    capacity: int
    backing: BackingStore | None


async def qemu_img_info(path: str) -> dict[str, object]:
    out = await run(["qemu-img", "info", "-U", "--output=json", path], timeout=60)
    return parse_image_info(out, f"qemu-img info {path}")


# Filesystems on local storage, whose syscalls return in microseconds (network and FUSE
# filesystems may hang, so their calls always go to a worker thread).
LOCAL_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "f2fs", "vfat",
                               "exfat", "ntfs3", "jfs", "nilfs2", "bcachefs"})


class DirBackend(Backend):
    pool_type: ClassVar[str] = "dir"
    volumes_in_target: ClassVar[bool] = True
    directory_volumes: ClassVar[bool] = True
    poll_interval: ClassVar[float] = 1.0

    def __init__(self, pool: PoolDef, services: Services | None = None) -> None:
        super().__init__(pool, services)
        self._probes: dict[str, _Probe] = {}
        self._unnamed: set[str] = set()  # files whose names cannot be volumes, logged
        self._dir_sig: tuple[int, int] | None = None
        # Whether the target is on a local filesystem (set at each refresh).
        self._local = False
        self._open_files: blockdev.OpenFiles | None = None

    @classmethod
    def validate(cls, pool: PoolDef) -> None:
        if not pool.target_path:
            raise Invalid(f"a {pool.type} pool needs <target><path>")

    @property
    def root(self) -> str:
        assert self.pool.target_path is not None
        return self.pool.target_path

    def path_of(self, name: str) -> str:
        return os.path.join(self.root, name)

    # ---------------------------------------------------------------- pools

    async def build(self, overwrite: bool) -> None:
        await trio.to_thread.run_sync(self._build_sync)

    def _build_sync(self) -> None:
        perms = self.pool.target_perms
        mode = perms.mode if perms.mode is not None else DEFAULT_POOL_MODE
        created = not os.path.lexists(self.root)
        try:
            os.makedirs(self.root, mode=0o755, exist_ok=True)
        except FileExistsError:
            raise Exists(f"{self.root} exists and is not a directory") from None
        except OSError as e:
            raise os_failure(e, f"mkdir {self.root}") from None
        try:
            os.chmod(self.root, mode)
            if perms.owner is not None or perms.group is not None:
                os.chown(self.root, -1 if perms.owner is None else perms.owner,
                         -1 if perms.group is None else perms.group)
        except OSError as e:
            if created:
                os.rmdir(self.root)
            raise os_failure(e, f"setting permissions of {self.root}") from None

    async def start(self) -> None:
        def check() -> None:
            if not os.path.isdir(self.root):
                raise BackendFailed(
                    f"target directory {self.root} does not exist (build the pool first)")
        await trio.to_thread.run_sync(check)

    async def remove_leftovers(self) -> None:
        # Volumes a daemon was still making when it died: never finished, never listed.
        # The same for fs and netfs pools, whose start mounts first, and for one still
        # mounted that a new daemon adopts (the manager calls this after either).
        def clean() -> None:
            try:
                entries = list(os.scandir(self.root))
            except OSError as e:
                raise BackendFailed(f"reading {self.root}: {e.strerror}") from None
            for entry in entries:
                if entry.name.startswith(TEMP_PREFIX):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
                        log.info("pool %s: removed %s, left unfinished", self.pool.name,
                                 entry.path)
        await trio.to_thread.run_sync(clean)

    async def delete(self) -> None:
        def rmdir() -> None:
            try:
                os.rmdir(self.root)
            except FileNotFoundError:
                raise NotFound(f"{self.root} does not exist") from None
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise NotEmpty(f"{self.root} still holds volumes") from None
                raise BackendFailed(f"rmdir {self.root}: {e.strerror}") from None
        await trio.to_thread.run_sync(rmdir)

    def _status_sync(self) -> PoolStatus:
        try:
            st = os.statvfs(self.root)
        except OSError as e:
            raise BackendFailed(f"statvfs {self.root}: {e.strerror}") from None
        # As libvirt's virStorageBackendFileSystemRefresh computes them.
        return PoolStatus(
            capacity=st.f_blocks * st.f_frsize,
            allocation=(st.f_blocks - st.f_bfree) * st.f_frsize,
            available=st.f_bavail * st.f_frsize,
        )

    async def status(self) -> PoolStatus:
        return await trio.to_thread.run_sync(self._status_sync)

    def _dir_signature(self) -> tuple[int, int]:
        st = os.stat(self.root)
        return (st.st_ino, st.st_mtime_ns)

    async def changed(self) -> bool:
        try:
            sig = await trio.to_thread.run_sync(self._dir_signature)
        except OSError:
            return True
        return sig != self._dir_sig

    async def refresh(self) -> Snapshot:
        snap, todo = await trio.to_thread.run_sync(self._scan_sync)
        if not todo:
            return snap
        # Files whose header names an image format: ask qemu-img for the rest.
        vols = {v.name: v for v in snap.volumes}
        for name in todo:
            with contextlib.suppress(BackendFailed, FileNotFoundError):
                vols[name] = await self._probe_image(vols[name])
        return Snapshot(snap.status, tuple(vols[n] for n in sorted(vols)), snap.live_perms)

    def _scan_sync(self) -> tuple[Snapshot, list[str]]:
        try:
            sig = self._dir_signature()
            entries = list(os.scandir(self.root))
        except OSError as e:
            raise BackendFailed(f"reading {self.root}: {e.strerror}") from None
        status = self._status_sync()
        root_st = os.stat(self.root)
        self._local = blockdev.filesystem_type(self.root) in LOCAL_FILESYSTEMS
        vols: list[Volume] = []
        todo: list[str] = []
        seen: set[str] = set()
        for entry in entries:
            if entry.name.startswith("."):
                continue  # hidden files are not volumes (and not valid volume names)
            if not volume_name_ok(entry.name):
                # Its name cannot be a volume's (libvirt's XML cannot carry it, nor a
                # value file print it): said once, not at every poll.
                if entry.name not in self._unnamed:
                    self._unnamed.add(entry.name)
                    log.warning("pool %s: %r is not taken as a volume: its name has control "
                                "characters or is not UTF-8", self.pool.name, entry.name)
                continue
            try:
                st = entry.stat(follow_symlinks=False)
                vol, need_probe = self._volume_from_stat(entry.name, st)
            except OSError:
                continue  # vanished while we looked
            if vol is None:
                continue
            seen.add(entry.name)
            vols.append(vol)
            if need_probe:
                todo.append(entry.name)
        for gone in set(self._probes) - seen:
            self._probes.pop(gone, None)  # a volinfo read may race us from another thread
        self._dir_sig = sig
        vols.sort(key=lambda v: v.name)
        live = Permissions(stat.S_IMODE(root_st.st_mode), root_st.st_uid, root_st.st_gid)
        return Snapshot(status, tuple(vols), live), todo

    def _stat_volume(self, name: str, st: os.stat_result) -> Volume:
        """A raw file volume as its stat shows it; callers adjust type and format."""
        path = self.path_of(name)
        return Volume(
            name=name, key=path, path=path, type="file", format="raw", capacity=st.st_size,
            allocation=st.st_blocks * 512, physical=st.st_size, mode=stat.S_IMODE(st.st_mode),
            owner=st.st_uid, group=st.st_gid, atime_ns=st.st_atime_ns,
            mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns,
        )

    def _volume_from_stat(self, name: str, st: os.stat_result) -> tuple[Volume | None, bool]:
        """A volume from its stat; True when its image header must be probed."""
        if stat.S_ISDIR(st.st_mode):
            return replace(self._stat_volume(name, st), type="dir", format="dir"), False
        if not stat.S_ISREG(st.st_mode):
            return None, False
        vol = self._stat_volume(name, st)
        sig = (st.st_ino, st.st_size, st.st_mtime_ns)
        cached = self._probes.get(name)
        if cached is None or cached.sig != sig:
            fmt = self._read_header_format(vol.path)
            if fmt != "raw":
                # Not probed yet: report the header's format with the file's size.
                return replace(vol, format=fmt), True
            cached = _Probe(sig, "raw", st.st_size, None)
            self._probes[name] = cached
        return replace(vol, format=cached.format, capacity=cached.capacity,
                       backing=cached.backing), False

    @staticmethod
    def _read_header_format(path: str) -> str:
        try:
            with open(path, "rb") as f:
                return probe_header(f.read(_HEADER_BYTES))
        except OSError:
            return "raw"

    async def _probe_image(self, vol: Volume) -> Volume:
        info = await qemu_img_info(vol.path)
        st = await trio.to_thread.run_sync(os.stat, vol.path)
        fmt, capacity, bpath, bfmt = image_facts(info, st.st_size, f"qemu-img info {vol.path}")
        backing = None
        if bpath is not None:
            # Resolved, so that the in-use check finds it however the image spells it.
            real = (await trio.to_thread.run_sync(os.path.realpath, bpath)
                    if bpath.startswith("/") else None)
            backing = BackingStore(bpath, bfmt, real)
        self._probes[vol.name] = _Probe((st.st_ino, st.st_size, st.st_mtime_ns), fmt, capacity,
                                        backing)
        return replace(self._stat_volume(vol.name, st), format=fmt, capacity=capacity,
                       backing=backing)

    def _volume_sync(self, name: str) -> tuple[Volume, bool]:
        path = self.path_of(name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise NotFound(f"no volume {name!r} in pool {self.pool.name!r}") from None
        vol, need_probe = self._volume_from_stat(name, st)
        if vol is None:
            raise NotFound(f"{path} is not a volume")
        return vol, need_probe

    async def volume(self, name: str) -> Volume:
        # An lstat, and a 512-byte header read when the file changed: quick_io.
        vol, need_probe = await self.quick_io(self._volume_sync, name)
        return await self._probe_image(vol) if need_probe else vol

    @contextlib.contextmanager
    def _own_change(self) -> Iterator[None]:
        """Around a change vsfs makes itself: the poll need not rescan for it.

        Only when nothing else had changed the directory before (the signature
        still matches the last scan) is the new signature taken as seen.
        """
        try:
            before = self._dir_signature()
        except OSError:
            before = None
        try:
            yield
        finally:
            if before is not None and before == self._dir_sig:
                with contextlib.suppress(OSError):
                    self._dir_sig = self._dir_signature()

    # ---------------------------------------------------------------- volumes

    def _owner_for(self, vdef: VolumeDef) -> tuple[int, int, int]:
        """Mode, uid and gid of a new volume: its XML, else the pool's, else the directory's."""
        try:
            st = os.stat(self.root)
        except OSError as e:  # removed behind our back, say
            raise BackendFailed(f"pool directory {self.root}: {e.strerror}") from None
        pp = self.pool.target_perms
        uid = next(v for v in (vdef.perms.owner, pp.owner, st.st_uid) if v is not None)
        gid = next(v for v in (vdef.perms.group, pp.group, st.st_gid) if v is not None)
        mode = vdef.perms.mode
        if mode is None:
            mode = 0o755 if "dir" in (vdef.format, vdef.type) else DEFAULT_VOL_MODE
        return mode, uid, gid

    async def create_volume(self, vdef: VolumeDef) -> Volume:
        fmt = vdef.format or ("dir" if vdef.type == "dir" else "raw")
        if vdef.backing is not None and fmt not in QEMU_CREATE_FORMATS:
            raise Invalid(f"a backing store needs an image format such as qcow2, not {fmt}")
        if fmt == "dir":
            await trio.to_thread.run_sync(self._mkdir_volume, vdef)
        elif fmt == "raw":
            vol, _ = await trio.to_thread.run_sync(self._create_raw, vdef)
            return vol
        elif fmt in QEMU_CREATE_FORMATS:
            await self._create_image(vdef, fmt)
        elif fmt == "luks":
            raise Unsupported("luks volumes need an encryption secret: vsfs does not create "
                              "encrypted volumes")
        else:
            raise Unsupported(f"cannot create volumes of format {fmt!r} in a {self.pool_type} pool")
        return await self._made(vdef.name, is_dir=fmt == "dir")

    async def _made(self, name: str, is_dir: bool = False) -> Volume:
        """The volume just made under ``name``; removed again if vsfs cannot read it back
        or is being cancelled meanwhile (a job's cancel), so that nothing is left."""
        try:
            return await self.volume(name)
        except BaseException:
            if is_dir:
                def rmdir() -> None:
                    with contextlib.suppress(OSError):
                        os.rmdir(self.path_of(name))
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(rmdir)
            else:
                await _discard_file(self.path_of(name))
            raise

    def _claim(self, vdef: VolumeDef) -> tuple[str, int, int, int]:
        mode, uid, gid = self._owner_for(vdef)
        path = self.path_of(vdef.name)
        if os.path.lexists(path):
            raise Exists(f"{path} already exists")
        return path, mode, uid, gid

    def _mkdir_volume(self, vdef: VolumeDef) -> None:
        path, mode, uid, gid = self._claim(vdef)
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            raise Exists(f"{path} already exists") from None
        try:
            os.chmod(path, mode)
            os.lchown(path, uid, gid)
        except OSError as e:
            os.rmdir(path)
            raise BackendFailed(f"{path}: {e.strerror}") from None

    def _create_raw(self, vdef: VolumeDef, keep_open: bool = False) -> tuple[Volume, int | None]:
        """Create a raw file; returns its volume and, if asked, an open O_RDWR descriptor."""
        path, mode, uid, gid = self._claim(vdef)
        with self._own_change():
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
            except FileExistsError:
                raise Exists(f"{path} already exists") from None
            except OSError as e:
                raise BackendFailed(f"creating {path}: {e.strerror}") from None
            try:
                # Each metadata change is a journal update on ext4: make only those needed.
                st = os.fstat(fd)
                changes = 0
                if stat.S_IMODE(st.st_mode) != mode:
                    os.fchmod(fd, mode)  # the umask narrowed what was asked for
                    changes += 1
                if (st.st_uid, st.st_gid) != (uid, gid):
                    os.fchown(fd, uid, gid)
                    changes += 1
                if vdef.capacity:
                    os.ftruncate(fd, vdef.capacity)
                    changes += 1
                if vdef.allocation:
                    os.posix_fallocate(fd, 0, min(vdef.allocation, vdef.capacity))
                    changes += 1
                if changes:
                    st = os.fstat(fd)
            except OSError as e:
                os.close(fd)
                os.unlink(path)
                if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                    raise NoSpace(f"{path}: {e.strerror}") from None
                raise BackendFailed(f"creating {path}: {e.strerror}") from None
        # vsfs made it raw: no header to probe.
        self._probes[vdef.name] = _Probe((st.st_ino, st.st_size, st.st_mtime_ns), "raw",
                                         st.st_size, None)
        vol = self._stat_volume(vdef.name, st)
        if keep_open:
            return vol, fd
        os.close(fd)
        return vol, None

    async def quick_io(self, fn: Callable[..., T], *args: object) -> T:
        if self._local:
            # Microseconds on a local disk: cheaper than two thread hand-overs.
            return fn(*args)
        return await super().quick_io(fn, *args)

    async def truncate_upload(self, fd: int, size: int, room: Room) -> None:
        def work() -> None:
            cur = os.fstat(fd).st_size
            if size > cur:
                room(self._status_sync(), size - cur)
            os.ftruncate(fd, size)
        await self.quick_io(work)

    async def create_upload(self, vdef: VolumeDef) -> tuple[Volume, int]:
        vol, fd = await self.quick_io(self._create_raw, vdef, True)
        assert fd is not None
        return vol, fd

    async def _create_image(self, vdef: VolumeDef, fmt: str) -> None:
        path, mode, uid, gid = await trio.to_thread.run_sync(self._claim, vdef)
        backing = None
        if vdef.backing is not None:
            backing = (vdef.backing.path, await self._backing_format(vdef.backing))
        # An overlay without a capacity takes its backing file's, as in libvirt.
        size = None if vdef.backing is not None and not vdef.capacity else vdef.capacity
        opts = create_options(vdef, fmt)
        await self._made_by(lambda tmp: qemu_img_create_argv(fmt, tmp, size, opts, backing),
                            path, mode, uid, gid)

    async def _backing_format(self, backing: BackingStore) -> str:
        """The backing file's format as given, else as qemu-img finds it (as libvirt
        does): taken for raw, a qcow2 base would show its header as disk data."""
        if backing.format:
            return backing.format
        path = os.path.join(self.root, backing.path)  # a relative one is the pool's
        fmt = (await qemu_img_info(path)).get("format")
        if not isinstance(fmt, str):
            raise BackendFailed(f"cannot tell the format of backing file {backing.path}")
        return fmt

    async def _made_by(self, argv: Callable[[str], list[str]], path: str, mode: int, uid: int,
                       gid: int, timeout: float = DEFAULT_TIMEOUT,
                       progress: Callable[[str], ProgressWatch] | None = None) -> None:
        """Make a volume's file with a command: under a hidden name, private until its
        owner and mode are set, then put in place. If vsfs dies meanwhile, the command
        is killed and the hidden file removed at the pool's next start: no volume is
        ever seen half-made, nor readable by others while it is. Failed or cancelled (the
        command is killed), the hidden file is removed at once. ``progress``: what tells
        how far the command got, given the hidden file's path."""
        tmp = self.path_of(f"{TEMP_PREFIX}{secrets.token_hex(8)}")
        try:
            await run(argv(tmp), timeout=timeout, umask=0o077, dies_with_daemon=True,
                      progress=progress(tmp) if progress is not None else None)
            await trio.to_thread.run_sync(self._set_perms, tmp, mode, uid, gid)
            await trio.to_thread.run_sync(_put_in_place, tmp, path)
        except BaseException:
            await _discard_file(tmp)  # shielded: it runs even while being cancelled
            raise

    @staticmethod
    def _set_perms(path: str, mode: int, uid: int, gid: int) -> None:
        try:
            os.chmod(path, mode)
            os.lchown(path, uid, gid)
        except OSError as e:
            raise BackendFailed(f"{path}: {e.strerror}") from None

    async def clone_volume(self, vdef: VolumeDef, source: Volume) -> Volume:
        if source.type == "dir":
            raise Unsupported("directory volumes cannot be cloned")
        src_fmt = data_format(source.format)
        fmt = vdef.format or src_fmt
        path, mode, uid, gid = await trio.to_thread.run_sync(self._claim, vdef)
        total = source.capacity
        make: Callable[[str], list[str]]
        if fmt == "raw" and src_fmt == "raw":
            # Shares extents where the filesystem can (xfs, btrfs), else a sparse copy.
            def make(tmp: str) -> list[str]:
                return ["cp", "--reflink=auto", "--sparse=always", "--no-preserve=all", "-T",
                        source.path, tmp]

            def progress(tmp: str) -> ProgressWatch:
                return Growth(tmp, total)  # cp says nothing; it writes from start to end
        else:
            def make(tmp: str) -> list[str]:
                return qemu_img_convert_argv(src_fmt, fmt, source.path, tmp)

            def progress(tmp: str) -> ProgressWatch:
                return QemuImgProgress(total)
        await self._made_by(make, path, mode, uid, gid, timeout=3600, progress=progress)
        try:
            vol = await self.volume(vdef.name)
            if vdef.capacity > source.capacity:
                vol = await self.resize_volume(vol, vdef.capacity)
        except BaseException:
            await _discard_file(path)  # shielded: a cancelled clone leaves nothing
            raise
        return vol

    def snapshot_space(self, vol: Volume) -> int:
        # A qcow2 overlay of the volume's size: no overcommit, as for any new image.
        return vol.capacity

    async def snapshot_volume(self, vol: Volume, name: str) -> Volume:
        if vol.type != "file":
            raise Unsupported(f"volume {vol.name!r} is not an image file")
        vdef = VolumeDef(name=name, capacity=vol.capacity, format="qcow2",
                         perms=Permissions(vol.mode, vol.owner, vol.group),
                         backing=BackingStore(vol.path, vol.format))
        return await self.create_volume(vdef)

    async def delete_volume(self, vol: Volume) -> None:
        def remove() -> None:
            with self._own_change():
                self._remove_sync(vol)
            self._probes.pop(vol.name, None)
        if vol.allocation <= INLINE_UNLINK_MAX:
            await self.quick_io(remove)
        else:
            # Freeing many blocks can take the filesystem a while.
            await trio.to_thread.run_sync(remove)

    @staticmethod
    def _remove_sync(vol: Volume) -> None:
        try:
            if vol.type == "dir":
                os.rmdir(vol.path)
            else:
                os.unlink(vol.path)
        except FileNotFoundError:
            raise NotFound(f"{vol.path} is already gone") from None
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise NotEmpty(f"directory volume {vol.path} is not empty") from None
            raise os_failure(e, f"removing {vol.path}") from None

    async def volume_users(self, vols: Collection[Volume]) -> dict[str, list[str]]:
        # A file a guest or any tool holds open (not only a device): removing, shrinking
        # or zeroing it would pull its data from under that process. The kernel tells it
        # exactly, file by file (a write lease is refused while anyone else has the file
        # open: blockdev.opened_elsewhere); /proc is read only to name the holder, or
        # where leases cannot be had (NFS), through one scan shared by the checks of a
        # tenth of a second (blockdev.OpenFiles), so `rm` of thousands makes few scans.
        files = {v.path: v.name for v in vols if v.type == "file"}
        if not files:
            return {}
        # Only a local filesystem's leases say that: NFS grants a write lease only with a
        # write delegation and refuses it (EAGAIN) otherwise, whoever has the file open.
        said = (await self.quick_io(lambda: {p: blockdev.opened_elsewhere(p) for p in files})
                if self._local else dict.fromkeys(files))
        if self._open_files is None or self._open_files.directory != self.root:
            self._open_files = blockdev.OpenFiles(self.root)
        unknown = [p for p, busy in said.items() if busy is None]
        found = await self._open_files.holders(unknown) if unknown else {}
        held = [p for p, busy in said.items() if busy]
        if held:
            named = await self._open_files.holders(held, fresh=True)
            for p in held:
                # Open in a process whose descriptors this daemon cannot read (another
                # user's, without root): said without its name.
                found[p] = named.get(p) or [f"{p} is open, mapped or running in a process "
                                            "vsfs cannot name"]
        return {files[p]: why for p, why in found.items()}

    async def rename_volume(self, vol: Volume, new_name: str) -> Volume:
        new_path = self.path_of(new_name)

        def rename() -> None:
            if os.path.lexists(new_path):
                raise Exists(f"{new_path} already exists")
            try:
                with self._own_change():
                    os.rename(vol.path, new_path)
            except FileNotFoundError:
                raise NotFound(f"{vol.path} is gone (removed behind vsfs's back)") from None
            except OSError as e:
                raise os_failure(e, f"renaming {vol.path}") from None
            probe = self._probes.pop(vol.name, None)
            if probe is not None:
                self._probes[new_name] = probe
        await trio.to_thread.run_sync(rename)
        return await self.volume(new_name)

    async def resize_volume(self, vol: Volume, capacity: int) -> Volume:
        if vol.type != "file":
            raise Unsupported(f"volume {vol.name!r} cannot be resized")
        if vol.format == "raw":
            await trio.to_thread.run_sync(self._resize_raw, vol, capacity)
        else:
            # Image formats count in 512-byte sectors: round up, as libvirt does.
            capacity = -(-capacity // 512) * 512
            if capacity < vol.capacity:
                await self._check_image_tail_empty(vol, capacity)
            try:
                await run(qemu_img_resize_argv(vol.format, vol.path, capacity,
                                               capacity < vol.capacity))
            except BackendFailed as e:
                if "does not support resize" in e.message:
                    raise Unsupported(f"{vol.format} images cannot be resized") from None
                raise
        return await self.volume(vol.name)

    @staticmethod
    def _resize_raw(vol: Volume, capacity: int) -> None:
        fd = _open_volume(vol, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if capacity < size:
                try:
                    data_at = os.lseek(fd, capacity, os.SEEK_DATA)
                except OSError as e:
                    if e.errno != errno.ENXIO:
                        raise
                    data_at = None  # only holes past the new end
                if data_at is not None and data_at < size:
                    raise Invalid(
                        f"shrinking {vol.name} to {capacity} bytes would discard data "
                        f"at offset {data_at}; wipe that part first")
            os.ftruncate(fd, capacity)
        except OSError as e:
            raise os_failure(e, f"resizing {vol.path}") from None
        finally:
            os.close(fd)

    async def _check_image_tail_empty(self, vol: Volume, capacity: int) -> None:
        out = await run(["qemu-img", "map", "-U", "--output=json", "-f", vol.format, vol.path])
        for start, length, data in parse_image_map(out):
            if data and start + length > capacity:
                raise Invalid(f"shrinking {vol.name} to {capacity} bytes would discard data")

    async def wipe_volume(self, vol: Volume) -> None:
        if vol.type != "file":
            raise Unsupported(f"volume {vol.name!r} cannot be wiped")
        if vol.format == "raw":
            def zero() -> None:
                # Dropping every block reads back as zeros and costs no writes, like a
                # discard of the whole volume. A punched hole keeps the size: truncating
                # to 0 and back left a volume of size 0 when vsfs was killed between the
                # two (freeing 2 GB takes ext4 half a second).
                fd = _open_volume(vol, os.O_WRONLY)
                try:
                    size = os.fstat(fd).st_size
                    if not _punch_hole(fd, size):
                        os.ftruncate(fd, 0)
                        os.ftruncate(fd, size)
                    os.fsync(fd)
                except OSError as e:
                    raise os_failure(e, f"wiping {vol.path}") from None
                finally:
                    os.close(fd)
            await trio.to_thread.run_sync(zero)
            return
        # An image format: a fresh empty image of the same size and backing store, and
        # what else qemu-img says the image is made with.
        info = await qemu_img_info(vol.path)
        if info.get("encrypted"):
            raise Unsupported(f"volume {vol.name!r} is encrypted: a fresh image would not be "
                              "(vsfs does not create encrypted volumes)")
        tmp = self.path_of(f"{TEMP_PREFIX}{secrets.token_hex(8)}")
        backing = None
        if vol.backing is not None:
            backing = (vol.backing.path, await self._backing_format(vol.backing))
        argv = qemu_img_create_argv(vol.format, tmp, vol.capacity, image_options(info), backing)
        try:
            await run(argv, umask=0o077, dies_with_daemon=True)
            await trio.to_thread.run_sync(
                self._set_perms, tmp, vol.mode or DEFAULT_VOL_MODE,
                vol.owner if vol.owner is not None else -1,
                vol.group if vol.group is not None else -1)
            await trio.to_thread.run_sync(os.replace, tmp, vol.path)
        except BaseException:
            await _discard_file(tmp)
            raise
