"""``logical`` pools: an LVM volume group; volumes are its logical volumes.

One ``vgs`` report per refresh gives the group's sizes and every LV (JSON,
sizes in bytes); nothing runs per lookup.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import ClassVar

import trio

from vsfs.errors import (
    BackendFailed,
    Busy,
    Exists,
    Invalid,
    NoSpace,
    NotEmpty,
    NotFound,
    Unsupported,
    VsfsError,
)
from vsfs.model import (
    PoolDef,
    PoolSource,
    PoolStatus,
    SourceDevice,
    Volume,
    VolumeDef,
)
from vsfs.proc import run

from . import blockdev
from .base import BlockBackend, Snapshot
from .cmdout import integer, json_object, objects, string, unexpected

log = logging.getLogger(__name__)

LV_FIELDS = "lv_name,lv_path,lv_size,lv_attr,lv_uuid,pool_lv,origin,origin_size,data_percent"
# A thin pool LV of this name in the group receives sparse volumes (allocation < capacity).
THIN_POOL = "thinpool"
SPARSE_MIN = 4 << 20  # the smallest COW area of a sparse LV


def _lvm_error(e: BackendFailed, what: str) -> VsfsError:
    msg = e.message
    if "not found" in msg or "Cannot process volume group" in msg:
        return NotFound(f"{what}: {msg}")
    if "in use" in msg or ("open" in msg.lower() and "logical volume" in msg.lower()):
        return Busy(f"{what}: {msg}")
    if "insufficient free space" in msg.lower() or "Insufficient" in msg:
        return NoSpace(f"{what}: {msg}")
    return e


def _size(n: int) -> str:
    """A size for lvcreate/lvresize: whole sectors (LVM rounds up to extents itself)."""
    return f"{-(-n // 512) * 512}b"


# vgs/lvs/pvs --reportformat json (LVM 2.03.16), sizes with --units b --nosuffix:
#   {
#       "report": [
#           {
#               "vg": [
#                   {"vg_name":"vsfsrec", "vg_size":"125829120", "vg_free":"125829120"}
#               ]
#           }
#       ]
#   }
# and for `lvs -o LV_FIELDS` rows such as (one line each)
#   {"lv_name":"plain-snap", "lv_path":"/dev/vsfsvg/plain-snap", "lv_size":"16777216",
#    "lv_attr":"swi-a-s---", "lv_uuid":"5nXln6-PtpC-g2WI-hMDt-W256-w7QT-fIUz8S",
#    "pool_lv":"", "origin":"plain", "origin_size":"67108864", "data_percent":"25.15"}
def parse_report(text: str, kind: str) -> list[dict[str, str]]:
    """The rows of an LVM JSON report of ``kind`` (vg, lv, pv); every value a string."""
    what = f"{kind}s report"
    doc = json_object(text, what)
    reports = objects(doc.get("report"), what)
    if not reports:
        raise unexpected(what, text)
    rows = objects(reports[0].get(kind), what)
    for row in rows:
        if not all(isinstance(v, str) for v in row.values()):
            raise unexpected(what, row)
    return rows


def parse_vg(text: str, vg: str) -> tuple[int, int]:
    """Size and free bytes of the group a ``vgs`` report of it shows."""
    rows = parse_report(text, "vg")
    if not rows:
        raise NotFound(f"volume group {vg} does not exist")
    return integer(rows[0], "vg_size", "vgs"), integer(rows[0], "vg_free", "vgs")


def parse_lvs(text: str) -> list[dict[str, str]]:
    """The rows of an ``lvs -o LV_FIELDS`` report, each with a name and attributes."""
    rows = parse_report(text, "lv")
    for row in rows:
        string(row, "lv_name", "lvs")
        if len(string(row, "lv_attr", "lvs")) < 5:
            raise unexpected("lvs", row)
    return rows


def lv_volume(row: dict[str, str]) -> Volume:
    """The volume an ``lvs`` row describes."""
    size = integer(row, "lv_size", "lvs")
    capacity, allocation = size, size
    if row["lv_attr"][:1] == "s" and row.get("origin_size"):
        capacity = integer(row, "origin_size", "lvs")  # a snapshot shows its origin's size;
        # its own LV is the copy-on-write area, which is what it takes
    elif row["lv_attr"][:1] == "V" and row.get("data_percent"):
        try:
            used = float(row["data_percent"])
        except ValueError:
            raise unexpected("lvs", row) from None
        allocation = int(size * used / 100)  # thin: what is used
    return Volume(name=row["lv_name"], key=string(row, "lv_uuid", "lvs"),
                  path=string(row, "lv_path", "lvs"), type="block", format="lvm2",
                  capacity=capacity, allocation=allocation, physical=size)


def lv_volumes(rows: list[dict[str, str]]) -> list[Volume]:
    """The volumes of an ``lvs`` report, by name: thin pools and hidden LVs ("[name]")
    are LVM's own, not volumes."""
    vols = [lv_volume(r) for r in rows
            if r["lv_attr"][:1] != "t" and not r["lv_name"].startswith("[")]
    return sorted(vols, key=lambda v: v.name)


def lvcreate_argv(vg: str, vdef: VolumeDef, thin_pool: bool) -> list[str]:
    """lvcreate for a new volume: sparse (allocation < capacity) as a thin LV when the
    group has a THIN_POOL, else as libvirt's snapshot of nothing; else a plain LV."""
    size = _size(vdef.capacity)
    if vdef.allocation is not None and vdef.allocation < vdef.capacity:
        if thin_pool:
            return ["lvcreate", "-y", "-n", vdef.name, "-V", size, "-T", f"{vg}/{THIN_POOL}"]
        # libvirt's sparse LV: a snapshot of nothing, grown on write. The type is
        # explicit, or newer LVM makes a thin pool that outlives the volume.
        alloc = max(vdef.allocation, SPARSE_MIN)
        return ["lvcreate", "-y", "--type", "snapshot", "-n", vdef.name, "-s",
                "-V", size, "-L", _size(alloc), vg]
    return ["lvcreate", "-y", "-W", "y", "-n", vdef.name, "-L", size, vg]


def snapshot_argv(vg: str, origin: Volume, name: str) -> list[str]:
    """lvcreate of a snapshot with room for 20% of the origin to change, at least 4 MiB."""
    cow = max(origin.capacity // 5, 4 << 20)
    return ["lvcreate", "-y", "-s", "-n", name, "-L", _size(cow), f"{vg}/{origin.name}"]


def resize_argv(vg: str, name: str, capacity: int, shrink: bool) -> list[str]:
    return [*(["lvreduce", "-f"] if shrink else ["lvextend"]), "-L", _size(capacity),
            f"{vg}/{name}"]


def parse_groups(text: str) -> list[PoolSource]:
    """The volume groups a ``pvs -o pv_name,vg_name`` report shows, with their PVs."""
    groups: dict[str, list[str]] = {}
    for row in parse_report(text, "pv"):
        vg, pv = string(row, "vg_name", "pvs"), string(row, "pv_name", "pvs")
        if vg:
            groups.setdefault(vg, []).append(pv)
    return [PoolSource(devices=tuple(SourceDevice(p) for p in pvs), name=vg, format="lvm2")
            for vg, pvs in sorted(groups.items())]


def parse_pv_names(text: str) -> list[str]:
    """The PVs of a ``pvs -o pv_name`` report."""
    return [string(row, "pv_name", "pvs") for row in parse_report(text, "pv")]


class LogicalBackend(BlockBackend):
    pool_type: ClassVar[str] = "logical"
    owns_source_devices: ClassVar[bool] = True

    @classmethod
    def validate(cls, pool: PoolDef) -> None:
        if pool.source.format not in (None, "lvm2", "unknown"):
            raise Invalid(f"logical pools are lvm2, not {pool.source.format!r}")
        if pool.target_path and pool.target_path != f"/dev/{cls.vg_of(pool)}":
            raise Invalid(f"the target of a logical pool is /dev/{cls.vg_of(pool)}")

    @staticmethod
    def vg_of(pool: PoolDef) -> str:
        return pool.source.name or pool.name

    @property
    def vg(self) -> str:
        return self.vg_of(self.pool)

    async def _vg(self) -> tuple[int, int]:
        """The group's size and free bytes."""
        try:
            out = await run(["vgs", "--reportformat", "json", "--units", "b", "--nosuffix",
                             "-o", "vg_name,vg_size,vg_free", self.vg])
        except BackendFailed as e:
            raise _lvm_error(e, f"volume group {self.vg}") from None
        return parse_vg(out, self.vg)

    async def _lvs(self) -> list[dict[str, str]]:
        try:
            out = await run(["lvs", "--reportformat", "json", "--units", "b", "--nosuffix",
                             "-o", LV_FIELDS, self.vg])
        except BackendFailed as e:
            raise _lvm_error(e, f"volume group {self.vg}") from None
        return parse_lvs(out)

    # ---------------------------------------------------------------- pools

    async def is_running(self) -> bool:
        """Active when any of its LVs is (an empty group is started explicitly)."""
        try:
            rows = await self._lvs()
        except (NotFound, BackendFailed):
            return False
        return any(r["lv_attr"][4:5] == "a" for r in rows)

    async def build(self, overwrite: bool) -> None:
        devices = [d.path for d in self.pool.source.devices]
        if not devices:
            raise Invalid("building a logical pool needs <source><device path=.../>")
        for dev in devices:
            await trio.to_thread.run_sync(blockdev.check_unused, dev)
            found = await blockdev.signatures(dev)
            if found and not overwrite:
                raise Busy(f"{dev} already holds {', '.join(found)}; "
                           "'build --overwrite' replaces it")
        made: list[str] = []
        try:
            for dev in devices:
                await run(["pvcreate", "-y", *(["-ff"] if overwrite else []), dev])
                made.append(dev)
            await run(["vgcreate", self.vg, *devices])
        except BaseException as e:
            # Failed or cancelled (the command killed): the PVs made go again, and a group
            # a killed vgcreate left on them (on them alone: never one that was there).
            with trio.CancelScope(shield=True):
                if not isinstance(e, BackendFailed) and made == devices:
                    await self._drop_group_on(devices)
                for dev in made:
                    with contextlib.suppress(BackendFailed):
                        await run(["pvremove", "-y", dev])
            if isinstance(e, BackendFailed):
                raise _lvm_error(e, f"building {self.vg}") from None
            raise
        log.info("pool %s: volume group %s made on %s", self.pool.name, self.vg, devices)

    async def _drop_group_on(self, devices: list[str]) -> None:
        """Remove the group if its PVs are all among ``devices``."""
        try:
            out = await run(["pvs", "--reportformat", "json", "-o", "pv_name",
                             "-S", f"vg_name={self.vg}"])
            pvs = set(parse_pv_names(out))
            if pvs and pvs <= set(devices):
                await run(["vgremove", "-f", self.vg])
        except BackendFailed as e:
            log.warning("pool %s: %s may be left half made: %s", self.pool.name, self.vg, e)

    async def start(self) -> None:
        await self._vg()  # says clearly when the group is not there
        await run(["vgchange", "-aay", self.vg])

    async def stop(self) -> None:
        try:
            await run(["vgchange", "-an", self.vg])
        except BackendFailed as e:
            raise Busy(f"cannot deactivate {self.vg}: {e.message}") from None

    async def delete(self) -> None:
        if await self._lvs():
            raise NotEmpty(f"volume group {self.vg} still holds logical volumes")
        pvs = parse_pv_names(await run(["pvs", "--reportformat", "json", "-o", "pv_name",
                                        "-S", f"vg_name={self.vg}"]))
        await run(["vgremove", "-f", self.vg])
        for pv in pvs:
            await run(["pvremove", "-y", pv])

    async def refresh(self) -> Snapshot:
        vg_size, vg_free = await self._vg()
        vols = lv_volumes(await self._lvs())
        status = PoolStatus(capacity=vg_size, allocation=vg_size - vg_free, available=vg_free)
        return Snapshot(status, tuple(vols))

    async def status(self) -> PoolStatus:
        return (await self.refresh()).status

    async def volume(self, name: str) -> Volume:
        for vol in (await self.refresh()).volumes:
            if vol.name == name:
                return vol
        raise NotFound(f"no logical volume {name!r} in {self.vg}")

    # ---------------------------------------------------------------- volumes

    def space_needed(self, vdef: VolumeDef) -> int:
        # A sparse or thin LV takes only its allocation now: that is its point.
        if vdef.allocation is not None and vdef.allocation < vdef.capacity:
            return max(vdef.allocation, SPARSE_MIN)
        return vdef.capacity

    async def _has_thin_pool(self) -> bool:
        rows = await self._lvs()
        return any(r["lv_name"] == THIN_POOL and r["lv_attr"][:1] == "t" for r in rows)

    async def create_volume(self, vdef: VolumeDef) -> Volume:
        if vdef.format not in (None, "raw", "lvm2", "none"):
            raise Unsupported(f"logical volumes hold raw data, not {vdef.format}")
        sparse = vdef.allocation is not None and vdef.allocation < vdef.capacity
        argv = lvcreate_argv(self.vg, vdef, sparse and await self._has_thin_pool())
        return await self._make(argv, vdef.name, f"creating {vdef.name}")

    async def _make(self, argv: list[str], name: str, what: str) -> Volume:
        """Make the LV ``name`` with ``argv`` (lvcreate) and return it with its device node.
        Failed or cancelled (a job's cancel kills lvcreate), nothing of it is left: an LV
        lvcreate made, or may have made before it was killed, is removed again (not one
        that was there: lvcreate refuses that at once)."""
        try:
            await run(argv)
        except BackendFailed as e:
            raise _lvm_error(e, what) from None
        except BaseException:
            await self._discard(name)
            raise
        try:
            vol = await self.volume(name)
            await self._wait_node(vol.path)
        except BaseException:
            await self._discard(name)
            raise
        return vol

    async def _discard(self, name: str) -> None:
        with trio.CancelScope(shield=True), contextlib.suppress(BackendFailed):
            await run(["lvremove", "-f", f"{self.vg}/{name}"])

    async def _wait_node(self, path: str) -> None:
        if not os.path.exists(path):
            await run(["vgmknodes", self.vg])
        if not os.path.exists(path):
            raise BackendFailed(f"{path} did not appear")

    async def delete_volume(self, vol: Volume) -> None:
        try:
            await run(["lvremove", "-f", f"{self.vg}/{vol.name}"])
        except BackendFailed as e:
            raise _lvm_error(e, f"removing {vol.name}") from None

    async def rename_volume(self, vol: Volume, new_name: str) -> Volume:
        try:
            await run(["lvrename", self.vg, vol.name, new_name])
        except BackendFailed as e:
            if "already exists" in e.message:
                raise Exists(e.message) from None
            raise _lvm_error(e, f"renaming {vol.name}") from None
        return await self.volume(new_name)

    async def resize_volume(self, vol: Volume, capacity: int) -> Volume:
        if capacity < vol.capacity:
            raise Unsupported("shrinking a logical volume destroys its end: use "
                              "'shrink SIZE' in volinfo/V/ctl to do it anyway")
        return await self._resize(vol, capacity, shrink=False)

    async def shrink_volume(self, vol: Volume, capacity: int) -> Volume:
        if capacity >= vol.capacity:
            raise Invalid(f"{capacity} is not smaller than {vol.capacity}")
        return await self._resize(vol, capacity, shrink=True)

    async def _resize(self, vol: Volume, capacity: int, shrink: bool) -> Volume:
        try:
            await run(resize_argv(self.vg, vol.name, capacity, shrink))
        except BackendFailed as e:
            raise _lvm_error(e, f"resizing {vol.name}") from None
        return await self.volume(vol.name)


    async def snapshot_volume(self, vol: Volume, name: str) -> Volume:
        return await self._make(snapshot_argv(self.vg, vol, name), name,
                                f"snapshot of {vol.name}")

    async def wipe_volume(self, vol: Volume) -> None:
        await blockdev.zero_out(vol.path, vol.capacity)


async def find_sources(spec: PoolSource) -> list[PoolSource]:
    """Volume groups and their physical volumes (virsh find-storage-pool-sources logical).

    Every group on the host: ``spec`` has nothing that narrows it.
    """
    return parse_groups(await run(["pvs", "--reportformat", "json", "-o", "pv_name,vg_name"]))
