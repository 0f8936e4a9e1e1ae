"""A dir pool driven end to end through a real mount with real tools."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from holders import holding
from rng import assert_valid
from support import Mount, MountFactory, sh

from vsfs.tree import readme_text

pytestmark = pytest.mark.fuse


def qemu_info(path: Path | str) -> dict[str, object]:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)  # type: ignore[no-any-return]


def test_root_and_readme(vsfs: Mount) -> None:
    names = set(os.listdir(vsfs.path))
    assert {"README", "error", "by-uuid", "by-key", "by-path", "pools"} <= names
    assert sh(f"cat {vsfs.path}/README", check=True).stdout == readme_text()
    assert sh(f"cat {vsfs.path}/error", check=True).stdout == ""


def test_pool_lifecycle(vsfs: Mount) -> None:
    m = vsfs.path
    target = vsfs.base / "images"
    (vsfs.base / "p.xml").write_text(vsfs.pool_xml("p", target))
    sh(f"cat {vsfs.base}/p.xml > {m}/pools/define", check=True)
    p = m / "pools" / "p"
    assert (p / "state").read_text() == "inactive\n"
    assert (p / "type").read_text() == "dir\n"
    assert os.readlink(p / "target") == str(target)
    uuid = (p / "uuid").read_text().strip()
    assert os.readlink(m / "by-uuid" / uuid) == "../pools/p"
    # Spelled as libvirt also takes it: upper case, without dashes.
    assert os.readlink(m / "by-uuid" / uuid.upper().replace("-", "")) == "../pools/p"
    assert not os.path.lexists(m / "by-uuid" / (uuid[:-1] + "g"))
    assert os.listdir(m / "by-uuid") == [uuid]
    assert (vsfs.state / "p.xml").exists()

    # start before build: the directory is missing, the backend says so (EIO)
    res = sh(f"echo start > {p}/ctl")
    assert res.returncode != 0 and "Input/output error" in res.stderr
    assert "build the pool first" in vsfs.error()
    assert (p / "state").read_text() == "inactive\n"

    sh(f"echo build > {p}/ctl", check=True)
    assert target.is_dir()
    sh(f"echo start > {p}/ctl", check=True)
    assert (p / "state").read_text() == "running\n"

    st = os.statvfs(target)
    assert int((p / "capacity").read_text()) == st.f_blocks * st.f_frsize
    free = int((p / "free").read_text())
    assert abs(free - st.f_bavail * st.f_frsize) < 64 << 20
    xml = sh(f"cat {p}/xml", check=True).stdout
    assert_valid(xml, "storagepool")
    assert f"<uuid>{uuid}</uuid>" in xml

    # active pools cannot be undefined, redefined or deleted
    assert "Device or resource busy" in sh(f"rmdir {p}").stderr
    assert "Device or resource busy" in sh(f"cat {vsfs.base}/p.xml > {p}/xml").stderr
    assert "Device or resource busy" in sh(f"echo delete > {p}/ctl").stderr
    assert "active" in vsfs.error()

    sh(f"echo stop > {p}/ctl", check=True)
    assert (p / "state").read_text() == "inactive\n"
    assert os.listdir(p / "volumes") == []
    # redefine through xml while inactive: the UUID stays
    new_target = vsfs.base / "images2"
    (vsfs.base / "p2.xml").write_text(vsfs.pool_xml("p", new_target))
    assert os.readlink(p / "target") == str(target)  # the kernel may cache it
    sh(f"cat {vsfs.base}/p2.xml > {p}/xml", check=True)
    assert os.readlink(p / "target") == str(new_target)
    assert (p / "uuid").read_text().strip() == uuid
    assert str(new_target) in (vsfs.state / "p.xml").read_text()

    sh(f"echo delete > {p}/ctl")  # images2 does not exist
    assert "does not exist" in vsfs.error()
    sh(f"rmdir {p}", check=True)
    assert not p.exists()
    assert not (vsfs.state / "p.xml").exists()
    assert not (m / "by-uuid" / uuid).exists()
    assert target.is_dir(), "undefine must leave the storage alone"


def test_autostart_values(vsfs: Mount) -> None:
    vsfs.dir_pool("a", start=False)
    auto = vsfs.path / "pools" / "a" / "autostart"
    link = vsfs.state / "autostart" / "a.xml"
    for value, expect in [("yes", True), ("0", False), ("TRUE", True), ("false", False),
                          ("1", True), ("no", False)]:
        sh(f"echo {value} > {auto}", check=True)
        assert auto.read_text() == ("yes\n" if expect else "no\n")
        assert link.is_symlink() is expect
    res = sh(f"echo maybe > {auto}")
    assert "Invalid argument" in res.stderr
    assert "expected yes or no" in vsfs.error()


def test_truncate_creates_sparse_raw_volume(vsfs: Mount) -> None:
    target = vsfs.dir_pool()
    vols = vsfs.path / "pools" / "p" / "volumes"
    sh(f"truncate -s 10G {vols}/web.img", check=True)
    entry = vols / "web.img"
    assert stat.S_ISLNK(os.lstat(entry).st_mode)
    assert os.readlink(entry) == str(target / "web.img")
    st = os.stat(target / "web.img")
    assert st.st_size == 10 << 30
    assert st.st_blocks == 0, "truncate must make a sparse file"
    assert stat.S_IMODE(st.st_mode) == 0o600
    info = qemu_info(entry)
    assert info["format"] == "raw" and info["virtual-size"] == 10 << 30
    vi = vsfs.path / "pools" / "p" / "volinfo" / "web.img"
    assert (vi / "capacity").read_text() == f"{10 << 30}\n"
    assert (vi / "allocation").read_text() == "0\n"
    assert (vi / "format").read_text() == "raw\n"
    assert (vi / "path").read_text() == f"{target}/web.img\n"
    assert (vi / "key").read_text() == f"{target}/web.img\n"
    xml = (vi / "xml").read_bytes()
    assert_valid(xml, "storagevol")
    assert b"<key>" + str(target / "web.img").encode() + b"</key>" in xml
    # by-key and by-path lead back to the entry
    key_link = vsfs.path / "by-key" / str(target / "web.img").replace("/", "\\x2f")
    assert os.path.samefile(key_link, target / "web.img")
    rel = str(target / "web.img").lstrip("/")
    assert os.readlink(vsfs.path / "by-path" / rel).endswith("pools/p/volumes/web.img")
    assert os.path.samefile(vsfs.path / "by-path" / rel, target / "web.img")
    # Its directories are there as long as a volume lies below them.
    assert os.listdir(vsfs.path / "by-path" / str(target).lstrip("/")) == ["web.img"]
    sh(f"rm {vsfs.path}/pools/p/volumes/web.img", check=True)
    assert not os.path.lexists(vsfs.path / "by-path" / rel)
    assert not os.path.exists(vsfs.path / "by-path" / str(target).lstrip("/"))
    assert os.listdir(vsfs.path / "by-path") == []


def test_mkdir_cp_mv_rm(vsfs: Mount) -> None:
    target = vsfs.dir_pool()
    vols = vsfs.path / "pools" / "p" / "volumes"
    sh(f"mkdir {vols}/isos", check=True)
    assert os.readlink(vols / "isos") == str(target / "isos")
    assert os.readlink(vols / "isos") == str(target / "isos")  # now from the cache, if any
    assert (target / "isos").is_dir()
    assert (vsfs.path / "pools/p/volinfo/isos/format").read_text() == "dir\n"

    src = vsfs.base / "disk.img"
    src.write_bytes(os.urandom(3 << 20) + b"tail")
    sh(f"cp {src} {vols}/copy.img", check=True)
    sh(f"cmp {src} {vols}/copy.img", check=True)
    assert stat.S_ISLNK(os.lstat(vols / "copy.img").st_mode)

    # cp of a qcow2 image: the volume reports the probed format
    sh(f"qemu-img create -q -f qcow2 {vsfs.base}/q.qcow2 1G", check=True)
    sh(f"cp {vsfs.base}/q.qcow2 {vols}/q.qcow2", check=True)
    assert (vsfs.path / "pools/p/volinfo/q.qcow2/format").read_text() == "qcow2\n"
    assert (vsfs.path / "pools/p/volinfo/q.qcow2/capacity").read_text() == f"{1 << 30}\n"

    assert os.readlink(vols / "copy.img") == str(target / "copy.img")  # the kernel may cache it
    sh(f"mv {vols}/copy.img {vols}/moved.img", check=True)
    assert not (target / "copy.img").exists()
    assert os.readlink(vols / "moved.img") == str(target / "moved.img")
    assert sh(f"readlink {vols}/moved.img", check=True).stdout == f"{target}/moved.img\n"
    sh(f"cmp {src} {vols}/moved.img", check=True)
    assert sorted(os.listdir(vols)) == ["isos", "moved.img", "q.qcow2"]
    assert not (vsfs.path / "pools/p/volinfo/copy.img").exists()

    sh(f"rm {vols}/moved.img", check=True)
    assert not (target / "moved.img").exists()
    sh(f"rm {vols}/isos", check=True)
    assert not (target / "isos").exists()
    assert sorted(os.listdir(vols)) == ["q.qcow2"]


def test_volume_xml_define(vsfs: Mount) -> None:
    target = vsfs.dir_pool()
    p = vsfs.path / "pools" / "p"
    (vsfs.base / "base.xml").write_text(
        "<volume><name>base.qcow2</name><capacity unit='G'>2</capacity>"
        "<target><format type='qcow2'/><permissions><mode>0640</mode></permissions>"
        "</target></volume>")
    sh(f"cat {vsfs.base}/base.xml > {p}/define", check=True)
    info = qemu_info(target / "base.qcow2")
    assert info["format"] == "qcow2" and info["virtual-size"] == 2 << 30
    assert stat.S_IMODE(os.stat(target / "base.qcow2").st_mode) == 0o640

    # an overlay with a backing store
    (vsfs.base / "ov.xml").write_text(
        f"<volume><name>overlay</name><capacity unit='G'>2</capacity>"
        f"<target><format type='qcow2'/></target><backingStore>"
        f"<path>{target}/base.qcow2</path><format type='qcow2'/></backingStore></volume>")
    sh(f"cat {vsfs.base}/ov.xml > {p}/define", check=True)
    info = qemu_info(target / "overlay")
    assert info["backing-filename"] == f"{target}/base.qcow2"
    xml = (p / "volinfo" / "overlay" / "xml").read_text()
    assert_valid(xml, "storagevol")
    assert f"<path>{target}/base.qcow2</path>" in xml

    # preallocated raw: allocation equal to capacity
    (vsfs.base / "pre.xml").write_text(
        "<volume><name>pre.raw</name><capacity unit='M'>8</capacity>"
        "<allocation unit='M'>8</allocation></volume>")
    sh(f"cat {vsfs.base}/pre.xml > {p}/define", check=True)
    assert os.stat(target / "pre.raw").st_blocks * 512 >= 8 << 20
    assert int((p / "volinfo/pre.raw/allocation").read_text()) >= 8 << 20

    # the same name again
    res = sh(f"cat {vsfs.base}/pre.xml > {p}/define")
    assert "File exists" in res.stderr
    assert "already exists" in vsfs.error()


def test_resize_clone_snapshot_wipe(mount_factory: MountFactory) -> None:
    vsfs = mount_factory()
    target = vsfs.dir_pool()
    target2 = vsfs.dir_pool("q")
    p = vsfs.path / "pools" / "p"
    sh(f"truncate -s 1M {p}/volumes/v", check=True)
    (target / "v").write_bytes(b"x" * 4096)
    os.truncate(target / "v", 1 << 20)

    sh(f"echo 20M > {p}/volinfo/v/capacity", check=True)
    assert os.stat(target / "v").st_size == 20 << 20
    assert (p / "volinfo/v/capacity").read_text() == f"{20 << 20}\n"
    sh(f"echo '10 MiB' > {p}/volinfo/v/capacity", check=True)
    assert os.stat(target / "v").st_size == 10 << 20
    # shrinking below the data is refused and changes nothing
    res = sh(f"echo 1K > {p}/volinfo/v/capacity")
    assert "Invalid argument" in res.stderr
    assert "discard data" in vsfs.error()
    assert os.stat(target / "v").st_size == 10 << 20
    assert "Invalid argument" in sh(f"echo 12XB > {p}/volinfo/v/capacity").stderr
    assert "bad size unit" in vsfs.error()

    sh(f"echo 'clone c' > {p}/volinfo/v/ctl", check=True)
    sh(f"cmp {target}/v {target}/c", check=True)
    sh(f"echo 'clone other q' > {p}/volinfo/v/ctl", check=True)
    sh(f"cmp {target}/v {target2}/other", check=True)
    assert os.readlink(vsfs.path / "pools/q/volumes/other") == str(target2 / "other")

    sh(f"echo 'snapshot snap' > {p}/volinfo/v/ctl", check=True)
    info = qemu_info(target / "snap")
    assert info["format"] == "qcow2"
    assert info["backing-filename"] == str(target / "v")
    assert info["virtual-size"] == 10 << 20
    # the backing store of a snapshot is in use
    res = sh(f"rm {p}/volumes/v")
    assert "Device or resource busy" in res.stderr
    assert "backing store" in vsfs.error()

    sh(f"echo wipe > {p}/volinfo/c/ctl", check=True)
    data = (target / "c").read_bytes()
    assert len(data) == 10 << 20 and data.count(0) == len(data)
    sh(f"echo delete > {p}/volinfo/snap/ctl", check=True)
    assert not (target / "snap").exists()
    sh(f"rm {p}/volumes/v", check=True)
    # a qcow2 volume wiped stays a qcow2 of the same size
    sh(f"qemu-img create -q -f qcow2 {target}/w.qcow2 64M", check=True)
    sh(f"qemu-io -c 'write -P 0x55 0 1M' {target}/w.qcow2", check=True)
    sh(f"echo refresh > {p}/ctl", check=True)
    sh(f"echo wipe > {p}/volinfo/w.qcow2/ctl", check=True)
    info = qemu_info(target / "w.qcow2")
    assert info["format"] == "qcow2" and info["virtual-size"] == 64 << 20
    out = sh(f"qemu-io -c 'read -P 0 0 1M' {target}/w.qcow2", check=True).stdout
    assert "read 1048576/1048576" in out


def test_outside_changes_appear(vsfs: Mount) -> None:
    target = vsfs.dir_pool()
    vols = vsfs.path / "pools" / "p" / "volumes"
    sh(f"qemu-img create -q -f qcow2 {target}/outside.qcow2 3G", check=True)
    (target / "raw.bin").write_bytes(b"\0" * 1024)
    (target / ".hidden").write_bytes(b"")
    # The pool is polled once a second: wait for it, boundedly.
    deadline = time.monotonic() + 10
    while "outside.qcow2" not in os.listdir(vols) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sorted(os.listdir(vols)) == ["outside.qcow2", "raw.bin"]
    vi = vsfs.path / "pools/p/volinfo/outside.qcow2"
    assert (vi / "format").read_text() == "qcow2\n"
    assert (vi / "capacity").read_text() == f"{3 << 30}\n"
    os.unlink(target / "raw.bin")
    sh(f"echo refresh > {vsfs.path}/pools/p/ctl", check=True)
    assert sorted(os.listdir(vols)) == ["outside.qcow2"]
    assert not (vols / "raw.bin").exists()


def test_forty_parallel_creates(vsfs: Mount) -> None:
    target = vsfs.dir_pool()
    vols = vsfs.path / "pools" / "p" / "volumes"
    sh(f"for i in $(seq 1 40); do truncate -s ${{i}}M {vols}/v$i & done; wait", check=True)
    names = os.listdir(vols)
    assert len(names) == 40
    for i in range(1, 41):
        assert os.stat(target / f"v{i}").st_size == i << 20
        assert stat.S_ISLNK(os.lstat(vols / f"v{i}").st_mode)
    sh(f"rm {vols}/*", check=True)
    assert os.listdir(target) == []


@pytest.mark.root
def test_host_devices_follow_hotplug(vsfs: Mount) -> None:
    img = vsfs.base / "hot.img"
    img.write_bytes(b"")
    os.truncate(img, 20 << 20)
    host = vsfs.path / "host"
    dev = sh(f"losetup -f --show {img}", check=True).stdout.strip()
    kname = os.path.basename(dev)
    try:
        deadline = time.monotonic() + 10
        while kname not in os.listdir(host / "volumes") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.readlink(host / "volumes" / kname) == dev
        info = host / "volinfo" / kname
        assert (info / "size").read_text() == f"{20 << 20}\n"
        assert (info / "type").read_text() == "loop\n"
        assert (info / "ro").read_text() == "0\n"
        assert (info / "holders").read_text() == "\n"
        assert_valid((info / "xml").read_bytes(), "storagevol")
        for name in ("model", "serial", "wwn", "fstype", "removable", "mountpoints"):
            assert (info / name).read_text().endswith("\n")
    finally:
        sh(f"losetup -d {dev}", check=True)
    # Hot-plug is noticed asynchronously, and the kernel is told to drop volinfo/<dev> by
    # the notifier thread a moment after the listing changed: wait for both, bounded.
    deadline = time.monotonic() + 10
    while ((kname in os.listdir(host / "volumes") or (host / "volinfo" / kname).exists())
           and time.monotonic() < deadline):
        time.sleep(0.05)
    assert kname not in os.listdir(host / "volumes")
    assert not (host / "volinfo" / kname).exists()


def test_renamed_volumes_never_show_their_old_target(vsfs: Mount) -> None:
    """The kernel may cache symlink targets; a rename must drop the old one before it returns."""
    target = vsfs.dir_pool()
    vols = vsfs.path / "pools" / "p" / "volumes"
    for i in range(50):
        sh(f"truncate -s 1M {vols}/a{i}", check=True)
        assert os.readlink(vols / f"a{i}") == str(target / f"a{i}")
        os.rename(vols / f"a{i}", vols / f"b{i}")
        assert os.readlink(vols / f"b{i}") == str(target / f"b{i}")


def test_files_whose_names_cannot_be_volumes_are_left_out(vsfs: Mount) -> None:
    target = vsfs.dir_pool()
    p = vsfs.path / "pools" / "p"
    for raw in (b"ctl\x01char", b"\xff\xfeinvalid", b"line\nbreak", b"fine"):
        (target.joinpath(os.fsdecode(raw))).write_bytes(b"")
    sh(f"echo refresh > {p}/ctl", check=True)
    assert os.listdir(p / "volumes") == ["fine"]
    assert os.listdir(p / "volinfo") == ["fine"]
    assert len(os.listdir(target)) == 4  # left where they are
    res = sh(f"truncate -s 1M {p}/volumes/$'\\xff'")
    assert "Invalid argument" in res.stderr
    assert "not UTF-8" in vsfs.error()
    log = vsfs.log.read_text()
    assert log.count("is not taken as a volume") == 3
    sh(f"echo refresh > {p}/ctl", check=True)
    assert vsfs.log.read_text().count("is not taken as a volume") == 3  # said once
    vsfs.assert_clean_log()


def test_by_path_of_a_target_spelled_with_dots(vsfs: Mount) -> None:
    (vsfs.base / "sub").mkdir()
    target = vsfs.base / "pool2"
    spelled = f"{vsfs.base}/./sub/../pool2"
    vsfs.define(f"<pool type='dir'><name>q</name><target><path>{spelled}</path></target></pool>")
    sh(f"echo build > {vsfs.path}/pools/q/ctl; echo start > {vsfs.path}/pools/q/ctl",
       check=True)
    sh(f"truncate -s 1M {vsfs.path}/pools/q/volumes/d1", check=True)
    by_path = vsfs.path / "by-path"
    # The kernel takes "." and ".." within the mount itself: the volume is found under
    # the path as it normalises, and by-path/ has no "." or ".." entries.
    assert os.path.samefile(f"{by_path}{target}/d1", target / "d1")
    assert os.path.samefile(f"{by_path}{vsfs.base}/./pool2/d1", target / "d1")
    assert sorted(os.listdir(f"{by_path}{vsfs.base}")) == ["pool2"]
    vsfs.assert_clean_log()


def test_values_and_commands_are_taken_whole(vsfs: Mount) -> None:
    target = vsfs.dir_pool()
    p = vsfs.path / "pools" / "p"
    sh(f"truncate -s 1G {p}/volumes/v", check=True)
    # One byte per write: nothing happens until the newline.
    sh(f"printf '20G\\n' | dd of={p}/volinfo/v/capacity bs=1 status=none", check=True)
    assert os.stat(target / "v").st_size == 20 << 30
    assert vsfs.log.read_text().count("volume p/v resized") == 1
    # A command in two writes is one command.
    sh(f"(printf 'clone two'; printf ' p\\n') > {p}/volinfo/v/ctl", check=True)
    assert sorted(os.listdir(target)) == ["two", "v"]
    # Without a newline the value is taken at close.
    sh(f"printf 2G > {p}/volinfo/v/capacity", check=True)
    assert os.stat(target / "v").st_size == 2 << 30
    res = sh(f"printf '3G\\n' | dd of={p}/volinfo/v/capacity bs=1 seek=1 status=none")
    assert "Invalid argument" in res.stderr
    assert "in order" in vsfs.error()
    assert os.stat(target / "v").st_size == 2 << 30
    vsfs.assert_clean_log()


def test_a_file_held_open_is_in_use(vsfs: Mount) -> None:
    """A guest's disk is a file some process holds open: rm, shrink, wipe and the pool's
    stop are EBUSY and change nothing, naming the process; growing is fine; once it is
    closed, everything works at once."""
    target = vsfs.dir_pool()
    p = vsfs.path / "pools" / "p"
    sh(f"truncate -s 1M {p}/volumes/v && echo data > {target}/v", check=True)
    sh(f"truncate -s 1M {p}/volumes/w", check=True)
    with holding(p / "volumes" / "v", redirect="<") as pid:
        # v holds 5 bytes now (echo truncated it): 1 byte is a shrink, 1K would be growth.
        for cmd in (f"rm {p}/volumes/v", f"echo wipe > {p}/volinfo/v/ctl",
                    f"echo 1 > {p}/volinfo/v/capacity", f"echo 'shrink 1K' > {p}/volinfo/v/ctl",
                    f"echo delete > {p}/volinfo/v/ctl", f"echo stop > {p}/ctl"):
            res = sh(cmd)
            assert "Device or resource busy" in res.stderr, (cmd, res.stderr)
            assert f"is open in process {pid} (sleep)" in vsfs.error(), vsfs.error()
        assert (target / "v").read_bytes() == b"data\n"
        assert (p / "state").read_text() == "running\n"
        # Growing takes nothing from the holder; other volumes are not in use.
        sh(f"echo 2M > {p}/volinfo/v/capacity", check=True)
        sh(f"rm {p}/volumes/w", check=True)
    sh(f"rm {p}/volumes/v", check=True)
    assert not (target / "v").exists()


def test_a_size_changed_behind_vsfs_is_compared_as_it_is_now(vsfs: Mount) -> None:
    """A guest's disk grown outside vsfs (qemu's block_resize, a truncate) and held open:
    a capacity below its new size is a shrink, refused while held, even if vsfs last saw
    the volume smaller."""
    target = vsfs.dir_pool()
    p = vsfs.path / "pools" / "p"
    sh(f"truncate -s 1M {p}/volumes/v", check=True)
    assert (p / "volinfo/v/capacity").read_text() == f"{1 << 20}\n"
    os.truncate(target / "v", 4 << 20)
    with holding(target / "v", redirect="<") as pid:
        res = sh(f"echo 2M > {p}/volinfo/v/capacity")
        assert "Device or resource busy" in res.stderr, res.stderr
        assert f"is open in process {pid} (sleep)" in vsfs.error(), vsfs.error()
        assert os.stat(target / "v").st_size == 4 << 20
    sh(f"echo 2M > {p}/volinfo/v/capacity", check=True)
    assert os.stat(target / "v").st_size == 2 << 20
    vsfs.assert_clean_log()


def test_what_the_file_refuses_is_said_with_its_errno(vsfs: Mount) -> None:
    """Never an internal error: a file removed behind vsfs's back is ENOENT, an immutable
    one (chattr +i) is refused as permissions are, a running program (ETXTBSY) is busy;
    nothing changes."""
    target = vsfs.dir_pool()
    p = vsfs.path / "pools" / "p"
    for name in ("gone", "gone2", "fixed", "prog"):
        sh(f"truncate -s 1M {p}/volumes/{name}", check=True)
    assert sorted(os.listdir(p / "volumes")) == ["fixed", "gone", "gone2", "prog"]
    os.unlink(target / "gone")
    os.unlink(target / "gone2")
    for cmd in (f"echo wipe > {p}/volinfo/gone/ctl", f"echo 2M > {p}/volinfo/gone2/capacity",
                f"mv {p}/volumes/gone {p}/volumes/gone3"):
        res = sh(cmd)
        assert "No such file or directory" in res.stderr, (cmd, res.stderr)
    assert not (target / "gone3").exists()
    if sh(f"chattr +i {target}/fixed").returncode == 0:
        try:
            for cmd in (f"rm {p}/volumes/fixed", f"echo wipe > {p}/volinfo/fixed/ctl",
                        f"echo 2M > {p}/volinfo/fixed/capacity",
                        f"mv {p}/volumes/fixed {p}/volumes/fixed2"):
                res = sh(cmd)
                assert "Permission denied" in res.stderr, (cmd, res.stderr)
                assert "Operation not permitted" in vsfs.error(), vsfs.error()
            assert os.stat(target / "fixed").st_size == 1 << 20
        finally:
            sh(f"chattr -i {target}/fixed", check=True)
    program = Path("/bin/sleep").read_bytes()
    (target / "prog").write_bytes(program)
    os.chmod(target / "prog", 0o700)
    running = subprocess.Popen([str(target / "prog"), "600"])
    try:
        # wipe: in use, the program named; growing: the file itself refuses (ETXTBSY).
        for cmd, why in ((f"echo wipe > {p}/volinfo/prog/ctl",
                          f"is running as process {running.pid} (prog)"),
                         (f"echo 4M > {p}/volinfo/prog/capacity", "Text file busy")):
            res = sh(cmd)
            assert "Device or resource busy" in res.stderr, (cmd, res.stderr)
            assert why in vsfs.error(), vsfs.error()
    finally:
        running.kill()
        running.wait()
    assert (target / "prog").read_bytes() == program
    vsfs.assert_clean_log()


def test_appending_to_value_command_and_xml_files(vsfs: Mount) -> None:
    """`>>` (O_APPEND) means what `>` means, however recently the file was written: the
    end the kernel keeps for it after a write is no offset into this open's value."""
    target = vsfs.dir_pool()
    p = vsfs.path / "pools" / "p"
    sh(f"truncate -s 1M {p}/volumes/v", check=True)
    sh(f"echo refresh >> {p}/ctl && echo refresh >> {p}/ctl", check=True)
    sh(f"echo 2M >> {p}/volinfo/v/capacity && echo 3M >> {p}/volinfo/v/capacity", check=True)
    assert os.stat(target / "v").st_size == 3 << 20
    for name in ("a", "b"):
        sh(f"echo '<volume><name>{name}</name><capacity>1M</capacity></volume>' >> {p}/define",
           check=True)
    assert sorted(os.listdir(target)) == ["a", "b", "v"]
    vsfs.assert_clean_log()


@pytest.mark.root
def test_a_file_held_through_a_bind_mount_is_in_use(vsfs: Mount) -> None:
    """A process that opened the volume through a bind mount of the pool's directory
    (a container's view of it) holds the same file: rm, wipe and stop are EBUSY."""
    target = vsfs.dir_pool()
    p = vsfs.path / "pools" / "p"
    sh(f"truncate -s 1M {p}/volumes/v && echo data > {target}/v", check=True)
    view = vsfs.base / "view"
    view.mkdir()
    sh(f"mount --bind {target} {view}", check=True)
    try:
        with holding(view / "v", redirect="<") as pid:
            for cmd in (f"rm {p}/volumes/v", f"echo wipe > {p}/volinfo/v/ctl",
                        f"echo stop > {p}/ctl"):
                res = sh(cmd)
                assert "Device or resource busy" in res.stderr, (cmd, res.stderr)
                assert f"is open in process {pid} (sleep)" in vsfs.error(), vsfs.error()
            assert (target / "v").read_bytes() == b"data\n"
    finally:
        sh(f"umount {view}", check=True)
    sh(f"rm {p}/volumes/v", check=True)
    vsfs.assert_clean_log()


def test_a_volume_rewritten_behind_vsfs_is_wiped_as_it_is_now(vsfs: Mount) -> None:
    """An image made over a volume's file in place (qemu-img create: same inode, so no
    rescan) is wiped as the image it now is, a fresh qcow2, not zeroed as the raw file
    vsfs last saw; a smaller capacity and a snapshot too go by what the file is now."""
    target = vsfs.dir_pool()
    p = vsfs.path / "pools" / "p"
    sh(f"truncate -s 1M {p}/volumes/v {p}/volumes/w {p}/volumes/x", check=True)
    assert (p / "volinfo/v/format").read_text() == "raw\n"
    for name in ("v", "w", "x"):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(target / name), "4M"],
                       check=True)
    sh(f"echo wipe > {p}/volinfo/v/ctl", check=True)
    info = qemu_info(target / "v")
    assert info["format"] == "qcow2" and info["virtual-size"] == 4 << 20, info
    sh(f"echo 2M > {p}/volinfo/w/capacity", check=True)
    info = qemu_info(target / "w")
    assert info["format"] == "qcow2" and info["virtual-size"] == 2 << 20, info
    # An overlay of it reads it as the qcow2 it is (-F qcow2), never its header as data.
    sh(f"echo 'snapshot s' > {p}/volinfo/x/ctl", check=True)
    info = qemu_info(target / "s")
    assert info["backing-filename-format"] == "qcow2", info
    vsfs.assert_clean_log()


def test_a_file_opened_a_moment_ago_is_in_use(vsfs: Mount) -> None:
    """No window: a file opened right after another `rm` looked at the pool is in use
    at once (the kernel says so file by file, not a scan of a moment ago)."""
    vsfs.dir_pool()
    vols = vsfs.path / "pools" / "p" / "volumes"
    for i in range(10):
        sh(f"truncate -s 1M {vols}/w{i} {vols}/v{i}", check=True)
        sh(f"rm {vols}/w{i}", check=True)  # a look at the pool's open files just now
        with holding(vols / f"v{i}", redirect="<") as pid:
            res = sh(f"rm {vols}/v{i}")
            assert "Device or resource busy" in res.stderr, (i, res.stderr)
            assert f"is open in process {pid} (sleep)" in vsfs.error()
        sh(f"rm {vols}/v{i}", check=True)


@pytest.mark.root
def test_a_file_mapped_or_under_a_loop_is_in_use(vsfs: Mount) -> None:
    """Held without an open descriptor: a mapping whose descriptor was closed, a loop
    device on the file. Both keep the file open in the kernel: in use."""
    target = vsfs.dir_pool()
    vols = vsfs.path / "pools" / "p" / "volumes"
    sh(f"truncate -s 1M {vols}/mapped {vols}/looped", check=True)
    code = ("import mmap, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
            "m = mmap.mmap(fd, 4096, prot=mmap.PROT_READ); os.close(fd); print(1, flush=True); "
            "time.sleep(600)")
    mapper = subprocess.Popen([sys.executable, "-c", code, str(target / "mapped")],
                              stdout=subprocess.PIPE)
    loop = ""
    try:
        assert mapper.stdout is not None and mapper.stdout.readline() == b"1\n"
        res = sh(f"rm {vols}/mapped")
        assert "Device or resource busy" in res.stderr, res.stderr
        loop = sh(f"losetup -f --show {target}/looped", check=True).stdout.strip()
        res = sh(f"rm {vols}/looped")
        assert "Device or resource busy" in res.stderr, res.stderr
        assert f"{loop} is attached to" in vsfs.error(), vsfs.error()
    finally:
        mapper.kill()
        mapper.wait()
        if loop:
            subprocess.run(["losetup", "-d", loop], check=False)
    sh(f"rm {vols}/mapped {vols}/looped", check=True)
    assert os.listdir(target) == []
