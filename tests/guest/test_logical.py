"""logical (LVM) pools, in the QEMU guest where device-mapper works, through the mount."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from holders import holding, still_works
from rng import assert_valid
from support import Mount, sh

pytestmark = [pytest.mark.guest, pytest.mark.fuse, pytest.mark.root]

MiB = 1 << 20


def define_vg(m: Mount, name: str, devices: list[str], vg: str = "vsfsvg") -> Path:
    devs = "".join(f"<device path='{d}'/>" for d in devices)
    return m.define(f"<pool type='logical'><name>{name}</name><source>{devs}"
                    f"<name>{vg}</name><format type='lvm2'/></source>"
                    f"<target><path>/dev/{vg}</path></target></pool>")


def test_logical_pool_lifecycle(vsfs: Mount, disks: list[str]) -> None:
    v = define_vg(vsfs, "vg", disks[:2])
    sh(f"echo build > {v}/ctl", check=True)
    assert sh("vgs --noheadings -o pv_count vsfsvg", check=True).stdout.strip() == "2"
    sh(f"echo start > {v}/ctl", check=True)
    assert (v / "state").read_text() == "running\n"
    free = int((v / "free").read_text())
    assert 900 * MiB < free <= 1024 * MiB
    assert_valid((v / "xml").read_bytes(), "storagepool")

    sh(f"truncate -s 64M {v}/volumes/web", check=True)
    assert os.readlink(v / "volumes/web") == "/dev/vsfsvg/web"
    assert stat.S_ISBLK(os.stat("/dev/vsfsvg/web").st_mode)
    assert (v / "volinfo/web/format").read_text() == "lvm2\n"
    assert (v / "volinfo/web/capacity").read_text() == f"{64 * MiB}\n"
    assert_valid((v / "volinfo/web/xml").read_bytes(), "storagevol")
    key = (v / "volinfo/web/key").read_text().strip()
    assert key == sh("lvs --noheadings -o lv_uuid vsfsvg/web", check=True).stdout.strip()

    # data through the path survives rename, grow, clone and snapshot
    sh(f"head -c 1M /dev/urandom > {vsfs.base}/blob", check=True)
    sh(f"dd if={vsfs.base}/blob of={v}/volumes/web bs=1M conv=fsync status=none", check=True)
    sh(f"mv {v}/volumes/web {v}/volumes/www", check=True)
    assert sh("lvs --noheadings -o lv_name vsfsvg", check=True).stdout.split() == ["www"]
    sh(f"echo 128M > {v}/volinfo/www/capacity", check=True)
    assert int(sh("blockdev --getsize64 /dev/vsfsvg/www", check=True).stdout) == 128 * MiB
    res = sh(f"echo 32M > {v}/volinfo/www/capacity")
    assert "Operation not supported" in res.stderr and "shrink SIZE" in vsfs.error()
    sh(f"echo 'clone copy' > {v}/volinfo/www/ctl", check=True)
    sh(f"cmp -n {MiB} {vsfs.base}/blob /dev/vsfsvg/copy", check=True)
    sh(f"echo 'snapshot snap' > {v}/volinfo/www/ctl", check=True)
    assert sh("lvs --noheadings -o origin vsfsvg/snap", check=True).stdout.strip() == "www"
    sh(f"cmp -n {MiB} {vsfs.base}/blob /dev/vsfsvg/snap", check=True)
    sh(f"echo 'shrink 64M' > {v}/volinfo/copy/ctl", check=True)
    assert int(sh("blockdev --getsize64 /dev/vsfsvg/copy", check=True).stdout) == 64 * MiB
    sh(f"echo wipe > {v}/volinfo/copy/ctl", check=True)
    assert sh(f"head -c {MiB} /dev/vsfsvg/copy | tr -d '\\0' | wc -c",
              check=True).stdout.strip() == "0"

    # a sparse volume (allocation below capacity), from XML
    (vsfs.base / "sparse.xml").write_text(
        "<volume><name>thin</name><capacity unit='G'>4</capacity>"
        "<allocation unit='M'>8</allocation></volume>")
    sh(f"cat {vsfs.base}/sparse.xml > {v}/define", check=True)
    assert (v / "volinfo/thin/capacity").read_text() == f"{4 << 30}\n"

    # not enough room: refused, nothing left behind
    res = sh(f"truncate -s 5G {v}/volumes/huge")
    assert "No space left on device" in res.stderr
    assert "huge" not in sh("lvs --noheadings -o lv_name vsfsvg", check=True).stdout

    for name in ("snap", "thin", "copy", "www"):
        sh(f"rm {v}/volumes/{name}", check=True)
    assert sh("lvs --noheadings -o lv_name vsfsvg", check=True).stdout.split() == []
    sh(f"echo stop > {v}/ctl", check=True)
    sh(f"echo delete > {v}/ctl", check=True)
    assert sh("vgs vsfsvg").returncode != 0
    assert "LVM2_member" not in sh(f"wipefs -n {disks[0]}", check=True).stdout


def test_logical_refusals(vsfs: Mount, disks: list[str]) -> None:
    v = define_vg(vsfs, "ghost", [disks[0]], vg="nosuchvg")
    res = sh(f"echo start > {v}/ctl")
    assert "No such file or directory" in res.stderr
    assert "nosuchvg" in vsfs.error()
    # a PV of another group is data: refused
    sh(f"pvcreate -q -y {disks[1]} && vgcreate -q othervg {disks[1]}", check=True)
    w = define_vg(vsfs, "w", [disks[1]], vg="wvg")
    res = sh(f"echo build > {w}/ctl")
    assert "Device or resource busy" in res.stderr
    assert "LVM2_member" in vsfs.error()
    assert sh("vgs --noheadings -o vg_name", check=True).stdout.split() == ["othervg"]


def test_sources_logical(vsfs: Mount, disks: list[str]) -> None:
    sh(f"pvcreate -q -y {disks[0]} {disks[1]} && vgcreate -q srcvg {disks[0]} {disks[1]}",
       check=True)
    xml = (vsfs.path / "sources" / "logical").read_text()
    assert "<name>srcvg</name>" in xml
    for dev in disks[:2]:
        assert f"<device path=\"{dev}\"/>" in xml


def test_logical_volume_opened_is_in_use(vsfs: Mount, disks: list[str]) -> None:
    """An LV a process holds open, not mounted, is in use: rm, shrink, wipe and stop are
    EBUSY and change nothing; once closed, they work."""
    v = define_vg(vsfs, "vg", disks[:1])
    sh(f"echo build > {v}/ctl && echo start > {v}/ctl", check=True)
    sh(f"truncate -s 32M {v}/volumes/lv", check=True)
    sh(f"head -c 1M /dev/urandom > {vsfs.base}/blob", check=True)
    sh(f"dd if={vsfs.base}/blob of={v}/volumes/lv bs=1M conv=fsync status=none", check=True)
    data = (vsfs.base / "blob").read_bytes()
    with holding(v / "volumes" / "lv") as pid:
        for cmd in (f"rm {v}/volumes/lv", f"echo 'shrink 16M' > {v}/volinfo/lv/ctl",
                    f"echo wipe > {v}/volinfo/lv/ctl", f"echo stop > {v}/ctl"):
            res = sh(cmd)
            assert res.returncode != 0 and "Device or resource busy" in res.stderr, cmd
            assert f"process {pid} (sleep)" in vsfs.error() and "'lv'" in vsfs.error(), cmd
        assert sh("lvs --noheadings -o lv_name,lv_attr vsfsvg", check=True).stdout.split()[0] \
            == "lv"
        assert int(sh("blockdev --getsize64 /dev/vsfsvg/lv", check=True).stdout) == 32 * MiB
        assert (v / "state").read_text() == "running\n"
        assert still_works(pid)[:16] == data[:16]
        sh(f"cmp -n {MiB} {vsfs.base}/blob /dev/vsfsvg/lv", check=True)
    sh(f"echo 'shrink 16M' > {v}/volinfo/lv/ctl", check=True)
    assert int(sh("blockdev --getsize64 /dev/vsfsvg/lv", check=True).stdout) == 16 * MiB
    sh(f"echo wipe > {v}/volinfo/lv/ctl", check=True)
    sh(f"rm {v}/volumes/lv", check=True)
    assert sh("lvs --noheadings -o lv_name vsfsvg", check=True).stdout.split() == []
    sh(f"echo stop > {v}/ctl && echo delete > {v}/ctl", check=True)
