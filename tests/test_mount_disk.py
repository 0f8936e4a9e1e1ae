"""disk pools on real loop devices, and pools nested three deep, through the mount."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest
from holders import holding, still_works
from rng import assert_valid
from support import Mount, MountFactory, loops_of, sh

pytestmark = [pytest.mark.fuse, pytest.mark.root]

MiB = 1 << 20


def disk_xml(name: str, dev: str, fmt: str = "gpt") -> str:
    return (f"<pool type='disk'><name>{name}</name><source><device path='{dev}'/>"
            f"<format type='{fmt}'/></source><target><path>/dev</path></target></pool>")


def test_disk_pool_partitions(vsfs: Mount, loopdev: str) -> None:
    d = vsfs.path / "pools" / "d"
    vsfs.define(disk_xml("d", loopdev))
    sh(f"echo build > {d}/ctl", check=True)
    assert "gpt" in sh(f"blkid -p -o value -s PTTYPE {loopdev}", check=True).stdout
    res = sh(f"echo build > {d}/ctl")
    assert "Device or resource busy" in res.stderr
    assert "already holds" in vsfs.error()
    sh(f"echo start > {d}/ctl", check=True)
    free = int((d / "free").read_text())
    assert 300 * MiB < free < 320 * MiB
    xml = (d / "xml").read_text()
    assert_valid(xml, "storagepool")
    assert "<freeExtent" in xml

    sh(f"truncate -s 10M {d}/volumes/web", check=True)
    node = os.readlink(d / "volumes" / "web")
    assert node == f"{loopdev}p1"
    assert stat.S_ISBLK(os.stat(node).st_mode), "the node exists when truncate returns"
    assert int(sh(f"blockdev --getsize64 {node}", check=True).stdout) == 10 * MiB
    assert (d / "volinfo/web/capacity").read_text() == f"{10 * MiB}\n"
    assert (d / "volinfo/web/format").read_text() == "partition\n"
    assert_valid((d / "volinfo/web/xml").read_bytes(), "storagevol")

    vsfs.define("<volume><name>db</name><capacity unit='M'>20</capacity></volume>", "d")
    assert sorted(os.listdir(d / "volumes")) == ["db", "web"]
    db = os.readlink(d / "volumes" / "db")
    # data written through the path reads back
    sh(f"head -c 1M /dev/urandom > {vsfs.base}/blob && dd if={vsfs.base}/blob of={db} "
       "bs=1M conv=fsync status=none", check=True)
    sh(f"cmp -n {MiB} {vsfs.base}/blob {db}", check=True)

    # the last partition grows into free space; the first has none after it
    sh(f"echo 30M > {d}/volinfo/db/capacity", check=True)
    assert int(sh(f"blockdev --getsize64 {db}", check=True).stdout) == 30 * MiB
    sh(f"cmp -n {MiB} {vsfs.base}/blob {db}", check=True)
    assert "No space left" in sh(f"echo 20M > {d}/volinfo/web/capacity").stderr
    assert "Operation not supported" in sh(f"echo 5M > {d}/volinfo/db/capacity").stderr
    assert "No space left" in sh(f"truncate -s 400M {d}/volumes/huge").stderr
    assert sorted(os.listdir(d / "volumes")) == ["db", "web"]
    assert not os.path.exists(f"{loopdev}p3")
    assert "Operation not supported" in sh(f"mkdir {d}/volumes/dir").stderr

    sh(f"rm {d}/volumes/web", check=True)
    assert not os.path.exists(node)
    assert os.listdir(d / "volumes") == ["db"]
    sh(f"echo stop > {d}/ctl && echo start > {d}/ctl", check=True)
    assert os.listdir(d / "volumes") == ["db"]

    # copies in and out of partitions, and wiping one
    images = vsfs.dir_pool()
    sh(f"echo 'clone db.img p' > {d}/volinfo/db/ctl", check=True)
    sh(f"cmp -n {30 * MiB} {db} {images}/db.img", check=True)
    sh(f"echo 'clone back d' > {vsfs.path}/pools/p/volinfo/db.img/ctl", check=True)
    back = os.readlink(d / "volumes" / "back")
    sh(f"cmp -n {MiB} {vsfs.base}/blob {back}", check=True)
    sh(f"echo wipe > {d}/volinfo/back/ctl", check=True)
    assert sh(f"head -c {MiB} {back} | tr -d '\\0' | wc -c", check=True).stdout.strip() == "0"

    assert "Device or resource busy" in sh(f"echo delete > {d}/ctl").stderr
    sh(f"echo stop > {d}/ctl && echo delete > {d}/ctl", check=True)
    assert sh(f"blkid -p -o value -s PTTYPE {loopdev}").stdout.strip() == ""


def test_dos_partitions_are_named_after_their_node(vsfs: Mount, loopdev: str) -> None:
    d = vsfs.path / "pools" / "m"
    vsfs.define(disk_xml("m", loopdev, "dos"))
    sh(f"echo build > {d}/ctl && echo start > {d}/ctl", check=True)
    kname = os.path.basename(loopdev)
    res = sh(f"truncate -s 8M {d}/volumes/web")
    assert "Invalid argument" in res.stderr
    assert f"{kname}p1" in vsfs.error()
    assert os.listdir(d / "volumes") == []
    sh(f"truncate -s 8M {d}/volumes/{kname}p1", check=True)
    assert os.listdir(d / "volumes") == [f"{kname}p1"]


def test_refusals_on_devices_in_use(vsfs: Mount, loopdev: str) -> None:
    d = vsfs.path / "pools" / "d"
    vsfs.define(disk_xml("d", loopdev))
    sh(f"echo build > {d}/ctl && echo start > {d}/ctl", check=True)
    sh(f"truncate -s 64M {d}/volumes/data", check=True)
    part = os.readlink(d / "volumes" / "data")
    sh(f"mkfs.ext4 -q {part}", check=True)
    where = vsfs.base / "inuse"
    where.mkdir()
    sh(f"mount {part} {where}", check=True)
    try:
        assert "Device or resource busy" in sh(f"rm {d}/volumes/data").stderr
        assert "mounted on" in vsfs.error()
        assert "Device or resource busy" in sh(f"echo stop > {d}/ctl").stderr
    finally:
        sh(f"umount {where}", check=True)
    sh(f"echo stop > {d}/ctl", check=True)
    sh(f"mount {part} {where}", check=True)
    try:
        res = sh(f"echo 'build --overwrite' > {d}/ctl")
        assert "Device or resource busy" in res.stderr
        assert f"mounted on {where}" in vsfs.error()
    finally:
        sh(f"umount {where}", check=True)
    # an LVM physical volume is data too: refused without --overwrite
    sh(f"wipefs -a -q {loopdev}", check=True)
    # (pvcreate writes a label; without device-mapper nothing more is needed)
    sh(f"pvcreate -q -ff -y {loopdev}", check=True)
    try:
        assert "Device or resource busy" in sh(f"echo build > {d}/ctl").stderr
        assert "LVM2_member" in vsfs.error()
    finally:
        sh(f"wipefs -a -q {loopdev}", check=True)


def test_three_levels_of_pools(vsfs: Mount) -> None:
    images = vsfs.dir_pool()
    p = vsfs.path / "pools" / "p"
    sh(f"truncate -s 200M {p}/volumes/disk.img", check=True)
    d = vsfs.define(disk_xml("d", str(images / "disk.img")))
    sh(f"echo build > {d}/ctl && echo start > {d}/ctl", check=True)
    loops = loops_of(images / "disk.img")
    assert len(loops) == 1
    try:
        sh(f"truncate -s 100M {d}/volumes/root", check=True)
        part = os.readlink(d / "volumes" / "root")
        assert part == f"{loops[0]}p1"
        fsxml = (f"<pool type='fs'><name>f</name><source><device path='{part}'/>"
                 f"<format type='ext4'/></source><target><path>{vsfs.base}/fsmnt</path>"
                 "</target></pool>")
        f = vsfs.define(fsxml)
        sh(f"echo build > {f}/ctl && echo start > {f}/ctl", check=True)
        sh(f"truncate -s 5M {f}/volumes/leaf.img", check=True)
        assert os.readlink(f / "volumes/leaf.img") == f"{vsfs.base}/fsmnt/leaf.img"
        # each level keeps the one below it busy
        assert "Device or resource busy" in sh(f"echo stop > {d}/ctl").stderr
        assert "source of running pool 'f'" in vsfs.error()
        assert "Device or resource busy" in sh(f"rm {d}/volumes/root").stderr
        assert "Device or resource busy" in sh(f"echo stop > {p}/ctl").stderr
        assert "source of running pool 'd'" in vsfs.error()
        sh(f"echo stop > {f}/ctl", check=True)
        sh(f"echo stop > {d}/ctl", check=True)
        assert loops_of(images / "disk.img") == []
        sh(f"echo stop > {p}/ctl", check=True)
    finally:
        for loop in loops_of(images / "disk.img"):
            subprocess.run(["umount", "-l", f"{vsfs.base}/fsmnt"], check=False)
            subprocess.run(["partx", "-d", loop], check=False)
            subprocess.run(["losetup", "-d", loop], check=False)


def test_disk_pool_on_a_file_is_adopted_after_a_crash(mount_factory: MountFactory) -> None:
    m = mount_factory()
    images = m.dir_pool()
    p = m.path / "pools" / "p"
    sh(f"echo yes > {p}/autostart && truncate -s 64M {p}/volumes/d.img", check=True)
    d = m.define(disk_xml("d", str(images / "d.img")))
    sh(f"echo build > {d}/ctl && echo start > {d}/ctl && truncate -s 8M {d}/volumes/one",
       check=True)
    loops = loops_of(images / "d.img")
    m.kill9()
    try:
        m.start()
        assert (m.path / "pools/d/state").read_text() == "running\n"
        assert os.listdir(m.path / "pools/d/volumes") == ["one"]
        assert loops_of(images / "d.img") == loops, "the same loop, not a second one"
        sh(f"echo stop > {m.path}/pools/d/ctl", check=True)
        assert loops_of(images / "d.img") == []
    finally:
        for loop in loops_of(images / "d.img"):
            subprocess.run(["partx", "-d", loop], check=False)
            subprocess.run(["losetup", "-d", loop], check=False)


def test_sources_logical_on_the_host(vsfs: Mount, loopdev: str) -> None:
    """pvcreate and vgcreate need no device-mapper, so discovery is testable here."""
    vg = f"vsfs{os.getpid()}"
    sh(f"pvcreate -q -y {loopdev} && vgcreate -q {vg} {loopdev}", check=True)
    try:
        xml = (vsfs.path / "sources" / "logical").read_text()
        assert f"<name>{vg}</name>" in xml
        assert f'<device path="{loopdev}"/>' in xml
        assert '<format type="lvm2"/>' in xml
    finally:
        sh(f"vgremove -q -f {vg} && pvremove -q -y {loopdev}", check=True)
    assert f"<name>{vg}</name>" not in (vsfs.path / "sources" / "logical").read_text()


def test_partitions_opened_are_in_use(vsfs: Mount, loopdev: str) -> None:
    """A partition a process holds open (not mounted) is in use: rm, shrinking, wipe, the
    pool's stop and, once stopped, its delete are EBUSY and change nothing."""
    d = vsfs.path / "pools" / "d"
    vsfs.define(disk_xml("d", loopdev))
    sh(f"echo build > {d}/ctl && echo start > {d}/ctl", check=True)
    sh(f"truncate -s 16M {d}/volumes/a && truncate -s 16M {d}/volumes/b", check=True)
    part = os.readlink(d / "volumes" / "a")
    data = os.urandom(MiB)
    with open(part, "r+b") as f:
        f.write(data)

    def refused(cmd: str, pid: int) -> None:
        res = sh(cmd)
        assert res.returncode != 0 and "Device or resource busy" in res.stderr, cmd
        assert f"process {pid} (sleep)" in vsfs.error(), cmd

    with holding(d / "volumes" / "a") as pid:
        for cmd in (f"rm {d}/volumes/a", f"echo 8M > {d}/volinfo/a/capacity",
                    f"echo wipe > {d}/volinfo/a/ctl", f"echo stop > {d}/ctl"):
            refused(cmd, pid)
        assert "'a'" in vsfs.error()
        assert sorted(os.listdir(d / "volumes")) == ["a", "b"]
        assert stat.S_ISBLK(os.stat(part).st_mode)
        assert int(sh(f"blockdev --getsize64 {part}", check=True).stdout) == 16 * MiB
        assert (d / "state").read_text() == "running\n"
        assert still_works(pid)[:16] == data[:16]
    sh(f"echo wipe > {d}/volinfo/a/ctl", check=True)
    with open(part, "rb") as wiped:
        assert wiped.read(MiB) == bytes(MiB)
    sh(f"rm {d}/volumes/a", check=True)
    assert not os.path.exists(part)
    sh(f"echo stop > {d}/ctl", check=True)
    # stopped, its partitions are still the kernel's: one held open keeps the table
    with holding(f"{loopdev}p2", "<") as pid:
        refused(f"echo delete > {d}/ctl", pid)
        assert "gpt" in sh(f"blkid -p -o value -s PTTYPE {loopdev}", check=True).stdout
    sh(f"echo delete > {d}/ctl", check=True)
    assert sh(f"blkid -p -o value -s PTTYPE {loopdev}").stdout.strip() == ""


def test_partitions_made_at_once_by_jobs_and_writers(vsfs: Mount, loopdev: str) -> None:
    """Jobs make their partitions outside the pool's lock (a volume from XML, a clone into
    the pool): made at the same moment as others, each gets its own extent and nothing
    another made is taken away."""
    d = vsfs.path / "pools" / "d"
    vsfs.define(disk_xml("d", loopdev))
    sh(f"echo build > {d}/ctl && echo start > {d}/ctl", check=True)
    sh(f"truncate -s 8M {d}/volumes/src", check=True)
    for i in range(4):
        (vsfs.base / f"x{i}.xml").write_text(
            f"<volume><name>x{i}</name><capacity unit='M'>8</capacity></volume>")
    cmds = [f"cat {vsfs.base}/x{i}.xml > {d}/define" for i in range(4)]
    cmds += [f"truncate -s 8M {d}/volumes/t{i}" for i in range(4)]
    cmds += [f"echo 'clone c{i}' > {d}/volinfo/src/ctl" for i in range(4)]
    procs = [subprocess.Popen(["sh", "-c", c], stderr=subprocess.PIPE, text=True)
             for c in cmds]
    for cmd, p in zip(cmds, procs, strict=True):
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, f"{cmd}: {err} ({vsfs.error()})"
    names = {*(f"x{i}" for i in range(4)), *(f"t{i}" for i in range(4)),
             *(f"c{i}" for i in range(4)), "src"}
    assert set(os.listdir(d / "volumes")) == names
    nodes = {os.readlink(d / "volumes" / n) for n in names}
    assert len(nodes) == len(names), "two volumes share a partition"
    table = sh(f"parted -s -m {loopdev} unit B print", check=True).stdout
    assert len([line for line in table.splitlines() if line[:1].isdigit()]) == len(names)
