"""rbd pools against a real single-node Ceph cluster on 127.0.0.1, through the mount.

Data goes in through each volume's local path (a qemu-storage-daemon FUSE export) and is read
back with Ceph's own `rbd export`, and the reverse with `rbd import`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from ceph_cluster import CephCluster, rbd_export
from holders import holding, still_works
from rng import assert_valid
from support import Mount, MountFactory, sh

from vsfs.paths import runtime_dir

pytestmark = [pytest.mark.fuse, pytest.mark.root, pytest.mark.ceph]

MiB = 1 << 20
def lockers(ceph: CephCluster, image: str) -> list[dict[str, str]]:
    """Who holds vsfs's advisory lock on an image (a RADOS lock beside it)."""
    res = ceph.cli("rados", "-p", ceph.pool, "lock", "info", f"vsfs_lock.{image}", "vsfs",
                   "--format", "json", check=False)
    return json.loads(res.stdout).get("lockers", []) if res.returncode == 0 else []


def rbd_size(ceph: CephCluster, image: str) -> int:
    info = json.loads(ceph.cli("rbd", "info", "--format", "json",
                               f"{ceph.pool}/{image}").stdout)
    return int(info["size"])


def test_rbd_pool_lifecycle(vsfs: Mount, ceph: CephCluster,
                            rbd_pool: Callable[[Mount, str], Path]) -> None:
    p = rbd_pool(vsfs, "r")
    assert (p / "type").read_text() == "rbd\n"
    assert int((p / "capacity").read_text()) >= 1 << 30
    assert int((p / "free").read_text()) > 0
    assert_valid((p / "xml").read_bytes(), "storagepool")

    # truncate makes a thin image; its local path is QEMU's export of it
    sh(f"truncate -s 64M {p}/volumes/img1", check=True)
    assert rbd_size(ceph, "img1") == 64 * MiB
    link = os.readlink(p / "volumes" / "img1")
    assert link.startswith(str(runtime_dir(vsfs.state)))
    assert os.stat(link).st_size == 64 * MiB
    xml = (p / "volinfo" / "img1" / "xml").read_text()
    assert_valid(xml, "storagevol")
    assert f"<path>{ceph.pool}/img1</path>" in xml and "type=\"network\"" in xml
    assert (p / "volinfo" / "img1" / "path").read_text() == f"{link}\n"
    assert (p / "volinfo" / "img1" / "key").read_text() == f"{ceph.pool}/img1\n"

    # bytes in through the path, out through Ceph's own tool, and the reverse
    data = os.urandom(4 * MiB)
    (vsfs.base / "data").write_bytes(data)
    sh(f"dd if={vsfs.base}/data of={p}/volumes/img1 bs=1M conv=notrunc status=none",
       check=True)
    assert rbd_export(ceph, "img1")[:4 * MiB] == data
    other = os.urandom(3 * MiB)
    ceph.cli("rbd", "import", "--no-progress", "-", f"{ceph.pool}/img2", stdin=other)
    sh(f"echo refresh > {p}/ctl", check=True)
    assert (p / "volumes" / "img2").read_bytes() == other
    assert "raw" in sh(f"qemu-img info {p}/volumes/img2", check=True).stdout

    # <volume> XML makes a thin raw image; other formats are not RBD's
    (vsfs.base / "v.xml").write_text("<volume><name>fromxml</name>"
                                     "<capacity unit='M'>16</capacity></volume>")
    sh(f"cat {vsfs.base}/v.xml > {p}/define", check=True)
    assert rbd_size(ceph, "fromxml") == 16 * MiB
    (vsfs.base / "q.xml").write_text("<volume><name>q</name><capacity>1048576</capacity>"
                                     "<target><format type='qcow2'/></target></volume>")
    assert "Operation not supported" in sh(f"cat {vsfs.base}/q.xml > {p}/define").stderr
    sh(f"rm {p}/volumes/fromxml", check=True)

    # path-only tools: mkfs straight on the path, and a loop device over it
    sh(f"truncate -s 32M {p}/volumes/fs && mkfs.ext4 -q {p}/volumes/fs", check=True)
    loop = sh(f"losetup -f --show {p}/volumes/fs", check=True).stdout.strip()
    try:
        assert "ext4" in sh(f"blkid -o value -s TYPE {loop}").stdout
    finally:
        sh(f"losetup -d {loop}", check=True)
    assert rbd_export(ceph, "fs")[1080:1082] == b"\x53\xef"  # ext4's magic, in Ceph
    sh(f"rm {p}/volumes/fs", check=True)

    # cp makes an image from a file
    sh(f"cp {vsfs.base}/data {p}/volumes/img3", check=True)
    assert rbd_export(ceph, "img3") == data

    # resize: grow by writing capacity; shrinking only by the explicit command
    sh(f"echo 128M > {p}/volinfo/img1/capacity", check=True)
    assert rbd_size(ceph, "img1") == 128 * MiB
    assert os.stat(p / "volumes" / "img1").st_size == 128 * MiB
    res = sh(f"echo 32M > {p}/volinfo/img1/capacity")
    assert "Operation not supported" in res.stderr and "shrink" in vsfs.error()
    sh(f"echo 'shrink 32M' > {p}/volinfo/img1/ctl", check=True)
    assert rbd_size(ceph, "img1") == 32 * MiB

    # snapshots are volumes IMAGE@SNAP, read-only, with the bytes of their time
    sh(f"echo 'snapshot s1' > {p}/volinfo/img1/ctl", check=True)
    assert "img1@s1" in os.listdir(p / "volumes")
    sh(f"dd if=/dev/zero of={p}/volumes/img1 bs=1M count=1 conv=notrunc status=none",
       check=True)
    assert (p / "volumes" / "img1@s1").read_bytes()[:4 * MiB] == data
    res = sh(f"dd if=/dev/zero of={p}/volumes/img1@s1 bs=4k count=1 conv=notrunc status=none")
    assert res.returncode != 0 and "Permission denied" in res.stderr
    res = sh(f"rm {p}/volumes/img1")
    assert "Directory not empty" in res.stderr and "snapshots" in vsfs.error()
    sh(f"rm {p}/volumes/img1@s1", check=True)
    assert b"s1" not in ceph.cli("rbd", "snap", "ls", f"{ceph.pool}/img1").stdout

    # rename, clone (rbd cp), clone into a dir pool, wipe, delete
    sh(f"mv {p}/volumes/img2 {p}/volumes/renamed", check=True)
    assert ceph.cli("rbd", "ls", ceph.pool).stdout.split().count(b"renamed") == 1
    assert (p / "volumes" / "renamed").read_bytes() == other
    sh(f"echo 'clone copy' > {p}/volinfo/renamed/ctl", check=True)
    assert rbd_export(ceph, "copy") == other
    d = vsfs.dir_pool("d")
    sh(f"echo 'clone local.raw d' > {p}/volinfo/renamed/ctl", check=True)
    assert (d / "local.raw").read_bytes() == other
    # a source whose local path nobody asked for yet is exported for the copy
    ceph.cli("rbd", "import", "--no-progress", "-", f"{ceph.pool}/fresh", stdin=other)
    sh(f"echo refresh > {p}/ctl && echo 'clone fresh.raw d' > {p}/volinfo/fresh/ctl",
       check=True)
    assert (d / "fresh.raw").read_bytes() == other
    sh(f"rm {p}/volumes/fresh", check=True)
    sh(f"echo 'clone back r' > {vsfs.path}/pools/d/volinfo/local.raw/ctl", check=True)
    assert rbd_export(ceph, "back") == other
    sh(f"echo wipe > {p}/volinfo/copy/ctl", check=True)
    assert rbd_export(ceph, "copy") == bytes(len(other))
    for name in ("copy", "back", "img3", "renamed", "img1"):
        sh(f"rm {p}/volumes/{name}", check=True)
    assert ceph.cli("rbd", "ls", ceph.pool).stdout.split() == []

    # stop ends the exports; start brings them back
    sh(f"truncate -s 8M {p}/volumes/last", check=True)
    sh(f"echo stop > {p}/ctl", check=True)
    assert os.listdir(p / "volumes") == []
    assert not sh(f"findmnt -rn -o TARGET | grep -F {runtime_dir(vsfs.state)}").stdout
    # its configuration, socket and export points went with it
    assert not list(runtime_dir(vsfs.state).glob("*"))
    sh(f"echo start > {p}/ctl", check=True)
    assert os.listdir(p / "volumes") == ["last"]
    assert os.stat(p / "volumes" / "last").st_size == 8 * MiB


def test_rbd_two_hosts(mount_factory: MountFactory, ceph: CephCluster,
                       rbd_pool: Callable[[Mount, str], Path], tmp_path: Path) -> None:
    """Two mounts with their own state directories, as two hosts, on one cluster."""
    a = mount_factory(name="host-a", state=tmp_path / "state-a")
    b = mount_factory(name="host-b", state=tmp_path / "state-b")
    pa, pb = rbd_pool(a, "shared"), rbd_pool(b, "shared")
    sh(f"truncate -s 16M {pa}/volumes/vm1", check=True)
    sh(f"echo refresh > {pb}/ctl", check=True)
    assert os.listdir(pb / "volumes") == ["vm1"]
    # a volume one host uses is locked against the other: a clear EBUSY, and no delete
    data = os.urandom(MiB)
    (a.base / "d").write_bytes(data)
    sh(f"dd if={a.base}/d of={pa}/volumes/vm1 bs=1M conv=notrunc,fsync status=none",
       check=True)
    res = sh(f"dd if=/dev/zero of={pb}/volumes/vm1 bs=4k count=1 conv=notrunc status=none")
    assert res.returncode != 0 and "Device or resource busy" in res.stderr
    assert "in use by vsfs on" in b.error()
    res = sh(f"rm {pb}/volumes/vm1")
    assert "Device or resource busy" in res.stderr
    assert len(lockers(ceph, "vm1")) == 1
    # once host A lets go (here: its pool stops), host B reads what A wrote
    sh(f"echo stop > {pa}/ctl", check=True)
    assert lockers(ceph, "vm1") == []
    assert (pb / "volumes" / "vm1").read_bytes()[:MiB] == data
    sh(f"echo stop > {pb}/ctl && echo start > {pb}/ctl && echo start > {pa}/ctl", check=True)
    # without a refresh, within the poll period (5 s) and a margin
    sh(f"truncate -s 8M {pa}/volumes/vm2", check=True)
    sh(f"echo 32M > {pa}/volinfo/vm1/capacity", check=True)
    deadline = time.monotonic() + 10
    while sorted(os.listdir(pb / "volumes")) != ["vm1", "vm2"] or \
            (pb / "volinfo" / "vm1" / "capacity").read_text() != f"{32 * MiB}\n":
        assert time.monotonic() < deadline, "the other host did not see the changes"
        time.sleep(0.25)
    sh(f"rm {pa}/volumes/vm2", check=True)
    deadline = time.monotonic() + 10
    while "vm2" in os.listdir(pb / "volumes"):
        assert time.monotonic() < deadline, "the other host did not see the delete"
        time.sleep(0.25)
    sh(f"echo refresh > {pb}/ctl", check=True)
    assert os.listdir(pb / "volumes") == ["vm1"]


def test_rbd_refusals(vsfs: Mount, ceph: CephCluster) -> None:
    p = vsfs.define(f"<pool type='rbd'><name>nopool</name><source>"
                    f"<name>no-such-pool</name><host name='127.0.0.1' port='{ceph.port}'/>"
                    "</source></pool>")
    res = sh(f"echo start > {p}/ctl")
    assert "No such file" in res.stderr and "no-such-pool" in vsfs.error()
    assert (p / "state").read_text() == "inactive\n"
    assert not list(runtime_dir(vsfs.state).glob("*")), "a failed start leaves no files"
    bad = vsfs.base / "bad.xml"
    bad.write_text("<pool type='rbd'><name>bad</name><source><name>x</name>"
                   "<auth type='chap' username='u'><secret usage='s'/></auth></source></pool>")
    res = sh(f"cat {bad} > {vsfs.path}/pools/define")
    assert "Invalid argument" in res.stderr and "ceph" in vsfs.error()


def test_rbd_local_paths_on_demand(mount_factory: MountFactory, ceph: CephCluster,
                                   rbd_pool: Callable[[Mount, str], Path],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A local path appears when asked for, and goes (releasing the image and its lock)
    once nothing has it open for VSFS_EXPORT_IDLE seconds; asking again brings it back."""
    monkeypatch.setenv("VSFS_EXPORT_IDLE", "2")
    m = mount_factory()
    p = rbd_pool(m, "r")
    ceph.cli("rbd", "import", "--no-progress", "-", f"{ceph.pool}/disk", stdin=b"x" * MiB)
    sh(f"echo refresh > {p}/ctl", check=True)

    def exported() -> bool:
        return str(runtime_dir(m.state)) in sh("findmnt -rn -o TARGET").stdout

    assert not exported() and lockers(ceph, "disk") == []
    assert (p / "volumes" / "disk").read_bytes() == b"x" * MiB
    assert exported() and len(lockers(ceph, "disk")) == 1
    # held open: it stays
    with open(p / "volumes" / "disk", "rb") as f:
        time.sleep(4)
        assert exported()
        assert f.read(4) == b"xxxx"
    # withdrawn, then its lock released (a moment later)
    deadline = time.monotonic() + 15
    while exported() or lockers(ceph, "disk"):
        assert time.monotonic() < deadline, "an idle local path was not withdrawn"
        time.sleep(0.25)
    # another host could delete it now; here it is simply used again
    assert (p / "volumes" / "disk").read_bytes() == b"x" * MiB
    assert exported()


def test_rbd_volume_in_use(vsfs: Mount, ceph: CephCluster,
                           rbd_pool: Callable[[Mount, str], Path]) -> None:
    """A volume whose local path (its export) a process holds open is in use: rm, shrinking,
    wipe, mv and the pool's stop are EBUSY and change nothing; once closed, they work."""
    p = rbd_pool(vsfs, "r")
    sh(f"truncate -s 32M {p}/volumes/v", check=True)
    data = os.urandom(MiB)
    (vsfs.base / "d").write_bytes(data)
    sh(f"dd if={vsfs.base}/d of={p}/volumes/v bs=1M conv=notrunc,fsync status=none",
       check=True)

    def refused(cmd: str, pid: int, name: str = "v") -> None:
        res = sh(cmd)
        assert res.returncode != 0 and "Device or resource busy" in res.stderr, cmd
        assert f"process {pid} (sleep)" in vsfs.error() and f"'{name}'" in vsfs.error(), cmd

    with holding(p / "volumes" / "v") as pid:
        refused(f"rm {p}/volumes/v", pid)
        refused(f"echo 'shrink 16M' > {p}/volinfo/v/ctl", pid)
        refused(f"echo 16M > {p}/volinfo/v/capacity", pid)
        refused(f"echo wipe > {p}/volinfo/v/ctl", pid)
        refused(f"mv {p}/volumes/v {p}/volumes/w", pid)
        refused(f"echo stop > {p}/ctl", pid)
        assert "cannot be stopped" in vsfs.error()
        # nothing changed, and the holder still reads and writes through its descriptor
        assert ceph.cli("rbd", "ls", ceph.pool).stdout.split() == [b"v"]
        assert rbd_size(ceph, "v") == 32 * MiB
        assert rbd_export(ceph, "v")[:MiB] == data
        assert (p / "state").read_text() == "running\n"
        assert still_works(pid)[:16] == data[:16]
        # growing takes nothing away: allowed
        sh(f"echo 48M > {p}/volinfo/v/capacity", check=True)
    sh(f"echo 'shrink 16M' > {p}/volinfo/v/ctl", check=True)
    assert rbd_size(ceph, "v") == 16 * MiB
    sh(f"echo wipe > {p}/volinfo/v/ctl", check=True)
    assert rbd_export(ceph, "v")[:MiB] == bytes(MiB)
    sh(f"mv {p}/volumes/v {p}/volumes/w", check=True)
    # held read-only, as a shell's `exec 4<path` does: in use just the same
    with holding(p / "volumes" / "w", "<") as pid:
        refused(f"rm {p}/volumes/w", pid, "w")
        refused(f"echo stop > {p}/ctl", pid, "w")
        assert ceph.cli("rbd", "ls", ceph.pool).stdout.split() == [b"w"]
    sh(f"rm {p}/volumes/w", check=True)
    assert ceph.cli("rbd", "ls", ceph.pool).stdout.split() == []
    sh(f"truncate -s 8M {p}/volumes/last", check=True)
    with open(p / "volumes" / "last", "rb"):
        res = sh(f"echo stop > {p}/ctl")
        assert "Device or resource busy" in res.stderr
        assert f"process {os.getpid()}" in vsfs.error()
        assert (p / "state").read_text() == "running\n"
    sh(f"echo stop > {p}/ctl", check=True)
    assert (p / "state").read_text() == "inactive\n"


def qemu_img_size(path: Path) -> int:
    info = json.loads(sh(f"qemu-img info --output=json {path}", check=True).stdout)
    return int(info["virtual-size"])


def test_rbd_resize_seen_at_once(vsfs: Mount, ceph: CephCluster,
                                 rbd_pool: Callable[[Mount, str], Path]) -> None:
    """When a write to capacity (or a shrink) returns, the volume's path has the new size:
    no sleep, no retry (the kernel must not serve the size it cached)."""
    p = rbd_pool(vsfs, "r")
    sh(f"truncate -s 32M {p}/volumes/g", check=True)
    path = p / "volumes" / "g"
    assert qemu_img_size(path) == 32 * MiB  # the export's size, now cached by the kernel
    sh(f"echo 96M > {p}/volinfo/g/capacity", check=True)
    assert qemu_img_size(path) == 96 * MiB
    assert os.stat(path).st_size == 96 * MiB
    assert rbd_size(ceph, "g") == 96 * MiB
    sh(f"echo 'shrink 40M' > {p}/volinfo/g/ctl", check=True)
    assert qemu_img_size(path) == 40 * MiB
    assert rbd_size(ceph, "g") == 40 * MiB
    assert (p / "volinfo" / "g" / "capacity").read_text() == f"{40 * MiB}\n"
    sh(f"rm {p}/volumes/g", check=True)
