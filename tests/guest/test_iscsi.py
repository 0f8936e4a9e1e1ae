"""iscsi pools and sources/iscsi, in the guest: a LIO target on 127.0.0.1 (python3-rtslib-fb)
and the kernel's open-iscsi initiator, through the mount."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from holders import holding, still_works
from rng import assert_sources_make_pools, assert_valid
from support import Mount, MountFactory, sh

pytestmark = [pytest.mark.guest, pytest.mark.fuse, pytest.mark.root]

MiB = 1 << 20
IQN = "iqn.2003-01.org.example:vsfs-t1"
LIO = Path(__file__).with_name("lio_target.py")
LUNS = Path("/run/vsfs-lio")
PASSWORD = "Sesame-0pen-1234"
BYPATH = f"/dev/disk/by-path/ip-127.0.0.1:3260-iscsi-{IQN}-lun-"


def lio(*args: str) -> None:
    # rtslib-fb is Debian's package: the system Python, not the venv.
    sh(f"/usr/bin/python3 {LIO} {' '.join(args)}", check=True)


def sessions() -> str:
    return sh("iscsiadm -m session").stdout


@pytest.fixture(scope="module")
def iscsid() -> Iterator[None]:
    sh("modprobe -a iscsi_tcp target_core_mod iscsi_target_mod target_core_file", check=True)
    # its own session: iscsid signals its whole process group when it shuts down
    proc = subprocess.Popen(["iscsid", "-f"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 20
    while sh("iscsiadm -m session").returncode not in (0, 21):  # 21: no sessions yet
        assert time.monotonic() < deadline, "iscsid did not come up"
        time.sleep(0.2)
    try:
        yield
    finally:
        sh("iscsiadm -m node -u")
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def target(iscsid: None) -> Iterator[Callable[..., list[Path]]]:
    """Makes the LIO target (LUN files of the sizes given, optional CHAP); removes it all."""
    made: list[str] = []

    def make(*sizes_mib: int, chap: str | None = None) -> list[Path]:
        LUNS.mkdir(exist_ok=True)
        files = [LUNS / f"lun{i}.img" for i in range(len(sizes_mib))]
        luns = [f"{f}:{s}" for f, s in zip(files, sizes_mib, strict=True)]
        lio("create", IQN, *luns, *(["--chap", chap] if chap else []))
        made.append(IQN)
        return files

    yield make
    sh(f"iscsiadm -m node -T {IQN} -u")
    sh(f"iscsiadm -m node -T {IQN} -o delete")
    for iqn in made:
        lio("delete", iqn)


def define(m: Mount, name: str = "san", extra: str = "", iqn: str = IQN,
           port: int = 3260) -> Path:
    return m.define(f"<pool type='iscsi'><name>{name}</name><source>"
                    f"<host name='127.0.0.1' port='{port}'/><device path='{iqn}'/>{extra}"
                    "</source><target><path>/dev/disk/by-path</path></target></pool>")


def start_refused(m: Mount, pool: Path, errno_text: str, reason: str) -> None:
    """`start` fails with that errno and reason, and leaves no session behind."""
    res = sh(f"echo start > {pool}/ctl")
    assert errno_text in res.stderr
    assert reason in m.error()
    assert IQN not in sessions()
    assert (pool / "state").read_text() == "inactive\n"


def udev_serial(dev: str) -> str:
    out = sh(f"udevadm info --query=property --name={dev}", check=True).stdout
    return next(line.split("=", 1)[1] for line in out.splitlines()
                if line.startswith("ID_SERIAL="))


def test_iscsi_pool_lifecycle(vsfs: Mount, target: Callable[..., list[Path]]) -> None:
    files = target(64, 32)
    p = define(vsfs)
    sh(f"echo start > {p}/ctl", check=True)
    assert IQN in sessions()
    assert sorted(os.listdir(p / "volumes")) == ["unit:0:0:0", "unit:0:0:1"]
    for lun, size in ((0, 64), (1, 32)):
        name = f"unit:0:0:{lun}"
        link = p / "volumes" / name
        assert os.readlink(link) == f"{BYPATH}{lun}"
        assert (p / "volinfo" / name / "capacity").read_text() == f"{size * MiB}\n"
        assert (p / "volinfo" / name / "path").read_text() == f"{BYPATH}{lun}\n"
        # libvirt's key: the SCSI id as udev's scsi_id spells it
        key = (p / "volinfo" / name / "key").read_text().strip()
        assert key == udev_serial(os.path.realpath(link))
        assert_valid((p / "volinfo" / name / "xml").read_bytes(), "storagevol")
    assert (p / "capacity").read_text() == f"{96 * MiB}\n"
    assert (p / "allocation").read_text() == f"{96 * MiB}\n"
    assert (p / "free").read_text() == "0\n"
    assert_valid((p / "xml").read_bytes(), "storagepool")
    assert (p / "type").read_text() == "iscsi\n"

    # bytes written through the volume's path land in the target's LUN file
    sh(f"head -c 1M /dev/urandom > {vsfs.base}/data", check=True)
    sh(f"dd if={vsfs.base}/data of={p}/volumes/unit:0:0:1 bs=1M oflag=direct status=none",
       check=True)
    sh(f"cmp -n {MiB} {vsfs.base}/data {files[1]}", check=True)
    assert sh(f"qemu-img info {p}/volumes/unit:0:0:0").returncode == 0

    # the LUN set is the target's: nothing is created, deleted or renamed here
    for cmd in (f"truncate -s 1M {p}/volumes/new", f"rm {p}/volumes/unit:0:0:0",
                f"mv {p}/volumes/unit:0:0:0 {p}/volumes/x",
                f"echo 128M > {p}/volinfo/unit:0:0:0/capacity",
                f"echo 'snapshot s' > {p}/volinfo/unit:0:0:0/ctl"):
        res = sh(cmd)
        assert res.returncode != 0 and "Operation not supported" in res.stderr, cmd
    assert sorted(os.listdir(p / "volumes")) == ["unit:0:0:0", "unit:0:0:1"]

    # clone a LUN into a dir pool, then wipe it
    d = vsfs.dir_pool("d")
    sh(f"echo 'clone copy d' > {p}/volinfo/unit:0:0:1/ctl", check=True)
    sh(f"cmp {d}/copy {files[1]}", check=True)
    sh(f"echo wipe > {p}/volinfo/unit:0:0:1/ctl", check=True)
    sh(f"cmp -n {32 * MiB} /dev/zero {p}/volumes/unit:0:0:1", check=True)

    # a LUN added on the target shows after refresh
    lio("add-lun", IQN, f"{LUNS}/lun2.img:16")
    sh(f"echo refresh > {p}/ctl", check=True)
    assert "unit:0:0:2" in os.listdir(p / "volumes")
    assert (p / "capacity").read_text() == f"{112 * MiB}\n"
    # ... and one that another tool's rescan brings shows by itself, within the poll
    lio("add-lun", IQN, f"{LUNS}/lun3.img:8")
    sh("iscsiadm -m session --rescan", check=True)
    deadline = time.monotonic() + 10
    while "unit:0:0:3" not in os.listdir(p / "volumes"):
        assert time.monotonic() < deadline, "a LUN that appeared was not picked up"
        time.sleep(0.2)
    assert (p / "volinfo" / "unit:0:0:3" / "capacity").read_text() == f"{8 * MiB}\n"

    # in use: stop refuses and keeps the session
    sh(f"mkfs.ext4 -q {p}/volumes/unit:0:0:0", check=True)
    mnt = vsfs.base / "m"
    mnt.mkdir()
    sh(f"mount {p}/volumes/unit:0:0:0 {mnt}", check=True)
    try:
        res = sh(f"echo stop > {p}/ctl")
        assert "Device or resource busy" in res.stderr
        assert "unit:0:0:0" in vsfs.error() and str(mnt) in vsfs.error()
        assert IQN in sessions()
    finally:
        sh(f"umount {mnt}", check=True)
    sh(f"echo stop > {p}/ctl", check=True)
    assert IQN not in sessions()
    assert os.listdir(p / "volumes") == []
    assert (p / "state").read_text() == "inactive\n"


def test_iscsi_session_survives_remount(mount_factory: MountFactory,
                                        target: Callable[..., list[Path]]) -> None:
    """A pool whose session exists when vsfs mounts is adopted as running; this one logs in
    with its own initiator IQN."""
    target(16)
    m = mount_factory()
    initiator = "iqn.2024-01.org.example:vsfs-host7"
    p = define(m, extra=f"<initiator><iqn name='{initiator}'/></initiator>")
    sh(f"echo start > {p}/ctl", check=True)
    assert sh("cat /sys/class/iscsi_session/*/initiatorname").stdout.split() == [initiator]
    m.kill9()
    assert IQN in sessions()
    m.start()
    assert (p / "state").read_text() == "running\n"
    assert os.listdir(p / "volumes") == ["unit:0:0:0"]
    sh(f"echo stop > {p}/ctl", check=True)
    assert IQN not in sessions()


def chap_xml(secret: str) -> str:
    return f"<auth type='chap' username='vsfsuser'><secret {secret}/></auth>"


def test_iscsi_chap(vsfs: Mount, target: Callable[..., list[Path]]) -> None:
    target(16, chap=f"vsfsuser:{PASSWORD}")
    pw = vsfs.base / "chap.pass"
    pw.write_text(PASSWORD + "\n")

    # a password file others can read is refused before anything is tried
    pw.chmod(0o644)
    p = define(vsfs, "san", chap_xml(f"usage='{pw}'"))
    start_refused(vsfs, p, "Permission denied", "chmod 600")
    pw.chmod(0o600)
    sh(f"echo start > {p}/ctl", check=True)
    assert os.listdir(p / "volumes") == ["unit:0:0:0"]
    assert PASSWORD not in (p / "xml").read_text()
    sh(f"echo stop > {p}/ctl", check=True)

    # a wrong password: EACCES, no session, nothing of the password anywhere
    bad = vsfs.base / "bad.pass"
    bad.write_text("Wrong-password-99")
    bad.chmod(0o600)
    b = define(vsfs, "bad", chap_xml(f"usage='{bad}'"))
    start_refused(vsfs, b, "Permission denied", "CHAP")

    # libvirt's secret layout in STATE/secrets, by usage and by uuid
    uuid = "4b1c0e2a-6f51-4bd4-9c73-9c5c3b8a1d01"
    secrets = vsfs.state / "secrets"
    secrets.mkdir(mode=0o700)
    (secrets / f"{uuid}.xml").write_text(
        f"<secret ephemeral='no' private='yes'><uuid>{uuid}</uuid>"
        "<usage type='iscsi'><target>san-chap</target></usage></secret>")
    sh(f"(umask 077; printf %s {PASSWORD} | base64 > {secrets}/{uuid}.base64)", check=True)
    for name, ref in (("lv1", "usage='san-chap'"), ("lv2", f"uuid='{uuid}'")):
        q = define(vsfs, name, chap_xml(ref))
        sh(f"echo start > {q}/ctl", check=True)
        assert os.listdir(q / "volumes") == ["unit:0:0:0"]
        sh(f"echo stop > {q}/ctl", check=True)
    missing = define(vsfs, "missing", chap_xml("usage='no-such-secret'"))
    start_refused(vsfs, missing, "No such file", "no-such-secret")

    log = vsfs.log.read_text()
    assert "CHAP" in log or "chap" in log.lower()
    assert PASSWORD not in log and "Wrong-password-99" not in log


def test_iscsi_refusals(vsfs: Mount, target: Callable[..., list[Path]]) -> None:
    target(16)
    p = define(vsfs, "other", iqn="iqn.2003-01.org.example:nothere")
    start_refused(vsfs, p, "No such file", IQN)  # the error lists what the portal offers
    q = define(vsfs, "closed", port=3261)
    start_refused(vsfs, q, "Input/output error", "cannot reach")
    xml = vsfs.base / "badiqn.xml"
    xml.write_text("<pool type='iscsi'><name>x</name><source><host name='127.0.0.1'/>"
                   "<device path='not-an-iqn'/></source></pool>")
    res = sh(f"cat {xml} > {vsfs.path}/pools/define")
    assert "Invalid argument" in res.stderr and "IQN" in vsfs.error()
    assert not (vsfs.path / "pools" / "x").exists()


def test_sources_iscsi(vsfs: Mount, target: Callable[..., list[Path]]) -> None:
    target(16)
    src = vsfs.path / "sources"
    xml = (src / "iscsi?host=127.0.0.1&port=3260").read_bytes()
    assert_sources_make_pools(xml, "iscsi", "<target><path>/dev/disk/by-path</path></target>")
    assert f"<device path=\"{IQN}\"/>" in xml.decode()
    assert "<host name=\"127.0.0.1\" port=\"3260\"/>" in xml.decode()
    sh(f"echo 127.0.0.1 > {src}/iscsi", check=True)
    assert IQN in (src / "iscsi").read_text()
    # nothing was logged in to, and no node records were left by the query
    assert IQN not in sessions()
    assert sh(f"iscsiadm -m node -T {IQN}").returncode != 0


def test_iscsi_lun_opened_is_in_use(vsfs: Mount, target: Callable[..., list[Path]]) -> None:
    """A LUN a process holds open, not mounted (by its stable link or as /dev/sdX), is in
    use: wipe and stop are EBUSY, the session stays and the LUN keeps its bytes."""
    files = target(16, 8)
    data = os.urandom(MiB)
    with open(files[0], "r+b") as f:
        f.write(data)
    p = define(vsfs)
    sh(f"echo start > {p}/ctl", check=True)
    dev = os.path.realpath(p / "volumes" / "unit:0:0:0")
    assert dev.startswith("/dev/sd")
    for path, redirect in ((p / "volumes" / "unit:0:0:0", "<>"), (f"{BYPATH}0", "<"),
                           (dev, "<")):
        with holding(path, redirect) as pid:
            for cmd in (f"echo stop > {p}/ctl", f"echo wipe > {p}/volinfo/unit:0:0:0/ctl"):
                res = sh(cmd)
                assert res.returncode != 0 and "Device or resource busy" in res.stderr, cmd
                assert f"process {pid} (sleep)" in vsfs.error(), (cmd, path)
                assert "unit:0:0:0" in vsfs.error(), cmd
            assert IQN in sessions()
            assert (p / "state").read_text() == "running\n"
            assert still_works(pid)[:16] == data[:16]
            with open(files[0], "rb") as f:
                assert f.read(MiB) == data
    sh(f"echo wipe > {p}/volinfo/unit:0:0:0/ctl", check=True)
    sh(f"cmp -n {16 * MiB} /dev/zero {files[0]}", check=True)
    sh(f"echo stop > {p}/ctl", check=True)
    assert IQN not in sessions()
    assert (p / "state").read_text() == "inactive\n"
