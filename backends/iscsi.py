"""``iscsi`` pools: one target's LUNs, logged in to with open-iscsi (``iscsiadm``).

As in libvirt, the LUNs are a read-only set (no volumes are created or
deleted here): ``start`` discovers the portal's targets and logs in, ``stop``
logs out. Volumes are named ``unit:BUS:TARGET:LUN`` and point at the LUN's
link in the target directory (``/dev/disk/by-path`` by default, where udev
makes stable names), else at ``/dev/sdX``.

What the session holds is read from sysfs, never by a command per volume; a
refresh asks the session to rescan first (one ``iscsiadm`` call).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import socket
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import ClassVar

import trio

from vsfs.errors import BackendFailed, Busy, Denied, Invalid, NotFound
from vsfs.model import PoolDef, PoolSource, PoolStatus, SourceDevice, SourceHost, Volume
from vsfs.proc import run

from . import blockdev
from .base import Backend, Services, Snapshot
from .blockdev import read_sysfs as _read

log = logging.getLogger(__name__)

PORT = 3260
DEFAULT_TARGET = "/dev/disk/by-path"
SESSIONS = "/sys/class/iscsi_session"
CONNECTIONS = "/sys/class/iscsi_connection"
# iSCSI names: iqn.YYYY-MM.reversed.domain[:anything], eui.16HEX, naa.16or32HEX
ISCSI_NAME = re.compile(r"^(iqn\.\d{4}-\d{2}\.[^\s:]+(:\S+)?|eui\.[0-9A-Fa-f]{16}"
                        r"|naa\.([0-9A-Fa-f]{16}|[0-9A-Fa-f]{32}))$")
# open-iscsi's exit codes (iscsi_err.h) that mean something to a user.
ERR_LOGIN_AUTH_FAILED = 24
ERR_ISCSID_NOTCONN = 20
ERR_NO_OBJS_FOUND = 21
ERR_TRANS = 4
ERR_TRANS_TIMEOUT = 8
# SCSI peripheral types that hold data: disk and CD/DVD (as libvirt keeps).
DATA_TYPES = frozenset({"0", "5"})
LINK_WAIT = 5.0  # seconds new LUNs get to attach and have their stable links made


def check_target(pool: PoolDef) -> None:
    """What both iSCSI pool types need: one portal, the target's IQN, CHAP if any."""
    src, kind = pool.source, pool.type
    if len(src.hosts) != 1:
        raise Invalid(f"an {kind} pool needs one <source><host name=... [port=...]/>")
    if len(src.devices) != 1 or not ISCSI_NAME.match(src.devices[0].path):
        raise Invalid(f"an {kind} pool needs the target's IQN in <source><device path=.../>")
    if src.auth is not None and src.auth.type != "chap":
        raise Invalid(f"{kind} pools take <auth type='chap'>, not {src.auth.type!r}")


def portal_of(host: SourceHost) -> str:
    port = host.port or PORT
    name = f"[{host.name}]" if ":" in host.name and not host.name.startswith("[") else host.name
    return f"{name}:{port}"


def _iscsi_error(e: BackendFailed, what: str) -> BackendFailed | Denied | NotFound:
    """Says what a failed iscsiadm meant, with the most telling of its lines."""
    lines = [ln.removeprefix("iscsiadm: ").strip() for ln in e.stderr.splitlines()
             if ln.strip()]
    detail = next((ln for ln in lines if "error (" in ln or "failed" in ln.lower()),
                  lines[0] if lines else e.message)
    if e.returncode == ERR_LOGIN_AUTH_FAILED:
        return Denied(f"{what}: the target refused the CHAP credentials ({detail})")
    if e.returncode == ERR_ISCSID_NOTCONN or "iSCSI daemon" in e.stderr:
        return BackendFailed(f"{what}: iscsid is not running (start it, e.g. "
                             "'systemctl start iscsid')")
    if e.returncode in (ERR_TRANS, ERR_TRANS_TIMEOUT) or "cannot make connection" in e.stderr:
        return BackendFailed(f"{what}: cannot reach the portal ({detail})")
    if e.returncode == ERR_NO_OBJS_FOUND:
        return NotFound(f"{what}: {detail}")
    return BackendFailed(f"{what}: {detail}")


async def discover(portal: str, iface: str | None = None,
                   persist: bool = True) -> dict[str, list[str]]:
    """The targets a portal offers (sendtargets): IQN -> its portals ("addr:port")."""
    argv = ["iscsiadm", "--mode", "discovery", "--type", "sendtargets", "--portal", portal]
    if iface is not None:
        argv += ["--interface", iface]
    if not persist:
        argv += ["--op", "nonpersistent"]
    try:
        out = await run(argv, timeout=60)
    except BackendFailed as e:
        raise _iscsi_error(e, f"discovery at {portal}") from None
    return parse_sendtargets(out)


# iscsiadm --mode discovery --type sendtargets --portal PORTAL (open-iscsi 2.1.8): one
# "PORTAL,TPGT TARGET" a line; other lines (none seen) are left out:
#   127.0.0.1:3260,1 iqn.2003-01.org.example:vsfs-t1
def parse_sendtargets(text: str) -> dict[str, list[str]]:
    """IQN -> its portals ("addr:port"), in the order listed."""
    targets: dict[str, list[str]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and ISCSI_NAME.match(parts[1]):
            targets.setdefault(parts[1], []).append(parts[0].rsplit(",", 1)[0])
    return targets


@dataclass(frozen=True)
class Session:
    sid: str
    device: str  # the session's directory in sysfs, which holds its SCSI targets


@dataclass(frozen=True)
class Lun:
    name: str    # unit:BUS:TARGET:LUN, libvirt's volume name
    block: str   # sdX
    size: int
    key: str


def _serial(block: str) -> str:
    """The LUN's unique id as udev's ID_SERIAL (libvirt's key) has it, from its VPD WWID."""
    wwid = _read(f"/sys/block/{block}/device/wwid")
    kind, _, ident = wwid.partition(".")
    prefix = {"naa": "3", "eui": "2", "t10": "1"}.get(kind)
    if prefix is None or not ident:
        return f"/dev/{block}"
    return prefix + "_".join(ident.split())


def _units(session: Session) -> Iterator[tuple[list[str], list[str]]]:
    """The data LUNs of a session as sysfs has them: H:B:T:L and block devices (none
    yet while the disk driver is still attaching one). Blocking."""
    try:
        targets = [t for t in os.listdir(session.device) if t.startswith("target")]
    except OSError:
        return
    for t in targets:
        tdir = os.path.join(session.device, t)
        try:
            units = os.listdir(tdir)
        except OSError:
            continue
        for unit in units:
            hbtl = unit.split(":")
            if len(hbtl) != 4 or not all(x.isdigit() for x in hbtl):
                continue
            udir = os.path.join(tdir, unit)
            if _read(os.path.join(udir, "type")) not in DATA_TYPES:
                continue
            try:
                blocks = os.listdir(os.path.join(udir, "block"))
            except OSError:
                blocks = []
            yield hbtl, blocks


def _attaching(session: Session) -> bool:
    """Whether a data LUN of the session has no block device yet. Blocking."""
    return any(not blocks for _, blocks in _units(session))


def _luns(session: Session) -> list[Lun]:
    """The data LUNs a session shows. Blocking (sysfs only)."""
    out = []
    for hbtl, blocks in _units(session):
        if blocks:
            block = blocks[0]
            sectors = _read(f"/sys/block/{block}/size")
            out.append(Lun(name=f"unit:{hbtl[1]}:{hbtl[2]}:{hbtl[3]}", block=block,
                           size=int(sectors) * 512 if sectors.isdigit() else 0,
                           key=_serial(block)))
    out.sort(key=lambda lun: [int(x) for x in lun.name.split(":")[1:]])
    return out


class IscsiBackend(Backend):
    pool_type: ClassVar[str] = "iscsi"
    # sysfs only: LUNs that come or go (after a rescan, or the session dropping) show
    # within a second.
    poll_interval: ClassVar[float] = 1.0

    def __init__(self, pool: PoolDef, services: Services | None = None) -> None:
        super().__init__(pool, services)
        self._seen: tuple[tuple[str, str, int], ...] | None = None  # at the last refresh
        self._addresses: frozenset[str] | None = None
        self._lost_logged = False

    @classmethod
    def validate(cls, pool: PoolDef) -> None:
        check_target(pool)
        src = pool.source
        if src.initiator_iqn is not None and not ISCSI_NAME.match(src.initiator_iqn):
            raise Invalid(f"bad initiator IQN {src.initiator_iqn!r}")
        if pool.target_path is not None and not pool.target_path.startswith("/dev"):
            raise Invalid("the target of an iscsi pool is a directory of device nodes "
                          f"such as {DEFAULT_TARGET}")

    @property
    def iqn(self) -> str:
        return self.pool.source.devices[0].path

    @property
    def portal(self) -> str:
        return portal_of(self.pool.source.hosts[0])

    @property
    def target_dir(self) -> str:
        return self.pool.target_path or DEFAULT_TARGET

    @property
    def iface(self) -> str | None:
        """The open-iscsi interface carrying our initiator IQN, when the XML names one."""
        iqn = self.pool.source.initiator_iqn
        if iqn is None:
            return None
        return "vsfs-" + hashlib.sha256(iqn.encode()).hexdigest()[:12]

    def _node_argv(self, portal: str) -> list[str]:
        argv = ["iscsiadm", "--mode", "node", "--targetname", self.iqn, "--portal", portal]
        if self.iface is not None:
            argv += ["--interface", self.iface]
        return argv

    # ---------------------------------------------------------------- sessions

    async def _host_addresses(self) -> frozenset[str]:
        if self._addresses is None:
            host = self.pool.source.hosts[0].name.strip("[]")

            def resolve() -> frozenset[str]:
                try:
                    infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
                except OSError:
                    return frozenset({host})
                return frozenset({host, *(str(i[4][0]) for i in infos)})
            self._addresses = await trio.to_thread.run_sync(resolve)
        return self._addresses

    def _find_session(self, addresses: frozenset[str]) -> Session | None:
        """Our session in sysfs: this target, at this host and port (and initiator). Blocking."""
        port = str(self.pool.source.hosts[0].port or PORT)
        try:
            names = os.listdir(SESSIONS)
        except OSError:
            return None
        for name in names:
            sdir = os.path.join(SESSIONS, name)
            if _read(os.path.join(sdir, "targetname")) != self.iqn:
                continue
            initiator = self.pool.source.initiator_iqn
            if initiator is not None and _read(os.path.join(sdir, "initiatorname")) != initiator:
                continue
            sid = name.removeprefix("session")
            conn = os.path.join(CONNECTIONS, f"connection{sid}:0")
            address = _read(os.path.join(conn, "persistent_address"))
            if address not in addresses or _read(os.path.join(conn, "persistent_port")) != port:
                continue
            return Session(sid, os.path.realpath(os.path.join(sdir, "device")))
        return None

    async def _session(self) -> Session | None:
        addresses = await self._host_addresses()
        return await trio.to_thread.run_sync(self._find_session, addresses)

    async def is_running(self) -> bool:
        return await self._session() is not None

    # ---------------------------------------------------------------- pools

    async def _ensure_iface(self) -> None:
        iface, iqn = self.iface, self.pool.source.initiator_iqn
        if iface is None or iqn is None:
            return
        base = ["iscsiadm", "--mode", "iface", "--interface", iface]
        try:
            await run(base)
        except BackendFailed:
            await run([*base, "--op", "new"])
        await run([*base, "--op", "update", "--name", "iface.initiatorname", "--value", iqn])

    async def _set_auth(self, portal: str) -> None:
        auth = self.pool.source.auth
        if auth is None:
            return
        password = await trio.to_thread.run_sync(self.secrets.value, auth)
        update = [*self._node_argv(portal), "--op", "update", "--name"]
        for key, value in (("node.session.auth.authmethod", "CHAP"),
                           ("node.session.auth.username", auth.username),
                           ("node.session.auth.password", password)):
            try:
                await run([*update, key, "--value", value], secret=password)
            except BackendFailed as e:
                raise _iscsi_error(e, f"setting CHAP for {self.iqn}") from None

    async def start(self) -> None:
        if await self._session() is not None:
            return  # logged in already (by hand, or before a crash): adopt it
        await self._ensure_iface()
        targets = await discover(self.portal, self.iface)
        portals = targets.get(self.iqn)
        if not portals:
            offered = ", ".join(sorted(targets)) or "none"
            raise NotFound(f"portal {self.portal} offers no target {self.iqn} "
                           f"(it offers: {offered})")
        # Log in through the portal as discovery recorded it: the node records are
        # keyed by it, and it is the host we were given when the target says so.
        addresses = await self._host_addresses()
        portal = next((p for p in portals if p.rsplit(":", 1)[0].strip("[]") in addresses),
                      self.portal)
        await self._set_auth(portal)
        try:
            await run([*self._node_argv(portal), "--login"], timeout=90)
        except BackendFailed as e:
            raise _iscsi_error(e, f"login to {self.iqn} at {portal}") from None
        log.info("pool %s: logged in to %s at %s", self.pool.name, self.iqn, portal)
        await self._settle()

    async def _settle(self) -> None:
        """After a login or a rescan: give the disk driver a moment to attach the new
        LUNs' block devices (those are the volumes), and udev to make their stable
        names, as libvirt does, when it runs."""
        udev = os.path.exists("/run/udev/control") and self.target_dir != "/dev"
        with trio.move_on_after(LINK_WAIT):
            while True:
                session = await self._session()
                if session is None:
                    return
                if not await trio.to_thread.run_sync(_attaching, session):
                    if not udev:
                        return
                    luns = await trio.to_thread.run_sync(_luns, session)
                    links = await trio.to_thread.run_sync(self._links)
                    if all(f"/dev/{lun.block}" in links for lun in luns):
                        return
                await trio.sleep(0.05)

    async def stop(self) -> None:
        session = await self._session()
        if session is None:
            return
        # Also the LUNs the pool has not listed yet: a logout pulls every one of them. Open
        # counts as in use as much as mounted: the holder's next read would fail.
        luns = {f"/dev/{lun.block}": lun for lun in
                await trio.to_thread.run_sync(_luns, session)}
        found = await trio.to_thread.run_sync(lambda: blockdev.users(devices=list(luns)))
        if found:
            dev, users = next(iter(found.items()))
            raise Busy(f"LUN {luns[dev].name} ({dev}) is in use: {'; '.join(users)}")
        portal = _read(os.path.join(CONNECTIONS, f"connection{session.sid}:0",
                                    "persistent_address"))
        port = _read(os.path.join(CONNECTIONS, f"connection{session.sid}:0", "persistent_port"))
        portal = f"[{portal}]:{port}" if ":" in portal else f"{portal}:{port}"
        try:
            await run([*self._node_argv(portal), "--logout"], timeout=60)
        except BackendFailed as e:
            raise _iscsi_error(e, f"logout from {self.iqn}") from None
        self._seen = None
        log.info("pool %s: logged out of %s", self.pool.name, self.iqn)

    # ---------------------------------------------------------------- volumes

    def _links(self) -> dict[str, str]:
        """Device node -> its link in the target directory. Blocking: one listdir."""
        target = self.target_dir
        if target.rstrip("/") == "/dev":
            return {}
        found: dict[str, str] = {}
        with contextlib.suppress(OSError):
            for name in sorted(os.listdir(target)):
                path = os.path.join(target, name)
                found.setdefault(os.path.realpath(path), path)
        return found

    def _scan(self, session: Session | None) -> list[Volume]:
        """Every LUN of the session as a volume. Blocking (sysfs and one listdir)."""
        if session is None:
            return []
        luns = _luns(session)
        links = self._links()
        vols = []
        for lun in luns:
            dev = f"/dev/{lun.block}"
            vols.append(Volume(name=lun.name, key=lun.key, path=links.get(dev, dev),
                               type="block", format="none", capacity=lun.size,
                               allocation=lun.size, physical=lun.size))
        return vols

    @staticmethod
    def _status(vols: list[Volume]) -> PoolStatus:
        # As libvirt: a target's LUNs are all allocated and it has no free space.
        total = sum(v.capacity for v in vols)
        return PoolStatus(capacity=total, allocation=total, available=0)

    async def refresh(self) -> Snapshot:
        session = await self._session()
        if session is None:
            if not self._lost_logged:
                log.warning("pool %s: no session with %s at %s; its LUNs are gone until "
                            "it is back or the pool is restarted", self.pool.name, self.iqn,
                            self.portal)
                self._lost_logged = True
        else:
            self._lost_logged = False
            try:
                await run(["iscsiadm", "--mode", "session", "--sid", session.sid, "--rescan"])
            except BackendFailed as e:
                log.warning("pool %s: rescan failed: %s", self.pool.name, e.message)
            # The rescan returns once the SCSI devices exist; their block devices come
            # a moment later.
            await self._settle()
        vols = await trio.to_thread.run_sync(self._scan, session)
        # What the manager now holds: `changed` compares the LUNs with it.
        self._seen = self._signature(vols)
        return Snapshot(self._status(vols), tuple(vols))

    async def status(self) -> PoolStatus:
        session = await self._session()
        return self._status(await trio.to_thread.run_sync(self._scan, session))

    @staticmethod
    def _signature(vols: list[Volume]) -> tuple[tuple[str, str, int], ...]:
        return tuple((v.name, v.path, v.capacity) for v in vols)

    async def changed(self) -> bool:
        session = await self._session()
        return self._signature(await trio.to_thread.run_sync(self._scan, session)) != self._seen

    async def volume(self, name: str) -> Volume:
        session = await self._session()
        for vol in await trio.to_thread.run_sync(self._scan, session):
            if vol.name == name:
                return vol
        raise NotFound(f"no LUN {name!r} in pool {self.pool.name!r}")

    async def volume_users(self, vols: Collection[Volume]) -> dict[str, list[str]]:
        # A LUN opened but not mounted (a VM's disk, dd) is in use: wiping it would write
        # under its user.
        return await blockdev.volume_users(vols)

    async def wipe_volume(self, vol: Volume) -> None:
        await blockdev.zero_out(vol.path, vol.capacity)


async def find_sources(spec: PoolSource) -> list[PoolSource]:
    """The targets a portal offers (virsh find-storage-pool-sources iscsi)."""
    if not spec.hosts:
        raise Invalid("name the portal: cat 'sources/iscsi?host=HOST[&port=PORT]', or "
                      "echo HOST[:PORT] > sources/iscsi first")
    host = spec.hosts[0]
    targets = await discover(portal_of(host), persist=False)
    return [PoolSource(hosts=(host,), devices=(SourceDevice(iqn),),
                       initiator_iqn=spec.initiator_iqn) for iqn in sorted(targets)]
