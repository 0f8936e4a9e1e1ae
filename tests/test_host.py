"""Listing the host's block devices (backends/host.py) without a mount."""

from __future__ import annotations

import pytest
import pyudev._ctypeslib.utils as udev_utils

from vsfs.backends import host


def test_listings_share_one_udev_context(monkeypatch: pytest.MonkeyPatch) -> None:
    # A new pyudev.Context runs `ldconfig -p` (ctypes.util.find_library): the host
    # listing, redone at every block uevent, must not start a process each time.
    host._shared_context.cache_clear()
    looked_up: list[str] = []
    real = udev_utils.find_library

    def counting(name: str) -> str | None:
        looked_up.append(name)
        found: str | None = real(name)
        return found

    monkeypatch.setattr(udev_utils, "find_library", counting)
    first = host.list_host_devices()
    host.list_host_devices()
    assert looked_up == ["udev"]
    assert any(d.type == "disk" for d in first)
