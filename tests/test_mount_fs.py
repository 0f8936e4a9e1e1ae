"""fs pools on real loop devices and image files, through the mount."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from support import Mount, MountFactory, loops_of, sh

pytestmark = [pytest.mark.fuse, pytest.mark.root]


def fs_xml(name: str, device: str | Path, fmt: str, target: Path) -> str:
    return (f"<pool type='fs'><name>{name}</name><source><device path='{device}'/>"
            f"<format type='{fmt}'/></source><target><path>{target}</path></target></pool>")


def test_fs_pool_on_a_loop_device(vsfs: Mount, loopdev: str) -> None:
    target = vsfs.base / "fsmnt"
    f = vsfs.define(fs_xml("f", loopdev, "ext4", target))
    sh(f"echo build > {f}/ctl", check=True)
    assert "ext4" in sh(f"blkid -p -o value -s TYPE {loopdev}", check=True).stdout
    # a second build would destroy the filesystem: refused unless asked
    res = sh(f"echo build > {f}/ctl")
    assert "Device or resource busy" in res.stderr
    assert "already holds ext4" in vsfs.error()
    sh(f"echo 'build --overwrite' > {f}/ctl", check=True)
    sh(f"echo start > {f}/ctl", check=True)
    assert (f / "state").read_text() == "running\n"
    assert sh(f"findmnt -n -o SOURCE {target}", check=True).stdout.strip() == loopdev
    st = os.statvfs(target)
    assert int((f / "capacity").read_text()) == st.f_blocks * st.f_frsize
    assert os.listdir(f / "volumes") == [], "lost+found is not a volume"
    sh(f"truncate -s 10M {f}/volumes/a.img && echo 'clone b.img' > {f}/volinfo/a.img/ctl",
       check=True)
    assert sorted(os.listdir(target)) == ["a.img", "b.img", "lost+found"]
    # never format a mounted device, even when told to overwrite
    sh(f"echo stop > {f}/ctl", check=True)
    other = vsfs.base / "elsewhere"
    other.mkdir()
    sh(f"mount {loopdev} {other}", check=True)
    try:
        res = sh(f"echo 'build --overwrite' > {f}/ctl")
        assert "Device or resource busy" in res.stderr
        assert f"mounted on {other}" in vsfs.error()
    finally:
        sh(f"umount {other}", check=True)
    assert (f / "state").read_text() == "inactive\n"
    assert sh(f"findmnt -n {target}").stdout == ""


def test_pools_nest_and_clone_with_reflinks(vsfs: Mount) -> None:
    images = vsfs.dir_pool()
    p = vsfs.path / "pools" / "p"
    sh(f"truncate -s 320M {p}/volumes/xfs.img", check=True)
    target = vsfs.base / "xfsmnt"
    f = vsfs.define(fs_xml("x", images / "xfs.img", "xfs", target))
    sh(f"echo build > {f}/ctl", check=True)
    sh(f"echo start > {f}/ctl", check=True)
    loops = loops_of(images / "xfs.img")
    assert len(loops) == 1, "start attaches the image file to one loop device"
    assert sh(f"findmnt -n -o SOURCE {target}", check=True).stdout.strip() == loops[0]
    try:
        sh(f"head -c 4M /dev/urandom > {f}/volumes/data.img", check=True)
        sh(f"echo 'clone copy.img' > {f}/volinfo/data.img/ctl", check=True)
        sh(f"cmp {target}/data.img {target}/copy.img", check=True)
        extents = sh(f"filefrag -v {target}/copy.img", check=True).stdout
        assert "shared" in extents, "xfs clones share extents (reflink)"
        # the image is in use as the source of a running pool
        res = sh(f"rm {p}/volumes/xfs.img")
        assert "Device or resource busy" in res.stderr
        assert "source of running pool 'x'" in vsfs.error()
        res = sh(f"echo stop > {p}/ctl")
        assert "Device or resource busy" in res.stderr
        assert (p / "state").read_text() == "running\n"
    finally:
        sh(f"echo stop > {f}/ctl", check=True)
    assert loops_of(images / "xfs.img") == []
    assert sh(f"findmnt -n {target}").stdout == ""
    sh(f"echo start > {f}/ctl", check=True)
    assert sorted(os.listdir(f / "volumes")) == ["copy.img", "data.img"]
    sh(f"echo stop > {f}/ctl", check=True)
    sh(f"rm {p}/volumes/xfs.img", check=True)


def test_running_fs_pool_is_adopted_after_a_crash(mount_factory: MountFactory) -> None:
    m = mount_factory()
    images = m.dir_pool()
    sh(f"truncate -s 64M {m.path}/pools/p/volumes/e.img", check=True)
    target = m.base / "emnt"
    f = m.define(fs_xml("e", images / "e.img", "ext4", target))
    sh(f"echo build > {f}/ctl && echo start > {f}/ctl && echo yes > {m.path}/pools/p/autostart",
       check=True)
    sh(f"truncate -s 1M {f}/volumes/v", check=True)
    m.kill9()
    try:
        m.start()
        assert (m.path / "pools/e/state").read_text() == "running\n"
        assert os.listdir(m.path / "pools/e/volumes") == ["v"]
        sh(f"echo stop > {m.path}/pools/e/ctl", check=True)
        assert loops_of(images / "e.img") == []
    finally:
        for loop in loops_of(images / "e.img"):
            subprocess.run(["umount", "-l", str(target)], check=False)
            subprocess.run(["losetup", "-d", loop], check=False)


def test_build_auto_and_bad_definitions(vsfs: Mount, loopdev: str) -> None:
    f = vsfs.define(fs_xml("a", loopdev, "auto", vsfs.base / "amnt"))
    assert "Invalid argument" in sh(f"echo build > {f}/ctl").stderr
    assert "holds no filesystem" in vsfs.error()
    sh(f"mkfs.ext4 -q {loopdev}", check=True)
    sh(f"echo build > {f}/ctl && echo start > {f}/ctl", check=True)  # auto: mount probes
    assert sh(f"findmnt -n -o FSTYPE {vsfs.base}/amnt", check=True).stdout.strip() == "ext4"
    sh(f"echo stop > {f}/ctl", check=True)
    (vsfs.base / "bad.xml").write_text(
        "<pool type='fs'><name>b</name><target><path>/tmp/b</path></target></pool>")
    assert "Invalid argument" in sh(f"cat {vsfs.base}/bad.xml > {vsfs.path}/pools/define").stderr
    assert "exactly one" in vsfs.error()
    (vsfs.base / "dup.xml").write_text(
        f"<pool type='disk'><name>d</name><source><device path='{loopdev}'/></source>"
        "<target><path>/dev</path></target></pool>")
    res = sh(f"cat {vsfs.base}/dup.xml > {vsfs.path}/pools/define")
    assert "File exists" in res.stderr
    assert f"already uses source device {loopdev}" in vsfs.error()


@pytest.mark.parametrize("fmt", ["ext4", "xfs", "btrfs"])
def test_fs_formats_lifecycle(vsfs: Mount, loopdev: str, fmt: str) -> None:
    target = vsfs.base / "mnt-fs"
    f = vsfs.define(fs_xml("f", loopdev, fmt, target))
    sh(f"echo build > {f}/ctl && echo start > {f}/ctl", check=True)
    assert sh(f"findmnt -n -o FSTYPE {target}", check=True).stdout.strip() == fmt
    sh(f"truncate -s 8M {f}/volumes/a && echo 'clone b' > {f}/volinfo/a/ctl", check=True)
    assert sorted(os.listdir(f / "volumes")) == ["a", "b"]
    assert "Device or resource busy" in sh(f"echo delete > {f}/ctl").stderr
    sh(f"rm {f}/volumes/a {f}/volumes/b && echo stop > {f}/ctl", check=True)
    assert sh(f"findmnt -n {target}").stdout == ""
    sh(f"echo delete > {f}/ctl", check=True)  # the (empty) target directory goes
    assert not target.exists()
    sh(f"rmdir {f}", check=True)
