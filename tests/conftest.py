"""Fixtures shared by the test tiers.

Mount tests start the real ``vsfs`` command in the foreground, drive the mount
with real tools and always unmount, asserting that the daemon exited 0 and
logged no traceback.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

FUSE_OK = os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None

# tests/guest/ runs inside the QEMU guest (tests/test_vm_tier.py boots it); on the host
# it is not collected at all, so nothing there shows up as skipped.
IN_GUEST = os.environ.get("VSFS_VM") == "1"
collect_ignore = [] if IN_GUEST else ["guest"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "fuse" in item.keywords and not FUSE_OK:
            item.add_marker(pytest.mark.skip(reason="needs /dev/fuse and fusermount3 (fuse3)"))
        if "root" in item.keywords and os.geteuid() != 0:
            item.add_marker(pytest.mark.skip(reason="needs root"))


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

    def define_pool(self, name: str, xml: str) -> Path:
        """Define a pool from XML the way a user would (a file, cat); its directory."""
        path = self.base / f"{self.path.name}-{name}.xml"
        path.write_text(xml)
        sh(f"cat {path} > {self.path}/pools/define", check=True)
        return self.path / "pools" / name

    def dir_pool(self, name: str = "p", start: bool = True) -> Path:
        """Define, build and start a dir pool the way a user would; its target."""
        target = self.base / f"images-{name}"
        xml = self.base / f"{name}.xml"
        xml.write_text(self.pool_xml(name, target))
        sh(f"cat {xml} > {self.path}/pools/define", check=True)
        sh(f"echo build > {self.path}/pools/{name}/ctl", check=True)
        if start:
            sh(f"echo start > {self.path}/pools/{name}/ctl", check=True)
        return target

    def assert_clean_log(self) -> None:
        if self.tracebacks_expected:
            return
        text = self.log.read_text() if self.log.exists() else ""
        assert "Traceback" not in text, f"the daemon logged a traceback:\n{text}"


@pytest.fixture
def mount_factory(tmp_path: Path) -> Iterator[Callable[..., Mount]]:
    mounts: list[Mount] = []
    public: list[Path] = []

    def make(extra_args: list[str] | None = None, name: str = "mnt",
             state: Path | None = None, command: list[str] | None = None) -> Mount:
        mnt = tmp_path / name
        if extra_args and "--allow-other" in extra_args:
            # Other users must be able to reach the mount point; pytest's
            # tmp_path is private to root.
            mnt = Path(tempfile.mkdtemp(prefix="vsfs-test-"))
            os.chmod(mnt, 0o755)
            public.append(mnt)
        mnt.mkdir(exist_ok=True)
        m = Mount(mnt, state or tmp_path / "state", tmp_path / f"{name}.log", tmp_path,
                  list(extra_args or []))
        if command is not None:
            m.command = command
        mounts.append(m)
        m.start()
        return m

    yield make
    failures = []
    results = os.environ.get("VSFS_VM_RESULTS")
    for m in mounts:
        try:
            m.stop(expect_rc=0 if m.proc is not None else None)
        except AssertionError as e:
            failures.append(str(e))
        try:
            m.assert_clean_log()
        except AssertionError as e:
            failures.append(str(e))
        if results and m.log.exists():
            # In the QEMU guest: the daemon's log goes back to the host.
            shutil.copy(m.log, Path(results) / f"{m.base.name}-{m.log.name}")
    for mnt in public:
        with contextlib.suppress(OSError):
            mnt.rmdir()
    if failures:
        pytest.fail("; ".join(failures))


@pytest.fixture
def vsfs(mount_factory: Callable[..., Mount]) -> Mount:
    return mount_factory()


def loops_of(path: Path) -> list[str]:
    out = sh(f"losetup -j {path} -O NAME -n", check=True).stdout
    return [ln.strip() for ln in out.splitlines() if ln.strip()]


@pytest.fixture
def loopdev(tmp_path: Path) -> Iterator[str]:
    """A fresh 320 MiB loop device, detached afterwards whatever happened."""
    img = tmp_path / "disk.img"
    img.write_bytes(b"")
    os.truncate(img, 320 << 20)
    dev = sh(f"losetup -f --show {img}", check=True).stdout.strip()
    try:
        yield dev
    finally:
        for mnt in sh(f"findmnt -n -o TARGET -S {dev}").stdout.split():
            subprocess.run(["umount", "-l", mnt], check=False)
        for part in sorted(Path("/dev").glob(os.path.basename(dev) + "p*")):
            for mnt in sh(f"findmnt -n -o TARGET -S {part}").stdout.split():
                subprocess.run(["umount", "-l", mnt], check=False)
        subprocess.run(["partx", "-d", dev], check=False, capture_output=True)
        subprocess.run(["losetup", "-d", dev], check=False)
