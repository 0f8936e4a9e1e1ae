"""host/ where udevd runs (the guest): serial numbers, filesystems, by-id links."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from support import Mount, sh

pytestmark = [pytest.mark.guest, pytest.mark.fuse, pytest.mark.root]


def disk_with_serial(serial: str) -> str:
    for blk in Path("/sys/block").iterdir():
        f = blk / "serial"
        if f.exists() and f.read_text().strip() == serial:
            return blk.name
    raise AssertionError(f"no test disk with serial {serial}")


def test_host_devices_with_udev(vsfs: Mount) -> None:
    kname = disk_with_serial("VSFSDISK2")
    info = vsfs.path / "host" / "volinfo" / kname
    assert (info / "serial").read_text() == "VSFSDISK2\n"
    assert (info / "type").read_text() == "disk\n"
    assert (info / "size").read_text() == f"{512 << 20}\n"
    by_id = Path("/dev/disk/by-id/virtio-VSFSDISK2")
    assert os.path.realpath(by_id) == os.path.realpath(vsfs.path / "host" / "volumes" / kname)
    sh(f"mkfs.ext4 -q /dev/{kname} && udevadm settle", check=True)
    try:
        deadline = time.monotonic() + 15
        while (info / "fstype").read_text() != "ext4\n" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (info / "fstype").read_text() == "ext4\n"
        assert '<format type="ext4"/>' in (info / "xml").read_text()
    finally:
        sh(f"wipefs -a -q /dev/{kname}", check=True)
