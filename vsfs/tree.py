"""The filesystem tree as plain Python objects.

Every path resolves to a Dir, a File or a Link, made on demand from the
manager's in-memory state (no backend command runs to resolve a path or list a
directory). Nothing here imports pyfuse3: the FUSE adapter walks these objects
and only translates.

FILES is the one table of what the tree holds; the mounted README and the
checks in the tests are made from it, so the documentation cannot drift.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from . import commands
from .backends import SOURCE_FINDERS
from .backends.host import HostDevice
from .errors import Invalid, NotFound, Unsupported
from .feed import Feed
from .jobs import Job
from .manager import Manager, PoolEntry
from .model import PoolSource, SourceHost, Volume, VolumeDef, check_name, normal_path
from .units import parse_size
from .uploads import Upload
from .xmlio import format_pool, format_sources, format_volume, parse_source_spec

Render = Callable[[], Awaitable[bytes]]
Apply = Callable[[bytes], Awaitable[None]]

DIR_MODE = 0o755
RO_MODE = 0o444
RW_MODE = 0o644
WO_MODE = 0o200

# (path pattern, access, what it is): the mounted README and docs/ are made from this.
FILES: tuple[tuple[str, str, str], ...] = (
    ("README", "r", "this page"),
    ("error", "r", "the last error caused by the reading user (empty when none)"),
    ("by-uuid/<uuid>", "link", "-> ../pools/<pool>: a pool by its UUID (any case, dashes or not)"),
    ("by-key/<key>", "link", "-> the volume's entry; '/' in a key is written '\\x2f'"),
    ("by-path/<local path>", "link", "-> the volume's entry, e.g. by-path/var/lib/images/a.img"),
    ("events", "r", "changes as they happen, one line each: SEQ TIME KIND OBJECT EVENT [DETAIL]"),
    ("jobs/<id>/what", "r", "a long operation (clone, wipe, upload, ...): what it does"),
    ("jobs/<id>/state", "r", "running | done | failed | cancelled"),
    ("jobs/<id>/progress", "r", "DONE TOTAL: bytes done and in all (TOTAL 0 where unknown)"),
    ("jobs/<id>/error", "r", "why it failed (empty otherwise)"),
    ("jobs/<id>/ctl", "w", "cancel: stop it and remove what it half made"),
    *((f"sources/{stype}", "rw" if finder.needs_host else "r", finder.about)
      for stype, finder in SOURCE_FINDERS.items()),
    ("sources/<type>?host=<host>", "r",
     "the same for that host, without writing: ?host=H[&port=P][&initiator=IQN]"),
    ("host/volumes/<dev>", "link", "-> /dev/<dev>: every block device of the host"),
    ("host/volinfo/<dev>/size", "r", "bytes"),
    ("host/volinfo/<dev>/type", "r", "disk | part | loop | rom | ..."),
    ("host/volinfo/<dev>/model", "r", "the model, where known"),
    ("host/volinfo/<dev>/serial", "r", "the serial number, where known"),
    ("host/volinfo/<dev>/wwn", "r", "the world wide name, where known (udev)"),
    ("host/volinfo/<dev>/fstype", "r", "the filesystem or signature on it (udev)"),
    ("host/volinfo/<dev>/ro", "r", "1 if read-only, else 0"),
    ("host/volinfo/<dev>/removable", "r", "1 if removable, else 0"),
    ("host/volinfo/<dev>/holders", "r", "devices built on it (dm, md, ...), space-separated"),
    ("host/volinfo/<dev>/mountpoints", "r", "where it is mounted, space-separated"),
    ("host/volinfo/<dev>/xml", "r", "the device as a libvirt <volume>"),
    ("pools/define", "w", "write a <pool> XML document to define a pool"),
    ("pools/<pool>/", "dir", "one per defined pool; rmdir undefines an inactive pool"),
    ("pools/<pool>/xml", "rw", "the pool's live XML; write a <pool> document to redefine it"),
    ("pools/<pool>/define", "w", "write a <volume> XML document to create a volume"),
    ("pools/<pool>/ctl", "w", "start | stop | build [--overwrite] | refresh | delete"),
    ("pools/<pool>/state", "r", "inactive | building | running | degraded | inaccessible"),
    ("pools/<pool>/type", "r", "dir, fs, netfs, logical, disk, iscsi, ..."),
    ("pools/<pool>/uuid", "r", "the pool's UUID"),
    ("pools/<pool>/autostart", "rw", "yes | no (1/0/true/false accepted)"),
    ("pools/<pool>/capacity", "r", "bytes"),
    ("pools/<pool>/allocation", "r", "bytes"),
    ("pools/<pool>/free", "r", "bytes available for new volumes"),
    ("pools/<pool>/target", "link", "-> the pool's target path, where it has one"),
    ("pools/<pool>/volumes/<vol>", "link", "-> the volume's local path"),
    ("pools/<pool>/volinfo/<vol>/xml", "r", "the volume's XML"),
    ("pools/<pool>/volinfo/<vol>/capacity", "rw", "bytes; write a size to resize"),
    ("pools/<pool>/volinfo/<vol>/allocation", "r", "bytes actually used"),
    ("pools/<pool>/volinfo/<vol>/format", "r", "raw, qcow2, dir, ..."),
    ("pools/<pool>/volinfo/<vol>/path", "r", "the local path"),
    ("pools/<pool>/volinfo/<vol>/key", "r", "the volume's unique key"),
    ("pools/<pool>/volinfo/<vol>/ctl", "w",
     "wipe | clone NEW [POOL] | snapshot NEW | shrink SIZE | delete"),
    ("pools/<pool>/volinfo/<vol>/job", "link",
     "-> ../../../../jobs/<id> while a long operation holds the volume"),
)

VERBS: tuple[tuple[str, str], ...] = (
    ("cat pool.xml > pools/define", "define a pool (it appears inactive)"),
    ("echo build > pools/P/ctl", "create its storage (a directory for dir pools)"),
    ("echo start > pools/P/ctl", "start it; stop, refresh and delete likewise"),
    ("echo yes > pools/P/autostart", "start it whenever vsfs is mounted"),
    ("rmdir pools/P", "undefine an inactive pool (its storage stays)"),
    ("truncate -s 10G pools/P/volumes/V", "create a sparse raw volume"),
    ("mkdir pools/P/volumes/V", "create a directory volume"),
    ("cp disk.img pools/P/volumes/V", "create a volume holding a copy of the file"),
    ("cat vol.xml > pools/P/define", "create a volume from XML (qcow2, backing store, ...)"),
    ("rm pools/P/volumes/V", "delete the volume"),
    ("mv pools/P/volumes/A pools/P/volumes/B", "rename it"),
    ("echo 20G > pools/P/volinfo/V/capacity", "resize it"),
    ("echo 'clone NEW [POOL]' > pools/P/volinfo/V/ctl", "copy it"),
    ("echo 'snapshot NEW' > pools/P/volinfo/V/ctl", "a qcow2 overlay backed by it"),
    ("echo wipe > pools/P/volinfo/V/ctl", "zero it"),
    ("cat jobs/N/progress", "how far a long operation is"),
    ("echo cancel > jobs/N/ctl", "stop it: its writer gets ECANCELED, nothing half made stays"),
    ("while read -r seq time kind obj ev rest; do ...; done < events", "follow every change"),
    ("cat 'sources/netfs?host=H'", "what pools could be made from that server"),
)


def readme_text() -> str:
    width = max(len(p) for p, _, _ in FILES)
    lines = [
        "vsfs: host storage as files (libvirt's pools and volumes).",
        "",
        "Files (one value per file, newline-terminated; r = read, w = write):",
    ]
    lines += [f"  {p:<{width}}  {a:<4} {d}" for p, a, d in FILES]
    vwidth = max(len(v) for v, _ in VERBS)
    lines += ["", "Verbs:"]
    lines += [f"  {v:<{vwidth}}  {d}" for v, d in VERBS]
    lines += [
        "",
        "Sizes: bytes, or K/M/G/T (1024) and KB/MB/GB/TB (1000).",
        "A refused action fails with an errno and leaves its reason in 'error'.",
        "Full reference: docs/reference.md in the vsfs sources.",
        "",
    ]
    return "\n".join(lines)


README_BYTES = readme_text().encode()


def escape_key(key: str) -> str:
    return key.replace("\\", "\\x5c").replace("/", "\\x2f")


def unescape_key(name: str) -> str:
    return name.replace("\\x2f", "/").replace("\\x5c", "\\")


def _value(v: object) -> bytes:
    return f"{v}\n".encode()


@dataclass
class Node:
    mode: int


@dataclass
class File(Node):
    read: Render | None = None
    write: Apply | None = None
    xml: bool = False
    # A value, or an XML document when what is written starts with "<" (sources/TYPE).
    document: bool = False
    # Size of static content; generated files report 0 and are read with direct I/O.
    size: int = 0


@dataclass
class Link(Node):
    target: str = ""
    # Run before the target is handed out: makes a local path that exists on demand.
    prepare: Callable[[], Awaitable[None]] | None = None


@dataclass
class Stream(Node):
    """A file whose reads wait for the next change (MNT/events)."""

    feed: Feed


@dataclass
class UploadFile(Node):
    """A volume being created through a file handle: a regular file until closed."""

    upload: Upload


@dataclass
class Dir(Node):
    names: Callable[[], Iterable[str]] = lambda: ()
    child: Callable[[str], Node | None] = lambda name: None
    # Every (name, child) at once, where that is cheaper than child() per name.
    entries: Callable[[], list[tuple[str, Node]]] | None = None
    create: Callable[[str], Awaitable[Upload]] | None = None
    mkdir: Callable[[str], Awaitable[None]] | None = None
    unlink: Callable[[str], Awaitable[None]] | None = None
    rmdir: Callable[[str], Awaitable[None]] | None = None
    rename: Callable[[str, tuple[str, ...], str], Awaitable[None]] | None = None
    # Entries that change behind our back are looked up again every time.
    volatile: bool = False


class Tree:
    """Resolves paths (tuples of names) to nodes."""

    def __init__(self, manager: Manager) -> None:
        self.m = manager
        # The last error per user id: MNT/error shows the reader's own.
        self.errors: dict[int, str] = {}
        # What was last written into sources/<type>: the host to ask, and so on.
        self.source_specs: dict[str, PoolSource] = {}
        # Directory nodes look the manager up when asked, so one object per
        # path serves for good; caching them keeps a lookup to a few dict hits.
        self._dirs: dict[tuple[str, ...], Dir] = {}

    def _cached(self, key: tuple[str, ...], make: Callable[[], Dir]) -> Dir:
        node = self._dirs.get(key)
        if node is None:
            if len(self._dirs) > 4096 + 4 * sum(len(e.volumes) for e in self.m.pools.values()):
                self._dirs.clear()  # volinfo dirs of volumes long gone
            node = self._dirs[key] = make()
        return node

    def record_error(self, uid: int, message: str) -> None:
        self.errors[uid] = message

    def resolve(self, path: tuple[str, ...]) -> Node | None:
        node: Node | None = self._cached((), self.root)
        for name in path:
            if not isinstance(node, Dir):
                return None
            node = node.child(name)
        return node

    def children(self, node: Dir) -> list[tuple[str, Node]]:
        if node.entries is not None:
            return node.entries()
        out = []
        for name in node.names():
            child = node.child(name)
            if child is not None:
                out.append((name, child))
        return out

    # ---------------------------------------------------------------- root

    def root(self) -> Dir:
        def child(name: str) -> Node | None:
            match name:
                case "README":
                    return File(RO_MODE, read=self._readme, size=len(README_BYTES))
                case "error":
                    return File(RO_MODE)  # filled per reader by the adapter
                case "by-uuid":
                    return self._by_uuid()
                case "by-key":
                    return self._by_key()
                case "by-path":
                    return self._by_path(())
                case "pools":
                    return self._cached(("pools",), self._pools)
                case "host":
                    return self._cached(("host",), self._host)
                case "sources":
                    return self._cached(("sources",), self._sources)
                case "events":
                    return Stream(RO_MODE, feed=self.m.feed)
                case "jobs":
                    return self._cached(("jobs",), self._jobs)
            return None

        return Dir(DIR_MODE, names=lambda: ("README", "error", "events", "jobs", "by-uuid",
                                            "by-key", "by-path", "sources", "host", "pools"),
                   child=child)

    # ---------------------------------------------------------------- jobs

    def _jobs(self) -> Dir:
        def child(name: str) -> Node | None:
            if not name.isascii() or not name.isdigit():
                return None
            job = self.m.jobs.get(int(name))
            return self._job(job) if job is not None else None

        return Dir(DIR_MODE, names=lambda: [str(i) for i in self.m.jobs.ids()], child=child,
                   volatile=True)

    def _job(self, job: Job) -> Dir:
        def value(fn: Callable[[], str]) -> File:
            async def render() -> bytes:
                text = fn()
                return _value(text) if text else b""
            return File(RO_MODE, read=render)

        async def ctl(data: bytes) -> None:
            commands.job_command(job, _line(data))

        files: dict[str, Node] = {
            "what": value(lambda: job.what),
            "state": value(lambda: job.state.value),
            "progress": value(job.progress),
            "error": value(lambda: job.error),
            "ctl": File(WO_MODE, write=ctl),
        }
        return Dir(DIR_MODE, names=lambda: list(files), child=files.get)

    def _sources(self) -> Dir:
        def finder(stype: str, spec: Callable[[], PoolSource]) -> Render:
            async def render() -> bytes:
                return format_sources(await SOURCE_FINDERS[stype].find(spec()))
            return render

        def child(name: str) -> Node | None:
            stype, query_mark, query = name.partition("?")
            if stype not in SOURCE_FINDERS:
                return None
            if query_mark:
                # sources/TYPE?host=H[&port=P][&initiator=IQN]: one query, nothing kept
                return File(RO_MODE, read=finder(stype, lambda: source_query(query)))
            if not SOURCE_FINDERS[stype].needs_host:
                return File(RO_MODE, read=finder(stype, PoolSource))

            async def remember(data: bytes) -> None:
                self.source_specs[stype] = source_spec(data)
            return File(RW_MODE, write=remember, document=True,
                        read=finder(stype, lambda: self.source_specs.get(stype, PoolSource())))

        return Dir(DIR_MODE, names=lambda: list(SOURCE_FINDERS), child=child)

    # ---------------------------------------------------------------- host

    def _host(self) -> Dir:
        devices = self.m.host.devices

        def volumes() -> Dir:
            def child(name: str) -> Node | None:
                dev = devices().get(name)
                return Link(0o777, target=dev.path) if dev is not None else None
            return Dir(DIR_MODE, names=lambda: list(devices()), child=child)

        def volinfo() -> Dir:
            def child(name: str) -> Node | None:
                if name not in devices():
                    return None
                return self._cached(("host", "volinfo", name), lambda: self._host_info(name))
            return Dir(DIR_MODE, names=lambda: list(devices()), child=child)

        kids = {"volumes": volumes(), "volinfo": volinfo()}
        return Dir(DIR_MODE, names=lambda: list(kids), child=kids.get)

    def _host_info(self, name: str) -> Dir:
        def field_of(fn: Callable[[HostDevice], object]) -> Render:
            async def render() -> bytes:
                dev = self.m.host.devices().get(name)
                if dev is None:
                    raise NotFound(f"no host device {name!r}")
                return _value(fn(dev))
            return render

        async def xml() -> bytes:
            dev = self.m.host.devices().get(name)
            if dev is None:
                raise NotFound(f"no host device {name!r}")
            return format_volume(Volume(
                name=dev.kname, key=dev.path, path=dev.path, type="block",
                format=dev.fstype or "none", capacity=dev.size, allocation=dev.size,
                physical=dev.size))

        fields: dict[str, Callable[[HostDevice], object]] = {
            "size": lambda d: d.size, "type": lambda d: d.type, "model": lambda d: d.model,
            "serial": lambda d: d.serial, "wwn": lambda d: d.wwn, "fstype": lambda d: d.fstype,
            "ro": lambda d: int(d.ro), "removable": lambda d: int(d.removable),
            "holders": lambda d: " ".join(d.holders),
            "mountpoints": lambda d: " ".join(d.mountpoints),
        }

        def child(cname: str) -> Node | None:
            if cname == "xml":
                return File(RO_MODE, read=xml)
            fn = fields.get(cname)
            return File(RO_MODE, read=field_of(fn)) if fn is not None else None

        return Dir(DIR_MODE, names=lambda: [*fields, "xml"], child=child)

    async def _readme(self) -> bytes:
        return README_BYTES

    def error_text(self, uid: int) -> bytes:
        msg = self.errors.get(uid)
        return f"{msg}\n".encode() if msg else b""

    # ---------------------------------------------------------------- lookups

    def _by_uuid(self) -> Dir:
        def child(name: str) -> Node | None:
            pool = self.m.by_uuid(name)
            return Link(0o777, target=f"../pools/{pool}") if pool is not None else None

        return Dir(DIR_MODE, names=lambda: [e.pool.uuid for e in self.m.pools.values()],
                   child=child, volatile=True)

    def _by_key(self) -> Dir:
        def child(name: str) -> Node | None:
            found = self.m.by_key(unescape_key(name))
            if found is None or escape_key(found[1].key) != name:
                return None
            return Link(0o777, target=f"../pools/{found[0]}/volumes/{found[1].name}")

        return Dir(DIR_MODE, names=lambda: [escape_key(v.key) for _, v in self.m.all_volumes()],
                   child=child, volatile=True)

    def _by_path(self, prefix: tuple[str, ...]) -> Dir:
        def paths() -> Iterable[tuple[tuple[str, ...], str, Volume]]:
            for pool, vol in self.m.all_volumes():
                if vol.path.startswith("/"):
                    # As a path walk spells it ("." and ".." taken), so that each name
                    # listed can be looked up.
                    yield tuple(c for c in normal_path(vol.path).split("/") if c), pool, vol

        def names() -> Iterable[str]:
            n = len(prefix)
            return sorted({p[n] for p, _, _ in paths() if len(p) > n and p[:n] == prefix})

        def child(name: str) -> Node | None:
            sub = (*prefix, name)
            up = "../" * len(sub)
            path = "/" + "/".join(sub)
            # As spelled, else spelled with "//" or a trailing "/": both indexed.
            found = self.m.by_path(path) or self.m.by_normal_path(path)
            if found is not None:
                return Link(0o777, target=f"{up}pools/{found[0]}/volumes/{found[1].name}")
            return self._by_path(sub) if self.m.has_volumes_below(path) else None

        return Dir(DIR_MODE, names=names, child=child, volatile=True)

    # ---------------------------------------------------------------- pools

    def _pools(self) -> Dir:
        def child(name: str) -> Node | None:
            if name == "define":
                return File(WO_MODE, write=self._define_pool, xml=True)
            if name not in self.m.pools:
                return None
            return self._cached(("pools", name), lambda: self._pool(name))

        async def mkdir(name: str) -> None:
            check_name(name, "pool name")
            raise Unsupported("define a pool by writing its XML to pools/define")

        return Dir(DIR_MODE, names=lambda: ["define", *self.m.pools], child=child,
                   rmdir=self.m.undefine_pool, mkdir=mkdir)

    async def _define_pool(self, data: bytes) -> None:
        await self.m.define_pool(data)

    def _pool(self, name: str) -> Dir:
        m = self.m

        async def xml() -> bytes:
            entry = m.entry(name)
            if entry.running:
                await m.pool_status(name)
                return format_pool(entry.pool, entry.status, entry.live_perms)
            return format_pool(entry.pool, entry.status)

        async def redefine(data: bytes) -> None:
            await m.redefine_pool(name, data)

        async def define_volume(data: bytes) -> None:
            await m.create_volume_xml(name, data)

        async def ctl(data: bytes) -> None:
            await commands.pool_command(m, name, _line(data))

        async def autostart(data: bytes) -> None:
            await m.set_autostart(name, commands.parse_bool(_line(data)))

        def size(attr: str) -> Render:
            async def render() -> bytes:
                status = await m.pool_status(name)
                return _value(getattr(status, attr))
            return render

        def const(fn: Callable[[], object]) -> Render:
            async def render() -> bytes:
                return _value(fn())
            return render

        def entry_names() -> list[str]:
            entry = m.pools.get(name)
            base = ["xml", "define", "ctl", "state", "type", "uuid", "autostart", "capacity",
                    "allocation", "free"]
            if entry is not None and entry.pool.target_path:
                base.append("target")
            return [*base, "volumes", "volinfo"]

        def child(cname: str) -> Node | None:
            entry = m.pools.get(name)
            if entry is None:
                return None
            match cname:
                case "xml":
                    return File(RW_MODE, read=xml, write=redefine, xml=True)
                case "define":
                    return File(WO_MODE, write=define_volume, xml=True)
                case "ctl":
                    return File(WO_MODE, write=ctl)
                case "state":
                    return File(RO_MODE, read=const(lambda: m.entry(name).state.value))
                case "type":
                    return File(RO_MODE, read=const(lambda: m.entry(name).pool.type))
                case "uuid":
                    return File(RO_MODE, read=const(lambda: m.entry(name).pool.uuid))
                case "autostart":
                    return File(RW_MODE, write=autostart,
                                read=const(lambda: "yes" if m.entry(name).autostart else "no"))
                case "capacity" | "allocation":
                    return File(RO_MODE, read=size(cname))
                case "free":
                    return File(RO_MODE, read=size("available"))
                case "target":
                    tp = entry.pool.target_path
                    return Link(0o777, target=tp) if tp else None
                case "volumes":
                    return self._cached(("pools", name, "volumes"), lambda: self._volumes(name))
                case "volinfo":
                    return self._cached(("pools", name, "volinfo"), lambda: self._volinfo(name))
            return None

        return Dir(DIR_MODE, names=entry_names, child=child)

    # ---------------------------------------------------------------- volumes

    def _volume_names(self, pool: str) -> list[str]:
        entry = self.m.pools.get(pool)
        return list(entry.volumes) if entry is not None and entry.running else []

    def _volumes(self, pool: str) -> Dir:
        m = self.m

        def node(entry: PoolEntry, name: str, vol: Volume | None) -> Node | None:
            upload = m.uploads.opening(pool, name)
            if upload is not None:
                return UploadFile(0o600, upload=upload)
            if vol is None:
                return None
            if entry.backend.on_demand_paths:
                return Link(0o777, target=vol.path,
                            prepare=lambda: m.prepare_volume(pool, name))
            return Link(0o777, target=vol.path)

        def child(name: str) -> Node | None:
            entry = m.pools.get(pool)
            if entry is None or not entry.running:
                upload = m.uploads.opening(pool, name)
                return UploadFile(0o600, upload=upload) if upload is not None else None
            return node(entry, name, entry.volumes.get(name))

        def entries() -> list[tuple[str, Node]]:
            # One pass over the pool's volumes: a listing of thousands is served from it.
            entry = m.pools.get(pool)
            if entry is None or not entry.running:
                return []
            out: list[tuple[str, Node]] = []
            for name, vol in entry.volumes.items():
                found = node(entry, name, vol)
                if found is not None:
                    out.append((name, found))
            return out

        async def create(name: str) -> Upload:
            return await m.uploads.begin(pool, name)

        async def mkdir(name: str) -> None:
            entry = m.entry(pool)
            if not entry.backend.directory_volumes:
                raise Unsupported(f"{entry.pool.type} pools have no directory volumes")
            await m.create_volume(pool, VolumeDef(name=name, capacity=0, format="dir",
                                                  type="dir"))

        async def unlink(name: str) -> None:
            await m.delete_volume(pool, name)

        async def rename(name: str, new_parent: tuple[str, ...], new_name: str) -> None:
            if (len(new_parent) != 3 or new_parent[0] != "pools"
                    or new_parent[2] != "volumes"):
                raise Invalid("volumes can only be renamed within a volumes/ directory")
            await m.rename_volume(pool, name, new_parent[1], new_name)

        return Dir(DIR_MODE, names=lambda: self._volume_names(pool), child=child,
                   entries=entries, create=create, mkdir=mkdir, unlink=unlink, rename=rename)

    def _volinfo(self, pool: str) -> Dir:
        def child(name: str) -> Node | None:
            entry = self.m.pools.get(pool)
            if entry is None or not entry.running or name not in entry.volumes:
                return None
            return self._cached(("pools", pool, "volinfo", name),
                                lambda: self._volinfo_dir(pool, name))

        return Dir(DIR_MODE, names=lambda: self._volume_names(pool), child=child)

    def _volinfo_dir(self, pool: str, name: str) -> Dir:
        files = _VolumeFiles(self.m, pool, name)
        return Dir(DIR_MODE, names=files.names, child=files.child)


class _VolumeFiles:
    """The files of volinfo/<vol>/. One per volume, kept with its cached directory node:
    a few objects rather than a closure per file, which Python's garbage collector
    would walk again and again with thousands of volumes."""

    __slots__ = ("m", "name", "pool")
    NAMES = ("xml", "capacity", "allocation", "format", "path", "key", "ctl")

    def __init__(self, m: Manager, pool: str, name: str) -> None:
        self.m = m
        self.pool = pool
        self.name = name

    def names(self) -> list[str]:
        if self.m.jobs.holder(self.pool, self.name) is not None:
            return [*_VolumeFiles.NAMES, "job"]
        return list(_VolumeFiles.NAMES)

    def child(self, cname: str) -> Node | None:
        match cname:
            case "job":
                job = self.m.jobs.holder(self.pool, self.name)
                return (Link(0o777, target=f"../../../../jobs/{job.id}")
                        if job is not None else None)
            case "xml":
                return File(RO_MODE, read=self.xml)
            case "capacity":
                return File(RW_MODE, read=self.capacity, write=self.resize)
            case "allocation":
                return File(RO_MODE, read=self.allocation)
            case "format":
                return File(RO_MODE, read=self.format)
            case "path":
                return File(RO_MODE, read=self.path)
            case "key":
                return File(RO_MODE, read=self.key)
            case "ctl":
                return File(WO_MODE, write=self.ctl)
        return None

    async def _volume(self) -> Volume:
        return await self.m.refresh_volume(self.pool, self.name)

    async def xml(self) -> bytes:
        return format_volume(await self._volume())

    async def capacity(self) -> bytes:
        return _value((await self._volume()).capacity)

    async def allocation(self) -> bytes:
        return _value((await self._volume()).allocation)

    async def format(self) -> bytes:
        return _value((await self._volume()).format)

    async def key(self) -> bytes:
        return _value((await self._volume()).key)

    async def path(self) -> bytes:
        # Whoever asks for the path will open it: make it usable.
        await self.m.prepare_volume(self.pool, self.name)
        return _value((await self._volume()).path)

    async def resize(self, data: bytes) -> None:
        await self.m.resize_volume(self.pool, self.name, parse_size(_line(data)))

    async def ctl(self, data: bytes) -> None:
        await commands.volume_command(self.m, self.pool, self.name, _line(data))


def _host_port(text: str) -> SourceHost:
    """HOST, HOST:PORT, [IPv6] or [IPv6]:PORT."""
    host, port = text, None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise Invalid(f"bad host {text!r}")
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not host or any(c.isspace() or c in "/?&<>" for c in host):
        raise Invalid(f"bad host {text!r}")
    # ASCII digits, at most five: int() takes '²' and refuses thousands of digits.
    if port is not None and not (len(port) <= 5 and port.isascii() and port.isdigit()
                                 and 0 < int(port) < 65536):
        raise Invalid(f"bad port in {text!r}")
    return SourceHost(host, int(port) if port is not None else None)


def source_query(query: str) -> PoolSource:
    """``host=H[&port=P][&initiator=IQN]``, the query part of ``sources/TYPE?...``."""
    fields: dict[str, str] = {}
    for item in query.split("&"):
        key, eq, value = item.partition("=")
        if not eq or key not in ("host", "port", "initiator") or not value:
            raise Invalid(f"bad query {query!r}: expected host=HOST[&port=PORT]"
                          "[&initiator=IQN]")
        fields[key] = value
    if "host" not in fields:
        raise Invalid(f"bad query {query!r}: it names no host")
    host = _host_port(fields["host"])
    if "port" in fields:
        host = _host_port(f"[{host.name}]:{fields['port']}")
    return PoolSource(hosts=(host,), initiator_iqn=fields.get("initiator"))


def source_spec(data: bytes) -> PoolSource:
    """What a user writes into sources/TYPE: HOST[:PORT], or a <source> document."""
    if data.lstrip().startswith(b"<"):
        return parse_source_spec(data)
    text = _line(data)
    return PoolSource(hosts=(_host_port(text),)) if text else PoolSource()


def _line(data: bytes) -> str:
    """One written value: the text, without its trailing newline. The adapter hands over
    one line per open (decisions.md); a caller that hands more gets them refused whole,
    never the first applied."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise Invalid("the value is not UTF-8 text") from None
    text = text.strip()
    if "\n" in text:
        raise Invalid("one value or command per open, on one line: nothing was done")
    return text
