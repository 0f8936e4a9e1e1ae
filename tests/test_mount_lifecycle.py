"""Mounting, unmounting, crashes and persistence, with the real command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import Mount, MountFactory, sh

pytestmark = pytest.mark.fuse

VSFS = [sys.executable, "-m", "vsfs"]


def populate(m: Mount) -> Path:
    target = m.dir_pool()
    p = m.path / "pools" / "p"
    sh(f"echo yes > {p}/autostart", check=True)
    sh(f"truncate -s 5M {p}/volumes/a.img && mkdir {p}/volumes/dir", check=True)
    sh(f"qemu-img create -q -f qcow2 -b {target}/a.img -F raw {p}/volumes/ov.qcow2", check=True)
    m.dir_pool("idle", start=False)
    return target


def check_populated(m: Mount, target: Path) -> None:
    p = m.path / "pools" / "p"
    assert sorted(os.listdir(m.path / "pools")) == ["define", "idle", "p"]
    assert (p / "state").read_text() == "running\n"
    assert (p / "autostart").read_text() == "yes\n"
    assert (m.path / "pools/idle/state").read_text() == "inactive\n"
    assert sorted(os.listdir(p / "volumes")) == ["a.img", "dir", "ov.qcow2"]
    assert os.readlink(p / "volumes/a.img") == str(target / "a.img")
    assert (p / "volinfo/ov.qcow2/format").read_text() == "qcow2\n"
    assert (p / "volinfo/a.img/capacity").read_text() == f"{5 << 20}\n"


def test_state_survives_unmount(mount_factory: MountFactory) -> None:
    m = mount_factory()
    target = populate(m)
    uuid = (m.path / "pools/p/uuid").read_text()
    m.stop()
    # libvirt's layout on disk
    assert sorted(os.listdir(m.state)) == ["autostart", "idle.xml", "p.xml"]
    link = m.state / "autostart" / "p.xml"
    assert link.is_symlink() and link.resolve() == (m.state / "p.xml").resolve()
    m.start()
    check_populated(m, target)
    assert (m.path / "pools/p/uuid").read_text() == uuid


def test_kill9_then_remount(mount_factory: MountFactory) -> None:
    m = mount_factory()
    target = populate(m)
    m.kill9()
    assert not os.path.ismount(m.path)
    m.start()
    check_populated(m, target)
    leftovers = [n for n in os.listdir(m.state) if n.startswith(".")]
    assert leftovers == []


def test_sigterm_unmounts_cleanly(mount_factory: MountFactory) -> None:
    m = mount_factory()
    assert m.proc is not None
    m.proc.send_signal(signal.SIGTERM)
    assert m.proc.wait(timeout=20) == 0
    m.proc = None
    assert not os.path.ismount(m.path)


def test_detached_mount_and_umount(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "log"
    res = subprocess.run([*VSFS, "mount", str(mnt), "--state-dir", str(tmp_path / "st"),
                          "--log-file", str(log)], capture_output=True, text=True, timeout=60,
                         check=False)
    try:
        assert res.returncode == 0, res.stderr
        # It answers as soon as the command has returned.
        assert "pools" in os.listdir(mnt)
        assert (mnt / "README").read_text().startswith("vsfs")
    finally:
        res = subprocess.run([*VSFS, "umount", str(mnt)], capture_output=True, text=True,
                             check=False)
        if res.returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
    assert res.returncode == 0, res.stderr
    assert not os.path.ismount(mnt)
    deadline = time.monotonic() + 10
    while "unmounted" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "unmounted" in log.read_text()
    assert "Traceback" not in log.read_text()


@pytest.mark.parametrize("case", ["missing", "notempty", "file", "badstate"])
def test_mount_failures_say_why(tmp_path: Path, case: str) -> None:
    mnt = tmp_path / "mnt"
    state = tmp_path / "st"
    expect = {"missing": "does not exist", "notempty": "is not empty",
              "file": "is not a directory", "badstate": "state directory"}[case]
    if case != "missing":
        mnt.mkdir()
    if case == "notempty":
        (mnt / "x").write_text("")
    if case == "file":
        mnt = tmp_path / "afile"
        mnt.write_text("")
    if case == "badstate":
        state.write_text("not a directory")
    res = subprocess.run([*VSFS, "mount", str(mnt), "--state-dir", str(state)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], res.stderr
    assert not os.path.ismount(mnt)


def test_mount_over_dead_mount_says_so(mount_factory: MountFactory) -> None:
    m = mount_factory()
    assert m.proc is not None
    # The daemon's watchdog would detach the dead mount (test_faults.py): end it first,
    # as if it could not act, to see what a mount over a dead one says.
    children = Path(f"/proc/{m.proc.pid}/task/{m.proc.pid}/children").read_text().split()
    watchdogs = [pid for pid in children
                 if b"vsfs.watchdog" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(watchdogs) == 1, children
    os.kill(int(watchdogs[0]), signal.SIGKILL)
    m.proc.kill()
    m.proc.wait()
    m.proc = None
    try:
        res = subprocess.run([*VSFS, "mount", str(m.path), "--state-dir", str(m.state)],
                             capture_output=True, text=True, timeout=60, check=False)
        assert res.returncode != 0
        assert "vsfs umount" in res.stderr
    finally:
        res = subprocess.run([*VSFS, "umount", str(m.path)], capture_output=True, text=True,
                             check=False)
    assert res.returncode == 0, res.stderr
    assert not os.path.ismount(m.path)


def test_one_daemon_per_state_directory(mount_factory: MountFactory, tmp_path: Path) -> None:
    """A second daemon on the same state directory would take the first one's files in
    flight for litter: it is refused, naming the first, and mounts nothing."""
    m = mount_factory()
    assert m.proc is not None
    other = tmp_path / "other"
    other.mkdir()
    res = subprocess.run([*VSFS, "mount", str(other), "--state-dir", str(m.state)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode != 0
    assert "is used by another vsfs daemon" in res.stderr, res.stderr
    assert not os.path.ismount(other)
    m.stop()
    # Free again once the first has gone.
    again = mount_factory(name="again", state=m.state)
    assert (again.path / "pools").is_dir()


def test_copied_libvirt_state_dir(mount_factory: MountFactory, tmp_path: Path) -> None:
    """A copy of /etc/libvirt/storage, as libvirt writes it, is a valid state directory."""
    state = tmp_path / "state"
    (state / "autostart").mkdir(parents=True)
    images = tmp_path / "lv-images"
    images.mkdir()
    (images / "disk.img").write_bytes(b"\0" * 4096)
    (state / "default.xml").write_text(f"""<!--
WARNING: THIS IS AN AUTO-GENERATED FILE. CHANGES TO IT ARE LIKELY TO BE
OVERWRITTEN AND LOST. Changes to this xml configuration should be made using:
  virsh pool-edit default
or other application using the libvirt API.
-->

<pool type='dir'>
  <name>default</name>
  <uuid>3c9b2b5e-0e2c-4d7e-9c1b-6f7ad1a3e001</uuid>
  <capacity unit='bytes'>0</capacity>
  <allocation unit='bytes'>0</allocation>
  <available unit='bytes'>0</available>
  <source>
  </source>
  <target>
    <path>{images}</path>
  </target>
</pool>
""")
    # libvirt's link is absolute and points at /etc/libvirt/storage, gone in a copy
    os.symlink("/etc/libvirt/storage/default.xml", state / "autostart" / "default.xml")
    m = mount_factory(state=state)
    d = m.path / "pools" / "default"
    assert (d / "state").read_text() == "running\n"
    assert (d / "uuid").read_text() == "3c9b2b5e-0e2c-4d7e-9c1b-6f7ad1a3e001\n"
    assert os.listdir(d / "volumes") == ["disk.img"]


def test_demo(tmp_path: Path) -> None:
    mnt = tmp_path / "demo"
    res = subprocess.run([*VSFS, "demo", str(mnt), "--state-dir", str(tmp_path / "st"),
                          "--images", str(tmp_path / "images")],
                         capture_output=True, text=True, timeout=120, check=False)
    try:
        assert res.returncode == 0, res.stderr
        assert f"Mounted at {mnt}" in res.stdout
        vols = mnt / "pools" / "demo" / "volumes"
        assert sorted(os.listdir(vols)) == ["base.qcow2", "disk1.img"]
        assert (mnt / "pools/demo/volinfo/base.qcow2/format").read_text() == "qcow2\n"
        assert (mnt / "pools/demo/autostart").read_text() == "yes\n"
        # every command the demo suggests works as printed
        for line in res.stdout.splitlines():
            cmd = line.strip()
            if cmd.startswith(("ls ", "cat ", "truncate ", "echo ", "qemu-img ", "rm ")):
                run = sh(cmd)
                assert run.returncode == 0, (cmd, run.stderr)
    finally:
        subprocess.run([*VSFS, "umount", str(mnt)], check=False)
    assert not os.path.ismount(mnt)


@pytest.mark.parametrize("value", ["-1", "10001", "soon"])
def test_read_spin_out_of_range_is_refused(tmp_path: Path, value: str) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run([*VSFS, "mount", str(mnt), "--state-dir", str(tmp_path / "st"),
                          "--read-spin", value], capture_output=True, text=True, timeout=60,
                         check=False)
    assert res.returncode == 2
    assert "--read-spin" in res.stderr and "microseconds from 0 to 10000" in res.stderr
    assert not os.path.ismount(mnt)
    assert not (tmp_path / "st").exists()


@pytest.mark.parametrize("spin", ["0", "3000"])
def test_read_spin_off_or_long_serves_as_usual(mount_factory: MountFactory, spin: str) -> None:
    """The read spin only changes when the daemon sleeps: none, or a long one (3 ms,
    longer than the gaps between a shell's requests), serves the same files."""
    m = mount_factory(extra_args=["--read-spin", spin])
    target = m.dir_pool()
    vols = m.path / "pools" / "p" / "volumes"
    sh(f'cd {vols} && for i in $(seq 100); do truncate -s 1M v$i || exit 1; done', check=True)
    out = sh(f"ls -l {vols}", check=True).stdout
    links = [line.split(" -> ")[1] for line in out.splitlines() if " -> " in line]
    assert sorted(links) == sorted(str(target / f"v{i}") for i in range(1, 101))
    sh(f"rm {vols}/v*", check=True)
    assert os.listdir(vols) == [] and os.listdir(target) == []
