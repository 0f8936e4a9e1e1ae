"""Backends whose volumes have no local device: a local path made on demand.

Each volume is exported by the pool's qemu-storage-daemon (backends/qsd.py)
onto a file when its path is first asked for (the readlink of ``volumes/V``,
or ``volinfo/V/path``), and withdrawn once no process has had it open for a
while (``VSFS_EXPORT_IDLE`` seconds, 30 by default), so that the volume is not
held by this host when nobody uses it here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from abc import abstractmethod
from collections.abc import Collection
from typing import Any, ClassVar

import trio

from vsfs.errors import Busy, NotFound, Unsupported
from vsfs.model import PoolDef, Volume

from . import blockdev
from .base import Backend, Services
from .qsd import StorageDaemon

IDLE_ENV = "VSFS_EXPORT_IDLE"
IDLE_DEFAULT = 30.0


class ExportingBackend(Backend):
    on_demand_paths: ClassVar[bool] = True
    # Reading a volume's values is a command to the storage: the last ones serve a while.
    values_fresh_for: ClassVar[float] = 5.0

    def __init__(self, pool: PoolDef, services: Services | None = None) -> None:
        super().__init__(pool, services)
        self._qsd: StorageDaemon | None = None
        # Exported volumes, and when their path was last asked for.
        self._exports: dict[str, float] = {}
        self._next_reap = 0.0
        self._idle = float(os.environ.get(IDLE_ENV, IDLE_DEFAULT))

    # ---- what a subclass says

    @abstractmethod
    def blockdev(self, name: str) -> dict[str, Any]:
        """QEMU's blockdev-add arguments (without node-name) for a volume."""

    def writable(self, name: str) -> bool:
        return True

    def qsd_objects(self) -> list[str]:
        """QEMU objects (secrets) the daemon starts with."""
        return []

    async def claim(self, name: str) -> None:
        """Before a volume is exported: take what keeps other hosts off it."""

    async def release(self, name: str) -> None:
        """After its export went."""

    # ---- the daemon and its exports

    @property
    def qsd(self) -> StorageDaemon:
        if self._qsd is None:
            self._qsd = StorageDaemon(self.run_dir(), f"pool {self.pool.name}")
        return self._qsd

    async def daemon_running(self) -> bool:
        """Whether this pool's daemon (from before a restart of vsfs) still answers; its
        exports, the files in its directory, are then taken over."""
        if self.services is None or not (self.run_dir(create=False) / "qmp.sock").exists():
            return False
        if not await self.qsd.alive():
            return False
        now = trio.current_time()
        with contextlib.suppress(FileNotFoundError):
            self._exports = {n: now for n in os.listdir(self.qsd.exports_dir)}
        return True

    def require_tools(self, tools: tuple[str, ...], packages: str) -> None:
        missing = [t for t in tools if shutil.which(t) is None]
        if missing:
            raise Unsupported(f"{self.pool_type} pools need {', '.join(missing)} "
                              f"(Debian: {packages})")

    async def check_storage(self) -> None:
        """Before the daemon starts: write what it needs, check that the storage answers."""

    async def start(self) -> None:
        try:
            await self.check_storage()
            await self.qsd.start(self.qsd_objects())
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._drop_runtime()
            raise

    async def stop_exports(self) -> None:
        for name in list(self._exports):
            await self._unexport(name)
        await self.qsd.stop()
        await self._drop_runtime()

    async def _drop_runtime(self) -> None:
        """The pool's configuration, secrets and socket: start writes them anew."""
        path = self.run_dir(create=False)
        await trio.to_thread.run_sync(lambda: shutil.rmtree(path, ignore_errors=True))

    async def _export(self, name: str) -> str:
        if name in self._exports:
            self._exports[name] = trio.current_time()
            return self.qsd.path_of(name)
        await self.claim(name)
        try:
            path = await self.qsd.export(name, self.blockdev(name), writable=self.writable(name))
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.release(name)
            raise
        self._exports[name] = trio.current_time()
        return path

    async def _unexport(self, name: str) -> None:
        with contextlib.suppress(NotFound):
            await self.qsd.unexport(name)
        self._exports.pop(name, None)
        await self.release(name)

    async def wipe_volume(self, vol: Volume) -> None:
        if not self.writable(vol.name):
            raise Unsupported(f"volume {vol.name!r} is read-only")
        # Zeros through the export, step by step (progress, cancel): QEMU turns them into
        # the storage's own write-zeroes (or discard) where it has one.
        path = await self._export(vol.name)
        await blockdev.zero_range(path, vol.capacity)

    async def prepare_volume(self, vol: Volume) -> None:
        await self._export(vol.name)

    async def volume_users(self, vols: Collection[Volume]) -> dict[str, list[str]]:
        # Withdrawing an export under a process that holds it (rm, stop, a rename) fails
        # its next read or write with ENOTCONN, and Ceph sees no watcher of ours to refuse
        # an rbd rm with: the export's users are looked for here. Volumes not exported
        # have no local path anything could hold.
        paths = {self.qsd.path_of(v.name): v.name for v in vols if v.name in self._exports}
        if not paths:
            return {}
        found = await trio.to_thread.run_sync(lambda: blockdev.users(files=list(paths)))
        return {paths[p]: why for p, why in found.items()}

    async def reap(self) -> list[str]:
        """Withdraw exports idle for a while that no process has open (checked every third
        of that time); the volumes whose went."""
        now = trio.current_time()
        if now < self._next_reap or not self._exports:
            return []
        self._next_reap = now + self._idle / 3
        idle = [n for n, used in self._exports.items() if now - used >= self._idle]
        if not idle:
            return []
        # In use also when no process has it open: a loop device on it holds it as well;
        # and the daemon's own descriptors count here (an upload longer than the idle time).
        busy = await trio.to_thread.run_sync(
            lambda: blockdev.users(files=[self.qsd.path_of(n) for n in idle], own=True))
        reaped = []
        for name in idle:
            if self.qsd.path_of(name) in busy:
                self._exports[name] = now
                continue
            try:
                await self._unexport(name)
            except Busy:
                self._exports[name] = now
                continue
            reaped.append(name)
        return reaped
