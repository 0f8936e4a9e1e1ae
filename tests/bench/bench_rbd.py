#!/usr/bin/env python3
"""Benchmark: a volume's local path against QEMU's and Ceph's own access to the image.

Run from the repository root as root, after ``.ci/setup --test`` (Ceph, QEMU)::

    .venv/bin/python tests/bench/bench_rbd.py [--size-mib N] [--workdir DIR]

One run starts a single-node Ceph cluster on 127.0.0.1 (tests/ceph_cluster.py, its OSD
in RAM), mounts vsfs with an rbd pool on it, and moves N MiB (default 1024) of random
data sequentially, 4 MiB at a time, one request in flight, four ways:

- through the volume's local path: ``dd`` with O_DIRECT (write, then read);
- QEMU straight to the cluster: ``qemu-img bench`` on ``rbd:POOL/IMAGE`` with the same
  request size, depth and cache mode as the export (QEMU's own direct access, the baseline
  of the target);
- Ceph's own tools: ``rbd import`` and ``rbd export``.

It checks the bytes (``rbd export`` of what went through the local path equals the data),
prints a table with MiB/s and the local path's ratio to QEMU's direct access, and cleans up.
Target (issue 5): the local path within 1.5x of QEMU's direct access.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for ceph_cluster

from ceph_cluster import CephCluster

BLOCK = 4 << 20
TARGET_RATIO = 1.5


def sh(*argv: str, stdin: bytes | None = None) -> float:
    """Run a command; its wall time in seconds."""
    t = time.perf_counter()
    res = subprocess.run(argv, input=stdin, capture_output=True, check=False)
    took = time.perf_counter() - t
    if res.returncode != 0:
        raise SystemExit(f"bench_rbd: {' '.join(argv)} failed: {res.stderr.decode().strip()}")
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--workdir", default="/var/tmp")
    args = ap.parse_args()
    size = args.size_mib << 20
    count = size // BLOCK
    work = Path(tempfile.mkdtemp(prefix="vsfs-bench-rbd-", dir=args.workdir))
    cluster = CephCluster(work / "ceph", device_bytes=4 * size + (1 << 30))
    mnt, state = work / "mnt", work / "state"
    mnt.mkdir()
    daemon = None
    try:
        print(f"starting Ceph ({cluster.dir}) ...", flush=True)
        cluster.start()
        conf = str(cluster.conf)
        daemon = subprocess.Popen(
            [sys.executable, "-m", "vsfs", "mount", str(mnt), "--foreground", "--state-dir",
             str(state), "--log-file", str(work / "vsfs.log"), "--log-level", "WARNING"],
            stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt):
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise SystemExit("bench_rbd: vsfs did not mount")
            time.sleep(0.05)
        (mnt / "pools" / "define").write_text(
            f"<pool type='rbd'><name>b</name><source><name>{cluster.pool}</name>"
            f"<host name='127.0.0.1' port='{cluster.port}'/></source></pool>")
        pool = mnt / "pools" / "b"
        (pool / "ctl").write_text("start\n")

        data = work / "data"
        print(f"writing {args.size_mib} MiB of random data ...", flush=True)
        with open(data, "wb") as f:
            for _ in range(count):
                f.write(os.urandom(BLOCK))
        digest = hashlib.sha256(data.read_bytes()).hexdigest()
        rbd_url = f"rbd:{cluster.pool}/direct:conf={conf}"

        rows: list[tuple[str, float, float, float]] = []
        # write
        sh("truncate", "-s", str(size), str(pool / "volumes" / "local"))
        path = os.path.realpath(pool / "volumes" / "local")
        w_local = sh("dd", f"if={data}", f"of={path}", f"bs={BLOCK}", "oflag=direct",
                     "conv=notrunc,fsync", "status=none")
        sh("rbd", "--conf", conf, "create", "--size", f"{size}B", f"{cluster.pool}/direct")
        # QEMU with the cache mode the export uses (writeback: librbd's cache on).
        w_qemu = sh("qemu-img", "bench", "-w", "-f", "raw", "-t", "writeback", "-c", str(count),
                    "-s", str(BLOCK), "-S", str(BLOCK), "-d", "1", rbd_url)
        w_rbd = sh("rbd", "--conf", conf, "import", "--no-progress", str(data),
                   f"{cluster.pool}/imported")
        rows.append(("sequential write", w_local, w_qemu, w_rbd))
        # read (the page cache of the export is bypassed with O_DIRECT)
        r_local = sh("dd", f"if={path}", "of=/dev/null", f"bs={BLOCK}", "iflag=direct",
                     "status=none")
        r_qemu = sh("qemu-img", "bench", "-f", "raw", "-t", "writeback", "-c", str(count),
                    "-s", str(BLOCK), "-S", str(BLOCK), "-d", "1", rbd_url)
        r_rbd = sh("bash", "-c", f"rbd --conf {conf} export --no-progress "
                   f"{cluster.pool}/imported - > /dev/null")
        rows.append(("sequential read", r_local, r_qemu, r_rbd))

        exported = subprocess.run(["rbd", "--conf", conf, "export", "--no-progress",
                                   f"{cluster.pool}/local", "-"], capture_output=True,
                                  check=True).stdout
        if hashlib.sha256(exported).hexdigest() != digest:
            raise SystemExit("bench_rbd: the bytes written through the local path differ")

        mib = args.size_mib
        print()
        print(f"{mib} MiB in {BLOCK >> 20} MiB requests, depth 1, "
              f"{datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}, "
              f"{platform.machine()}, {os.cpu_count()} CPUs, kernel {platform.release()}, "
              f"Ceph memstore OSD on 127.0.0.1")
        print()
        print("| operation        | local path | qemu-img bench (direct) | rbd import/export "
              "| local / direct |")
        print("|------------------|------------|-------------------------|-------------------"
              "|----------------|")
        worst = 0.0
        for op, local, qemu, rbd in rows:
            ratio = local / qemu
            worst = max(worst, ratio)
            print(f"| {op:<16} | {mib / local:6.0f} MiB/s | {mib / qemu:19.0f} MiB/s "
                  f"| {mib / rbd:11.0f} MiB/s | {ratio:13.2f}x |")
        print()
        met = "met" if worst <= TARGET_RATIO else "MISSED"
        print(f"target: local path within {TARGET_RATIO}x of QEMU's direct access: "
              f"[{met}] (worst {worst:.2f}x)")
        return 0
    finally:
        with_mount = os.path.ismount(mnt)
        if with_mount:
            subprocess.run(["bash", "-c", f"echo stop > {mnt}/pools/b/ctl"], check=False)
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        if daemon is not None:
            daemon.wait(timeout=30)
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
