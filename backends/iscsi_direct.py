"""``iscsi-direct`` pools: a target's LUNs reached in userspace (libiscsi), as libvirt does.

No kernel initiator: ``iscsi-ls`` lists the LUNs and ``iscsi-readcapacity16``
gives each one's exact size (one per LUN, at start and refresh only). Like
libvirt's, the volumes are ``unit:0:0:LUN`` of type network with the key and
XML path ``ip-PORTAL-iscsi-IQN-lun-N``; their local path is the pool's
qemu-storage-daemon exporting the LUN with QEMU's iscsi driver, made on demand.
CHAP credentials reach libiscsi through its environment
(``LIBISCSI_CHAP_USERNAME``/``PASSWORD``) and QEMU through a secret file, never
through a command line.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, ClassVar

import trio

from vsfs.errors import BackendFailed, Denied, Invalid, NotFound, VsfsError
from vsfs.model import PoolDef, PoolSource, PoolStatus, SourceDevice, Volume
from vsfs.proc import run
from vsfs.state import atomic_write

from .base import Snapshot
from .exports import ExportingBackend
from .iscsi import ISCSI_NAME, check_target, portal_of

log = logging.getLogger(__name__)

TOOLS = ("iscsi-ls", "iscsi-readcapacity16", "qemu-storage-daemon", "fallocate")
PREFIX = "unit:0:0:"
_TARGET = re.compile(r"^Target:(\S+)\s+Portal:(\S+)")
_LUN = re.compile(r"^Lun:(\d+)\s+Type:(\S+)")


# iscsi-ls -i INITIATOR -s iscsi://PORTAL/ (libiscsi 1.19): each target, then (with -s)
# its LUNs; without -s only the Target lines:
#   Target:iqn.2003-01.org.example:vsfs-t1 Portal:127.0.0.1:13260,1
#   Lun:0    Type:STORAGE_ARRAY_CONTROLLER
#   Lun:1    Type:DIRECT_ACCESS (Size:15M)
def parse_iscsi_ls(text: str) -> dict[str, list[int]]:
    """Target IQN -> its data LUNs (DIRECT_ACCESS), in the order listed."""
    targets: dict[str, list[int]] = {}
    current = None
    for line in text.splitlines():
        m = _TARGET.match(line.strip())
        if m:
            current = m.group(1)
            targets.setdefault(current, [])
            continue
        m = _LUN.match(line.strip())
        if m and current is not None and m.group(2) == "DIRECT_ACCESS":
            targets[current].append(int(m.group(1)))
    return targets


# iscsi-readcapacity16 -i INITIATOR iscsi://PORTAL/IQN/LUN (libiscsi 1.19):
#   RETURNED LOGICAL BLOCK ADDRESS:81919
#   LOGICAL BLOCK LENGTH IN BYTES:512
#   ...
#   Total size:41943040
def parse_readcapacity(text: str, what: str) -> int:
    """The LUN's size in bytes."""
    m = re.search(r"^Total size:\s*(\d+)\s*$", text, re.MULTILINE)
    if m is None:
        raise BackendFailed(f"{what}: iscsi-readcapacity16 gave no size")
    return int(m.group(1))


def _libiscsi_error(e: BackendFailed, what: str) -> VsfsError:
    msg = e.stderr or e.message
    if "authentication" in msg.lower() or "Authorization" in msg or "CHAP" in msg:
        return Denied(f"{what}: the target refused the CHAP credentials")
    if "connect" in msg.lower():
        return BackendFailed(f"{what}: cannot reach the portal ({msg.splitlines()[-1]})")
    return BackendFailed(f"{what}: {msg.strip().splitlines()[-1] if msg.strip() else e}")


class IscsiDirectBackend(ExportingBackend):
    pool_type: ClassVar[str] = "iscsi-direct"

    @classmethod
    def validate(cls, pool: PoolDef) -> None:
        check_target(pool)
        src = pool.source
        if src.initiator_iqn is None or not ISCSI_NAME.match(src.initiator_iqn):
            raise Invalid("an iscsi-direct pool needs its initiator IQN in "
                          "<source><initiator><iqn name=.../></initiator>")

    @property
    def iqn(self) -> str:
        return self.pool.source.devices[0].path

    @property
    def initiator(self) -> str:
        assert self.pool.source.initiator_iqn is not None
        return self.pool.source.initiator_iqn

    @property
    def portal(self) -> str:
        return portal_of(self.pool.source.hosts[0])

    def _password_path(self) -> Path:
        return self.run_dir() / "chap"

    async def _env(self) -> dict[str, str] | None:
        auth = self.pool.source.auth
        if auth is None:
            return None
        password = await trio.to_thread.run_sync(self.secrets.value, auth)
        return {**os.environ, "LIBISCSI_CHAP_USERNAME": auth.username,
                "LIBISCSI_CHAP_PASSWORD": password}

    async def _cli(self, *argv: str, what: str) -> str:
        try:
            return await run([argv[0], "-i", self.initiator, *argv[1:]], timeout=60,
                             env=await self._env())
        except BackendFailed as e:
            raise _libiscsi_error(e, what) from None

    # ---------------------------------------------------------------- QEMU

    def blockdev(self, name: str) -> dict[str, Any]:
        dev: dict[str, Any] = {"driver": "iscsi", "transport": "tcp", "portal": self.portal,
                               "target": self.iqn, "lun": self._lun(name),
                               "initiator-name": self.initiator}
        if self.pool.source.auth is not None:
            dev["user"] = self.pool.source.auth.username
            dev["password-secret"] = "chap"
        return dev

    def qsd_objects(self) -> list[str]:
        if self.pool.source.auth is None:
            return []
        return [f"secret,id=chap,file={self._password_path()},format=raw"]

    @staticmethod
    def _lun(name: str) -> int:
        if not name.startswith(PREFIX) or not name[len(PREFIX):].isdigit():
            raise NotFound(f"no LUN {name!r}")
        return int(name[len(PREFIX):])

    # ---------------------------------------------------------------- pools

    async def is_running(self) -> bool:
        return await self.daemon_running()

    async def check_storage(self) -> None:
        self.require_tools(TOOLS, "libiscsi-bin, qemu-system-common, qemu-block-extra")
        auth = self.pool.source.auth
        if auth is not None:
            password = await trio.to_thread.run_sync(self.secrets.value, auth)
            await trio.to_thread.run_sync(atomic_write, self._password_path(), password.encode())
        await self._luns()  # the target is there and lets us in

    async def stop(self) -> None:
        await self.stop_exports()  # the password file goes with the runtime directory

    async def _luns(self) -> list[int]:
        """The data LUNs of our target: one iscsi-ls."""
        out = await self._cli("iscsi-ls", "-s", f"iscsi://{self.portal}/",
                              what=f"listing {self.portal}")
        targets = parse_iscsi_ls(out)
        if self.iqn not in targets:
            raise NotFound(f"portal {self.portal} offers no target {self.iqn} (it offers: "
                           f"{', '.join(targets) or 'none'})")
        return targets[self.iqn]

    async def _volume(self, lun: int) -> Volume:
        out = await self._cli("iscsi-readcapacity16", f"iscsi://{self.portal}/{self.iqn}/{lun}",
                              what=f"LUN {lun}")
        size = parse_readcapacity(out, f"LUN {lun}")
        name = f"{PREFIX}{lun}"
        key = f"ip-{self.portal}-iscsi-{self.iqn}-lun-{lun}"
        return Volume(name=name, key=key, path=self.qsd.path_of(name), type="network",
                      format="raw", capacity=size, allocation=size, physical=size,
                      xml_path=key)

    async def refresh(self) -> Snapshot:
        vols = [await self._volume(lun) for lun in await self._luns()]
        for gone in set(self._exports) - {v.name for v in vols}:
            await self._unexport(gone)
        total = sum(v.capacity for v in vols)
        return Snapshot(PoolStatus(capacity=total, allocation=total, available=0), tuple(vols))

    async def status(self) -> PoolStatus:
        return (await self.refresh()).status

    async def volume(self, name: str) -> Volume:
        return await self._volume(self._lun(name))


async def find_sources(spec: PoolSource) -> list[PoolSource]:
    """The targets a portal offers, found without a kernel initiator (iscsi-ls)."""
    if not spec.hosts or not spec.initiator_iqn:
        raise Invalid("name the portal and an initiator: cat 'sources/iscsi-direct?host=HOST"
                      "&initiator=IQN', or write a <source> with both into it")
    host = spec.hosts[0]
    try:
        out = await run(["iscsi-ls", "-i", spec.initiator_iqn, f"iscsi://{portal_of(host)}/"],
                        timeout=60)
    except BackendFailed as e:
        raise _libiscsi_error(e, f"discovery at {portal_of(host)}") from None
    iqns = sorted(parse_iscsi_ls(out))
    return [PoolSource(hosts=(host,), devices=(SourceDevice(iqn),),
                       initiator_iqn=spec.initiator_iqn) for iqn in iqns]
