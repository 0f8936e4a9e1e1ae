"""The state directory, in libvirt's own layout.

``STATE/<name>.xml`` holds each pool's definition and
``STATE/autostart/<name>.xml`` is a symlink to it for autostart pools, so a
copy of ``/etc/libvirt/storage`` is a valid state directory. Every write is
atomic: a temporary file, fsync, rename, fsync of the directory; what a killed
write leaves (a temporary file, an autostart link whose definition went first)
is removed at the next start (``StateDir.remove_litter``).

``STATE/.uploads`` is vsfs's own (libvirt's loader reads only ``*.xml``): the
journal of volumes being made through a file handle (``UploadJournal``), there
while a daemon runs and after one was killed with something in flight.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import itertools
import json
import logging
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import BackendFailed, Busy, Invalid, VsfsError
from .model import PoolDef
from .xmlio import format_pool, parse_pool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredPool:
    pool: PoolDef
    autostart: bool


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# What atomic_write and set_autostart name their temporary files.
TEMP_PREFIX = ".tmp-"


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file."""
    # Not named after the file: a name of 251 bytes leaves no room to add to it.
    fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=path.parent)
    tmp = Path(tmp_name)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def remove_temporaries(directory: Path) -> list[Path]:
    """Remove the temporary files of writes a killed daemon never finished (atomic_write's
    in the state or runtime directory, a link set_autostart was making); what went.
    Only the one daemon of a state directory writes there. Blocking."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if entry.name.startswith(TEMP_PREFIX):
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            removed.append(Path(entry.path))
            log.info("removed %s, left by a write that never finished", entry.path)
    if removed:
        _fsync_dir(directory)
    return removed


class StateDir:
    """Pool definitions on disk. Blocking: call it from a worker thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.autostart_dir = path / "autostart"

    def ensure(self) -> None:
        """Create the directory (0700 as libvirt's) and check that we can use it."""
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.autostart_dir.mkdir(mode=0o700, exist_ok=True)
        except OSError as e:
            raise BackendFailed(f"state directory {self.path}: {e.strerror}") from None
        if not os.access(self.path, os.R_OK | os.W_OK | os.X_OK):
            raise BackendFailed(f"state directory {self.path}: not readable and writable")

    def lock(self) -> int:
        """Take the state directory for this daemon alone, for as long as it lives (the
        kernel lets go of the lock when the process ends, however it ends); the lock's
        descriptor. Two daemons on one directory would remove each other's temporary files
        and uploads in flight as litter. The lock is on the directory itself, so that it
        holds however the directory is spelled and adds no file to libvirt's layout.
        Busy when another daemon has it."""
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Busy(f"state directory {self.path} is used by another vsfs daemon; "
                       "one daemon per state directory") from None
        return fd

    def _file(self, name: str) -> Path:
        return self.path / f"{name}.xml"

    def load(self) -> Iterator[StoredPool]:
        """Every valid definition; broken files are logged and left alone."""
        for entry in sorted(self.path.glob("*.xml")):
            try:
                pool = parse_pool(entry.read_bytes(), stored=True)
            except (OSError, VsfsError) as e:
                log.error("state file %s skipped: %s", entry, e)
                continue
            if pool.name != entry.stem:
                log.error("state file %s skipped: it defines pool %r", entry, pool.name)
                continue
            # The link's presence is what counts: a copied directory may carry
            # links that point at the original location.
            autostart = os.path.lexists(self.autostart_dir / entry.name)
            yield StoredPool(pool, autostart)

    def save(self, pool: PoolDef) -> None:
        path = self._file(pool.name)
        try:
            atomic_write(path, format_pool(pool))
        except OSError as e:
            raise BackendFailed(f"state directory: cannot write {path}: {e.strerror}") from None

    def remove(self, name: str) -> None:
        """Undefine: the definition first (synced), then its autostart link. A kill between
        the two leaves a link without a definition, which the next load removes
        (remove_litter): the pool is undefined either way. The other order could leave it
        defined but no longer autostart."""
        path = self._file(name)
        try:
            path.unlink(missing_ok=True)
            _fsync_dir(self.path)
        except OSError as e:
            raise BackendFailed(f"state directory: cannot remove {path}: {e.strerror}") from None
        link = self.autostart_dir / path.name
        try:
            link.unlink(missing_ok=True)
            _fsync_dir(self.autostart_dir)
        except OSError as e:
            # The pool is undefined already; the link alone means nothing now.
            log.error("state directory: cannot remove %s (%s); it goes at the next start",
                      link, e.strerror)

    def remove_litter(self) -> None:
        """Remove what killed writes left: temporary files, and autostart links whose
        definition is gone (an undefine cut short). Blocking; once, before load."""
        remove_temporaries(self.path)
        remove_temporaries(self.autostart_dir)
        try:
            links = [e for e in os.scandir(self.autostart_dir) if e.name.endswith(".xml")]
        except FileNotFoundError:
            return
        gone = False
        for link in links:
            if not os.path.lexists(self.path / link.name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(link.path)
                gone = True
                log.warning("autostart link %s removed: pool %s has no definition (its "
                            "undefine was cut short)", link.path, link.name[:-4])
        if gone:
            _fsync_dir(self.autostart_dir)

    def set_autostart(self, name: str, on: bool) -> None:
        link = self.autostart_dir / f"{name}.xml"
        try:
            self._set_autostart(name, link, on)
        except OSError as e:
            what = "make" if on else "remove"
            raise BackendFailed(f"state directory: cannot {what} {link}: {e.strerror}") from None

    def _set_autostart(self, name: str, link: Path, on: bool) -> None:
        if on:
            if not self._file(name).exists():
                raise Invalid(f"pool {name!r} has no state file")
            tmp = link.with_name(f"{TEMP_PREFIX}{secrets.token_hex(8)}")
            # Relative, so that the directory can be copied or moved whole;
            # libvirt compares the target's inode, which this satisfies.
            tmp.symlink_to(Path("..") / self._file(name).name)
            try:
                os.replace(tmp, link)
            except OSError:
                tmp.unlink(missing_ok=True)
                raise
        else:
            link.unlink(missing_ok=True)
        _fsync_dir(self.autostart_dir)


# ---------------------------------------------------------------- uploads in flight

JOURNAL_NAME = ".uploads"
# Past this size the journal is emptied once nothing is in flight, or else written anew
# with only the records still in flight.
JOURNAL_COMPACT_AT = 1 << 20


@dataclass(frozen=True)
class InFlight:
    """A volume being made through a file handle, as the journal records it."""

    id: str
    pool: str  # the pool's UUID, which a redefinition keeps
    name: str
    since_ns: int  # the wall clock just before the backend was asked to make it
    # The size asked for when the volume is made at its size (a partition, an LV);
    # -1 when it is made empty (a file).
    size: int = -1
    # What was made: "file" (st_dev, st_ino, and the inode's generation where the
    # filesystem has one: an inode number is given again to the next file), "block"
    # (st_rdev in dev, and the volume's key), "other" (only its key: a path served on
    # demand, whose inode means nothing later); "" until the backend has made it.
    kind: str = ""
    dev: int = 0
    ino: int = 0
    gen: int = -1
    key: str = ""

    def line(self) -> bytes:
        return json.dumps({"id": self.id, "pool": self.pool, "name": self.name,
                           "t": self.since_ns, "size": self.size, "kind": self.kind,
                           "dev": self.dev, "ino": self.ino, "gen": self.gen,
                           "key": self.key},
                          separators=(",", ":")).encode() + b"\n"


def _parse_record(raw: bytes) -> tuple[str, InFlight | None] | None:
    """A journal line: (id, its record, or None when it ended); None for a torn line."""
    try:
        d = json.loads(raw)
        if not isinstance(d, dict) or not isinstance(d.get("id"), str):
            return None
        if d.get("done"):
            return d["id"], None
        return d["id"], InFlight(
            id=d["id"], pool=str(d["pool"]), name=str(d["name"]), since_ns=int(d["t"]),
            size=int(d["size"]), kind=str(d["kind"]), dev=int(d["dev"]), ino=int(d["ino"]),
            gen=int(d["gen"]), key=str(d["key"]))
    except (ValueError, KeyError, TypeError):
        return None


def read_in_flight(path: Path) -> list[InFlight]:
    """The records of a journal still in flight (a torn last line is skipped: nothing was
    made after it). Blocking."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    found: dict[str, InFlight] = {}
    for raw in data.splitlines():
        parsed = _parse_record(raw)
        if parsed is None:
            continue
        rid, rec = parsed
        if rec is None:
            found.pop(rid, None)
        else:
            found[rid] = rec
    return list(found.values())


class UploadJournal:
    """Volumes being made through a file handle (``truncate``, ``cp`` into ``volumes/``)
    until they are settled, so that the next start of their pool removes one that a
    killed daemon left half-written: it would look like any other volume, and a VM given
    it would boot a truncated disk.

    One JSON line per change, appended with a single write(2) and never synced: a record
    must outlive the process, not the machine (a power loss takes the volume's unsynced
    bytes too), and creating volumes stays at hundreds per second. The last line of an
    id wins; ``{"id": ..., "done": true}`` ends it. The file is made at the first upload
    and stays, emptied now and then, while the daemon runs: a file made and removed per
    upload slowed ext4 down by half (each freed inode is one more to pass over when the
    next file is made). A clean exit (``close``, run at exit) and the next load remove
    it when nothing is in flight, so a state directory at rest holds libvirt's files
    alone. Each method is a few quick syscalls on the state directory; a lock orders them
    when the caller runs them in worker threads.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd = -1
        self._size = 0
        self._at_exit = False
        self._live: dict[str, InFlight] = {}  # this daemon's
        # In flight when an earlier daemon died: each stays recorded until its pool
        # starts (or is adopted) and the manager has dealt with it.
        self.left: dict[str, InFlight] = {}
        self._run = secrets.token_hex(4)  # ids never repeat those of a dead daemon
        self._serial = itertools.count(1)

    def recover(self) -> list[InFlight]:
        """What a killed daemon left in flight: read once, at load, before any upload."""
        with self._lock, self._failing("read"):
            found = read_in_flight(self.path)
            self.left.update((r.id, r) for r in found)
            self._rewrite()
            return found

    def left_in(self, pool_uuid: str) -> list[InFlight]:
        return [r for r in self.left.values() if r.pool == pool_uuid]

    def begin(self, pool_uuid: str, name: str, size: int = -1) -> InFlight:
        """Record, before the backend makes it, that a volume is being made."""
        rec = InFlight(f"{self._run}-{next(self._serial)}", pool_uuid, name, time.time_ns(),
                       size)
        self.put(rec)
        return rec

    def identify(self, rec: InFlight, kind: str, dev: int = 0, ino: int = 0, gen: int = -1,
                 key: str = "") -> InFlight:
        """Record what was made, so that only that is ever removed."""
        new = replace(rec, kind=kind, dev=dev, ino=ino, gen=gen, key=key)
        self.put(new)
        return new

    def put(self, rec: InFlight) -> None:
        """Record ``rec`` as in flight (again: written to after it was settled)."""
        with self._lock, self._failing("write"):
            self._live[rec.id] = rec
            self._append(rec.line())

    def end(self, rec: InFlight) -> None:
        """The volume is settled (complete, or gone): nothing to undo after a crash."""
        with self._lock, self._failing("write"):
            if self._live.pop(rec.id, None) is not None:
                self._ended(rec.id)

    def forget(self, rec: InFlight) -> None:
        """A record left by a killed daemon was dealt with."""
        with self._lock, self._failing("write"):
            if self.left.pop(rec.id, None) is not None:
                self._ended(rec.id)

    def close(self) -> None:
        """At exit: the file goes when nothing is in flight (run by atexit once it is made:
        after a clean unmount the state directory holds libvirt's files alone)."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            if not self._live and not self.left:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)

    @contextlib.contextmanager
    def _failing(self, what: str) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            raise BackendFailed(f"state directory: cannot {what} the journal of uploads "
                                f"{self.path}: {e.strerror}") from None

    def _ended(self, rid: str) -> None:
        if self._fd >= 0 and not self._live and not self.left and (
                self._size > JOURNAL_COMPACT_AT):
            # Nothing in flight: emptied in place (the inode stays, see above).
            os.ftruncate(self._fd, 0)
            self._size = 0
            return
        self._append(json.dumps({"id": rid, "done": True}).encode() + b"\n")

    def _append(self, line: bytes) -> None:
        if self._fd < 0:
            if not self._at_exit:
                atexit.register(self.close)
                self._at_exit = True
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                               0o600)
            self._size = os.fstat(self._fd).st_size
        if os.write(self._fd, line) != len(line):
            # A torn line is skipped when read; the record is not there.
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._size += len(line)
        if self._size > JOURNAL_COMPACT_AT and (self._live or self.left):
            self._rewrite()

    def _rewrite(self) -> None:
        """The journal anew with only what is in flight, or no file when nothing is.
        Renamed into place, not synced: it must outlive a process, as its appends."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        records = [*self.left.values(), *self._live.values()]
        if not records:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=self.path.parent)
        try:
            try:
                data = b"".join(r.line() for r in records)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
