"""``disk`` pools: a partitioned disk (or image file); volumes are its partitions.

Driven by parted's machine-readable output (``parted -m unit B print free``):
one command per refresh, not one per partition.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from dataclasses import dataclass
from typing import ClassVar

import trio

from vsfs.errors import (
    BackendFailed,
    Busy,
    Exists,
    Invalid,
    NoSpace,
    NotFound,
    Unsupported,
    VsfsError,
)
from vsfs.model import PoolDef, PoolStatus, Volume, VolumeDef
from vsfs.proc import run

from . import blockdev
from .base import BlockBackend, Services, Snapshot

log = logging.getLogger(__name__)

ALIGN = 1 << 20  # partitions start on MiB boundaries, as parted's "optimal" does
LABELS = {"gpt": "gpt", "dos": "msdos"}
LABEL_FORMATS = frozenset({"unknown", "dos", "dvh", "gpt", "mac", "bsd", "pc98", "sun", "lvm2"})


@dataclass(frozen=True)
class Partition:
    number: int
    start: int
    end: int  # inclusive, as parted prints it
    name: str


@dataclass(frozen=True)
class Table:
    size: int
    label: str  # gpt | msdos | ...
    partitions: tuple[Partition, ...]
    free: tuple[tuple[int, int], ...]  # (start, end) inclusive


def _bytes(text: str) -> int:
    if not text.endswith("B") or not text[:-1].isdigit():
        raise ValueError(text)
    return int(text[:-1])


# parted -s -m DEV unit B print free (parted 3.5): "BYT;", the device (path, size, transport,
# sector sizes, label, model), then partitions (number, start, end, size, filesystem, name,
# flags) and free extents (number 1, start, end, size, "free"), all ";"-terminated:
#   BYT;
#   /dev/loop0:67108864B:loopback:512:512:gpt:Loopback device:;
#   1:17408B:1048575B:1031168B:free;
#   1:1048576B:9437183B:8388608B::data:;
#   2:9437184B:26214399B:16777216B::my disk:;
#   1:26214400B:41943039B:15728640B:free;
# A disk with no label: "Error: ...: unrecognised disk label" on stderr, exit status 1.
def parse_parted(out: str) -> Table:
    lines = [ln.rstrip(";") for ln in out.splitlines() if ln.strip()]
    if len(lines) < 2 or lines[0] != "BYT" or len(dev := lines[1].split(":")) < 6:
        raise BackendFailed(f"parted: unexpected output {out[:80]!r}")
    parts, free = [], []
    try:
        for ln in lines[2:]:
            f = ln.split(":")
            if len(f) >= 5 and f[4] == "free":
                free.append((_bytes(f[1]), _bytes(f[2])))
            elif len(f) >= 6:
                parts.append(Partition(int(f[0]), _bytes(f[1]), _bytes(f[2]), f[5]))
            else:
                raise ValueError(ln)
        return Table(_bytes(dev[1]), dev[5], tuple(parts), tuple(free))
    except ValueError as e:
        raise BackendFailed(f"parted: unexpected line {str(e)[:80]!r}") from None


def mkpart_argv(dev: str, kind: str, start: int, size: int) -> list[str]:
    """parted making a partition of ``size`` bytes at ``start`` exactly (no alignment of
    its own: vsfs aligns); ``kind`` is a gpt partition's name, else primary."""
    return ["parted", "-s", "-a", "none", dev, "unit", "B", "mkpart", kind, str(start),
            str(start + size - 1)]


def partition_node(dev: str, number: int) -> str:
    sep = "p" if dev[-1:].isdigit() else ""
    return f"{dev}{sep}{number}"


class DiskBackend(BlockBackend):
    pool_type: ClassVar[str] = "disk"
    owns_source_devices: ClassVar[bool] = True

    def __init__(self, pool: PoolDef, services: Services | None = None) -> None:
        super().__init__(pool, services)
        self.loop: str | None = None
        self._table: Table | None = None
        # Held while the partition table changes. The manager's pool lock no longer
        # covers every change: a job (a clone into the pool, a volume made from XML)
        # makes its partition outside it, and two parted runs at once would pick the
        # same free extent, or the clean-up of one would take the other's partition.
        self._changing = trio.Lock()

    @classmethod
    def validate(cls, pool: PoolDef) -> None:
        if len(pool.source.devices) != 1:
            raise Invalid("a disk pool needs exactly one <source><device path=.../>")
        if (pool.source.format or "unknown") not in LABEL_FORMATS:
            raise Invalid(f"unknown partition table format {pool.source.format!r}")

    @property
    def source(self) -> str:
        return self.pool.source.devices[0].path

    @property
    def dev(self) -> str:
        """The block device the partitions live on (a loop device for an image file)."""
        return self.loop or self.source

    @property
    def label(self) -> str:
        fmt = self.pool.source.format or "unknown"
        if fmt == "unknown":
            return "msdos"  # libvirt builds a DOS label when none is named
        if fmt not in LABELS:
            raise Unsupported(f"vsfs makes gpt and dos partition tables, not {fmt}")
        return LABELS[fmt]

    async def _table_now(self) -> Table:
        try:
            out = await run(["parted", "-s", "-m", self.dev, "unit", "B", "print", "free"])
        except BackendFailed as e:
            if "unrecognised disk label" in e.message:
                raise BackendFailed(f"{self.source} has no partition table "
                                    "(echo build > ctl makes one)") from None
            raise
        self._table = parse_parted(out)
        return self._table

    # ---------------------------------------------------------------- pools

    async def is_running(self) -> bool:
        if await blockdev.is_regular_file(self.source):
            loops = await blockdev.loops_of(self.source)
            # A loop we attached with partition scanning and that holds a table.
            for loop in loops:
                if blockdev.partscan(loop):
                    self.loop = loop
                    return True
            return False
        return False

    async def build(self, overwrite: bool) -> None:
        if await blockdev.is_regular_file(self.source):
            loops = await blockdev.loops_of(self.source)
            if loops:
                raise Busy(f"{self.source} is attached as {', '.join(loops)}; stop what "
                           "uses it first")
        else:
            await trio.to_thread.run_sync(blockdev.check_unused, self.source)
        found = await blockdev.signatures(self.source)
        if found and not overwrite:
            raise Busy(f"{self.source} already holds {', '.join(found)}; "
                       "'build --overwrite' replaces it")
        await run(["parted", "-s", self.source, "mklabel", self.label])
        log.info("pool %s: %s label written on %s", self.pool.name, self.label, self.source)

    async def start(self) -> None:
        if await blockdev.is_regular_file(self.source):
            self.loop = await blockdev.reuse_or_attach(self.source, scan=True)
            log.info("pool %s: %s attached as %s", self.pool.name, self.source, self.loop)
        try:
            await self._table_now()
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._detach()
            raise

    async def _detach(self) -> None:
        if self.loop is not None:
            loop, self.loop = self.loop, None
            with contextlib.suppress(BackendFailed):
                await run(["partx", "-d", loop])
            await blockdev.detach_loop(loop)

    async def stop(self) -> None:
        if self._table is not None:
            for part in self._table.partitions:
                users = await trio.to_thread.run_sync(
                    blockdev.device_users, partition_node(self.dev, part.number))
                if users:
                    raise Busy(f"partition {part.number} is in use: {'; '.join(users)}")
        await self._detach()
        self._table = None

    async def delete(self) -> None:
        """Remove the partition table (libvirt's disk pool delete wipes the label)."""
        if await blockdev.is_regular_file(self.source):
            if await blockdev.loops_of(self.source):
                raise Busy(f"{self.source} is attached to a loop device")
        else:
            # The pool is stopped, but its partitions are still the kernel's: one that a
            # process holds open would lose its table under it.
            users = await trio.to_thread.run_sync(
                lambda: blockdev.users(devices=[self.source]).get(self.source))
            if users:
                raise Busy(f"{self.source} is in use: {'; '.join(users)}")
        await run(["wipefs", "--all", "--quiet", self.source])

    def _status(self, table: Table) -> PoolStatus:
        used = sum(p.end - p.start + 1 for p in table.partitions)
        largest = max((self._usable(s, e) for s, e in table.free), default=0)
        return PoolStatus(capacity=table.size, allocation=used, available=largest,
                          extents=table.free)

    @staticmethod
    def _usable(start: int, end: int) -> int:
        aligned = -(-start // ALIGN) * ALIGN
        return max(0, end + 1 - aligned)

    def _volume(self, part: Partition, table: Table) -> Volume:
        node = partition_node(self.dev, part.number)
        name = part.name if table.label == "gpt" and part.name else os.path.basename(node)
        size = part.end - part.start + 1
        return Volume(name=name, key=node, path=node, type="block", format="partition",
                      capacity=size, allocation=size, physical=size)

    async def refresh(self) -> Snapshot:
        table = await self._table_now()
        vols = [self._volume(p, table) for p in table.partitions]
        return Snapshot(self._status(table), tuple(sorted(vols, key=lambda v: v.name)))

    async def status(self) -> PoolStatus:
        return self._status(await self._table_now())

    # ---------------------------------------------------------------- volumes

    async def create_volume(self, vdef: VolumeDef) -> Volume:
        if vdef.capacity <= 0:
            raise Invalid("a partition needs a size")
        async with self._changing:
            return await self._create(vdef)

    async def _create(self, vdef: VolumeDef) -> Volume:
        table = await self._table_now()
        name = vdef.name
        if table.label != "gpt":
            expect = os.path.basename(partition_node(self.dev, self._next_number(table)))
            if name != expect:
                raise Invalid(f"{table.label} partition tables have no names: the next "
                              f"partition is {expect!r}; create it under that name")
        elif any(self._volume(p, table).name == name for p in table.partitions):
            raise Exists(f"partition {name!r} already exists")
        size = -(-vdef.capacity // 512) * 512
        start = next((a for s, e in table.free
                      if e + 1 - (a := -(-s // ALIGN) * ALIGN) >= size), None)
        if start is None:
            raise NoSpace(f"no free extent of {size} bytes on {self.source}")
        kind = name if table.label == "gpt" else "primary"
        before = {p.number for p in table.partitions}
        try:
            await run(mkpart_argv(self.dev, kind, start, size))
            table = await self._table_now()
            part = self._made_at(table, before, start, size)
            if part is None:
                raise BackendFailed("parted made no partition")
            await self._wait_node(partition_node(self.dev, part.number), present=True)
        except BaseException:
            # Failed or cancelled (parted killed): the partition it made, if it did, goes.
            with trio.CancelScope(shield=True):
                await self._drop_made(before, start, size)
            raise
        return self._volume(part, table)

    @staticmethod
    def _made_at(table: Table, before: set[int], start: int, size: int) -> Partition | None:
        """The partition made in the ``size`` bytes at ``start``: one not in the table
        before (numbers ``before``) there (another made meanwhile would be elsewhere)."""
        return next((p for p in table.partitions if p.number not in before
                     and p.start < start + size and p.end >= start), None)

    async def _drop_made(self, before: set[int], start: int, size: int) -> None:
        try:
            part = self._made_at(await self._table_now(), before, start, size)
            if part is not None:
                await run(["parted", "-s", self.dev, "rm", str(part.number)])
                await self._wait_node(partition_node(self.dev, part.number), present=False)
        except VsfsError as e:
            log.warning("pool %s: a partition at %d may be left: %s", self.pool.name, start,
                        e.message)

    @staticmethod
    def _next_number(table: Table) -> int:
        used = {p.number for p in table.partitions}
        return next(n for n in range(1, 1 << 16) if n not in used)

    async def _wait_node(self, node: str, present: bool) -> None:
        """Make the kernel's partition nodes match the table, without sleeping on a guess."""
        if os.path.exists(node) == present:
            return
        await run(["partx", "-u", self.dev])
        if shutil.which("udevadm") and os.path.exists("/run/udev/control"):
            await run(["udevadm", "settle"])
        if os.path.exists(node) != present:
            raise BackendFailed(f"{node} did not {'appear' if present else 'go away'}")

    def _find(self, vol: Volume) -> Partition:
        table = self._table
        if table is not None:
            for part in table.partitions:
                if partition_node(self.dev, part.number) == vol.path:
                    return part
        raise NotFound(f"no partition {vol.name!r}")

    async def delete_volume(self, vol: Volume) -> None:
        async with self._changing:
            await self._delete(vol)

    async def _delete(self, vol: Volume) -> None:
        await self._table_now()
        part = self._find(vol)
        await trio.to_thread.run_sync(blockdev.check_unused, vol.path)
        await run(["parted", "-s", self.dev, "rm", str(part.number)])
        await self._wait_node(vol.path, present=False)

    async def resize_volume(self, vol: Volume, capacity: int) -> Volume:
        async with self._changing:
            return await self._resize(vol, capacity)

    async def _resize(self, vol: Volume, capacity: int) -> Volume:
        table = await self._table_now()
        part = self._find(vol)
        size = -(-capacity // 512) * 512
        if size < part.end - part.start + 1:
            raise Unsupported("partitions are not shrunk: that would cut off their data")
        end = part.start + size - 1
        room = next((e for s, e in table.free if s == part.end + 1), part.end)
        if end > room:
            raise NoSpace(f"only {room - part.start + 1} bytes fit after partition "
                          f"{vol.name!r}")
        await run(["parted", "-s", self.dev, "unit", "B", "resizepart", str(part.number),
                   str(end)])
        await run(["partx", "-u", self.dev])
        table = await self._table_now()
        return self._volume(next(p for p in table.partitions if p.number == part.number), table)

    async def volume(self, name: str) -> Volume:
        table = self._table or await self._table_now()
        for part in table.partitions:
            vol = self._volume(part, table)
            if vol.name == name:
                return vol
        raise NotFound(f"no volume {name!r} in pool {self.pool.name!r}")

    async def wipe_volume(self, vol: Volume) -> None:
        await blockdev.zero_out(vol.path, vol.capacity)

