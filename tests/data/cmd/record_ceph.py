"""Records the rbd/rados output tests/test_parsers.py reads, from the throw-away cluster of
tests/ceph_cluster.py (root; Debian's ceph). Run: .venv/bin/python tests/data/cmd/record_ceph.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parent
sys.path.insert(0, str(OUT.parent.parent))  # tests/, for ceph_cluster and conftest

from ceph_cluster import CephCluster  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="vsfs-record-ceph.") as tmp:
        cluster = CephCluster(Path(tmp) / "ceph")
        cluster.start()
        try:
            record(cluster)
        finally:
            cluster.stop()


def record(c: CephCluster) -> None:
    (OUT / "rbd").mkdir(exist_ok=True)
    (OUT / "rados").mkdir(exist_ok=True)

    def save(name: str, *argv: str, check: bool = True) -> None:
        res = c.cli(*argv, check=check)
        if res.stdout:
            (OUT / name).write_bytes(res.stdout)
        if not check:
            (OUT / name.replace(".json", ".stderr.txt")).write_bytes(res.stderr)

    def rbd(*args: str) -> None:
        c.cli("rbd", "--pool", c.pool, *args)

    save("rbd/ls-empty.json", "rbd", "--pool", c.pool, "ls", "-l", "--format", "json")
    rbd("create", "--size", "64M", "disk1")
    rbd("create", "--size", "1073741824B", "big")
    rbd("create", "--size", "0B", "empty")
    c.cli("rbd", "--pool", c.pool, "bench", "--io-type", "write", "--io-size", "4K",
          "--io-total", "1M", "disk1")
    rbd("snap", "create", "disk1@s1")
    rbd("snap", "create", "disk1@before upgrade")
    ls = ("rbd", "--pool", c.pool)
    save("rbd/ls-l.json", *ls, "ls", "-l", "--format", "json")
    save("rbd/info-image.json", *ls, "info", "--format", "json", "disk1")
    save("rbd/info-snapshot.json", *ls, "info", "--format", "json", "disk1@s1")
    save("rbd/info-missing.json", *ls, "info", "--format", "json", "nosuch", check=False)
    save("rbd/du-image.json", *ls, "du", "--format", "json", "disk1")
    # rbd du of an image of size 0 fails (a ceph_assert, 80 kB of backtrace): not kept
    save("rbd/snap-ls.json", *ls, "snap", "ls", "--format", "json", "disk1")
    save("rbd/snap-ls-none.json", *ls, "snap", "ls", "--format", "json", "big")
    save("rbd/status.json", *ls, "status", "--format", "json", "disk1")
    save("rbd/rm-with-snapshots.json", *ls, "rm", "--no-progress", "disk1", check=False)
    save("rbd/create-exists.json", *ls, "create", "--size", "1M", "big", check=False)
    save("rados/df.json", "rados", "df", "--format", "json")
    rados = ("rados", "--pool", c.pool)
    c.cli(*rados, "lock", "get", "vsfs_lock.big", "vsfs", "--lock-cookie", "host1/abc",
          "--lock-type", "exclusive", "--lock-description", "vsfs on host1/abc")
    save("rados/lock-info.json", *rados, "lock", "info", "vsfs_lock.big", "vsfs",
         "--format", "json")
    save("rados/lock-get-held.json", *rados, "lock", "get", "vsfs_lock.big", "vsfs",
         "--lock-cookie", "host2/def", "--lock-type", "exclusive", check=False)
    save("rados/lock-info-missing.json", *rados, "lock", "info", "vsfs_lock.nosuch", "vsfs",
         "--format", "json", check=False)
    version = subprocess.run(["rbd", "--version"], capture_output=True, text=True, check=True)
    (OUT / "ceph-version.txt").write_text(version.stdout)


if __name__ == "__main__":
    main()
