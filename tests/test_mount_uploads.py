"""New volumes written through descriptors that tools duplicate: touch, dd, shell redirections.

These tools open the file, duplicate the descriptor and close the first copy at once, so
the volume is listed at that first close while a descriptor is still open and in use.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import Mount, sh

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


def test_volume_still_open_is_in_use(vsfs: Mount) -> None:
    target = vsfs.dir_pool()
    p = vsfs.path / "pools" / "p"
    # Listed at the first close, but still being written through the open copy.
    res = sh(f"exec 7>{p}/volumes/d; rm {p}/volumes/d; echo wipe > {p}/volinfo/d/ctl; "
             f"mv {p}/volumes/d {p}/volumes/e; echo stop > {p}/ctl; printf x >&7; exec 7>&-")
    assert res.stderr.count("Device or resource busy") == 4, res.stderr
    assert (target / "d").read_bytes() == b"x"
    sh(f"rm {p}/volumes/d", check=True)
    vsfs.assert_clean_log()


@pytest.mark.root
def test_volume_replaced_behind_an_open_descriptor(vsfs: Mount, tmp_path: Path) -> None:
    with small_pool(vsfs, tmp_path) as (target, p):
        # Removed and made again by another tool while vsfs still holds the first file
        # open: a failed write through the old descriptor must not remove the new one.
        res = sh(f"exec 7>{p}/volumes/d; rm {target}/d; echo precious > {target}/d; "
                 f"echo refresh > {p}/ctl; head -c 8M /dev/zero >&7; exec 7>&-")
        assert "No space left" in res.stderr, res.stderr
        assert (target / "d").read_bytes() == b"precious\n"
        assert (p / "volinfo" / "d" / "capacity").read_text() == "9\n"
        sh(f"echo stop > {p}/ctl", check=True)
    vsfs.assert_clean_log()


def test_refused_size_then_a_good_one_keeps_the_volume(vsfs: Mount) -> None:
    target = vsfs.dir_pool()
    p = vsfs.path / "pools" / "p"
    free = int((p / "free").read_text())
    script = (f"import os\n"
              f"fd = os.open('{p}/volumes/v', os.O_CREAT | os.O_RDWR | os.O_EXCL)\n"
              f"try:\n    os.ftruncate(fd, {free + (1 << 30)})\n"
              f"except OSError as e:\n    print(e.errno)\n"
              f"os.ftruncate(fd, 1 << 20)\nos.write(fd, b'important')\nos.close(fd)\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=False)
    assert res.returncode == 0 and res.stdout.strip() == "28", (res.stdout, res.stderr)
    assert (target / "v").read_bytes()[:9] == b"important"
    assert os.stat(target / "v").st_size == 1 << 20
    # Refused and closed so: nothing is left, as with truncate -s TOO_BIG.
    script = (f"import os\n"
              f"fd = os.open('{p}/volumes/w', os.O_CREAT | os.O_RDWR | os.O_EXCL)\n"
              f"try:\n    os.ftruncate(fd, {free + (1 << 30)})\n"
              f"except OSError:\n    pass\nos.close(fd)\n")
    subprocess.run([sys.executable, "-c", script], check=True)
    assert sorted(os.listdir(target)) == ["v"]
    vsfs.assert_clean_log()


def test_append_goes_to_the_end_of_the_file(vsfs: Mount) -> None:
    target = vsfs.dir_pool()
    p = vsfs.path / "pools" / "p"
    res = sh(f"set -e; exec 7>>{p}/volumes/a; echo one >&7; echo OTHER >> {p}/volumes/a; "
             f"echo two >&7; exec 7>&-")
    assert res.returncode == 0, res.stderr
    assert (target / "a").read_text() == "one\nOTHER\ntwo\n"
    vsfs.assert_clean_log()


def test_copy_tools_that_set_modes(vsfs: Mount, tmp_path: Path) -> None:
    target = vsfs.dir_pool()
    p = vsfs.path / "pools" / "p"
    src = tmp_path / "src.img"
    src.write_bytes(b"data" * 1000)
    src.chmod(0o640)
    for cmd, name, mode in [(f"install -m 604 {src} {p}/volumes/i", "i", 0o604),
                            (f"cp -p {src} {p}/volumes/c", "c", 0o640)]:
        res = sh(cmd)
        assert res.returncode == 0, (cmd, res.stderr)
        assert (target / name).read_bytes() == src.read_bytes()
        assert os.stat(target / name).st_mode & 0o7777 == mode
    assert os.stat(target / "c").st_mtime == src.stat().st_mtime
    vsfs.assert_clean_log()


@contextlib.contextmanager
def small_pool(vsfs: Mount, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A running dir pool "s" on a 4 MiB tmpfs: its target and its directory in the mount."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "vsfs-test", str(small)],
                   check=True)
    try:
        vsfs.define(vsfs.pool_xml("s", small))
        p = vsfs.path / "pools" / "s"
        sh(f"echo start > {p}/ctl", check=True)
        yield small, p
    finally:
        if subprocess.run(["umount", str(small)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(small)], check=False)


@pytest.mark.root
def test_failed_write_through_redirection_removes_the_volume(vsfs: Mount,
                                                             tmp_path: Path) -> None:
    with small_pool(vsfs, tmp_path) as (small, p):
        res = sh(f"head -c 8M /dev/zero > {p}/volumes/big")
        assert res.returncode != 0
        assert "No space left" in res.stderr, res.stderr
        assert os.listdir(small) == []
        assert os.listdir(p / "volumes") == []
        assert "big" in vsfs.error()
        sh(f"echo stop > {p}/ctl", check=True)
    vsfs.assert_clean_log()


@pytest.mark.root
def test_snapshot_needs_the_space_of_its_volume(vsfs: Mount, tmp_path: Path) -> None:
    with small_pool(vsfs, tmp_path) as (small, p):
        (small / "big").write_bytes(b"")
        os.truncate(small / "big", 10 << 20)  # made by another tool, sparse
        sh(f"echo refresh > {p}/ctl", check=True)
        res = sh(f"echo 'snapshot s' > {p}/volinfo/big/ctl")
        assert "No space left" in res.stderr, res.stderr
        assert os.listdir(small) == ["big"]
        sh(f"echo stop > {p}/ctl", check=True)
    vsfs.assert_clean_log()
