"""The host's own block devices, read with pyudev: a read-only pseudo-pool.

Enumeration reads sysfs (and udev's database where udevd runs) once per
change; the monitor listens to the kernel's uevents, which arrive with or
without udevd, so a loop device attached with losetup shows up at once.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import pyudev
import trio

from vsfs.watchdog import read_mountinfo

from .blockdev import read_sysfs

log = logging.getLogger(__name__)

RESCAN_SECONDS = 5.0

# pyudev.Context() finds libudev with ctypes.util.find_library, which runs
# `ldconfig -p`: one process per context. Listings share one context instead,
# one thread at a time (libudev's objects are not thread-safe).
_context_lock = threading.Lock()


@functools.cache
def _shared_context() -> pyudev.Context:
    return pyudev.Context()


@dataclass(frozen=True)
class HostDevice:
    kname: str
    path: str
    size: int
    type: str  # disk | part | loop | rom | ...
    model: str
    serial: str
    wwn: str
    fstype: str
    ro: bool
    removable: bool
    holders: tuple[str, ...]
    mountpoints: tuple[str, ...]


def _attr(dev: pyudev.Device, name: str) -> str:
    try:
        value = dev.attributes.get(name)
    except (OSError, KeyError):
        return ""
    if value is None:
        return ""
    text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return text.strip()


def _parent_attr(dev: pyudev.Device, name: str) -> str:
    """An attribute of the disk's ``device/`` (model, serial, wwid live there)."""
    return read_sysfs(os.path.join(dev.sys_path, "device", name))


def _mounts() -> dict[str, list[str]]:
    """Mount points by "major:minor" of the mounted device."""
    out: dict[str, list[str]] = {}
    with contextlib.suppress(OSError):
        for mount in read_mountinfo():
            out.setdefault(mount.device, []).append(mount.mount_point)
    return out


def _kind(dev: pyudev.Device) -> str:
    if dev.device_type == "partition":
        return "part"
    name = dev.sys_name
    for prefix, kind in (("loop", "loop"), ("sr", "rom"), ("zram", "zram"), ("ram", "ram"),
                         ("md", "raid"), ("dm-", "dm"), ("nbd", "nbd")):
        if name.startswith(prefix):
            return kind
    return "disk"


def _parent_sys(dev: pyudev.Device) -> pyudev.Device:
    return dev.parent if dev.device_type == "partition" and dev.parent is not None else dev


def list_host_devices() -> list[HostDevice]:
    """Every block device: disks, partitions, and loop devices that have a backing file."""
    with _context_lock:
        return _list_devices(_shared_context())


def _list_devices(context: pyudev.Context) -> list[HostDevice]:
    mounts = _mounts()
    out = []
    for dev in context.list_devices(subsystem="block"):
        kind = _kind(dev)
        if kind == "loop" and not _attr(dev, "loop/backing_file"):
            continue  # an unused loop device holds nothing
        props = dev.properties
        disk = _parent_sys(dev)
        try:
            size = int(_attr(dev, "size") or 0) * 512
        except ValueError:
            size = 0
        holders_dir = os.path.join(dev.sys_path, "holders")
        try:
            holders = tuple(sorted(os.listdir(holders_dir)))
        except OSError:
            holders = ()
        devnum = f"{os.major(dev.device_number)}:{os.minor(dev.device_number)}"
        out.append(HostDevice(
            kname=dev.sys_name,
            path=dev.device_node or f"/dev/{dev.sys_name}",
            size=size,
            type=kind,
            model=props.get("ID_MODEL", "") or _parent_attr(disk, "model"),
            serial=(props.get("ID_SERIAL_SHORT", "") or props.get("ID_SERIAL", "")
                    or _attr(disk, "serial") or _parent_attr(disk, "serial")),
            wwn=props.get("ID_WWN", "") or _parent_attr(disk, "wwid"),
            fstype=props.get("ID_FS_TYPE", ""),
            ro=_attr(dev, "ro") == "1",
            removable=_attr(disk, "removable") == "1",
            holders=holders,
            mountpoints=tuple(mounts.get(devnum, ())),
        ))
    out.sort(key=lambda d: d.kname)
    return out


class HostDevices:
    """The current list, kept up to date by ``watch``."""

    def __init__(self) -> None:
        self._devices: dict[str, HostDevice] = {}

    def devices(self) -> dict[str, HostDevice]:
        return self._devices

    async def refresh(self) -> tuple[set[str], set[str]]:
        """Re-read the list; returns the names that came and those that went away."""
        found = await trio.to_thread.run_sync(list_host_devices)
        new = {d.kname: d for d in found}
        gone = set(self._devices) - set(new)
        came = set(new) - set(self._devices)
        self._devices = new
        return came, gone

    async def watch(self, on_change: Callable[[str, bool], None]) -> None:
        """Follow the kernel's block uevents for as long as the mount lives, calling
        ``on_change(name, added)`` for each device that came or went."""
        await self.refresh()
        monitor: pyudev.Monitor | None = None
        try:
            monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="kernel")
            monitor.filter_by("block")
            monitor.start()
        except (OSError, ValueError) as e:
            log.warning("host devices: no uevent monitor (%s); listing every %g s", e,
                        RESCAN_SECONDS)
            monitor = None
        while True:
            # Events say when to look; a slow periodic look covers any that were lost
            # (the netlink socket drops events when its buffer overflows).
            with trio.move_on_after(RESCAN_SECONDS):
                if monitor is None:
                    await trio.sleep_forever()
                else:
                    await trio.lowlevel.wait_readable(monitor.fileno())
                    await trio.sleep(0.05)  # a burst of events (partitions, loops) is one
            try:
                while monitor is not None and monitor.poll(timeout=0) is not None:
                    pass
            except OSError as e:
                log.debug("host devices: uevent socket: %s", e)
            try:
                came, gone = await self.refresh()
                for kname in sorted(gone):
                    on_change(kname, False)
                for kname in sorted(came):
                    on_change(kname, True)
            except OSError as e:
                log.warning("host devices: listing failed: %s", e)
