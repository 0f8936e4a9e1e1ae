"""``logical`` pools: an LVM volume group; volumes are its logical volumes.

One ``vgs`` report per refresh gives the group's sizes and every LV (JSON,
sizes in bytes); nothing runs per lookup.
"""

from __future__ import annotations

import contextlib
import json
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

    async def _vg(self) -> dict[str, str]:
        try:
            out = await run(["vgs", "--reportformat", "json", "--units", "b", "--nosuffix",
                             "-o", "vg_name,vg_size,vg_free", self.vg])
        except BackendFailed as e:
            raise _lvm_error(e, f"volume group {self.vg}") from None
        rows: list[dict[str, str]] = json.loads(out)["report"][0]["vg"]
        if not rows:
            raise NotFound(f"volume group {self.vg} does not exist")
        return rows[0]

    async def _lvs(self) -> list[dict[str, str]]:
        try:
            out = await run(["lvs", "--reportformat", "json", "--units", "b", "--nosuffix",
                             "-o", LV_FIELDS, self.vg])
        except BackendFailed as e:
            raise _lvm_error(e, f"volume group {self.vg}") from None
        rows: list[dict[str, str]] = json.loads(out)["report"][0]["lv"]
        return rows

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
            pvs = {pv["pv_name"] for pv in json.loads(out)["report"][0]["pv"]}
            if pvs and pvs <= set(devices):
                await run(["vgremove", "-f", self.vg])
        except (BackendFailed, ValueError, LookupError) as e:
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
        pvs = json.loads(await run(["pvs", "--reportformat", "json", "-o", "pv_name",
                                    "-S", f"vg_name={self.vg}"]))["report"][0]["pv"]
        await run(["vgremove", "-f", self.vg])
        for pv in pvs:
            await run(["pvremove", "-y", pv["pv_name"]])

    @staticmethod
    def _volume(row: dict[str, str]) -> Volume:
        size = int(row["lv_size"])
        capacity, allocation = size, size
        if row["lv_attr"][:1] == "s" and row.get("origin_size"):
            capacity = int(row["origin_size"])  # a snapshot shows its origin's size;
            # its own LV is the copy-on-write area, which is what it takes
        elif row["lv_attr"][:1] == "V" and row.get("data_percent"):
            allocation = int(size * float(row["data_percent"]) / 100)  # thin: what is used
        return Volume(name=row["lv_name"], key=row["lv_uuid"], path=row["lv_path"],
                      type="block", format="lvm2", capacity=capacity, allocation=allocation,
                      physical=size)

    async def refresh(self) -> Snapshot:
        vg = await self._vg()
        vg_size, vg_free = int(vg["vg_size"]), int(vg["vg_free"])
        vols = [self._volume(r) for r in await self._lvs()
                # thin pools and hidden LVs ("[name]") are LVM's own, not volumes
                if r["lv_attr"][:1] != "t" and not r["lv_name"].startswith("[")]
        status = PoolStatus(capacity=vg_size, allocation=vg_size - vg_free, available=vg_free)
        return Snapshot(status, tuple(sorted(vols, key=lambda v: v.name)))

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
        size = _size(vdef.capacity)
        if vdef.allocation is not None and vdef.allocation < vdef.capacity:
            if await self._has_thin_pool():
                argv = ["lvcreate", "-y", "-n", vdef.name, "-V", size, "-T",
                        f"{self.vg}/{THIN_POOL}"]
            else:
                # libvirt's sparse LV: a snapshot of nothing, grown on write. The type
                # is explicit, or newer LVM makes a thin pool that outlives the volume.
                alloc = max(vdef.allocation, SPARSE_MIN)
                argv = ["lvcreate", "-y", "--type", "snapshot", "-n", vdef.name, "-s",
                        "-V", size, "-L", _size(alloc), self.vg]
        else:
            argv = ["lvcreate", "-y", "-W", "y", "-n", vdef.name, "-L", size, self.vg]
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
        return await self._resize(vol, capacity, ["lvextend"])

    async def shrink_volume(self, vol: Volume, capacity: int) -> Volume:
        if capacity >= vol.capacity:
            raise Invalid(f"{capacity} is not smaller than {vol.capacity}")
        return await self._resize(vol, capacity, ["lvreduce", "-f"])

    async def _resize(self, vol: Volume, capacity: int, argv: list[str]) -> Volume:
        try:
            await run([*argv, "-L", _size(capacity), f"{self.vg}/{vol.name}"])
        except BackendFailed as e:
            raise _lvm_error(e, f"resizing {vol.name}") from None
        return await self.volume(vol.name)


    async def snapshot_volume(self, vol: Volume, name: str) -> Volume:
        # Room for 20% of the origin to change, at least 4 MiB.
        cow = max(vol.capacity // 5, 4 << 20)
        return await self._make(["lvcreate", "-y", "-s", "-n", name, "-L", _size(cow),
                                 f"{self.vg}/{vol.name}"], name, f"snapshot of {vol.name}")

    async def wipe_volume(self, vol: Volume) -> None:
        await blockdev.zero_out(vol.path, vol.capacity)


async def find_sources(spec: PoolSource) -> list[PoolSource]:
    """Volume groups and their physical volumes (virsh find-storage-pool-sources logical).

    Every group on the host: ``spec`` has nothing that narrows it.
    """
    out = await run(["pvs", "--reportformat", "json", "-o", "pv_name,vg_name"])
    groups: dict[str, list[str]] = {}
    for row in json.loads(out)["report"][0]["pv"]:
        if row["vg_name"]:
            groups.setdefault(row["vg_name"], []).append(row["pv_name"])
    return [PoolSource(devices=tuple(SourceDevice(p) for p in pvs), name=vg, format="lvm2")
            for vg, pvs in sorted(groups.items())]
