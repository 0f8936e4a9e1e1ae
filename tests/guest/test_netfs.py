"""netfs pools against the guest kernel's own NFS server on 127.0.0.1, through the mount."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from rng import assert_sources_make_pools
from support import Mount, sh

pytestmark = [pytest.mark.guest, pytest.mark.fuse, pytest.mark.root]

EXPORT = Path("/run/vsfs-nfs-export")


@pytest.fixture
def nfs_export() -> Iterator[Path]:
    """An NFSv4 export of a tmpfs (the guest's overlay root cannot be exported)."""
    sh("modprobe nfsd && (mountpoint -q /proc/fs/nfsd || mount -t nfsd nfsd /proc/fs/nfsd)",
       check=True)
    EXPORT.mkdir(parents=True, exist_ok=True)
    Path("/var/lib/nfs/v4recovery").mkdir(parents=True, exist_ok=True)
    sh(f"mount -t tmpfs -o size=256m vsfs-nfs {EXPORT}", check=True)
    Path("/etc/exports").write_text("")
    sh(f"exportfs -o rw,fsid=0,no_subtree_check,no_root_squash,insecure 127.0.0.1:{EXPORT}",
       check=True)
    # mountd answers the kernel's export lookups, NFSv4 too (no rpcbind needed for v4)
    mountd = subprocess.Popen(["rpc.mountd", "-F", "-N", "3", "--no-udp"])
    sh("rpc.nfsd -N 3 -U 4", check=True)
    try:
        yield EXPORT
    finally:
        subprocess.run(["rpc.nfsd", "0"], check=False)
        mountd.terminate()
        mountd.wait(timeout=30)
        subprocess.run(["exportfs", "-ua"], check=False)
        subprocess.run(["umount", "-l", str(EXPORT)], check=False)


def test_netfs_pool(vsfs: Mount, nfs_export: Path) -> None:
    target = vsfs.base / "nfsmnt"
    n = vsfs.define("<pool type='netfs'><name>n</name><source><host name='127.0.0.1'/>"
                    "<dir path='/'/><format type='nfs'/><protocol ver='4.2'/></source>"
                    f"<target><path>{target}</path></target></pool>")
    sh(f"echo build > {n}/ctl && echo start > {n}/ctl", check=True)
    mnt = sh(f"findmnt -n -o SOURCE,FSTYPE,OPTIONS {target}", check=True).stdout
    assert mnt.startswith("127.0.0.1:/ nfs4") and "vers=4.2" in mnt
    sh(f"truncate -s 64M {n}/volumes/a.img", check=True)
    assert (nfs_export / "a.img").stat().st_size == 64 << 20
    sh(f"echo 'snapshot s' > {n}/volinfo/a.img/ctl && echo 'clone c' > {n}/volinfo/a.img/ctl",
       check=True)
    assert sorted(os.listdir(n / "volumes")) == ["a.img", "c", "s"]
    # files the server side gets from elsewhere appear after a refresh
    (nfs_export / "outside.raw").write_bytes(b"\0" * 4096)
    sh(f"echo refresh > {n}/ctl", check=True)
    assert "outside.raw" in os.listdir(n / "volumes")
    sh(f"rm {n}/volumes/s", check=True)
    assert not (nfs_export / "s").exists()
    sh(f"echo stop > {n}/ctl", check=True)
    assert sh(f"findmnt -n {target}").stdout == ""
    assert (nfs_export / "a.img").exists(), "stop unmounts; the export's files stay"


def test_netfs_refusals(vsfs: Mount) -> None:
    b = vsfs.define("<pool type='netfs'><name>b</name><source><host name='127.0.0.1'/>"
                    "<dir path='/share'/><format type='cifs'/></source>"
                    f"<target><path>{vsfs.base}/b</path></target></pool>")
    res = sh(f"echo start > {b}/ctl")
    assert "Operation not supported" in res.stderr
    assert "mount.cifs" in vsfs.error()
    assert not (vsfs.base / "b").exists()


@pytest.fixture
def nfs3_server() -> Iterator[list[Path]]:
    """Two exports of an NFSv3 server whose mountd answers through rpcbind (showmount)."""
    sh("modprobe nfsd && (mountpoint -q /proc/fs/nfsd || mount -t nfsd nfsd /proc/fs/nfsd)",
       check=True)
    exports = [Path("/run/vsfs-nfs3-a"), Path("/run/vsfs-nfs3 b")]
    Path("/etc/exports").write_text("")
    for i, export in enumerate(exports, start=1):
        export.mkdir(parents=True, exist_ok=True)
        sh(f"mount -t tmpfs -o size=16m vsfs-nfs3 '{export}'", check=True)
        sh(f"exportfs -o rw,fsid={i},no_subtree_check 127.0.0.1:'{export}'", check=True)
    procs = [subprocess.Popen(["rpcbind", "-f", "-w"], start_new_session=True)]
    sh("for i in $(seq 50); do rpcinfo -p 127.0.0.1 >/dev/null 2>&1 && break; sleep 0.1; done",
       check=True)
    procs.append(subprocess.Popen(["rpc.mountd", "-F", "--no-udp"], start_new_session=True))
    sh("rpc.nfsd 2", check=True)
    sh("for i in $(seq 50); do rpcinfo -p 127.0.0.1 | grep -q mountd && break; sleep 0.1; "
       "done", check=True)
    try:
        yield exports
    finally:
        subprocess.run(["rpc.nfsd", "0"], check=False)
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(timeout=30)
        subprocess.run(["exportfs", "-ua"], check=False)
        for export in exports:
            subprocess.run(["umount", "-l", str(export)], check=False)


def test_sources_netfs(vsfs: Mount, nfs3_server: list[Path]) -> None:
    src = vsfs.path / "sources"
    xml = (src / "netfs?host=127.0.0.1").read_bytes()
    assert_sources_make_pools(xml, "netfs", "<target><path>/mnt/x</path></target>")
    text = xml.decode()
    for export in nfs3_server:
        assert f"<dir path=\"{export}\"/>" in text
    assert text.count("<host name=\"127.0.0.1\"/>") == 2 and "<format type=\"nfs\"/>" in text
    # the written form, also as the <source> document virsh takes
    assert "Invalid argument" in sh(f"cat {src}/netfs").stderr
    assert "name the server" in vsfs.error()
    sh(f"echo 127.0.0.1 > {src}/netfs", check=True)
    assert (src / "netfs").read_bytes() == xml
    sh(f"echo \"<source><host name='127.0.0.1'/></source>\" > {src}/netfs", check=True)
    assert (src / "netfs").read_bytes() == xml
    assert "Invalid argument" in sh(f"echo 'a b' > {src}/netfs").stderr
    assert "Invalid argument" in sh(f"cat '{src}/netfs?hots=127.0.0.1'").stderr
    assert "bad query" in vsfs.error()


def test_sources_netfs_v4_only(vsfs: Mount, nfs_export: Path) -> None:
    """A v4-only server has no mountd on rpcbind to list exports: a clear EIO."""
    res = sh(f"cat '{vsfs.path}/sources/netfs?host=127.0.0.1'")
    assert "Input/output error" in res.stderr
    assert "rpcbind" in vsfs.error()
