"""A throw-away single-node Ceph cluster on 127.0.0.1 for the rbd tests.

One monitor (msgr2 only, on a free port), one manager (pool statistics come from it) and one
OSD on memstore (RAM, 1 GiB unless told otherwise), no cephx, pools of size 1. Every file
lives under one directory; every daemon is ended by the PID it wrote.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

from support import free_port

DAEMONS = ("osd.0", "mgr.x", "mon.a")
# What the Ceph tier needs on PATH (.ci/setup --test installs it).
CEPH_TOOLS = ("ceph-mon", "ceph-osd", "ceph-mgr", "rbd", "rados", "qemu-storage-daemon")


class CephCluster:
    def __init__(self, base: Path, pool: str = "vsfs", device_bytes: int = 1 << 30) -> None:
        self.dir = base
        self.pool = pool
        self.device_bytes = device_bytes
        self.port = free_port()
        self.conf = base / "ceph.conf"

    def cli(self, *args: str, check: bool = True, stdin: bytes | None = None,
            ) -> subprocess.CompletedProcess[bytes]:
        """Run a Ceph tool (ceph, rbd, rados) against this cluster."""
        res = subprocess.run([args[0], "--conf", str(self.conf), *args[1:]], input=stdin,
                             capture_output=True, timeout=120, check=False)
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed: {res.stderr.decode()}")
        return res

    def start(self) -> None:
        d = self.dir
        if d.exists():
            shutil.rmtree(d)
        for sub in ("run", "log", "mon/ceph-a", "osd/ceph-0", "mgr/ceph-x"):
            (d / sub).mkdir(parents=True)
        fsid = str(uuid.uuid4())
        self.conf.write_text(f"""[global]
fsid = {fsid}
mon_host = v2:127.0.0.1:{self.port}
public_addr = 127.0.0.1
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
ms_bind_msgr1 = false
ms_bind_msgr2 = true
osd_objectstore = memstore
memstore_device_bytes = {self.device_bytes}
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_crush_chooseleaf_type = 0
run_dir = {d}/run
log_file = {d}/log/$name.log
mon_data = {d}/mon/$cluster-$id
osd_data = {d}/osd/$cluster-$id
mgr_data = {d}/mgr/$cluster-$id
admin_socket = {d}/run/$name.asok
pid_file = {d}/run/$name.pid
keyring = /dev/null
""")
        conf = ["--conf", str(self.conf)]

        def sh(*argv: str) -> None:
            subprocess.run(argv, check=True, capture_output=True, timeout=120)

        sh("monmaptool", "--create", "--add", "a", f"v2:127.0.0.1:{self.port}", "--fsid", fsid,
           str(d / "monmap"))
        sh("ceph-authtool", "--create-keyring", str(d / "mon.keyring"), "--gen-key", "-n",
           "mon.", "--cap", "mon", "allow *")
        sh("ceph-mon", *conf, "--mkfs", "-i", "a", "--monmap", str(d / "monmap"), "--keyring",
           str(d / "mon.keyring"))
        sh("ceph-mon", *conf, "-i", "a")
        self.cli("ceph", "osd", "create")
        sh("ceph-osd", *conf, "-i", "0", "--mkfs")
        sh("ceph-osd", *conf, "-i", "0")
        sh("ceph-mgr", *conf, "-i", "x")
        self.wait("osd up", lambda: b"1 up" in self.cli("ceph", "osd", "stat").stdout)
        self.cli("ceph", "osd", "pool", "create", self.pool, "8")
        self.cli("rbd", "pool", "init", self.pool)
        # Pool statistics come from the manager: wait until it reports them.
        self.wait("pool statistics", lambda: f'"name":"{self.pool}"'.encode()
                  in self.cli("rados", "df", "--format", "json").stdout)

    @staticmethod
    def wait(what: str, ready: object, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not ready():  # type: ignore[operator]
            if time.monotonic() > deadline:
                raise AssertionError(f"ceph: no {what} after {timeout:g} s")
            time.sleep(0.2)

    def stop(self) -> None:
        for name in DAEMONS:
            pidfile = self.dir / "run" / f"{name}.pid"
            with contextlib.suppress(OSError, ValueError):
                pid = int(pidfile.read_text())
                os.kill(pid, signal.SIGTERM)
                for _ in range(100):
                    os.kill(pid, 0)
                    time.sleep(0.1)
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)


def rbd_export(ceph: CephCluster, image: str) -> bytes:
    """An image's bytes, as Ceph's own `rbd export` reads them."""
    return ceph.cli("rbd", "export", "--no-progress", f"{ceph.pool}/{image}", "-").stdout
