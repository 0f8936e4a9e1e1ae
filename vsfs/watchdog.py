"""Frees the mount of a daemon that died: ``python -m vsfs.watchdog PID DEVICE MOUNTPOINT``.

A daemon killed (``kill -9``, the OOM killer) or ended by a bug can leave its mount
wedged: a thread of it that waits in the kernel to drop a cached entry waits for the
lock of a directory, which a caller's request holds while that request waits for the
dead daemon's answer. The thread cannot die (not even SIGKILL ends a task waiting in
the kernel there), so the daemon's /dev/fuse is never closed, so the connection is
never aborted, so the callers stay in D state: only aborting the connection by hand
frees them.

The daemon starts this watchdog right after mounting, as a process of its own that
the kernel signals when the daemon's main thread ends (``setpriv --pdeathsig``, which
is bound to the thread that forked it). It then gives the daemon a moment to go
away by itself; if the FUSE connection is still there, it aborts it
(``/sys/fs/fuse/connections/N/abort``), which answers every waiting request and so
lets the stuck thread and the daemon end; and it detaches the dead mount (lazily),
so that the mount point can be mounted again at once. After a clean unmount it finds
nothing to do.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

from vsfs.errors import BackendFailed

log = logging.getLogger("vsfs.watchdog")

CONNECTIONS = Path("/sys/fs/fuse/connections")
# How long a daemon that is going away by itself (a clean unmount) is given.
GRACE = 1.0


class MountEntry(NamedTuple):
    """One line of /proc/self/mountinfo: what the mount shows (``root``, a path of its
    filesystem) where (``mount_point``), its device number, type and source."""

    device: str  # MAJOR:MINOR
    root: str
    mount_point: str
    fstype: str
    source: str


def unescape(field: str) -> str:
    """A path as /proc/self/mountinfo writes it (space, tab, newline, backslash octal)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


# /proc/self/mountinfo (Linux 6.18), one mount a line; optional fields (shared:N ...)
# end at "-", then come the type, the source and the super block's options:
#   27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard,resv_strict
#   48 27 0:43 / /tmp/rec/with\040space rw,relatime - tmpfs vsfs-record rw,size=1024k
def parse_mountinfo(text: str) -> list[MountEntry]:
    """Every mount of a mountinfo text, in its order (the later of two at one place is on
    top). A line not in the kernel's format is a BackendFailed naming it."""
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        sep = fields.index("-", 6) if "-" in fields[6:] else 0
        if not sep or len(fields) < sep + 3 or ":" not in fields[2]:
            raise BackendFailed(f"mountinfo line {number} is not a mount: {line[:80]!r}")
        out.append(MountEntry(fields[2], unescape(fields[3]), unescape(fields[4]),
                              fields[sep + 1], unescape(fields[sep + 2])))
    return out


def read_mountinfo() -> list[MountEntry]:
    """This process's mounts. Blocking."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        return parse_mountinfo(f.read())


def mount_device(mountpoint: str) -> str | None:
    """The device (MAJOR:MINOR) of the topmost mount at ``mountpoint``, if mounted."""
    found = None
    with contextlib.suppress(OSError, BackendFailed):
        for mount in read_mountinfo():
            if mount.mount_point == mountpoint:
                found = mount.device
    return found


def _alive(pid: int) -> bool:
    """Whether the daemon still has a thread that is not a zombie."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tasks:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        if stat.rpartition(")")[2].split()[0] not in ("Z", "X"):
            return True
    return False


def abort(device: str) -> bool:
    """Abort the FUSE connection of ``device`` (MAJOR:MINOR); whether it was there."""
    minor = device.partition(":")[2]
    conn = CONNECTIONS / minor
    if not conn.exists() and os.geteuid() == 0 and CONNECTIONS.is_dir():
        # fusectl is not mounted everywhere; root can mount it.
        subprocess.run(["mount", "-t", "fusectl", "fusectl", str(CONNECTIONS)],
                       capture_output=True, check=False)
    try:
        (conn / "abort").write_text("1")
    except OSError:
        return False
    return True


def detach(mountpoint: str) -> None:
    """Lazily unmount a dead mount, so that its mount point can be mounted again."""
    tool = shutil.which("fusermount3")
    argv = [[tool, "-u", "-z", mountpoint]] if tool else []
    if os.geteuid() == 0:
        argv.append(["umount", "-l", mountpoint])
    for cmd in argv:
        if subprocess.run(cmd, capture_output=True, check=False).returncode == 0:
            return


def free(pid: int, device: str, mountpoint: str) -> None:
    """What to do once the daemon's main thread has ended."""
    deadline = time.monotonic() + GRACE
    while _alive(pid) and mount_device(mountpoint) == device and time.monotonic() < deadline:
        time.sleep(0.02)
    if mount_device(mountpoint) != device:
        return  # unmounted cleanly (or by someone else): nothing left to free
    aborted = abort(device)
    detach(mountpoint)
    log.warning("vsfs daemon %d ended without unmounting %s: %s; mount detached", pid,
                mountpoint, "connection aborted" if aborted else "its connection was "
                "gone already or cannot be aborted here (is fusectl mounted?)")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (3, 4):
        print("usage: python -m vsfs.watchdog PID MAJOR:MINOR MOUNTPOINT [LOGFILE]",
              file=sys.stderr)
        return 2
    pid, device, mountpoint = int(args[0]), args[1], args[2]
    if len(args) == 4:
        logging.basicConfig(filename=args[3],
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The parent-death signal is taken by sigtimedwait, not by a handler.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    # A terminal's Ctrl-C is for the daemon, which unmounts; this one waits for it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    while os.getppid() == pid and mount_device(mountpoint) == device:
        # A look now and then too, in case the daemon ended before the signal was armed.
        if signal.sigtimedwait([signal.SIGTERM], 5.0) is not None:
            break
    free(pid, device, mountpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
