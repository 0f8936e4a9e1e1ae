"""New volumes written through descriptors that tools duplicate: touch, dd, shell redirections.

These tools open the file, duplicate the descriptor and close the first copy at once, so
the volume is listed at that first close while a descriptor is still open and in use.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import Mount, sh

pytestmark = pytest.mark.fuse


def test_touch_creates_a_volume(vsfs: Mount) -> None:
    target = vsfs.dir_pool()
    vols = vsfs.path / "pools" / "p" / "volumes"
    res = sh(f"touch {vols}/t")
    assert res.returncode == 0, res.stderr
    assert os.readlink(vols / "t") == str(target / "t")
    assert os.stat(target / "t").st_size == 0
    res = sh(f"touch -d '2020-01-02 03:04:05 UTC' {vols}/dated")
    assert res.returncode == 0, res.stderr
    assert os.stat(target / "dated").st_mtime == 1577934245
    vsfs.assert_clean_log()


def test_dd_seek_makes_a_sparse_volume(vsfs: Mount) -> None:
    target = vsfs.dir_pool()
    p = vsfs.path / "pools" / "p"
    res = sh(f"dd if=/dev/null of={p}/volumes/sparse bs=1M seek=100")
    assert res.returncode == 0 and "failed" not in res.stderr, res.stderr
    assert os.stat(target / "sparse").st_size == 100 << 20
    assert os.stat(target / "sparse").st_blocks == 0
    assert (p / "volinfo" / "sparse" / "capacity").read_text() == f"{100 << 20}\n"
    vsfs.assert_clean_log()


def test_redirection_is_settled_at_its_last_close(vsfs: Mount, tmp_path: Path) -> None:
    target = vsfs.dir_pool()
    p = vsfs.path / "pools" / "p"
    # The shell opens, moves the descriptor to 7 and closes the first copy: the volume
    # is listed then, empty; the bytes come afterwards.
    res = sh(f"set -e; exec 7>{p}/volumes/r; printf abc >&7; "
             "stat -L -c %s /dev/fd/7 >&2; exec 7>&-")
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == "3"
    assert (target / "r").read_bytes() == b"abc"
    assert (p / "volinfo" / "r" / "capacity").read_text() == "3\n"
    # An image copied in through a redirection is probed when it is complete.
    img = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "16M"], check=True)
    res = sh(f"cat {img} > {p}/volumes/q")
    assert res.returncode == 0, res.stderr
    assert (p / "volinfo" / "q" / "format").read_text() == "qcow2\n"
    assert (p / "volinfo" / "q" / "capacity").read_text() == f"{16 << 20}\n"
    vsfs.assert_clean_log()


def test_volume_deleted_while_still_open(vsfs: Mount) -> None:
    target = vsfs.dir_pool()
    vols = vsfs.path / "pools" / "p" / "volumes"
    # Deleted and made again under the same name while the first descriptor is open:
    # the old descriptor's last close must not touch the new volume.
    res = sh(f"set -e; exec 7>{vols}/d; rm {vols}/d; truncate -s 2M {vols}/d; "
             f"truncate -s 5M /dev/fd/7; printf x >&7; exec 7>&-")
    assert res.returncode == 0, res.stderr
    assert os.stat(target / "d").st_size == 2 << 20
    assert (vsfs.path / "pools" / "p" / "volinfo" / "d" / "capacity").read_text() \
        == f"{2 << 20}\n"
    vsfs.assert_clean_log()


@pytest.mark.root
def test_failed_write_through_redirection_removes_the_volume(vsfs: Mount,
                                                             tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "vsfs-test", str(small)],
                   check=True)
    try:
        xml = vsfs.pool_xml("s", small)
        vsfs.define_pool("s", xml)
        p = vsfs.path / "pools" / "s"
        sh(f"echo start > {p}/ctl", check=True)
        res = sh(f"head -c 8M /dev/zero > {p}/volumes/big")
        assert res.returncode != 0
        assert "No space left" in res.stderr, res.stderr
        assert os.listdir(small) == []
        assert os.listdir(p / "volumes") == []
        assert "big" in vsfs.error()
        sh(f"echo stop > {p}/ctl", check=True)
    finally:
        if subprocess.run(["umount", str(small)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(small)], check=False)
    vsfs.assert_clean_log()
