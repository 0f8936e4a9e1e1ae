"""The FUSE adapter: the only module that imports pyfuse3.

It translates: inode numbers and file handles to tree paths and nodes,
vsfs errors to FUSEError with the contract's errno (and the reason into the
caller's MNT/error). It holds no storage logic.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import select
import signal
import stat
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Concatenate, NoReturn, ParamSpec, TypeVar

import pyfuse3
import trio

from .errors import Invalid, VsfsError
from .feed import Change, Feed
from .feeder import DocumentFeeder
from .jobs import REQUESTER
from .tree import Apply, Dir, File, Link, Node, Stream, Tree, UploadFile
from .units import shown
from .uploads import Upload

log = logging.getLogger(__name__)

# Entries we change ourselves are invalidated explicitly; these bound how long
# the kernel trusts an entry that changed behind our back.
TIMEOUT = 1.0
# Lazy invalidations (the dentries of uploads once closed) wait at most this long, so
# that one wake-up of the notifier thread sends many.
LAZY_INVALIDATE = 0.05
# The longest line a value or command file takes.
MAX_LINE = 64 * 1024
# A read of MNT/events waits for the next change and holds one of pyfuse3's request
# tasks meanwhile: the main loop may run this many, and at most WAITING_READS of them
# wait in such a read, so that other requests always find a task.
MAX_TASKS = 1024
WAITING_READS = 768
# How often a waiting read of events looks whether its reader was sent a signal.
SIGNAL_CHECK = 0.2

R = TypeVar("R")
P = ParamSpec("P")

# pyfuse3 built with .ci/patches/pyfuse3-noflush.patch can open a file with
# FOPEN_NOFLUSH; a stock build cannot, and then every close sends a FLUSH.
HAS_NOFLUSH = hasattr(pyfuse3.FileInfo(), "noflush")

# pyfuse3 built with .ci/patches/pyfuse3-read-spin.patch keeps reading /dev/fuse
# this long after serving a request before it sleeps. Clients that send requests
# one by one (`ls -l`: a READLINK per volume; `truncate`: LOOKUP, GETATTR of the
# directory, CREATE, SETATTR, FLUSH) send the next within microseconds, and in a
# virtual machine waking an idle CPU costs more than that: the first `ls -l` of
# 1000 new volumes takes half as long.
READ_SPIN_US = 50


def set_read_spin(microseconds: int) -> None:
    """Set the read spin (a stock pyfuse3 has none: it always sleeps). With one CPU to
    run on, polling would only keep the client from sending its next request: none."""
    setter = getattr(pyfuse3, "set_read_spin", None)
    if setter is not None:
        setter(microseconds * 1000 if len(os.sched_getaffinity(0)) > 1 else 0)


class Notifier:
    """Tells the kernel what to forget, from a thread of its own.

    To drop an entry the kernel takes its parent directory's lock
    (``fuse_reverse_inval_entry``), and to drop a symlink's cached target the lock of
    its page; a request in flight may hold either while it waits for this daemon's
    answer. So the rule: **no request waits for an invalidation** (but a write to a
    value file, which holds no directory lock, for at most TIMEOUT: _caught_up).
    Handlers and the manager only queue one here (an append, never blocking, never
    bounded), and this thread alone waits in the kernel, for as long as the requests holding those
    locks take to be answered, which the main loop goes on doing meanwhile. Neither
    trio's worker threads (whose number is limited and which handlers use) nor
    pyfuse3's own notify thread (one queue that an entry waiting for its lock holds
    up) are used for it. Nor does the daemon's exit wait for this thread (a daemon
    thread): if the daemon dies while it waits in the kernel, the watchdog
    (vsfs.watchdog) aborts the connection, which frees it.
    """

    def __init__(self) -> None:
        self._queue: deque[tuple[str, int, bytes]] = deque()
        # Set when anything is queued; _urgent when something is that must not wait
        # LAZY_INVALIDATE for others to go with it.
        self._wake = threading.Event()
        self._urgent = threading.Event()
        # Held while a call into libfuse runs: the session must outlive it.
        self._calling = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None
        # How many were queued (by the main thread) and have been sent (by this one).
        self.queued = 0
        self.sent = 0
        self._progress = threading.Condition()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="vsfs-invalidate",
                                        daemon=True)
        self._thread.start()

    def entry(self, parent: int, name: bytes, lazy: bool = False) -> None:
        """Drop the kernel's entry ``name`` of directory inode ``parent``; a lazy one
        may wait LAZY_INVALIDATE seconds to go with others."""
        self.queued += 1
        self._queue.append(("entry", parent, name))
        if not lazy:
            self._urgent.set()
        self._wake.set()

    def inode(self, ino: int) -> None:
        """Drop what the kernel caches of inode ``ino`` (a symlink's target, say)."""
        self.queued += 1
        self._queue.append(("inode", ino, b""))
        self._urgent.set()
        self._wake.set()

    def wait_sent(self, upto: int, timeout: float) -> bool:
        """Block until the first ``upto`` invalidations were sent, at most ``timeout``
        seconds (for a worker thread); whether they were."""
        with self._progress:
            return self._progress.wait_for(lambda: self.sent >= upto or self._closed, timeout)

    def close(self, timeout: float = 5.0) -> bool:
        """Stop sending (before the session goes); False if a call still waits in the
        kernel after ``timeout`` seconds, when the session must not be destroyed."""
        self._closed = True
        self._urgent.set()
        self._wake.set()
        if not self._calling.acquire(timeout=timeout):
            return False
        self._calling.release()
        return True

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait()
            # A lazy one waits a moment for others to go with it, unless one that must
            # not wait comes meanwhile.
            self._urgent.wait(LAZY_INVALIDATE)
            self._urgent.clear()
            self._wake.clear()
            while self._queue and not self._closed:
                kind, ino, name = self._queue.popleft()
                with self._calling:
                    if self._closed:
                        return
                    self._send(kind, ino, name)
                with self._progress:
                    self.sent += 1
                    self._progress.notify_all()

    @staticmethod
    def _send(kind: str, ino: int, name: bytes) -> None:
        try:
            if kind == "entry":
                pyfuse3.invalidate_entry(ino, name)
            else:
                pyfuse3.invalidate_inode(ino)
        except OSError as e:  # ENOENT: the kernel has forgotten it already
            log.debug("invalidate %s %d %r: %s", kind, ino, name, e)
        except Exception:  # never end the thread: later invalidations still count
            log.exception("invalidate %s %d %r failed", kind, ino, name)


def _guarded(by_fh: bool = False) -> Callable[
        [Callable[Concatenate[Operations, P], Coroutine[Any, Any, R]]],
        Callable[Concatenate[Operations, P], Coroutine[Any, Any, R]]]:
    """A request handler whose unexpected errors answer that one request with EIO.

    pyfuse3 answers a FUSEError and lets anything else end its main loop, and with
    it the mount: every caller would get ENOTCONN. So the reason goes to the log
    (with its traceback) and to the caller's MNT/error, and the mount goes on. The
    caller is the request's context, or the user who opened the handle (``by_fh``:
    the first argument is a file handle).
    """
    def wrap(fn: Callable[Concatenate[Operations, P], Coroutine[Any, Any, R]]
             ) -> Callable[Concatenate[Operations, P], Coroutine[Any, Any, R]]:
        @functools.wraps(fn)
        async def handler(self: Operations, /, *args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return await fn(self, *args, **kwargs)
            except pyfuse3.FUSEError:
                raise
            except Exception as e:
                raise self._fail(self._caller(args, by_fh), e) from None
        return handler
    return wrap


Key = tuple[tuple[str, ...], str]


def _kind(node: Node) -> str:
    if isinstance(node, Dir):
        return "dir"
    if _fresh(node):
        return "cmd"
    if isinstance(node, Stream):
        return "stream"
    if isinstance(node, Link):
        return "link:" + node.target
    if isinstance(node, UploadFile):
        return f"upload:{node.upload.serial}" if node.upload is not None else "upload"
    return "file"


def _fresh(node: Node) -> bool:
    """A command file (ctl, define: written, never read). Each lookup of one gets an inode
    of its own, never cached (entry timeout 0), so each open has its own: the kernel
    holds a file's inode lock through a write (and an open with O_TRUNC takes it), and
    a write that started a job waits for the job. On one shared inode, every other
    `echo ... > ctl` of that volume would wait behind the job instead of getting its
    own answer (EBUSY) at once."""
    return isinstance(node, File) and node.write is not None and node.read is None


def _shown(path: tuple[str, ...]) -> str:
    """A path of the mount as a message shows it: MNT/a/b."""
    return "/".join(("MNT", *path))


def _name(raw: bytes) -> str:
    return os.fsdecode(raw)


# Signals that mean "stop what you are doing" (^C, kill, a closed pipe, a lost
# terminal): to a job's writer they cancel its job. Others (SIGCHLD to a shell with a
# child in the background, SIGUSR1 asking dd for its progress) do not.
STOPPING = frozenset({signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM,
                      signal.SIGKILL, signal.SIGPIPE})


def _signal_pending(pid: int, only: frozenset[int] | None = None) -> bool:
    """Whether process ``pid`` has a signal pending (of ``only``, if given) that it
    neither blocks nor ignores.

    pyfuse3 does not pass on the kernel's INTERRUPT requests: a reader of events killed
    by ^C or SIGTERM while its read waits here would wait with it, in the kernel, until
    the next change. The signal stays pending while it waits, so it shows here; the read
    is then answered EINTR, and the signal is delivered. A reader gone (or never known)
    has none."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            fields = dict(line.split(b":", 1) for line in f.read().splitlines() if b":" in line)
        pending = int(fields[b"SigPnd"], 16) | int(fields[b"ShdPnd"], 16)
        quiet = int(fields[b"SigBlk"], 16) | int(fields[b"SigIgn"], 16)
    except (OSError, KeyError, ValueError):
        return False
    pending &= ~quiet
    if only is not None:
        pending &= sum(1 << (s - 1) for s in only)
    return bool(pending)


# One class per kind of open file: each request handler dispatches on the class, and
# each holds only what its kind needs. A file handle (fh) the kernel sends that is not
# open here is EBADF (the kernel sends none; it would be a bug).


@dataclass(eq=False)
class ReadHandle:
    """A file opened for reading only: what it held at the open (rendered once: a
    reader never sees a torn value)."""

    uid: int
    content: bytes


@dataclass(eq=False, kw_only=True)
class ValueHandle:
    """A value or command file opened for writing (LineHandle, DocumentHandle): one
    open carries one value, applied through the file's ``write``."""

    uid: int
    # The process that opened it: its stopping signals cancel the job its write started
    # (Operations.watch_writers).
    pid: int
    write: Apply
    # Opened with O_APPEND: its writes follow each other whatever offset the kernel
    # gives them.
    append: bool
    # Opened O_RDWR: what a read sees (rendered at the open).
    content: bytes = b""
    # The errno of the first refusal: a writer that tries again (Python's buffered
    # files do, at close) gets the first answer again. 0 while none.
    failed: int = 0


@dataclass(eq=False, kw_only=True)
class LineHandle(ValueHandle):
    """A value or command taken at its newline (_write_lines)."""

    # Bytes taken so far, and those of a line not ended yet; this open's one value
    # once applied (a second is refused).
    taken: int = 0
    pending: bytearray = field(default_factory=bytearray)
    applied: bytes | None = None
    # The file takes an XML document too (sources/TYPE): a first write that starts
    # with "<" makes this open a DocumentHandle.
    document: bool = False


@dataclass(eq=False, kw_only=True)
class DocumentHandle(ValueHandle):
    """An XML document written in pieces (xml, define; a <source>), acted on once whole."""

    feeder: DocumentFeeder = field(default_factory=DocumentFeeder)
    wrote: bool = False

    @classmethod
    def instead_of(cls, line: LineHandle) -> DocumentHandle:
        return cls(uid=line.uid, pid=line.pid, write=line.write, append=line.append,
                   content=line.content)


@dataclass(eq=False)
class UploadHandle:
    """A volume being created through a file handle (truncate, cp, a shell's >)."""

    uid: int
    upload: Upload
    ino: int
    # Opened with O_APPEND: the kernel's idea of the end may miss writes made through
    # the volume's own path meanwhile, so each write goes to the file's end as it is.
    append: bool


@dataclass(eq=False)
class EventsHandle:
    """A reader of MNT/events: its own cursor in the feed."""

    uid: int
    # The process that opened it: a signal pending for it ends a waiting read (EINTR).
    pid: int
    feed: Feed
    cursor: int
    # Opened with O_NONBLOCK: a read with no line ready is EAGAIN (the kernel does not
    # tell of a later fcntl(F_SETFL)).
    nonblocking: bool
    # The bytes of a line it has only partly read.
    unread: bytes = b""


FileHandle = ReadHandle | LineHandle | DocumentHandle | UploadHandle | EventsHandle


@dataclass(eq=False)
class DirHandle:
    """A directory opened: one snapshot of its entries, which readdir offsets index."""

    entries: list[tuple[str, Node]]
    path: tuple[str, ...]


H = TypeVar("H")


def _opened(handles: dict[int, H], fh: int) -> H:
    """The open file or directory ``fh``; EBADF for one not open here (the kernel sends
    none: it would be a bug)."""
    handle = handles.get(fh)
    if handle is None:
        log.warning("handle %d is not open", fh)
        raise pyfuse3.FUSEError(errno.EBADF)
    return handle


class Operations(pyfuse3.Operations):
    """pyfuse3 requests in, tree calls and FUSEErrors out."""

    enable_writeback_cache = False
    # Honoured by pyfuse3 built with .ci/patches/pyfuse3-cache-symlinks.patch
    # (ignored by a stock build): the kernel then keeps each volume's symlink
    # target, so `ls -l` costs no READLINK per volume. Link inodes are keyed by
    # their target, so a target that changes gets a new inode.
    enable_cache_symlinks = True

    def __init__(self, tree: Tree, uid: int, gid: int) -> None:
        super().__init__()
        self.tree = tree
        self.uid = uid
        self.gid = gid
        self._stamp_ns = time.time_ns()
        self._next_ino = pyfuse3.ROOT_INODE + 1
        self._ino_of: dict[Key, int] = {((), "dir"): pyfuse3.ROOT_INODE}
        self._key_of: dict[int, Key] = {pyfuse3.ROOT_INODE: ((), "dir")}
        self._lookups: dict[int, int] = {pyfuse3.ROOT_INODE: 1}
        self._link_attrs: dict[int, pyfuse3.EntryAttributes] = {}
        self._handles: dict[int, FileHandle] = {}
        # The inodes of uploads with an open handle: once listed, their names lead to a
        # symlink, but the open descriptors (fstat, ftruncate, futimens) still need them.
        self._upload_inos: dict[int, UploadFile] = {}
        self._dirs: dict[int, DirHandle] = {}
        self._next_fh = 1
        self.mounted = False
        self.notifier = Notifier()
        self._waiting_reads = 0

    # ---------------------------------------------------------------- plumbing

    def invalidate(self, path: tuple[str, ...], lazy: bool = False) -> None:
        """Tell the kernel to forget a cached entry (from the manager); a lazy one may
        go a moment later, with others. Never waits (see Notifier)."""
        if not self.mounted or not path:
            return
        parent = self._ino_of.get((path[:-1], "dir"))
        if parent is not None:
            self.notifier.entry(parent, os.fsencode(path[-1]), lazy)

    def on_change(self, change: Change) -> None:
        """Which of the kernel's entries a change makes wrong (a subscriber of the
        manager's feed). Only queues invalidations (Notifier): never waits."""
        kind, names, event = change.kind, change.names, change.event
        if kind == "pool":
            pool = names[0]
            if event == "undefined":
                self.invalidate(("pools", pool))
            elif event == "defined":  # redefined: its target may be another
                self.invalidate(("pools", pool, "target"))
            for p, v in change.touches:  # stopped: its volumes are gone
                self.invalidate(("pools", p, "volumes", v))
                self.invalidate(("pools", p, "volinfo", v))
        elif kind == "volume":
            pool, vol = names
            if event in ("deleted", "renamed"):
                self.invalidate(("pools", pool, "volinfo", vol))
                # Gone already where the kernel itself removed it (rm, mv): lazily.
                self.invalidate(("pools", pool, "volumes", vol), lazy=True)
            elif event == "created":
                # An upload listed at its first close: its regular file's entry was
                # handed out with a zero timeout, so the next lookup finds the symlink;
                # dropping the dentry spares a GETATTR of the old inode in a listing.
                self.invalidate(("pools", pool, "volumes", vol), lazy=True)
        elif kind == "job" and event != "started":
            for p, v in change.touches:  # volinfo/V/job leads nowhere now
                self.invalidate(("pools", p, "volinfo", v, "job"))
        elif kind == "host" and event == "removed":
            self.invalidate(("host", "volumes", names[0]))
            self.invalidate(("host", "volinfo", names[0]))

    async def forget_link(self, path: tuple[str, ...], target: str) -> None:
        """Make the kernel read a symlink's target again (from the manager)."""
        ino = self._ino_of.get((path, f"link:{target}"))
        if self.mounted and ino is not None:
            self.notifier.inode(ino)

    def _register(self, path: tuple[str, ...], node: Node, kind: str | None = None) -> int:
        if kind is None and _fresh(node):
            # Each lookup its own inode (see _fresh).
            kind = f"cmd#{self._next_ino}"
        key = (path, kind or _kind(node))
        ino = self._ino_of.get(key)
        if ino is None:
            ino = self._next_ino
            self._next_ino += 1
            self._ino_of[key] = ino
            self._key_of[ino] = key
            self._lookups[ino] = 0
        return ino

    def _ref(self, ino: int) -> None:
        self._lookups[ino] = self._lookups.get(ino, 0) + 1

    def _node(self, ino: int) -> tuple[tuple[str, ...], Node]:
        key = self._key_of.get(ino)
        if key is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        upload = self._upload_inos.get(ino)
        if upload is not None:
            return key[0], upload
        node = self.tree.resolve(key[0])
        if node is None or _kind(node) != key[1].partition("#")[0]:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return key[0], node

    def _dir(self, ino: int) -> tuple[tuple[str, ...], Dir]:
        path, node = self._node(ino)
        if not isinstance(node, Dir):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return path, node

    def _attrs(self, ino: int, node: Node, volatile: bool = False) -> pyfuse3.EntryAttributes:
        if isinstance(node, Link) and not volatile:
            # A link inode's target never changes (it is part of its key), so neither do
            # its attributes: built once, they serve every listing until it is forgotten.
            a = self._link_attrs.get(ino)
            if a is None:
                a = self._link_attrs[ino] = self._new_attrs(ino, node, False)
            return a
        return self._new_attrs(ino, node, volatile)

    def _new_attrs(self, ino: int, node: Node, volatile: bool) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.generation = 0
        # A volume being uploaded is a regular file only until it is closed: its name must
        # be looked up again then (to find the symlink). Its attributes may be cached: the
        # kernel keeps the size current through our setattr and write replies, and the
        # inode is never reused for the volume that follows.
        a.entry_timeout = (0 if volatile or isinstance(node, UploadFile) or _fresh(node)
                           else TIMEOUT)
        a.attr_timeout = TIMEOUT
        a.st_uid = self.uid
        a.st_gid = self.gid
        a.st_nlink = 1
        size = 0
        if isinstance(node, Dir):
            a.st_mode = stat.S_IFDIR | node.mode
            a.st_nlink = 2
        elif isinstance(node, Link):
            a.st_mode = stat.S_IFLNK | 0o777
            size = len(os.fsencode(node.target))
        elif isinstance(node, UploadFile):
            a.st_mode = stat.S_IFREG | node.mode
            size = node.upload.size() if node.upload is not None else 0
        elif isinstance(node, Stream):
            a.st_mode = stat.S_IFREG | node.mode
        elif isinstance(node, File):
            a.st_mode = stat.S_IFREG | node.mode
            size = node.size
        else:
            raise TypeError(f"a node of no known kind: {node!r}")
        a.st_size = size
        a.st_blksize = 4096
        a.st_blocks = (size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self._stamp_ns
        return a

    def _fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _fail(self, uid: int | None, e: BaseException) -> pyfuse3.FUSEError:
        if isinstance(e, VsfsError):
            if uid is not None:
                self.tree.record_error(uid, e.message)
            log.info("refused (%s): %s", errno.errorcode.get(e.errno, e.errno), e.message)
            return pyfuse3.FUSEError(e.errno)
        log.error("internal error", exc_info=e)
        if uid is not None:
            self.tree.record_error(uid, f"internal error: {e!r} (the daemon's log has "
                                   "the details)")
        return pyfuse3.FUSEError(errno.EIO)

    def _caller(self, args: tuple[object, ...], by_fh: bool) -> int | None:
        """Who made a request: its context's uid, or the user who opened its handle."""
        for arg in args:
            uid = getattr(arg, "uid", None)  # a RequestContext (or a stand-in in tests)
            if isinstance(uid, int):
                return uid
        if by_fh and args and isinstance(args[0], int):
            handle = self._handles.get(args[0])
            if handle is not None:
                return handle.uid
        return None

    # ---------------------------------------------------------------- metadata

    @_guarded()
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path, parent = self._dir(parent_inode)
        sname = _name(name)
        node: Node | None
        if sname == ".":
            child_path, node = path, parent
        elif sname == "..":
            child_path = path[:-1]
            node = self.tree.resolve(child_path)
        else:
            child_path = (*path, sname)
            node = parent.child(sname)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        ino = self._register(child_path, node)
        self._ref(ino)
        return self._attrs(ino, node, parent.volatile)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # pyfuse3 sends no reply to a FORGET: an error here could only end the mount.
        try:
            self._forget(inode_list)
        except Exception:
            log.exception("forget failed")

    def _forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            left = self._lookups.get(ino, 0) - n
            if left > 0 or ino == pyfuse3.ROOT_INODE:
                self._lookups[ino] = max(left, 0)
                continue
            self._lookups.pop(ino, None)
            self._link_attrs.pop(ino, None)
            key = self._key_of.pop(ino, None)
            if key is not None and self._ino_of.get(key) == ino:
                del self._ino_of[key]

    @_guarded()
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path, node = self._node(inode)
        parent = self.tree.resolve(path[:-1]) if path else None
        return self._attrs(inode, node, isinstance(parent, Dir) and parent.volatile)

    @_guarded()
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path, node = self._node(inode)
        if ((fields.update_mode or fields.update_uid or fields.update_gid)
                and isinstance(node, UploadFile) and node.upload is not None
                and node.upload.fd >= 0):
            # cp -p, install -m: a volume being written is the writer's file.
            mode = attr.st_mode & 0o777 if fields.update_mode else None
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            await self.tree.m.uploads.set_owner(node.upload, mode, uid, gid)
        elif fields.update_mode or fields.update_uid or fields.update_gid:
            self._refuse(ctx, errno.EPERM, f"{_shown(path)}: vsfs's files keep their modes and "
                         "owners (a volume's are its target's, or its <permissions>)")
        if fields.update_size:
            if isinstance(node, UploadFile) and node.upload is not None:
                await self.tree.m.uploads.truncate(node.upload, attr.st_size)
            elif not (isinstance(node, File) and node.write is not None and attr.st_size == 0):
                # Truncating a value file to 0 is what `echo x > file` does first.
                self._refuse(ctx, errno.EACCES, f"{_shown(path)} cannot be resized: it is "
                             "not a volume being created")
        if ((fields.update_atime or fields.update_mtime) and isinstance(node, UploadFile)
                and node.upload is not None and node.upload.fd >= 0):
            # touch -d, cp -p: the times go to the new volume's file.
            atime = attr.st_atime_ns if fields.update_atime else None
            mtime = attr.st_mtime_ns if fields.update_mtime else None
            await self.tree.m.uploads.set_times(node.upload, atime, mtime)
        return self._attrs(inode, node)

    @_guarded()
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        _, node = self._node(inode)
        if not isinstance(node, Link):
            raise pyfuse3.FUSEError(errno.EINVAL)
        if node.prepare is not None:
            await self._dir_op(ctx, node.prepare)
        return os.fsencode(node.target)

    @_guarded()
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_namemax = 255
        return s

    # ---------------------------------------------------------------- directories

    @_guarded()
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        path, node = self._dir(inode)
        fh = self._fh()
        # One snapshot per open: readdir offsets index into it, so they stay stable.
        self._dirs[fh] = DirHandle(self.tree.children(node), path)
        return fh

    @_guarded(by_fh=True)
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = _opened(self._dirs, fh)
        parent = self.tree.resolve(handle.path)
        volatile = isinstance(parent, Dir) and parent.volatile
        for i in range(start_id, len(handle.entries)):
            name, node = handle.entries[i]
            ino = self._register((*handle.path, name), node)
            if not pyfuse3.readdir_reply(token, os.fsencode(name),
                                         self._attrs(ino, node, volatile), i + 1):
                return
            self._ref(ino)

    @_guarded(by_fh=True)
    async def releasedir(self, fh: int) -> None:
        _opened(self._dirs, fh)
        del self._dirs[fh]

    async def _dir_op(self, ctx: pyfuse3.RequestContext, op: Callable[[], Awaitable[R]]) -> R:
        try:
            return await op()
        except pyfuse3.FUSEError:
            raise
        except Exception as e:
            raise self._fail(ctx.uid, e) from None

    @_guarded()
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path, parent = self._dir(parent_inode)
        if parent.mkdir is None:
            self._refuse(ctx, errno.EPERM, f"directories cannot be made in {_shown(path)}")
        mkdir = parent.mkdir
        await self._dir_op(ctx, lambda: mkdir(_name(name)))
        # The new entry is a symlink to the new directory; the kernel expects a
        # directory from mkdir, so hand it one that it must not cache.
        node = Dir(0o755)
        ino = self._register((*path, _name(name)), node, kind="mkdir")
        self._ref(ino)
        attrs = self._attrs(ino, node, volatile=True)
        attrs.attr_timeout = 0
        return attrs

    @_guarded()
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        path, parent = self._dir(parent_inode)
        if parent.rmdir is None:
            self._refuse(ctx, errno.EPERM, f"{_shown((*path, _name(name)))} cannot be removed")
        rmdir = parent.rmdir
        await self._dir_op(ctx, lambda: rmdir(_name(name)))

    @_guarded()
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        path, parent = self._dir(parent_inode)
        if parent.unlink is None:
            self._refuse(ctx, errno.EPERM, f"{_shown((*path, _name(name)))} cannot be removed")
        unlink = parent.unlink
        await self._dir_op(ctx, lambda: unlink(_name(name)))

    @_guarded()
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        old_dir, parent = self._dir(parent_inode_old)
        new_dir, _ = self._dir(parent_inode_new)
        if parent.rename is None:
            self._refuse(ctx, errno.EPERM, f"{_shown((*old_dir, _name(name_old)))} cannot be "
                         "renamed" + (" (pools keep their names)" if old_dir == ("pools",)
                                      else ""))
        if flags & ~pyfuse3.RENAME_NOREPLACE:
            # RENAME_EXCHANGE has no meaning here
            self._refuse(ctx, errno.EINVAL, "volumes cannot be exchanged, only renamed")
        old_path, new_path = (*old_dir, _name(name_old)), (*new_dir, _name(name_new))
        before = parent.child(_name(name_old))
        rename = parent.rename
        await self._dir_op(ctx, lambda: rename(_name(name_old), new_dir, _name(name_new)))
        # The kernel moves its dentry to the new name and keeps the inode, so
        # that inode must now stand for the new path, with what is there now.
        ino = self._ino_of.pop((old_path, _kind(before)), None) if before else None
        after = self.tree.resolve(new_path)
        if ino is None or after is None:
            return
        new_key = (new_path, _kind(after))
        stale = self._ino_of.pop(new_key, None)
        if stale is not None:
            self._key_of.pop(stale, None)
        self._ino_of[new_key] = ino
        self._key_of[ino] = new_key
        if isinstance(after, Link) and before is not None and _kind(after) != _kind(before):
            # The kernel may cache the old target and keeps this inode for the new
            # name: drop the cached target before the rename returns. (The kernel
            # holds no lock this needs, so it cannot deadlock with our reply.)
            try:
                await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino)
            except OSError:  # not cached, or the kernel dropped the inode already
                log.debug("invalidate_inode %d failed", ino, exc_info=True)

    def _refuse(self, ctx: pyfuse3.RequestContext, err: int, reason: str) -> NoReturn:
        """Refuse a request, keeping the reason in MNT/error for the user who made it."""
        self.tree.record_error(ctx.uid, reason)
        log.info("refused (%s): %s", errno.errorcode.get(err, err), reason)
        raise pyfuse3.FUSEError(err)

    @_guarded()
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.tree.record_error(ctx.uid, "symlinks cannot be made here")
        raise pyfuse3.FUSEError(errno.EPERM)

    @_guarded()
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.tree.record_error(ctx.uid, "hard links cannot be made here")
        raise pyfuse3.FUSEError(errno.EPERM)

    @_guarded()
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.tree.record_error(ctx.uid, "device nodes cannot be made here")
        raise pyfuse3.FUSEError(errno.EPERM)

    # ---------------------------------------------------------------- files

    @_guarded()
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext,
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        path, parent = self._dir(parent_inode)
        if parent.create is None:
            self.tree.record_error(ctx.uid, f"files cannot be created in /{'/'.join(path)}")
            raise pyfuse3.FUSEError(errno.EACCES)
        create = parent.create
        upload = await self._dir_op(ctx, lambda: create(_name(name)))
        node = UploadFile(0o600, upload=upload)
        ino = self._register((*path, _name(name)), node)
        self._ref(ino)
        fh = self._fh()
        self._handles[fh] = UploadHandle(ctx.uid, upload, ino, bool(flags & os.O_APPEND))
        self._upload_inos[ino] = node
        return pyfuse3.FileInfo(fh=fh), self._attrs(ino, node)

    @_guarded()
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        path, node = self._node(inode)
        if isinstance(node, Dir):
            raise pyfuse3.FUSEError(errno.EISDIR)
        acc = flags & os.O_ACCMODE
        writing = acc in (os.O_WRONLY, os.O_RDWR)
        reading = acc in (os.O_RDONLY, os.O_RDWR)
        # O_APPEND: the kernel puts each write at the end it keeps for the file, which a
        # write moments before (direct I/O) left where that one ended: no offset here.
        append = bool(flags & os.O_APPEND)
        fh = self._fh()
        if isinstance(node, UploadFile):
            self._handles[fh] = UploadHandle(ctx.uid, node.upload, inode, append)
            self._upload_inos.setdefault(inode, node)
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        if isinstance(node, Stream):
            if writing:
                self._refuse(ctx, errno.EACCES, f"{_shown(path)} is read-only")
            # Its own cursor, from the moment it opened.
            self._handles[fh] = EventsHandle(ctx.uid, ctx.pid, node.feed, node.feed.cursor(),
                                             bool(flags & os.O_NONBLOCK))
            return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False, nonseekable=True)
        if not isinstance(node, File):  # a Link: the kernel follows it, never opens it
            raise pyfuse3.FUSEError(errno.ELOOP)
        write = node.write
        if writing and write is None:
            self._refuse(ctx, errno.EACCES, f"{_shown(path)} is read-only")
        content = b""
        if reading:
            if path == ("error",):
                content = self.tree.error_text(ctx.uid)
            elif node.read is not None:
                read = node.read
                # Rendered once per open: later reads of this open see one snapshot.
                content = await self._dir_op(ctx, read)
            elif not writing:
                self._refuse(ctx, errno.EACCES, f"{_shown(path)} is write-only")
        handle: FileHandle
        if writing and write is not None:
            if node.xml:
                handle = DocumentHandle(uid=ctx.uid, pid=ctx.pid, write=write, append=append,
                                        content=content)
            else:
                handle = LineHandle(uid=ctx.uid, pid=ctx.pid, write=write, append=append,
                                    content=content, document=node.document)
        else:
            handle = ReadHandle(ctx.uid, content)
        self._handles[fh] = handle
        static = node.size > 0
        info = pyfuse3.FileInfo(fh=fh, direct_io=not static, keep_cache=static)
        if not writing and HAS_NOFLUSH:
            # A reader has nothing to flush: spare it the FLUSH request on close.
            setattr(info, "noflush", True)  # noqa: B010 (absent from a stock pyfuse3)
        return info

    @_guarded(by_fh=True)
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = _opened(self._handles, fh)
        if isinstance(handle, EventsHandle):
            return await self._read_events(handle, size)
        if isinstance(handle, UploadHandle):
            return await self.tree.m.uploads.read(handle.upload, off, size)
        return handle.content[off:off + size]

    async def _read_events(self, handle: EventsHandle, size: int) -> bytes:
        """The next lines of the feed after this reader's cursor, waiting for one if
        there is none yet; EINTR as soon as the reader has a signal pending."""
        feed = handle.feed
        if not handle.unread and not feed.ready(handle.cursor):
            if handle.nonblocking:
                raise pyfuse3.FUSEError(errno.EAGAIN)  # opened O_NONBLOCK: do not wait
            if self._waiting_reads >= WAITING_READS:
                self.tree.record_error(handle.uid, f"{WAITING_READS} reads of events wait "
                                       "already; try again later")
                raise pyfuse3.FUSEError(errno.EAGAIN)
            self._waiting_reads += 1
            try:
                while not feed.ready(handle.cursor):
                    if feed.closed:
                        return b""  # the daemon stops: the end of the stream
                    with trio.move_on_after(SIGNAL_CHECK):
                        await feed.wait(handle.cursor)
                    if (not feed.ready(handle.cursor) and handle.pid
                            and _signal_pending(handle.pid)):
                        raise pyfuse3.FUSEError(errno.EINTR)
            finally:
                self._waiting_reads -= 1
        if not handle.unread:
            handle.unread, handle.cursor = feed.take(handle.cursor, size)
        out, handle.unread = handle.unread[:size], handle.unread[size:]
        return out

    @_guarded(by_fh=True)
    async def poll(self, fh_inode: int, fh: int, poll_handle: pyfuse3.PollHandle | None,
                   ctx: pyfuse3.RequestContext) -> int:
        """Readable when a line waits for this reader (events); other files always."""
        handle = _opened(self._handles, fh)
        ready = select.POLLIN | select.POLLRDNORM
        if not isinstance(handle, EventsHandle):
            return ready | select.POLLOUT | select.POLLWRNORM
        if handle.unread or handle.feed.ready(handle.cursor):
            return ready
        if poll_handle is not None:
            handle.feed.on_next(fh, poll_handle.notify)
        return 0

    async def watch_writers(self) -> None:
        """Cancel a job whose writer has a signal pending (^C, a kill): it waits in the
        kernel for its write to be answered, which pyfuse3 does not interrupt, and would
        otherwise wait for the whole copy. Its write is answered ECANCELED, the signal is
        delivered, and the job removes what it half made."""
        while True:
            await trio.sleep(SIGNAL_CHECK)
            for job in self.tree.m.jobs.running():
                if (job.requester and not job.cancelled
                        and _signal_pending(job.requester, STOPPING)):
                    log.info("job %d: its writer (process %d) was sent a signal: cancelled",
                             job.id, job.requester)
                    job.cancel()

    @_guarded(by_fh=True)
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = _opened(self._handles, fh)
        if isinstance(handle, UploadHandle):
            return await self.tree.m.uploads.write(handle.upload, off, bytes(buf),
                                                   handle.append)
        if not isinstance(handle, LineHandle | DocumentHandle):
            raise pyfuse3.FUSEError(errno.EBADF)  # not open for writing
        if handle.failed:
            # A writer that tries again gets the first answer again, not a new reason.
            raise pyfuse3.FUSEError(handle.failed)
        if (isinstance(handle, LineHandle) and handle.document and handle.taken == 0
                and bytes(buf).lstrip().startswith(b"<")):
            # A <source> document is one value, on as many lines as it has.
            handle = self._handles[fh] = DocumentHandle.instead_of(handle)
        token = REQUESTER.set(handle.pid)
        try:
            if isinstance(handle, DocumentHandle):
                await self._applied(handle, self._write_document(handle, off, bytes(buf)))
            else:
                await self._applied(handle, self._write_lines(handle, off, bytes(buf)))
        finally:
            REQUESTER.reset(token)
        return len(buf)

    async def _applied(self, handle: ValueHandle, step: Awaitable[None]) -> None:
        """Run a step of a value's write or flush: a refusal is this handle's answer
        from now on (and its reason goes to its user's MNT/error); what it changed, the
        kernel is told of before the request is answered (_caught_up)."""
        try:
            await step
        except Exception as e:
            err = self._fail(handle.uid, e)
            handle.failed = err.errno
            raise err from None
        await self._caught_up()

    async def _write_document(self, handle: DocumentHandle, off: int, buf: bytes) -> None:
        handle.wrote = True
        feeder = handle.feeder
        if off != len(feeder.data) and not feeder.complete and not handle.append:
            raise Invalid("write the XML document in order, from its start")
        feeder.feed(buf)
        if feeder.settled() and not feeder.acted:
            # The bytes so far form a whole document and nothing after it is left open:
            # act on it now, so the writer sees the outcome from write() and not only
            # from close(). Bytes after it that may still turn out invalid
            # ("</pool>\n<") wait for close, which checks them first: a refused write
            # must not have done anything.
            feeder.acted = True
            await handle.write(bytes(feeder.data))

    async def _caught_up(self) -> None:
        """Wait (TIMEOUT at most) until the kernel has been told of what the write just
        changed, so that a script reads the new state when its write returns (a target
        after a redefine, volumes/V gone after `delete` in volinfo/V/ctl).

        The one wait for invalidations the rule allows (Notifier): a write to a value
        file holds no directory lock, the invalidations wait only for requests that the
        main loop answers meanwhile, and the wait is bounded by the time the kernel
        would trust the entry anyway."""
        upto = self.notifier.queued
        if self.notifier.sent < upto:
            await trio.to_thread.run_sync(self.notifier.wait_sent, upto, TIMEOUT,
                                          abandon_on_cancel=True)

    async def _write_lines(self, handle: LineHandle, off: int, buf: bytes) -> None:
        """A value or command is taken whole, at its newline (or at close without one):
        `dd bs=1` and a line written in pieces mean what one `echo` means.

        One open carries one value (decisions.md): blank lines around it are ignored, a
        second one is refused, and a write is checked whole before its line is applied,
        so that a refused write has done nothing (one write of "stop\\nx\\n" stops
        nothing; a shell's printf writes each line on its own, and its second is refused).
        """
        if off != handle.taken and not handle.append:
            raise Invalid("write the value in order, from its start")
        *ended, rest = bytes(handle.pending + buf).split(b"\n")
        values = [line for line in ended if line.strip()]
        if len(rest) > MAX_LINE:
            raise Invalid(f"a line of more than {MAX_LINE} bytes")
        if len(values) + bool(rest.strip()) > (1 if handle.applied is None else 0):
            before = ("" if handle.applied is None else
                      f"{shown(handle.applied.decode(errors='replace'))} was applied already "
                      "(a shell's echo and printf write each line on its own); ")
            raise Invalid("one value or command per open, on one line (blank lines aside): "
                          f"{before}nothing was done for this write")
        handle.taken += len(buf)
        handle.pending = bytearray(rest)
        if values or (ended and handle.applied is None and not rest.strip()):
            # A write of blank lines only, with nothing before it, is an empty value:
            # `echo > ctl` is still "empty command", `echo > sources/iscsi` forgets.
            handle.applied = values[0] if values else b""
            await handle.write(handle.applied + b"\n")

    @_guarded(by_fh=True)
    async def flush(self, fh: int) -> None:
        handle = _opened(self._handles, fh)
        if isinstance(handle, UploadHandle):
            await self.tree.m.uploads.flush(handle.upload)
            return
        if not isinstance(handle, LineHandle | DocumentHandle) or handle.failed:
            return
        token = REQUESTER.set(handle.pid)
        try:
            if isinstance(handle, LineHandle):
                if handle.pending.strip():
                    await self._applied(handle, self._last_line(handle))
            elif handle.wrote:
                await self._applied(handle, self._finish_document(handle))
        finally:
            REQUESTER.reset(token)

    async def _last_line(self, handle: LineHandle) -> None:
        """The last value had no newline: take it now (_write_lines let it wait only as
        this open's one value)."""
        line, handle.pending = bytes(handle.pending), bytearray()
        handle.applied = line
        await handle.write(line)

    async def _finish_document(self, handle: DocumentHandle) -> None:
        """The document must be whole and what followed it closed. One not acted on yet
        (the push parser missed its end, or what followed it was still open at the last
        write) is acted on only then: a refusal here has done nothing."""
        feeder = handle.feeder
        feeder.finish()
        if not feeder.acted:
            feeder.acted = True
            await handle.write(bytes(feeder.data))

    @_guarded(by_fh=True)
    async def release(self, fh: int) -> None:
        handle = _opened(self._handles, fh)
        del self._handles[fh]
        if isinstance(handle, EventsHandle):
            handle.feed.forget(fh)
        if not isinstance(handle, UploadHandle):
            return
        if any(isinstance(h, UploadHandle) and h.upload is handle.upload
               for h in self._handles.values()):
            return  # another open of the same new volume is still writing
        self._upload_inos.pop(handle.ino, None)
        try:
            await self.tree.m.uploads.close(handle.upload)
        except Exception as e:  # release cannot report; the reason is kept for the user
            self._fail(handle.uid, e)

    @_guarded(by_fh=True)
    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = _opened(self._handles, fh)
        if isinstance(handle, UploadHandle):
            await self.tree.m.uploads.sync(handle.upload, datasync)


# ---------------------------------------------------------------- the mount
# What the daemon (cli.serve) asks of pyfuse3, so that this stays the one module that
# imports it.


def mount(ops: Operations, mountpoint: str, allow_other: bool) -> None:
    """Mount ``ops`` at ``mountpoint`` (pyfuse3.init, with vsfs's options). Raises
    RuntimeError when it cannot (the kernel or fusermount3 refused)."""
    options = set(pyfuse3.default_options)
    options |= {"fsname=vsfs", "subtype=vsfs"}
    if allow_other:
        options.add("allow_other")
    pyfuse3.init(ops, mountpoint, options)


async def serve_requests(max_tasks: int = MAX_TASKS) -> None:
    """Answer the kernel's requests until the mount goes (unmounted, or terminate()),
    in at most ``max_tasks`` request tasks at once."""
    await pyfuse3.main(max_tasks=max_tasks)


def terminate() -> None:
    """End serve_requests() (the daemon got SIGTERM, SIGINT or SIGHUP)."""
    pyfuse3.terminate()


def unmount(ops: Operations, clean: bool) -> bool:
    """Stop telling the kernel anything, then end the session: unmounting if
    serve_requests() ended cleanly, only closing /dev/fuse after a failure. False, and
    the session left alone, while an invalidation still waits in the kernel: the
    session must outlive it (the watchdog aborts the connection once the daemon has
    ended)."""
    ops.mounted = False
    if not ops.notifier.close():
        return False
    pyfuse3.close(unmount=clean)
    return True
