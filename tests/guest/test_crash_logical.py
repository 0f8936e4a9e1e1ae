"""kill -9 under load for a logical (LVM) pool, in the QEMU guest where device-mapper works.

The host's crash test (tests/test_crash.py) with its writers and checks, on a volume group
instead of a directory: volumes are LVs made at their size when ``truncate`` gives it, and
clones are LVs filled by ``qemu-img convert`` under their own name, so a kill in the
middle of either must leave no LV behind after the remount (the journal of uploads, taken
up when the pool is adopted, since an active group is still up), and every acknowledged
action must be there. Fewer kills than on the host (``VSFS_CRASH_CYCLES_GUEST``, 8 by
default): under TCG each cycle starts the daemon (3.5-5 s of imports) and four writers
(1-1.5 s each) and every LVM command takes a second or so, some 15 s a cycle.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from crash_load import MiB, Vol
from support import Mount, guest_disks, sh
from test_crash import Crashes

pytestmark = [pytest.mark.guest, pytest.mark.fuse, pytest.mark.root, pytest.mark.slow]

CYCLES = int(os.environ.get("VSFS_CRASH_CYCLES_GUEST", "8"))
VG = "vsfscrash"


@pytest.fixture
def disk() -> Iterator[str]:
    dev = guest_disks()[0]
    yield dev
    sh(f"vgremove -f {VG}")
    sh(f"pvremove -ff -y {dev}")
    sh(f"wipefs -a -q {dev}")


def _size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def test_kill9_under_load_logical(vsfs: Mount, disk: str) -> None:
    m = vsfs
    lv = m.define(f"<pool type='logical'><name>lv</name><source><device "
                  f"path='{disk}'/><name>{VG}</name><format type='lvm2'/></source>"
                  f"<target><path>/dev/{VG}</path></target></pool>")
    sh(f"echo build > {lv}/ctl && echo start > {lv}/ctl && echo yes > {lv}/autostart",
       check=True)
    # Sizes in whole extents (4 MiB): an LV is as large as asked.
    pools = {"lv": {"ops": ["truncate", "truncate", "rm", "clone"],
                    "sizes": [4 * MiB, 8 * MiB, 16 * MiB]}}

    def look(pool: str) -> dict[str, Vol]:
        vols = m.path / "pools" / pool / "volumes"
        return {n: Vol(_size(os.readlink(vols / n))) for n in os.listdir(vols)}

    def litter(pool: str) -> list[str]:
        listed = set(os.listdir(m.path / "pools" / pool / "volumes"))
        lvs = set(sh(f"lvs --noheadings -o lv_name {VG}", check=True).stdout.split())
        return sorted(lvs ^ listed)

    crashes = Crashes(m, pools, look, litter, seed=CYCLES, pause=(3.0, 8.0))
    try:
        crashes.run(CYCLES, "logical pool")
    finally:
        if m.proc is not None and os.path.ismount(m.path):
            sh(f"echo stop > {lv}/ctl")
