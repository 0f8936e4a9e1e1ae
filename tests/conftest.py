"""Fixtures shared by the test tiers (nobody imports this module: helpers are in
support.py).

Mount tests start the real ``vsfs`` command in the foreground, drive the mount
with real tools and always unmount, asserting that the daemon exited 0 and
logged no traceback.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from ceph_cluster import CEPH_TOOLS, CephCluster
from support import (
    FUSE_OK,
    IN_GUEST,
    Mount,
    MountFactory,
    guest_disks,
    sh,
)

from vsfs.paths import runtime_dir

# tests/guest/ runs inside the QEMU guest (tests/test_vm_tier.py boots it); on the host
# it is not collected at all, so nothing there shows up as skipped.
collect_ignore = [] if IN_GUEST else ["guest"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "fuse" in item.keywords and not FUSE_OK:
            item.add_marker(pytest.mark.skip(reason="needs /dev/fuse and fusermount3 (fuse3)"))
        if "root" in item.keywords and os.geteuid() != 0:
            item.add_marker(pytest.mark.skip(reason="needs root"))


@pytest.fixture
def mount_factory(tmp_path: Path) -> Iterator[MountFactory]:
    mounts: list[Mount] = []
    public: list[Path] = []

    def make(extra_args: list[str] | None = None, name: str = "mnt",
             state: Path | None = None, command: list[str] | None = None) -> Mount:
        mnt = tmp_path / name
        if extra_args and "--allow-other" in extra_args:
            # Other users must be able to reach the mount point; pytest's
            # tmp_path is private to root.
            mnt = Path(tempfile.mkdtemp(prefix="vsfs-test-"))
            os.chmod(mnt, 0o755)
            public.append(mnt)
        mnt.mkdir(exist_ok=True)
        m = Mount(mnt, state or tmp_path / "state", tmp_path / f"{name}.log", tmp_path,
                  list(extra_args or []))
        if command is not None:
            m.command = command
        mounts.append(m)
        m.start()
        return m

    yield make
    failures = []
    results = os.environ.get("VSFS_VM_RESULTS")
    for m in mounts:
        try:
            m.stop(expect_rc=0 if m.proc is not None else None)
        except AssertionError as e:
            failures.append(str(e))
        try:
            m.assert_clean_log()
        except AssertionError as e:
            failures.append(str(e))
        if results and m.log.exists():
            # In the QEMU guest: the daemon's log goes back to the host.
            shutil.copy(m.log, Path(results) / f"{m.base.name}-{m.log.name}")
    for mnt in public:
        with contextlib.suppress(OSError):
            mnt.rmdir()
    if failures:
        pytest.fail("; ".join(failures))


@pytest.fixture
def vsfs(mount_factory: MountFactory) -> Mount:
    return mount_factory()


@pytest.fixture
def loopdev(tmp_path: Path) -> Iterator[str]:
    """A fresh 320 MiB loop device, detached afterwards whatever happened."""
    img = tmp_path / "disk.img"
    img.write_bytes(b"")
    os.truncate(img, 320 << 20)
    dev = sh(f"losetup -f --show {img}", check=True).stdout.strip()
    try:
        yield dev
    finally:
        for mnt in sh(f"findmnt -n -o TARGET -S {dev}").stdout.split():
            subprocess.run(["umount", "-l", mnt], check=False)
        for part in sorted(Path("/dev").glob(os.path.basename(dev) + "p*")):
            for mnt in sh(f"findmnt -n -o TARGET -S {part}").stdout.split():
                subprocess.run(["umount", "-l", mnt], check=False)
        subprocess.run(["partx", "-d", dev], check=False, capture_output=True)
        subprocess.run(["losetup", "-d", dev], check=False)


# The Ceph tier (tests/test_rbd.py, tests/test_rbd_jobs.py): a cluster per module.
@pytest.fixture(scope="module")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    missing = [t for t in CEPH_TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run .ci/setup --test")
    cluster = CephCluster(tmp_path_factory.mktemp("ceph"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def rbd_pool(ceph: CephCluster) -> Iterator[Callable[[Mount, str], Path]]:
    """Defines and starts an rbd pool on a mount; stops every such pool and empties the
    RADOS pool afterwards."""
    started: list[tuple[Mount, Path]] = []

    def make(m: Mount, name: str = "r") -> Path:
        p = m.define(f"<pool type='rbd'><name>{name}</name><source>"
                     f"<name>{ceph.pool}</name><host name='127.0.0.1' port='{ceph.port}'/>"
                     "</source></pool>")
        sh(f"echo start > {p}/ctl", check=True)
        started.append((m, p))
        return p

    yield make
    for m, p in started:
        if m.proc is not None and (p / "state").exists() and \
                (p / "state").read_text() == "running\n":
            sh(f"echo stop > {p}/ctl")
        # a daemon left behind (the mount died) is ended by its pid file
        for pidfile in runtime_dir(m.state).glob("*/qsd.pid"):
            subprocess.run(["kill", pidfile.read_text().strip()], check=False)
    for line in ceph.cli("rbd", "ls", ceph.pool).stdout.decode().split():
        ceph.cli("rbd", "snap", "purge", f"{ceph.pool}/{line}", check=False)
        ceph.cli("rbd", "rm", f"{ceph.pool}/{line}", check=False)


# In the QEMU guest (tests/guest/): its three test disks, left without LVM or signatures.
@pytest.fixture
def disks() -> Iterator[list[str]]:
    """The guest's test disks; afterwards no volume group is left and they are wiped."""
    devs = guest_disks()
    yield devs
    for vg in sh("vgs --noheadings -o vg_name").stdout.split():
        sh(f"vgremove -f {vg}")
    for dev in devs:
        sh(f"pvremove -ff -y {dev}")
        sh(f"wipefs -a -q {dev}")
