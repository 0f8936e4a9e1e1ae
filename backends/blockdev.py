"""What the block-device backends share: who uses a device, what it holds, loops."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import stat
from collections.abc import Collection, Iterator

import trio

from vsfs import jobs
from vsfs.errors import Busy, os_failure
from vsfs.model import Volume
from vsfs.proc import BlkdiscardProgress, run
from vsfs.watchdog import read_mountinfo

from .cmdout import json_object, objects, string


def _mount_table() -> list[tuple[str, str, str]]:
    """(major:minor, mount point, source) of every mount. Blocking."""
    return [(m.device, m.mount_point, m.source) for m in read_mountinfo()]


def filesystem_type(path: str) -> str:
    """The type of the filesystem ``path`` is on (the deepest mount holding it). Blocking."""
    real = os.path.realpath(path)
    best, fstype = "", ""
    for mount in read_mountinfo():
        mnt = mount.mount_point
        inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) >= len(best):
            best, fstype = mnt, mount.fstype
    return fstype


def _sys_block(devnum: str) -> str | None:
    path = f"/sys/dev/block/{devnum}"
    return os.path.realpath(path) if os.path.exists(path) else None


def _numbers(dev: str) -> dict[str, str] | None:
    """major:minor -> kernel name of a block device and each of its partitions; None when
    ``dev`` is not a block device. Blocking."""
    try:
        st = os.stat(dev)
    except OSError:
        return None
    if not stat.S_ISBLK(st.st_mode):
        return None
    devnum = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    sysdir = _sys_block(devnum)
    nums = {devnum: os.path.basename(sysdir or dev)}
    if sysdir:
        for entry in os.listdir(sysdir):
            try:
                with open(os.path.join(sysdir, entry, "dev"), encoding="ascii") as f:
                    nums[f.read().strip()] = entry  # a partition of it
            except OSError:
                continue
    return nums


def device_users(dev: str) -> list[str]:
    """What uses a block device or any of its partitions: mounts and holders. Blocking."""
    nums = _numbers(dev)
    return [] if nums is None else _mounts_and_holders(nums, _mount_table())


def _mounts_and_holders(nums: dict[str, str], mounts: list[tuple[str, str, str]]) -> list[str]:
    users = [f"{nums[num]} is mounted on {mnt}" for num, mnt, _ in mounts if num in nums]
    for num, name in nums.items():
        holders = _sys_block(num)
        if holders is None:
            continue
        try:
            held = os.listdir(os.path.join(holders, "holders"))
        except OSError:
            held = []
        users += [f"{name} is held by {h}" for h in held]
    return users


def check_unused(dev: str) -> None:
    users = device_users(dev)
    if users:
        raise Busy(f"{dev} is in use: {'; '.join(users)}")


# udev's workers open a device for a moment after each change to it (blkid probes, and the
# "watch" rule's probe once a writer closes it): a passing read, not a user, which would
# otherwise make an action right after a write fail now and then.
TRANSIENT = frozenset({"(udev-worker)", "systemd-udevd", "udevd"})


def read_sysfs(path: str) -> str:
    """A small kernel file (sysfs, /proc) stripped, or "" when it cannot be read. Blocking."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def _loops() -> dict[str, list[str]]:
    """Backing file (as the kernel names it) -> the loop devices attached to it. Blocking."""
    found: dict[str, list[str]] = {}
    try:
        names = os.listdir("/sys/block")
    except OSError:
        return found
    for name in names:
        if name.startswith("loop"):
            backing = read_sysfs(f"/sys/block/{name}/loop/backing_file")
            if backing:
                found.setdefault(backing, []).append(f"/dev/{name}")
    return found


def _descriptors(skip: str) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """Every process but ``skip`` (a PID) with its open descriptors: /proc/PID/fd/N and
    what it leads to, as the kernel names it. Blocking."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid == skip:
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            names = os.listdir(fd_dir)
        except OSError:
            continue  # gone meanwhile, or a kernel thread
        fds = []
        for fd in names:
            with contextlib.suppress(OSError):
                fds.append((f"{fd_dir}/{fd}", os.readlink(f"{fd_dir}/{fd}")))
        yield pid, fds


def users(files: Collection[str] = (), devices: Collection[str] = (),
          own: bool = False) -> dict[str, list[str]]:
    """What uses each of ``files`` (regular files, such as the exported local paths of
    network volumes) and ``devices`` (block devices, or links to them) on this host: a
    process holding it open, a loop device attached to it, and for a device or any of its
    partitions also mounts and holders. Path -> one phrase per use; unused paths are left
    out. One pass over /proc/*/fd for all of them. Blocking.

    The daemon's own descriptors count only with ``own``: they are uploads, which the
    manager keeps track of itself (and closes a moment after the writer's close returned).
    """
    found: dict[str, list[str]] = {}
    names: dict[str, str] = {}  # how /proc and sysfs name it -> the path asked about
    numbers: dict[int, str] = {}  # device number (a partition's too) -> the device asked about
    for path in files:
        # Only the directory is resolved: the file may be a FUSE export, and stat() of it
        # would wait on the server behind it.
        head, tail = os.path.split(path)
        names[os.path.join(os.path.realpath(head), tail)] = path
    mounts = _mount_table() if devices else []
    for dev in devices:
        nums = _numbers(dev)
        if nums is None:
            continue
        for num, kname in nums.items():
            major, minor = num.split(":")
            numbers[os.makedev(int(major), int(minor))] = dev
            names[f"/dev/{kname}"] = dev
        held = _mounts_and_holders(nums, mounts)
        if held:
            found.setdefault(dev, []).extend(held)
    if not names:
        return found
    for backing, loops in _loops().items():
        if backing in names:
            found.setdefault(names[backing], []).extend(
                f"{loop} is attached to {backing}" for loop in loops)
    me = "" if own else str(os.getpid())
    seen: dict[str, str | None] = {}  # a /dev path an fd shows -> the device asked about
    for pid, fds in _descriptors(me):
        hits: dict[str, str] = {}
        for fd_path, target in fds:
            asked = names.get(target)
            if asked is None and numbers and target.startswith("/dev/"):
                # A node under another name (/dev/mapper/VG-LV made by LVM without udev):
                # by its number. Device nodes answer stat() without any I/O.
                if target not in seen:
                    try:
                        st = os.stat(fd_path)
                        seen[target] = (numbers.get(st.st_rdev)
                                        if stat.S_ISBLK(st.st_mode) else None)
                    except OSError:
                        continue
                asked = seen[target]
            if asked is not None:
                hits.setdefault(asked, target)
        if hits:
            comm = read_sysfs(f"/proc/{pid}/comm")
            if comm in TRANSIENT:
                continue
            for path, target in hits.items():
                found.setdefault(path, []).append(f"{target} is open in process {pid} ({comm})")
    return found


def _within(path: str, top: str) -> str | None:
    """``path`` below (or at) the directory ``top``, as a relative tail ("" at ``top``);
    None when it is not. Both as the kernel names them."""
    if top == "/":
        return path.lstrip("/")
    if path == top:
        return ""
    return path[len(top) + 1:] if path.startswith(top + "/") else None


def _aliases(real: str) -> list[str]:
    """``real`` (a directory, resolved) and the other names mounts give it: the same
    directory seen through a bind mount (a container's view of a pool), where /proc names
    the files a process opened there. Blocking."""
    mounts = [(m.device, m.root, m.mount_point) for m in read_mountinfo()]
    holding = [(dev, root, mnt) for dev, root, mnt in mounts if _within(real, mnt) is not None]
    if not holding:
        return [real]
    # The deepest mount point; of mounts stacked on it, the last one (on top).
    dev, root, mnt = max(reversed(holding), key=lambda m: len(m[2]))
    inside = os.path.join(root, _within(real, mnt) or "").rstrip("/") or "/"
    names = [real]
    for other_dev, other_root, other_mnt in mounts:
        tail = _within(inside, other_root.rstrip("/") or "/")
        if other_dev == dev and tail is not None:
            alias = os.path.join(other_mnt, tail).rstrip("/") or "/"
            if alias not in names:
                names.append(alias)
    return names


def _open_below(directory: str) -> tuple[str, dict[str, list[str]]]:
    """The directory as the kernel names it, and every file below it that a process other
    than this daemon holds open (as /proc names it, under that name) -> one phrase per
    holder; loop devices attached to one count too, and files opened through a bind mount
    of it. One pass over /proc/*/fd. Blocking."""
    real = os.path.realpath(directory)
    root = real.rstrip("/") + "/"
    prefixes = [name.rstrip("/") + "/" for name in _aliases(real)]

    def below(path: str) -> str | None:
        """``path`` as named below ``real``, if it is below one of its names."""
        for prefix in prefixes:
            if path.startswith(prefix) and len(path) > len(prefix):
                return root + path[len(prefix):]
        return None

    found: dict[str, list[str]] = {}
    for backing, loops in _loops().items():
        where = below(backing)
        if where is not None:
            found.setdefault(where, []).extend(
                f"{loop} is attached to {backing}" for loop in loops)
    for pid, fds in _descriptors(str(os.getpid())):
        hits = {}
        for _, target in fds:
            where = below(target)
            if where is not None:
                hits[where] = target
        with contextlib.suppress(OSError):
            exe = os.readlink(f"/proc/{pid}/exe")
            where = below(exe)
            if where is not None:  # a program run from a volume holds it too
                found.setdefault(where, []).append(
                    f"{exe} is running as process {pid} ({read_sysfs(f'/proc/{pid}/comm')})")
        if hits:
            comm = read_sysfs(f"/proc/{pid}/comm")
            if comm in TRANSIENT:
                continue
            for where, target in hits.items():
                found.setdefault(where, []).append(f"{target} is open in process {pid} "
                                                   f"({comm})")
    return real, found


def opened_elsewhere(path: str) -> bool | None:
    """Whether another open of the file at ``path`` exists now (any process, reading or
    writing), told exactly and in microseconds by the kernel: a write lease is refused
    (EAGAIN) while anyone else has the file open. None where it cannot tell: no leases
    on this filesystem (NFS) or for this caller (not the file's owner, no CAP_LEASE), or
    no such regular file. The lease is let go at once; an open elsewhere meanwhile waits
    those microseconds (one with O_NONBLOCK gets EWOULDBLOCK), and the lease break's
    SIGIO is ignored by the daemon (cli). Only for local filesystems: NFS refuses a write
    lease (EAGAIN) whenever it holds no write delegation, open elsewhere or not. Blocking."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
    except OSError as e:
        return True if e.errno in (errno.EAGAIN, errno.EBUSY) else None
    else:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(fd)


class OpenFiles:
    """Which files of one directory (a pool's) processes hold open, from a scan of /proc
    that the checks of the next FRESH seconds share.

    A scan costs milliseconds on a busy host; one per `rm` would make removing a thousand
    volumes take seconds. A file held open for longer than FRESH (a guest's disk, a
    copy in progress) is always seen; one opened and closed within it may not be — as
    one opened right after any check would not be either.
    """

    FRESH = 0.1

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._at = float("-inf")
        self._open: dict[str, list[str]] = {}
        self._real = directory  # the directory as /proc names files in it
        self._scanning: trio.Event | None = None

    async def holders(self, paths: Collection[str],
                      fresh: bool = False) -> dict[str, list[str]]:
        """Path (below the directory) -> what holds it; paths nothing holds left out.

        What the shared scan says is free is taken as it is; what it says is held is
        looked at again, so that a file closed a moment ago is not refused (a script
        that ends its guest, then removes its disk)."""
        await self._scan(0.0 if fresh else self.FRESH)
        found = self._lookup(paths)
        if found and not fresh:
            await self._scan(0.0)
            found = self._lookup(paths)
        return found

    async def _scan(self, fresh: float) -> None:
        """Make sure a scan started no more than ``fresh`` seconds ago."""
        asked = trio.current_time()
        while asked - self._at > fresh:
            if self._scanning is not None:
                await self._scanning.wait()  # one scan at a time serves every caller
                continue
            self._scanning = trio.Event()
            started = trio.current_time()
            try:
                self._real, self._open = await trio.to_thread.run_sync(_open_below,
                                                                       self.directory)
                self._at = started
            finally:
                self._scanning.set()
                self._scanning = None

    def _lookup(self, paths: Collection[str]) -> dict[str, list[str]]:
        out = {}
        for path in paths if self._open else ():
            head, tail = os.path.split(path)
            # As the kernel names it: the pool's target may be a symlink.
            why = self._open.get(os.path.join(self._real if head == self.directory else head,
                                              tail))
            if why:
                out[path] = why
        return out


async def volume_users(vols: Collection[Volume]) -> dict[str, list[str]]:
    """Backend.volume_users for volumes that are block devices (partitions, LVs, LUNs)."""
    paths = {v.path: v.name for v in vols}
    if not paths:
        return {}
    found = await trio.to_thread.run_sync(lambda: users(devices=list(paths)))
    return {paths[p]: why for p, why in found.items()}


# What blkdiscard zeroes at a time: it says how far it got once a second between two, and
# is killed between two (the kernel may finish one first), so that a cancelled wipe
# stops within a second even at 20 MB/s.
ZERO_STEP = 16 << 20


async def zero_out(dev: str, size: int) -> None:
    """Write zeros over a whole block device that nothing uses (discarding where it can).
    Progress: blkdiscard's own, of ``size`` (the device's) bytes. Cancelled, it stops;
    what was zeroed stays so."""
    await trio.to_thread.run_sync(check_unused, dev)
    await run(["blkdiscard", "--zeroout", "--step", str(ZERO_STEP), "--verbose", dev],
              timeout=3600, progress=BlkdiscardProgress(size))


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (os.posix_fallocate has none); OSError on failure.
    Blocking."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# How long one step of zero_range should take: short enough that a cancelled wipe stops
# within a second, long enough that the calls' own cost does not count.
ZERO_RANGE_AIM = (0.2, 0.5)


async def zero_range(path: str, size: int) -> None:
    """Zero the first ``size`` bytes of a file in steps (FALLOC_FL_ZERO_RANGE): through
    a network volume's export, QEMU turns each into the storage's own write-zeroes or
    discard. One call for all would say nothing until its end, and could not be stopped:
    the FUSE request it waits on is not interrupted once QEMU has it. Each step is
    sized to take ZERO_RANGE_AIM seconds; the job is told after each, and a cancel stops
    it after the step under way (what was zeroed stays so): never one still writing
    zeros where the next action may write data."""
    def open_() -> int:
        try:
            return os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as e:
            raise os_failure(e, f"opening {path}") from None

    def zero(fd: int, offset: int, length: int) -> None:
        try:
            fallocate(fd, FALLOC_FL_ZERO_RANGE, offset, length)
        except OSError as e:
            raise os_failure(e, f"zeroing {path}") from None

    fd = await trio.to_thread.run_sync(open_)
    try:
        done, step = 0, 64 << 20
        jobs.report(0, size)
        while done < size:
            length = min(step, size - done)
            started = trio.current_time()
            await trio.to_thread.run_sync(zero, fd, done, length)
            done += length
            jobs.report(done, size)
            took = trio.current_time() - started
            if took < ZERO_RANGE_AIM[0]:
                step = min(step * 2, 16 << 30)
            elif took > ZERO_RANGE_AIM[1]:
                step = max(step // 2, 1 << 20)
            await trio.lowlevel.checkpoint()
    finally:
        # The close waits for QEMU (a FUSE flush): not for long while being cancelled.
        with trio.CancelScope(shield=True), trio.move_on_after(1.0):
            await trio.to_thread.run_sync(os.close, fd, abandon_on_cancel=True)


# wipefs --no-act --json DEV (util-linux 2.38.1); nothing found: an empty list (older
# versions print nothing at all):
#   {
#      "signatures": [
#         {
#            "device": "gpt.img",
#            "offset": "0x200",
#            "type": "gpt",
#            "uuid": null,
#            "label": null
#         },{
def parse_wipefs(text: str) -> list[str]:
    """The type of each signature ``wipefs --json`` found, in its order."""
    if not text.strip():
        return []
    what = "wipefs"
    rows = objects(json_object(text, what).get("signatures", []), what)
    return [string(row, "type", what) for row in rows]


async def signatures(dev: str) -> list[str]:
    """Filesystems, partition tables and RAID/LVM labels found on a device or file."""
    return parse_wipefs(await run(["wipefs", "--no-act", "--json", dev]))


# losetup --associated FILE --output NAME --noheadings (util-linux 2.38.1):
#   /dev/loop1
#   /dev/loop0
def parse_loop_names(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


async def loops_of(path: str) -> list[str]:
    """Loop devices backed by a file."""
    return parse_loop_names(await run(["losetup", "--associated", path, "--output", "NAME",
                                       "--noheadings"]))


async def detach_loop(dev: str) -> None:
    await run(["losetup", "--detach", dev])


def mount_source(target: str) -> str | None:
    """The device mounted on ``target``, if something is. Blocking."""
    real = os.path.realpath(target)
    found = None
    for _, mnt, source in _mount_table():
        if mnt == real:
            found = source  # the last one is on top
    return found


async def is_regular_file(path: str) -> bool:
    def check() -> bool:
        try:
            return stat.S_ISREG(os.stat(path).st_mode)
        except OSError:
            return False
    return await trio.to_thread.run_sync(check)


def partscan(loop: str) -> bool:
    """Whether a loop device scans partitions (losetup --partscan)."""
    try:
        with open(f"/sys/block/{os.path.basename(loop)}/loop/partscan", encoding="ascii") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


async def reuse_or_attach(path: str, scan: bool = False) -> str:
    """A loop device for ``path``: one left attached and unused (a crash), else a new one."""
    for loop in await loops_of(path):
        if (not scan or partscan(loop)) and not await trio.to_thread.run_sync(device_users,
                                                                                 loop):
            return loop
    argv = ["losetup", "--find", "--show", *(["--partscan"] if scan else []), path]
    return (await run(argv)).strip()
