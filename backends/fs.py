"""``fs`` pools: a filesystem on a block device (or an image file), mounted on the target."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import ClassVar

import trio

from vsfs.errors import BackendFailed, Busy, Invalid
from vsfs.model import PoolDef
from vsfs.proc import run

from . import blockdev
from .base import Services, Snapshot
from .dir import DirBackend, drop_mount_point, make_mount_point

log = logging.getLogger(__name__)

# What `build` can make (libvirt's fs formats that have a mkfs here).
MKFS: dict[str, list[str]] = {
    "ext2": ["mkfs.ext2", "-F", "-q"],
    "ext3": ["mkfs.ext3", "-F", "-q"],
    "ext4": ["mkfs.ext4", "-F", "-q"],
    "xfs": ["mkfs.xfs", "-f", "-q"],
    "btrfs": ["mkfs.btrfs", "-f", "-q"],
    "vfat": ["mkfs.vfat"],
}
FS_FORMATS = frozenset({"auto", "ext2", "ext3", "ext4", "ufs", "iso9660", "udf", "gfs", "gfs2",
                        "vfat", "hfs+", "xfs", "ocfs2", "vmfs", "btrfs"})


class FsBackend(DirBackend):
    pool_type: ClassVar[str] = "fs"
    owns_source_devices: ClassVar[bool] = True

    def __init__(self, pool: PoolDef, services: Services | None = None) -> None:
        super().__init__(pool, services)
        self.loop: str | None = None  # the loop device we attached for an image file

    @classmethod
    def validate(cls, pool: PoolDef) -> None:
        super().validate(pool)
        if len(pool.source.devices) != 1:
            raise Invalid("an fs pool needs exactly one <source><device path=.../>")
        fmt = pool.source.format or "auto"
        if fmt not in FS_FORMATS:
            raise Invalid(f"unknown filesystem format {fmt!r}")

    @property
    def device(self) -> str:
        return self.pool.source.devices[0].path

    @property
    def format(self) -> str:
        return self.pool.source.format or "auto"

    async def _backing_file(self) -> bool:
        return await blockdev.is_regular_file(self.device)

    async def is_running(self) -> bool:
        source = await trio.to_thread.run_sync(blockdev.mount_source, self.root)
        if source is None:
            return False
        if await self._backing_file():
            loops = await blockdev.loops_of(self.device)
            if source in loops:
                self.loop = source
                return True
            return False
        return os.path.realpath(source) == os.path.realpath(self.device)

    async def build(self, overwrite: bool) -> None:
        dev = self.device
        if self.format == "auto":
            # Nothing to make: the device must already hold a filesystem to mount.
            found = await blockdev.signatures(dev)
            if not found:
                raise Invalid(f"{dev} holds no filesystem: name one in <format type=...> "
                              f"({', '.join(MKFS)}) for build to make it")
            await super().build(overwrite)
            return
        if self.format not in MKFS:
            raise Invalid(f"vsfs cannot make {self.format!r} filesystems "
                          f"(it makes {', '.join(MKFS)})")
        if await self._backing_file():
            loops = await blockdev.loops_of(dev)
            if loops:
                raise Busy(f"{dev} is attached as {', '.join(loops)}; stop what uses it first")
        else:
            await trio.to_thread.run_sync(blockdev.check_unused, dev)
        found = await blockdev.signatures(dev)
        if found and not overwrite:
            raise Busy(f"{dev} already holds {', '.join(found)}; 'build --overwrite' replaces it")
        await super().build(overwrite)  # the target directory
        await run([*MKFS[self.format], dev], timeout=600)
        log.info("pool %s: made %s on %s", self.pool.name, self.format, dev)

    async def start(self) -> None:
        dev = self.device
        attached = None
        if await self._backing_file():
            attached = await blockdev.reuse_or_attach(dev)
            dev = attached
        made_target = False
        try:
            made_target = await make_mount_point(self.root)
            argv = ["mount"]
            if self.format != "auto":
                argv += ["-t", self.format]
            if self.pool.mount_opts:
                argv += ["-o", ",".join(self.pool.mount_opts)]
            await run([*argv, dev, self.root])
        except BaseException:
            with trio.CancelScope(shield=True):
                if made_target:
                    await drop_mount_point(self.root)
                if attached is not None:
                    with contextlib.suppress(BackendFailed):
                        await blockdev.detach_loop(attached)
            raise
        self.loop = attached
        if attached is not None:
            log.info("pool %s: %s attached as %s", self.pool.name, self.device, attached)

    async def stop(self) -> None:
        if await trio.to_thread.run_sync(blockdev.mount_source, self.root) is not None:
            try:
                await run(["umount", self.root])
            except BackendFailed as e:
                raise Busy(f"cannot unmount {self.root}: {e.message}") from None
        if self.loop is not None:
            await blockdev.detach_loop(self.loop)
            self.loop = None

    async def refresh(self) -> Snapshot:
        snap = await super().refresh()
        # mkfs's own directory is not a volume.
        vols = tuple(v for v in snap.volumes if v.name != "lost+found")
        return Snapshot(snap.status, vols, snap.live_perms)
