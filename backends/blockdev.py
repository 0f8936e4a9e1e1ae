"""What the block-device backends share: who uses a device, what it holds, loops."""

from __future__ import annotations

import json
import os
import stat

import trio

from vsfs.errors import Busy
from vsfs.proc import run


def _mount_table() -> list[tuple[str, str, str]]:
    """(major:minor, mount point, source) of every mount."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            out.append((fields[2], fields[4].replace("\\040", " "), fields[sep + 2]))
    return out


def filesystem_type(path: str) -> str:
    """The type of the filesystem ``path`` is on (the deepest mount holding it). Blocking."""
    real = os.path.realpath(path)
    best, fstype = "", ""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            mnt = fields[4].replace("\\040", " ")
            inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) >= len(best):
                best, fstype = mnt, fields[fields.index("-") + 1]
    return fstype


def _sys_block(devnum: str) -> str | None:
    path = f"/sys/dev/block/{devnum}"
    return os.path.realpath(path) if os.path.exists(path) else None


def device_users(dev: str) -> list[str]:
    """What uses a block device or any of its partitions: mounts and holders. Blocking."""
    try:
        st = os.stat(dev)
    except OSError:
        return []
    if not stat.S_ISBLK(st.st_mode):
        return []
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
    users = [f"{nums[num]} is mounted on {mnt}" for num, mnt, _ in _mount_table() if num in nums]
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


async def zero_out(dev: str) -> None:
    """Write zeros over a whole block device that nothing uses (discarding where it can)."""
    await trio.to_thread.run_sync(check_unused, dev)
    await run(["blkdiscard", "--zeroout", dev], timeout=3600)


async def signatures(dev: str) -> list[str]:
    """Filesystems, partition tables and RAID/LVM labels found on a device or file."""
    out = await run(["wipefs", "--no-act", "--json", dev])
    if not out.strip():
        return []
    return [str(s.get("type")) for s in json.loads(out).get("signatures", [])]


async def loops_of(path: str) -> list[str]:
    """Loop devices backed by a file."""
    out = await run(["losetup", "--associated", path, "--output", "NAME", "--noheadings"])
    return [line.strip() for line in out.splitlines() if line.strip()]


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
