"""Faults injected into a real mount (tests/faulty_vsfs.py): a bug in a handler or a
background task costs that one request an EIO, or the task a restart, never the mount."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support import Mount, MountFactory, abort_connection, sh

pytestmark = pytest.mark.fuse

FAULTY = [sys.executable, str(Path(__file__).with_name("faulty_vsfs.py"))]


def wait_for(check: Callable[[], bool], what: str, bound: float = 10.0) -> None:
    deadline = time.monotonic() + bound
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {bound:g} s: {what}")
        time.sleep(0.05)


def test_a_failing_handler_costs_one_request(mount_factory: MountFactory) -> None:
    m = mount_factory(command=FAULTY)
    m.tracebacks_expected = True
    target = m.dir_pool("p")
    vols = m.path / "pools" / "p" / "volumes"
    sh(f"truncate -s 1M {vols}/a {vols}/badfd", check=True)

    # A value whose rendering fails: EIO for that read, the reason in MNT/error.
    res = sh(f"cat {m.path}/pools/p/volinfo/badfd/capacity")
    assert res.returncode != 0 and "Input/output error" in res.stderr
    assert "internal error" in m.error() and "Bad file descriptor" in m.error()
    # The rest answers.
    assert (m.path / "pools" / "p" / "volinfo" / "a" / "capacity").read_text() == "1048576\n"

    # A listing that fails: EIO for ls, and later listings work once the cause is gone.
    sh(f"truncate -s 1M {vols}/boom", check=True)
    res = sh(f"ls {vols}")
    assert res.returncode != 0 and "Input/output error" in res.stderr
    assert "injected: a listing that fails" in m.error()
    sh(f"rm {vols}/boom", check=True)
    assert sorted(os.listdir(vols)) == ["a", "badfd"]

    # The background tasks failed once each and were started again: the poll still
    # sees a file another tool put into the pool.
    (target / "outside").write_bytes(b"x" * 512)
    wait_for(lambda: "outside" in os.listdir(vols), "the poll to see a new file")
    # FORGETs that fail (the kernel drops its caches) are logged, nothing more.
    if os.geteuid() == 0:
        Path("/proc/sys/vm/drop_caches").write_text("2")
    assert sorted(os.listdir(vols)) == ["a", "badfd", "outside"]
    assert m.proc is not None and m.proc.poll() is None, "the daemon died"
    m.stop()
    log = m.log.read_text()
    for what in ("the pool poll failed; starting it again",
                 "the host device watch failed; starting it again",
                 "injected: a listing that fails", "Bad file descriptor (injected)",
                 "no watchdog for", "Resource temporarily unavailable (injected)"):
        assert what in log, what
    if os.geteuid() == 0:
        assert "forget failed" in log


def test_killed_daemon_frees_its_mount(mount_factory: MountFactory) -> None:
    """kill -9 under load: the daemon dies, its watchdog aborts the connection (no
    caller stays in D state) and detaches the mount, and the next mount works."""
    m = mount_factory()
    m.dir_pool("p")
    sh(f"echo yes > {m.path}/pools/p/autostart", check=True)
    vols = m.path / "pools" / "p" / "volumes"
    assert m.proc is not None
    callers = [subprocess.Popen(["bash", "-c", f"for j in $(seq 50); do truncate -s 1M "
                                 f"{vols}/k{i}-$j; ls -l {vols} >/dev/null; done"],
                                stderr=subprocess.DEVNULL) for i in range(20)]
    time.sleep(0.5)
    m.proc.kill()
    m.proc.wait(timeout=30)
    if m.proc.stderr:
        m.proc.stderr.close()
    m.proc = None
    try:
        for p in callers:
            p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        abort_connection(m.path)
        for p in callers:
            p.kill()
        pytest.fail("callers still waiting 60 s after the daemon was killed")
    wait_for(lambda: not os.path.ismount(m.path), "the watchdog to detach the mount")
    m.start()
    assert (m.path / "pools" / "p" / "state").read_text() == "running\n"


def _mounted(mnt: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(mnt) for line in f)


def test_watchdog_finds_a_mount_point_reached_through_a_symlink(tmp_path: Path) -> None:
    """The kernel lists a mount under its real path; the one given may lead through a
    symlink (/var/run is /run on Debian). The watchdog must look for it there, or a
    killed daemon's mount stays dead."""
    real = tmp_path / "real"
    (real / "mnt").mkdir(parents=True)
    (tmp_path / "link").symlink_to(real)
    m = Mount(tmp_path / "link" / "mnt", tmp_path / "state", tmp_path / "mnt.log", tmp_path)
    m.start()
    try:
        assert m.proc is not None
        m.proc.kill()
        m.proc.wait(timeout=30)
        wait_for(lambda: not _mounted(real / "mnt"), "the watchdog to detach the mount")
    finally:
        if m.proc is not None and m.proc.stderr:
            m.proc.stderr.close()
        subprocess.run(["fusermount3", "-u", "-z", str(real / "mnt")], check=False,
                       capture_output=True)
    assert "no watchdog" not in m.log.read_text()


def _watchdogs(pid: int) -> list[str]:
    """The watchdog among a daemon's children (others run commands: ldconfig, at import)."""
    found = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"vsfs.watchdog" in argv or b"setpriv" in argv[:1]:
            found.append(child)
    return found


def test_a_daemon_killed_as_its_watchdog_starts_frees_its_mount(tmp_path: Path) -> None:
    """Killed the moment its watchdog is started, while the watchdog's Python is still
    starting: the parent-death signal must wait for the watchdog to take it, not end it."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for attempt in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "vsfs", "mount", str(mnt),
                                 "--foreground", "--state-dir", str(tmp_path / "state"),
                                 "--log-file", str(tmp_path / "mnt.log")],
                                stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        try:
            while not _watchdogs(proc.pid):  # the moment it is started
                assert proc.poll() is None and time.monotonic() < deadline, "no watchdog"
        finally:
            proc.kill()
            proc.wait()
        try:
            wait_for(lambda: not _mounted(mnt), f"the watchdog to detach the mount ({attempt})")
        finally:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False,
                           capture_output=True)


def test_sigterm_under_load_unmounts_cleanly(mount_factory: MountFactory) -> None:
    """SIGTERM while 40 creators take turns at the volumes/ directory's lock: the
    notifier's last invalidation may wait for it, held by a request that only the
    running loop answers. The daemon must still unmount by itself (not leave its mount
    to the watchdog) and exit 0."""
    m = mount_factory()
    m.dir_pool("p")
    vols = m.path / "pools" / "p" / "volumes"
    assert m.proc is not None
    callers = [subprocess.Popen(["bash", "-c", f"for j in $(seq 200); do truncate -s 1M "
                                 f"{vols}/x{i}-$j; rm -f {vols}/x{i}-$((j-1)); done"],
                                stderr=subprocess.DEVNULL) for i in range(40)]
    try:
        time.sleep(2)
        m.proc.send_signal(signal.SIGTERM)
        assert m.proc.wait(timeout=30) == 0
    finally:
        for p in callers:
            p.wait(timeout=60)
    if m.proc.stderr:
        m.proc.stderr.close()
    m.proc = None
    assert "an invalidation still waits" not in m.log.read_text()
    assert not _mounted(m.path)
