"""iscsi-direct pools (libiscsi, no kernel initiator) against a tgtd target on 127.0.0.1.

The LUNs are files on the host; bytes written through a volume's local path (a
qemu-storage-daemon export using QEMU's iscsi driver) are read back from those files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from holders import holding, still_works
from rng import assert_sources_make_pools, assert_valid
from support import Mount, free_port, sh

pytestmark = [pytest.mark.fuse, pytest.mark.root]

MiB = 1 << 20
IQN = "iqn.2003-01.org.example:vsfs-direct"
INITIATOR = "iqn.2024-01.org.example:vsfs-test"
REQUIRED = ("tgtd", "tgtadm", "iscsi-ls", "iscsi-readcapacity16", "qemu-storage-daemon")


class Tgt:
    """A tgtd on a free portal and control port, with file-backed LUNs."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.port = free_port()
        self.control = free_port() % 10000 + 20000  # tgtd's own socket number
        self.proc: subprocess.Popen[bytes] | None = None

    def adm(self, *args: str) -> None:
        subprocess.run(["tgtadm", "--lld", "iscsi", "-C", str(self.control), *args],
                       check=True, capture_output=True, timeout=30)

    def start(self, sizes_mib: tuple[int, ...], chap: tuple[str, str] | None = None) -> list[Path]:
        self.proc = subprocess.Popen(
            ["tgtd", "-f", "--iscsi", f"portal=127.0.0.1:{self.port}",
             "--control-port", str(self.control)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.adm("--op", "show", "--mode", "sys")
                break
            except subprocess.CalledProcessError:
                assert time.monotonic() < deadline, "tgtd did not come up"
                time.sleep(0.1)
        self.adm("--op", "new", "--mode", "target", "--tid", "1", "-T", IQN)
        files = []
        for lun, size in enumerate(sizes_mib, start=1):
            f = self.base / f"lun{lun}.img"
            with open(f, "wb") as fh:
                fh.truncate(size * MiB)
            self.adm("--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", str(lun),
                     "-b", str(f))
            files.append(f)
        self.adm("--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL")
        if chap:
            self.adm("--op", "new", "--mode", "account", "--user", chap[0],
                     "--password", chap[1])
            self.adm("--op", "bind", "--mode", "account", "--tid", "1", "--user", chap[0])
        return files

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def tgt(tmp_path: Path) -> Iterator[Tgt]:
    missing = [t for t in REQUIRED if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run .ci/setup --test")
    t = Tgt(tmp_path)
    try:
        yield t
    finally:
        t.stop()


def direct_xml(t: Tgt, name: str = "direct", extra: str = "") -> str:
    return (f"<pool type='iscsi-direct'><name>{name}</name><source>"
            f"<host name='127.0.0.1' port='{t.port}'/><device path='{IQN}'/>"
            f"<initiator><iqn name='{INITIATOR}'/></initiator>{extra}</source></pool>")


def test_iscsi_direct_pool(vsfs: Mount, tgt: Tgt) -> None:
    files = tgt.start((64, 32))
    p = vsfs.define(direct_xml(tgt))
    sh(f"echo start > {p}/ctl", check=True)
    try:
        assert sorted(os.listdir(p / "volumes")) == ["unit:0:0:1", "unit:0:0:2"]
        assert (p / "volinfo/unit:0:0:1/capacity").read_text() == f"{64 * MiB}\n"
        assert (p / "volinfo/unit:0:0:2/capacity").read_text() == f"{32 * MiB}\n"
        key = f"ip-127.0.0.1:{tgt.port}-iscsi-{IQN}-lun-1"
        assert (p / "volinfo/unit:0:0:1/key").read_text() == f"{key}\n"
        xml = (p / "volinfo/unit:0:0:1/xml").read_text()
        assert_valid(xml, "storagevol")
        assert f"<path>{key}</path>" in xml and 'type="network"' in xml
        assert_valid((p / "xml").read_bytes(), "storagepool")
        assert (p / "capacity").read_text() == f"{96 * MiB}\n"
        assert (p / "free").read_text() == "0\n"

        # bytes through the local path reach the LUN's file, and the reverse
        data = os.urandom(2 * MiB)
        (vsfs.base / "data").write_bytes(data)
        sh(f"dd if={vsfs.base}/data of={p}/volumes/unit:0:0:2 bs=1M conv=notrunc,fsync "
           "status=none", check=True)
        with open(files[1], "rb") as f:
            assert f.read(2 * MiB) == data
        other = os.urandom(MiB)
        with open(files[0], "r+b") as f:
            f.write(other)
        with open(p / "volumes/unit:0:0:1", "rb") as f:
            assert f.read(MiB) == other
        assert "raw" in sh(f"qemu-img info {p}/volumes/unit:0:0:1", check=True).stdout

        for cmd in (f"truncate -s 1M {p}/volumes/new", f"rm {p}/volumes/unit:0:0:1",
                    f"echo 128M > {p}/volinfo/unit:0:0:1/capacity"):
            res = sh(cmd)
            assert res.returncode != 0 and "Operation not supported" in res.stderr, cmd
        sh(f"echo wipe > {p}/volinfo/unit:0:0:2/ctl", check=True)
        with open(files[1], "rb") as f:
            assert f.read() == bytes(32 * MiB)
    finally:
        sh(f"echo stop > {p}/ctl", check=True)
    assert os.listdir(p / "volumes") == []

    # the targets a portal offers, asked without a kernel initiator
    query = f"host=127.0.0.1&port={tgt.port}&initiator={INITIATOR}"
    src = vsfs.path / "sources" / f"iscsi-direct?{query}"
    xml_sources = src.read_bytes()
    assert IQN in xml_sources.decode()
    assert_sources_make_pools(xml_sources, "iscsi-direct", "")


def test_iscsi_direct_chap_and_refusals(vsfs: Mount, tgt: Tgt) -> None:
    tgt.start((16,), chap=("vsfsuser", "Direct-pass-123"))
    pw = vsfs.base / "pw"
    pw.write_text("Direct-pass-123\n")
    pw.chmod(0o600)
    auth = f"<auth type='chap' username='vsfsuser'><secret usage='{pw}'/></auth>"
    p = vsfs.define(direct_xml(tgt, "chap", auth))
    sh(f"echo start > {p}/ctl", check=True)
    assert (p / "volumes/unit:0:0:1").read_bytes() == bytes(16 * MiB)
    sh(f"echo stop > {p}/ctl", check=True)
    assert "Direct-pass-123" not in vsfs.log.read_text()

    bad = vsfs.base / "bad"
    bad.write_text("wrong-password")
    bad.chmod(0o600)
    q = vsfs.define(direct_xml(tgt, "bad", f"<auth type='chap' username='vsfsuser'>"
                                          f"<secret usage='{bad}'/></auth>"))
    res = sh(f"echo start > {q}/ctl")
    assert res.returncode != 0 and (q / "state").read_text() == "inactive\n"

    xml = vsfs.base / "noinit.xml"
    xml.write_text("<pool type='iscsi-direct'><name>x</name><source><host name='127.0.0.1'/>"
                   f"<device path='{IQN}'/></source></pool>")
    res = sh(f"cat {xml} > {vsfs.path}/pools/define")
    assert "Invalid argument" in res.stderr and "initiator" in vsfs.error()


def test_iscsi_direct_volume_in_use(vsfs: Mount, tgt: Tgt) -> None:
    """A LUN whose local path (its export) a process holds open is in use: wipe and the
    pool's stop are EBUSY and change nothing; once closed, they work."""
    files = tgt.start((16, 8))
    data = os.urandom(MiB)
    with open(files[0], "r+b") as f:
        f.write(data)
    p = vsfs.define(direct_xml(tgt))
    sh(f"echo start > {p}/ctl", check=True)
    try:
        with holding(p / "volumes/unit:0:0:1") as pid:
            for cmd in (f"echo wipe > {p}/volinfo/unit:0:0:1/ctl", f"echo stop > {p}/ctl"):
                res = sh(cmd)
                assert res.returncode != 0 and "Device or resource busy" in res.stderr, cmd
                assert f"process {pid} (sleep)" in vsfs.error(), cmd
                assert "'unit:0:0:1'" in vsfs.error(), cmd
            # nothing changed: the pool runs, the LUN keeps its bytes, the holder reads them
            assert (p / "state").read_text() == "running\n"
            with open(files[0], "rb") as f:
                assert f.read(MiB) == data
            assert still_works(pid)[:16] == data[:16]
            # another LUN nobody holds is wiped as usual
            sh(f"echo wipe > {p}/volinfo/unit:0:0:2/ctl", check=True)
        sh(f"echo wipe > {p}/volinfo/unit:0:0:1/ctl", check=True)
        with open(files[0], "rb") as f:
            assert f.read(MiB) == bytes(MiB)
        with holding(p / "volumes/unit:0:0:2", "<") as pid:
            assert "Device or resource busy" in sh(f"echo stop > {p}/ctl").stderr
            assert f"process {pid} (sleep)" in vsfs.error()
            assert (p / "state").read_text() == "running\n"
    finally:
        sh(f"echo stop > {p}/ctl", check=True)
    assert (p / "state").read_text() == "inactive\n"
