"""Every parser of an outside command's output, fed the real output recorded in tests/data/cmd/
(see its README: how each file was made), and malformed input, which must be a vsfs error.
Plain functions: no mount, no root, no VM, no Ceph."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from vsfs.backends import blockdev, disk, iscsi, iscsi_direct, logical, netfs, qsd, rbd
from vsfs.backends import dir as dirpool
from vsfs.errors import (
    BackendFailed,
    Busy,
    Denied,
    Exists,
    NoSpace,
    NotEmpty,
    NotFound,
    VsfsError,
)
from vsfs.model import Volume, VolumeDef
from vsfs.watchdog import MountEntry, parse_mountinfo, unescape
from vsfs.xmlio import parse_pool

DATA = Path(__file__).with_name("data") / "cmd"
MiB = 1 << 20


def rec(name: str) -> str:
    """A recorded output."""
    return (DATA / name).read_text()


def failed(stderr: str, returncode: int = 1) -> BackendFailed:
    """The error vsfs.proc.run raises for a command that printed ``stderr`` and failed."""
    last = stderr.strip().splitlines()[-1] if stderr.strip() else "failed"
    return BackendFailed(f"cmd: {last}", returncode=returncode, stderr=stderr)


# ---------------------------------------------------------------- /proc/self/mountinfo


def test_mountinfo_host() -> None:
    mounts = parse_mountinfo(rec("mountinfo/host.txt"))
    root = next(m for m in mounts if m.mount_point == "/")
    assert root.fstype and ":" in root.device and root.root == "/"
    spaced = [m for m in mounts if m.mount_point == "/tmp/rec/with space"]
    assert spaced == [MountEntry(spaced[0].device, "/", "/tmp/rec/with space", "tmpfs",
                                 "vsfs-record")]


@pytest.mark.parametrize(("field", "path"), [
    ("/a\\040b", "/a b"), ("/t\\011ab", "/t\tab"), ("/n\\012l", "/n\nl"),
    ("/back\\134slash", "/back\\slash"), ("/plain", "/plain"), ("/\\0401", "/ 1"),
])
def test_mountinfo_unescape(field: str, path: str) -> None:
    assert unescape(field) == path


def test_mountinfo_optional_fields() -> None:
    # Hand-made from a recorded line: optional fields ("shared:N", "master:N", which
    # systemd hosts show) between the options and "-" change nothing.
    line = rec("mountinfo/host.txt").splitlines()[0].split(" - ")
    with_shared = f"{line[0]} shared:5 master:1 - {line[1]}"
    assert parse_mountinfo(with_shared) == parse_mountinfo(" - ".join(line))


@pytest.mark.parametrize("text", [
    "garbage\n",
    "22 1 0:21 / /proc rw,nosuid\n",  # cut off before "-"
    "22 1 0:21 / /proc rw,nosuid - proc\n",  # no source
    "22 1 nodev / /proc rw - proc proc rw\n",  # no MAJOR:MINOR
])
def test_mountinfo_malformed(text: str) -> None:
    with pytest.raises(BackendFailed, match="mountinfo line 1"):
        parse_mountinfo(text)


def test_mountinfo_blank() -> None:
    assert parse_mountinfo("") == [] and parse_mountinfo("\n\n") == []


# ---------------------------------------------------------------- wipefs, losetup


@pytest.mark.parametrize(("case", "types"), [
    ("gpt.json", ["gpt", "gpt", "PMBR"]),
    ("ext4.json", ["ext4"]),
    ("blank.json", []),
])
def test_wipefs(case: str, types: list[str]) -> None:
    assert blockdev.parse_wipefs(rec(f"wipefs/{case}")) == types


@pytest.mark.parametrize("text", ["{", "[]", '{"signatures": {}}', '{"signatures": [{}]}',
                                  '{"signatures": [{"type": 7}]}'])
def test_wipefs_malformed(text: str) -> None:
    with pytest.raises(BackendFailed, match="wipefs: unexpected output"):
        blockdev.parse_wipefs(text)


def test_wipefs_empty_output() -> None:
    assert blockdev.parse_wipefs("") == []  # util-linux before 2.38 printed nothing


def test_losetup_associated() -> None:
    names = blockdev.parse_loop_names(rec("losetup/associated-two.txt"))
    assert len(names) == 2 and all(n.startswith("/dev/loop") for n in names)
    assert blockdev.parse_loop_names(rec("losetup/associated-none.txt")) == []


# ---------------------------------------------------------------- parted -m


@pytest.mark.parametrize(("case", "label", "parts", "free"), [
    ("file-gpt.txt", "gpt",
     [(1, MiB, 9 * MiB - 1, "data"), (2, 9 * MiB, 25 * MiB - 1, "my disk"),
      (3, 40 * MiB, 63 * MiB - 1, "last")],
     [(17408, MiB - 1), (25 * MiB, 40 * MiB - 1), (63 * MiB, 67091967)]),
    ("loop-gpt.txt", "gpt",
     [(1, MiB, 9 * MiB - 1, "data"), (2, 9 * MiB, 25 * MiB - 1, "my disk"),
      (3, 40 * MiB, 63 * MiB - 1, "last")],
     [(17408, MiB - 1), (25 * MiB, 40 * MiB - 1), (63 * MiB, 67091967)]),
    ("file-msdos.txt", "msdos",
     [(1, MiB, 17 * MiB - 1, ""), (2, 17 * MiB, 33 * MiB - 1, "")],
     [(16384, MiB - 1), (33 * MiB, 64 * MiB - 1)]),
    ("file-gpt-empty.txt", "gpt", [], [(17408, 67091967)]),
    ("file-nolabel.stdout.txt", "unknown", [], []),
])
def test_parted(case: str, label: str, parts: list[tuple[int, int, int, str]],
                free: list[tuple[int, int]]) -> None:
    table = disk.parse_parted(rec(f"parted/{case}"))
    assert table.size == 64 * MiB and table.label == label
    assert [(p.number, p.start, p.end, p.name) for p in table.partitions] == parts
    assert list(table.free) == free


def _parted_cut(case: str, line: int, new: str | None) -> str:
    """A real recording with one line replaced (or dropped): hand-made malformed input."""
    lines = rec(f"parted/{case}").splitlines()
    if new is None:
        del lines[line]
    else:
        lines[line] = new
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text", [
    "",
    "Error: /dev/sdz: unrecognised disk label\n",
    _parted_cut("file-gpt.txt", 0, "CHS;"),  # not in bytes
    _parted_cut("file-gpt.txt", 1, "/tmp/rec/gpt.img:67108864B;"),  # short device line
    _parted_cut("file-gpt.txt", 1, "/tmp/rec/gpt.img:64MiB:file:512:512:gpt::;"),
    _parted_cut("file-gpt.txt", 3, "1:1048576:9437183B:8388608B::data:;"),  # no unit
    _parted_cut("file-gpt.txt", 3, "x:1048576B:9437183B:8388608B::data:;"),
    _parted_cut("file-gpt.txt", 3, "1:1048576B;"),
    _parted_cut("file-gpt.txt", 2, "1:17408B:oops:1031168B:free;"),
])
def test_parted_malformed(text: str) -> None:
    with pytest.raises(BackendFailed, match="parted: unexpected"):
        disk.parse_parted(text)


def test_parted_stderr_is_recorded() -> None:
    assert "unrecognised disk label" in rec("parted/file-nolabel.stderr.txt")


@pytest.mark.parametrize(("dev", "kind", "start", "size", "argv"), [
    ("/dev/loop0", "data", MiB, 8 * MiB,
     ["parted", "-s", "-a", "none", "/dev/loop0", "unit", "B", "mkpart", "data",
      "1048576", "9437183"]),
    ("/dev/sdb", "primary", 17 * MiB, 512,
     ["parted", "-s", "-a", "none", "/dev/sdb", "unit", "B", "mkpart", "primary",
      "17825792", "17826303"]),
])
def test_mkpart_argv(dev: str, kind: str, start: int, size: int, argv: list[str]) -> None:
    assert disk.mkpart_argv(dev, kind, start, size) == argv


@pytest.mark.parametrize(("dev", "number", "node"), [
    ("/dev/sdb", 1, "/dev/sdb1"), ("/dev/loop3", 2, "/dev/loop3p2"),
    ("/dev/nvme0n1", 5, "/dev/nvme0n1p5"), ("/dev/vda", 12, "/dev/vda12"),
])
def test_partition_node(dev: str, number: int, node: str) -> None:
    assert disk.partition_node(dev, number) == node


# ---------------------------------------------------------------- LVM reports (logical.py)

THIN = "lvm/lvs-thin.json"


def test_vgs() -> None:
    assert logical.parse_vg(rec("lvm/vgs.json"), "vsfsvg") == (1065353216, 973078528)
    assert logical.parse_vg(rec("lvm/host-vgs.json"), "vsfsrec") == (125829120, 125829120)


def test_vgs_missing_group() -> None:
    with pytest.raises(NotFound, match="nosuchvg does not exist"):
        logical.parse_vg(rec("lvm/host-vgs-missing.stdout.json"), "nosuchvg")


@pytest.mark.parametrize(("case", "expected"), [
    # name, capacity, allocation: a snapshot shows its origin's size and takes its COW
    # area; a thin LV takes what it uses; libvirt's sparse LV is a snapshot of nothing
    ("lvm/lvs-snapshots.json", [("plain", 64 * MiB, 64 * MiB),
                                ("plain-snap", 64 * MiB, 16 * MiB),
                                ("sparse", 256 * MiB, 8 * MiB)]),
    (THIN, [("plain", 64 * MiB, 64 * MiB), ("plain-snap", 64 * MiB, 16 * MiB),
            ("sparse", 256 * MiB, 8 * MiB), ("thin1", 1024 * MiB, None)]),
    ("lvm/lvs-inactive.json", [("plain", 64 * MiB, 64 * MiB),
                               ("plain-snap", 64 * MiB, 16 * MiB),
                               # inactive, a thin LV has no data_percent: all of it
                               ("sparse", 256 * MiB, 8 * MiB),
                               ("thin1", 1024 * MiB, 1024 * MiB)]),
    ("lvm/host-lvs-empty.json", []),
])
def test_lvs(case: str, expected: list[tuple[str, int, int | None]]) -> None:
    vols = logical.lv_volumes(logical.parse_lvs(rec(case)))
    assert [v.name for v in vols] == [e[0] for e in expected]
    for vol, (_, capacity, allocation) in zip(vols, expected, strict=True):
        assert vol.capacity == capacity and vol.physical is not None
        assert vol.path == f"/dev/vsfsvg/{vol.name}" and vol.format == "lvm2" and vol.key
        if allocation is not None:
            assert vol.allocation == allocation
    if case == THIN:  # 8 MiB written into the thin LV: 0.78% of 1 GiB, not all of it
        assert vols[-1].allocation == int((1 << 30) * 0.78 / 100)


def test_lvs_thin_pool_is_no_volume() -> None:
    rows = logical.parse_lvs(rec(THIN))
    assert any(r["lv_name"] == logical.THIN_POOL and r["lv_attr"][0] == "t" for r in rows)
    active = [r["lv_attr"][4] == "a" for r in logical.parse_lvs(rec("lvm/lvs-inactive.json"))]
    assert active and not any(active)


def _lvs_row(**change: str) -> str:
    """The recorded thin-pool report with one field of its first row changed (hand-made)."""
    text = rec(THIN)
    first = text.index('"lv_name":"plain"')
    for key, value in change.items():
        start = text.index(f'"{key}":', first)
        end = text.index(",", start)
        text = text[:start] + f'"{key}":{value}' + text[end:]
    return text


@pytest.mark.parametrize("text", [
    "", "not json", "[]", '{"report": []}', '{"report": [{"lv": {}}]}',
    '{"report": [{"vg": []}]}', rec(THIN)[:200],
    _lvs_row(lv_size='"64m"'), _lvs_row(lv_size="67108864"), _lvs_row(lv_attr='"-wi"'),
    _lvs_row(lv_uuid="null"),
])
def test_lvs_malformed(text: str) -> None:
    with pytest.raises(BackendFailed, match="unexpected output"):
        logical.lv_volumes(logical.parse_lvs(text))


def test_lvs_malformed_percent() -> None:
    text = rec(THIN).replace('"data_percent":"0.78"', '"data_percent":"n/a"')
    assert text != rec(THIN)
    with pytest.raises(BackendFailed, match="lvs: unexpected output"):
        logical.lv_volumes(logical.parse_lvs(text))


def test_pvs() -> None:
    assert logical.parse_pv_names(rec("lvm/pvs-of-vg.json")) == ["/dev/vda", "/dev/vdb"]
    [group] = [g for g in logical.parse_groups(rec("lvm/pvs-all.json")) if g.name == "vsfsvg"]
    assert [d.path for d in group.devices] == ["/dev/vda", "/dev/vdb"]
    assert group.format == "lvm2"
    assert [g.name for g in logical.parse_groups(rec("lvm/host-pvs-all.json"))] == ["vsfsrec"]


def test_pvs_malformed() -> None:
    with pytest.raises(BackendFailed, match="pvs: unexpected output"):
        logical.parse_groups('{"report": [{"pv": [{"pv_name": "/dev/vda"}]}]}')


@pytest.mark.parametrize(("case", "error"), [
    ("lvm/vgs-missing.stderr.txt", NotFound),
    ("lvm/lvcreate-nospace.stderr.txt", NoSpace),
    ("lvm/lvremove-open.stderr.txt", Busy),
    ("lvm/lvcreate-exists.stderr.txt", BackendFailed),
])
def test_lvm_errors(case: str, error: type[VsfsError]) -> None:
    assert type(logical._lvm_error(failed(rec(case), 5), "x")) is error


def _vdef(capacity: int, allocation: int | None = None, name: str = "v") -> VolumeDef:
    return VolumeDef(name=name, capacity=capacity, allocation=allocation)


@pytest.mark.parametrize(("vdef", "thin", "argv"), [
    (_vdef(64 * MiB), False, ["lvcreate", "-y", "-W", "y", "-n", "v", "-L", "67108864b", "vg"]),
    (_vdef(1000), True, ["lvcreate", "-y", "-W", "y", "-n", "v", "-L", "1024b", "vg"]),
    (_vdef(MiB, MiB), False, ["lvcreate", "-y", "-W", "y", "-n", "v", "-L", "1048576b", "vg"]),
    (_vdef(1 << 30, 0), True,
     ["lvcreate", "-y", "-n", "v", "-V", "1073741824b", "-T", "vg/thinpool"]),
    (_vdef(1 << 30, 0), False,
     ["lvcreate", "-y", "--type", "snapshot", "-n", "v", "-s", "-V", "1073741824b",
      "-L", "4194304b", "vg"]),
    (_vdef(1 << 30, 100 * MiB), False,
     ["lvcreate", "-y", "--type", "snapshot", "-n", "v", "-s", "-V", "1073741824b",
      "-L", "104857600b", "vg"]),
])
def test_lvcreate_argv(vdef: VolumeDef, thin: bool, argv: list[str]) -> None:
    assert logical.lvcreate_argv("vg", vdef, thin) == argv


def test_lv_snapshot_and_resize_argv() -> None:
    origin = logical.lv_volumes(logical.parse_lvs(rec("lvm/lvs-snapshots.json")))[0]
    assert logical.snapshot_argv("vsfsvg", origin, "s") == [
        "lvcreate", "-y", "-s", "-n", "s", "-L", "13422080b", "vsfsvg/plain"]
    small = Volume(name="t", key="k", path="/dev/vg/t", type="block", format="lvm2",
                   capacity=MiB, allocation=MiB, physical=MiB)
    assert logical.snapshot_argv("vg", small, "s")[6] == "4194304b"
    assert logical.resize_argv("vg", "v", 3 * MiB + 1, shrink=False) == [
        "lvextend", "-L", "3146240b", "vg/v"]
    assert logical.resize_argv("vg", "v", MiB, shrink=True) == [
        "lvreduce", "-f", "-L", "1048576b", "vg/v"]


# ---------------------------------------------------------------- qemu-img (dir.py)

POOL = "/var/lib/vsfs/pool/"


@pytest.mark.parametrize(("case", "facts", "options"), [
    ("info-raw.json", ("raw", 10 * MiB, None, None), []),
    ("info-qcow2.json", ("qcow2", 1 << 30, None, None),
     ["cluster_size=65536", "compat=1.1"]),
    ("info-qcow2-compat010.json", ("qcow2", 64 * MiB, None, None),
     ["cluster_size=65536", "compat=0.10"]),
    ("info-qcow2-lazy.json", ("qcow2", 100 * MiB, None, None),
     ["cluster_size=2097152", "compat=1.1", "lazy_refcounts=on"]),
    ("info-overlay-absolute.json", ("qcow2", 1 << 30, f"{POOL}plain.qcow2", "qcow2"),
     ["cluster_size=65536", "compat=1.1"]),
    ("info-overlay-relative.json", ("qcow2", 20 * MiB, "raw.img", "raw"),
     ["cluster_size=65536", "compat=1.1"]),
    ("info-qed.json", ("qed", 50 * MiB, None, None), ["cluster_size=65536"]),
    ("info-vmdk.json", ("vmdk", 50 * MiB, None, None), []),
    ("info-vpc.json", ("vpc", 52432896, None, None), []),  # vpc rounds to its geometry
    ("info-vdi.json", ("vdi", 50 * MiB, None, None), []),
])
def test_qemu_img_info(case: str, facts: tuple[str, int, str | None, str | None],
                       options: list[str]) -> None:
    info = dirpool.parse_image_info(rec(f"qemu-img/{case}"), "info")
    assert dirpool.image_facts(info, 12345, "info") == facts
    assert dirpool.image_options(info) == options


def test_qemu_img_info_no_size() -> None:
    info = dirpool.parse_image_info('{"format": "file"}', "info")  # hand-made: no size
    assert dirpool.image_facts(info, 4096, "info") == ("raw", 4096, None, None)


@pytest.mark.parametrize("text", [
    "", "qemu-img: Could not open 'x'", "[]", "null", rec("qemu-img/info-qcow2.json")[:100],
    '{"format": 7, "virtual-size": 1}', '{"format": "qcow2", "virtual-size": "big"}',
    '{"format": "qcow2", "virtual-size": 1.5}', '{"format": "qcow2", "virtual-size": true}',
])
def test_qemu_img_info_malformed(text: str) -> None:
    with pytest.raises(BackendFailed, match="info: unexpected output"):
        dirpool.image_facts(dirpool.parse_image_info(text, "info"), 0, "info")


def test_qemu_img_map() -> None:
    assert dirpool.parse_image_map(rec("qemu-img/map-qcow2.json")) == [
        (0, MiB, True), (MiB, 31 * MiB, False), (32 * MiB, 65536, True),
        (32 * MiB + 65536, 33488896, False)]
    assert dirpool.parse_image_map(rec("qemu-img/map-qcow2-empty.json")) == [
        (0, 1 << 30, False)]


@pytest.mark.parametrize("text", ["", "{}", "[1]", '[{"start": 0}]',
                                  '[{"start": "x", "length": 1}]'])
def test_qemu_img_map_malformed(text: str) -> None:
    with pytest.raises(BackendFailed, match="qemu-img map: unexpected output"):
        dirpool.parse_image_map(text)


@pytest.mark.parametrize(("vdef", "fmt", "options"), [
    (VolumeDef(name="a", capacity=MiB), "qcow2", []),
    (VolumeDef(name="a", capacity=MiB, allocation=MiB), "qcow2", ["preallocation=falloc"]),
    (VolumeDef(name="a", capacity=MiB, allocation=MiB), "vmdk", []),
    (VolumeDef(name="a", capacity=MiB, compat="0.10", lazy_refcounts=True,
               cluster_size=2 * MiB), "qcow2",
     ["compat=0.10", "lazy_refcounts=on", "cluster_size=2097152"]),
])
def test_create_options(vdef: VolumeDef, fmt: str, options: list[str]) -> None:
    assert dirpool.create_options(vdef, fmt) == options


@pytest.mark.parametrize(("args", "argv"), [
    (("qcow2", "/p/t", MiB, [], None), ["qemu-img", "create", "-q", "-f", "qcow2", "/p/t",
                                        "1048576"]),
    (("qcow2", "/p/t", None, ["compat=1.1"], ("base.img", "raw")),
     ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=1.1", "-b", "base.img", "-F",
      "raw", "/p/t"]),
    (("qed", "/p/t", 5, ["cluster_size=65536", "preallocation=falloc"], None),
     ["qemu-img", "create", "-q", "-f", "qed", "-o", "cluster_size=65536,preallocation=falloc",
      "/p/t", "5"]),
])
def test_qemu_img_create_argv(args: tuple[str, str, int | None, list[str],
                                          tuple[str, str] | None], argv: list[str]) -> None:
    fmt, path, size, options, backing = args
    assert dirpool.qemu_img_create_argv(fmt, path, size, options, backing) == argv


def test_qemu_img_create_argv_remakes_recorded_image() -> None:
    info = dirpool.parse_image_info(rec("qemu-img/info-qcow2-lazy.json"), "info")
    assert dirpool.qemu_img_create_argv("qcow2", "/p/t", 100 * MiB,
                                        dirpool.image_options(info)) == [
        "qemu-img", "create", "-q", "-f", "qcow2", "-o",
        "cluster_size=2097152,compat=1.1,lazy_refcounts=on", "/p/t", "104857600"]


def test_qemu_img_convert_and_resize_argv() -> None:
    assert dirpool.qemu_img_convert_argv("qcow2", "raw", "/p/a", "/p/b") == [
        "qemu-img", "convert", "-U", "-p", "-f", "qcow2", "-O", "raw", "/p/a", "/p/b"]
    assert dirpool.qemu_img_resize_argv("qcow2", "/p/a", MiB, shrink=False) == [
        "qemu-img", "resize", "-q", "-f", "qcow2", "/p/a", "1048576"]
    assert dirpool.qemu_img_resize_argv("qcow2", "/p/a", 512, shrink=True) == [
        "qemu-img", "resize", "-q", "-f", "qcow2", "--shrink", "/p/a", "512"]


# ---------------------------------------------------------------- rbd / rados (rbd.py)


def test_rados_df() -> None:
    status = rbd.parse_df(rec("rados/df.json"), "vsfs")
    assert status.capacity == 1048576 * 1024 and status.available == 1048558 * 1024
    assert status.allocation == 19
    assert rbd.parse_df(rec("rados/df.json"), "nosuch").allocation == 0


def test_rbd_ls() -> None:
    rows = rbd.parse_ls(rec("rbd/ls-l.json"))
    assert [(rbd.RbdBackend._name_of(r), r["size"]) for r in rows] == [
        ("big", 1 << 30), ("disk1", 64 * MiB), ("disk1@s1", 64 * MiB),
        ("disk1@before upgrade", 64 * MiB), ("empty", 0)]
    assert rbd.parse_ls(rec("rbd/ls-empty.json")) == [] and rbd.parse_ls("") == []


def test_rbd_info() -> None:
    assert rbd.parse_info(rec("rbd/info-image.json"), "disk1") == {
        "image": "disk1", "size": 64 * MiB}
    assert rbd.parse_info(rec("rbd/info-snapshot.json"), "disk1@s1") == {
        "image": "disk1", "size": 64 * MiB, "snapshot": "s1"}


def test_rbd_du() -> None:
    assert rbd.parse_du(rec("rbd/du-image.json")) == {
        ("disk1", "s1"): 64 * MiB, ("disk1", "before upgrade"): 0, ("disk1", ""): 0}


def test_rbd_snapshots_watchers_lockers() -> None:
    assert rbd.parse_snapshots(rec("rbd/snap-ls.json")) == ["s1", "before upgrade"]
    assert rbd.parse_snapshots(rec("rbd/snap-ls-none.json")) == []
    assert rbd.parse_watchers(rec("rbd/status.json")) == []
    assert rbd.parse_lockers(rec("rados/lock-info.json")) == [
        {"name": "client.4258", "cookie": "host1/abc"}]
    assert rbd.parse_lockers("") == []


def test_rbd_watchers_hand_made() -> None:
    # rbd status of an image held open, shaped as Ceph 16 prints it (hand-made: the
    # recording has no watcher)
    text = ('{"watchers":[{"address":"127.0.0.1:0/1234","client":4321,"cookie":1},'
            '{"client":5}]}')
    assert rbd.parse_watchers(text) == ["127.0.0.1:0/1234"]


@pytest.mark.parametrize(("parse", "text"), [
    (rbd.parse_ls, "{}"),
    (rbd.parse_ls, '[{"image": "a"}]'),
    (rbd.parse_ls, '[{"image": "a", "size": "1x"}]'),
    (rbd.parse_ls, '[{"image": "a", "size": 1, "snapshot": 3}]'),
    (rbd.parse_ls, rec("rbd/ls-l.json")[:50]),
    (lambda t: rbd.parse_info(t, "a"), "rbd: error opening image"),
    (lambda t: rbd.parse_info(t, "a"), '{"name": "a"}'),
    (rbd.parse_du, '{"images": [{"name": "a"}]}'),
    (rbd.parse_du, '{"images": {}}'),
    (lambda t: rbd.parse_df(t, "p"), '{"pools": []}'),
    (lambda t: rbd.parse_df(t, "p"), '{"pools": [{"name": "p"}], "total_space": 1, '
                                      '"total_avail": 1}'),
    (rbd.parse_lockers, '{"lockers": [{"name": "c"}]}'),
    (rbd.parse_snapshots, "{}"),
    (rbd.parse_watchers, '{"watchers": 1}'),
])
def test_rbd_malformed(parse: Callable[[str], object], text: str) -> None:
    with pytest.raises(BackendFailed, match="unexpected output"):
        parse(text)


@pytest.mark.parametrize(("case", "error", "says"), [
    ("rbd/info-missing.stderr.txt", NotFound, "No such file or directory"),
    ("rbd/rm-with-snapshots.stderr.txt", NotEmpty, "has snapshots"),
    ("rbd/create-exists.stderr.txt", Exists, "File exists"),
    ("rados/lock-get-held.stderr.txt", Busy, "Device or resource busy"),
    ("rados/lock-info-missing.stderr.txt", NotFound, "No such file or directory"),
])
def test_rbd_errors(case: str, error: type[VsfsError], says: str) -> None:
    e = rbd._rbd_error(failed(rec(case)), "x")
    assert type(e) is error and says in e.message


# ---------------------------------------------------------------- iSCSI


def test_sendtargets() -> None:
    assert iscsi.parse_sendtargets(rec("iscsiadm/discovery.txt")) == {
        "iqn.2003-01.org.example:vsfs-t1": ["127.0.0.1:3260"],
        "iqn.2003-01.org.example:vsfs-t2": ["127.0.0.1:3260"]}
    assert iscsi.parse_sendtargets(rec("iscsiadm/discovery-nonpersistent.txt")) == \
        iscsi.parse_sendtargets(rec("iscsiadm/discovery.txt"))
    # hand-made: an IPv6 portal, two portals of one target, a line that is no target
    assert iscsi.parse_sendtargets(
        "[::1]:3260,1 iqn.2003-01.org.example:t\n10.0.0.1:3260,2 iqn.2003-01.org.example:t\n"
        "iscsiadm: something else\n") == {
            "iqn.2003-01.org.example:t": ["[::1]:3260", "10.0.0.1:3260"]}
    assert iscsi.parse_sendtargets("") == {}


def test_iscsiadm_exit_statuses_recorded() -> None:
    # the statuses _iscsi_error tells apart, as iscsiadm really returned them (a refused
    # portal is 11, ISCSI_ERR_PDU_TIMEOUT: told by its stderr, not its status)
    assert [int(rec(f"iscsiadm/{case}.rc")) for case in (
        "node-missing", "login-badchap", "discovery-noiscsid", "discovery-refused")] == [
        iscsi.ERR_NO_OBJS_FOUND, iscsi.ERR_LOGIN_AUTH_FAILED, iscsi.ERR_ISCSID_NOTCONN, 11]


@pytest.mark.parametrize(("case", "rc", "error", "says"), [
    ("iscsiadm/discovery-refused.stderr.txt", 11, BackendFailed, "cannot reach the portal"),
    ("iscsiadm/node-missing.stderr.txt", 21, NotFound, "No records found"),
    ("iscsiadm/login-again.stderr.txt", 15, BackendFailed, "1 already present"),
    ("iscsiadm/login-badchap.stderr.txt", 24, Denied, "authorization failure"),
    ("iscsiadm/discovery-noiscsid.stderr.txt", 20, BackendFailed, "iscsid is not running"),
])
def test_iscsiadm_errors(case: str, rc: int, error: type[VsfsError], says: str) -> None:
    e = iscsi._iscsi_error(failed(rec(case), rc), "x")
    assert type(e) is error and says in e.message


def test_iscsi_ls() -> None:
    assert iscsi_direct.parse_iscsi_ls(rec("iscsi-ls/show-luns.txt")) == {
        "iqn.2003-01.org.example:other": [1], "iqn.2003-01.org.example:vsfs-t1": [1, 2]}
    assert iscsi_direct.parse_iscsi_ls(rec("iscsi-ls/targets.txt")) == {
        "iqn.2003-01.org.example:other": [], "iqn.2003-01.org.example:vsfs-t1": []}
    assert iscsi_direct.parse_iscsi_ls("") == {}
    assert iscsi_direct.parse_iscsi_ls("Lun:1 Type:DIRECT_ACCESS\n") == {}  # no target yet


def test_readcapacity() -> None:
    assert iscsi_direct.parse_readcapacity(rec("iscsi-readcapacity16/lun2.txt"), "x") == 40 * MiB
    for text in ("", rec("iscsi-readcapacity16/nolun.stderr.txt"), "Total size:\n",
                 "Total size:12x\n"):
        with pytest.raises(BackendFailed, match="gave no size"):
            iscsi_direct.parse_readcapacity(text, "x")


def test_libiscsi_errors() -> None:
    e = iscsi_direct._libiscsi_error(failed(rec("iscsi-ls/unreachable.stderr.txt")), "x")
    assert "cannot reach the portal" in e.message
    e = iscsi_direct._libiscsi_error(failed(rec("iscsi-readcapacity16/nolun.stderr.txt")), "x")
    assert "LOGICAL_UNIT_NOT_SUPPORTED" in e.message


# ---------------------------------------------------------------- QMP (qsd.py)


def test_qmp() -> None:
    lines = rec("qmp/session.txt").encode().splitlines()
    msgs = [qsd.parse_qmp(line) for line in lines]
    assert "QMP" in msgs[0] and msgs[1] == {"return": {}} and msgs[3] == {"return": []}
    assert msgs[2]["error"]["class"] == "GenericError"
    for bad in (b"", b"[]", b"\xff{", lines[0][:20]):
        with pytest.raises(BackendFailed, match="monitor: unexpected output"):
            qsd.parse_qmp(bad)


# ---------------------------------------------------------------- showmount (netfs.py)

EXPORTS = ["/run/vsfs-nfs/a", "/run/vsfs-nfs/c", "/run/vsfs-nfs", "/run/vsfs-nfs/with space"]


@pytest.mark.parametrize(("case", "paths"), [
    ("exports.txt", EXPORTS),
    ("exports-headers.txt", EXPORTS),  # without --no-headers: the header is left out
])
def test_showmount(case: str, paths: list[str]) -> None:
    assert netfs.parse_showmount(rec(f"showmount/{case}")) == paths


@pytest.mark.parametrize(("text", "paths"), [
    ("", []),
    (rec("showmount/no-mountd.stderr.txt"), []),
    ("/lonely\n", ["/lonely"]),  # no clients column: the whole line
    ("\n\n/a b c\n", ["/a b"]),
])
def test_showmount_odd(text: str, paths: list[str]) -> None:
    assert netfs.parse_showmount(text) == paths


# ---------------------------------------------------------------- argv built from pool XML

NFS = ("<pool type='netfs'><name>n</name><source><host name='nfs.example'{port}/>"
       "<dir path='/srv/x'/><format type='{fmt}'/>{ver}</source>"
       "<target><path>/mnt/n</path></target></pool>")


@pytest.mark.parametrize(("fmt", "port", "ver", "argv"), [
    ("auto", "", "", ["mount", "-t", "nfs", "nfs.example:/srv/x", "/mnt/n"]),
    ("nfs", " port='2049'", "<protocol ver='4.2'/>",
     ["mount", "-t", "nfs4", "-o", "vers=4.2,port=2049", "nfs.example:/srv/x", "/mnt/n"]),
    ("nfs", "", "<protocol ver='3'/>",
     ["mount", "-t", "nfs", "-o", "vers=3", "nfs.example:/srv/x", "/mnt/n"]),
])
def test_netfs_mount_argv(fmt: str, port: str, ver: str, argv: list[str]) -> None:
    pool = parse_pool(NFS.format(fmt=fmt, port=port, ver=ver).encode())
    assert netfs.NetfsBackend(pool)._argv() == argv


def test_iscsiadm_node_argv() -> None:
    xml = ("<pool type='iscsi'><name>s</name><source><host name='127.0.0.1'/>"
           "<device path='iqn.2003-01.org.example:vsfs-t1'/>{init}</source>"
           "<target><path>/dev/disk/by-path</path></target></pool>")
    plain = iscsi.IscsiBackend(parse_pool(xml.format(init="").encode()))
    assert plain._node_argv("127.0.0.1:3260") == [
        "iscsiadm", "--mode", "node", "--targetname", "iqn.2003-01.org.example:vsfs-t1",
        "--portal", "127.0.0.1:3260"]
    named = iscsi.IscsiBackend(parse_pool(xml.format(
        init="<initiator><iqn name='iqn.2003-01.org.example:me'/></initiator>").encode()))
    assert named._node_argv("127.0.0.1:3260")[-2:] == ["--interface", named.iface]
