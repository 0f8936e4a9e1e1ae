"""Helpers the tests share: plain functions and the ``Mount`` a mount fixture gives.

Tests import them (``from support import Mount, sh``); the fixtures themselves are in
conftest.py, which nobody imports.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from lxml import etree

FUSE_OK = os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None

# tests/guest/ runs inside the QEMU guest (tests/test_vm_tier.py boots it, with VSFS_VM=1).
IN_GUEST = os.environ.get("VSFS_VM") == "1"


def abort_connection(mnt: Path) -> bool:
    """Abort the FUSE connection of the mount at ``mnt`` and detach it (lazily): what
    frees callers stuck in D state, which not even SIGKILL does. Whether one was found."""
    minor = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(mnt):
                minor = fields[2].split(":")[1]
    if minor is None:
        return False
    conns = Path("/sys/fs/fuse/connections")
    if not (conns / minor).exists():
        subprocess.run(["mount", "-t", "fusectl", "none", str(conns)], check=False,
                       capture_output=True)
    with contextlib.suppress(OSError):
        (conns / minor / "abort").write_text("1")
    subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False, capture_output=True)
    return True


def free_port() -> int:
    """A TCP port nothing listens on at 127.0.0.1 now, for a server a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def sh(cmd: str, check: bool = False, user: str | None = None,
       input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a shell command line as a user would type it."""
    argv = ["bash", "-c", cmd]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    res = subprocess.run(argv, capture_output=True, text=True, input=input, timeout=120,
                         check=False)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd!r} failed ({res.returncode}): {res.stderr}")
    return res


@dataclass
class Mount:
    path: Path
    state: Path
    log: Path
    base: Path
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    # What starts vsfs: the real command, or a test's wrapper around it.
    command: list[str] = field(default_factory=lambda: [sys.executable, "-m", "vsfs"])
    # A test that makes the daemon fail on purpose expects its tracebacks in the log.
    tracebacks_expected: bool = False

    def start(self) -> None:
        argv = [*self.command, "mount", str(self.path), "--foreground",
                "--state-dir", str(self.state), "--log-file", str(self.log),
                "--log-level", "DEBUG", *self.extra_args]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while not os.path.ismount(self.path):
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise AssertionError(f"vsfs exited {self.proc.returncode}: {err}")
            if time.monotonic() > deadline:
                raise AssertionError("vsfs did not mount within 20 s")
            time.sleep(0.02)
        # Mounted; it answers once a listing comes back.
        os.listdir(self.path)

    def stop(self, expect_rc: int | None = 0) -> None:
        """Unmount and wait; the daemon must exit with ``expect_rc``."""
        if os.path.ismount(self.path):
            res = subprocess.run(["fusermount3", "-u", str(self.path)], capture_output=True,
                                 check=False)
            if res.returncode != 0:
                subprocess.run(["fusermount3", "-u", "-z", str(self.path)], check=False)
        if self.proc is not None:
            try:
                rc = self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                rc = self.proc.wait()
                raise AssertionError("vsfs did not exit after unmount") from None
            finally:
                if self.proc.stderr:
                    self.proc.stderr.close()
            self.proc = None
            if expect_rc is not None:
                assert rc == expect_rc, f"vsfs exited {rc}"

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None
        # What a user does after a crash: the mount is dead until unmounted.
        subprocess.run(["fusermount3", "-u", "-z", str(self.path)], check=False)

    def error(self) -> str:
        return (self.path / "error").read_text().strip()

    def pool_xml(self, name: str, target: Path, extra: str = "") -> str:
        return (f"<pool type='dir'><name>{name}</name>{extra}"
                f"<target><path>{target}</path></target></pool>")

    def define(self, xml: str, pool: str | None = None) -> Path:
        """Define from XML the way a user would (`cat > .../define`): a pool, or a volume
        of ``pool``. It must succeed. The new pool's directory (MNT/pools/NAME), or the
        new volume's (MNT/pools/POOL/volinfo/NAME)."""
        name = etree.fromstring(xml.encode()).findtext("name")
        assert name, f"no <name> in {xml}"
        if pool is None:
            sh(f"cat > {self.path}/pools/define", check=True, input=xml)
            return self.path / "pools" / name
        sh(f"cat > {self.path}/pools/{pool}/define", check=True, input=xml)
        return self.path / "pools" / pool / "volinfo" / name

    def dir_pool(self, name: str = "p", start: bool = True) -> Path:
        """Define, build and start a dir pool the way a user would; its target."""
        target = self.base / f"images-{name}"
        p = self.define(self.pool_xml(name, target))
        sh(f"echo build > {p}/ctl", check=True)
        if start:
            sh(f"echo start > {p}/ctl", check=True)
        return target

    def assert_clean_log(self) -> None:
        if self.tracebacks_expected:
            return
        text = self.log.read_text() if self.log.exists() else ""
        assert "Traceback" not in text, f"the daemon logged a traceback:\n{text}"


def loops_of(path: Path) -> list[str]:
    out = sh(f"losetup -j {path} -O NAME -n", check=True).stdout
    return [ln.strip() for ln in out.splitlines() if ln.strip()]


def guest_disks() -> list[str]:
    """The guest's test disks, found by the serial numbers the VM tier gives them."""
    found = {}
    for blk in Path("/sys/block").iterdir():
        serial_file = blk / "serial"
        if serial_file.exists():
            serial = serial_file.read_text().strip()
            if serial.startswith("VSFSDISK"):
                found[serial] = f"/dev/{blk.name}"
    wanted = int(os.environ.get("VSFS_VM_DISKS", "3"))
    assert len(found) >= wanted, f"the guest lacks its test disks: {found}"
    return [found[k] for k in sorted(found)]


class MountFactory(Protocol):
    """What the ``mount_factory`` fixture gives: starts a mount (torn down after the test)."""

    def __call__(self, extra_args: list[str] | None = None, name: str = "mnt",
                 state: Path | None = None, command: list[str] | None = None) -> Mount: ...
