"""The FUSE adapter's own rules, with its Operations driven directly and no mount, as
s3ql's tests/t3_fs_api.py drives its own: the errno mapping, lookup counts and inode
numbers, the handles of each kind, the command files' inode per lookup.

A manager over a dir pool in tmp_path, its tree and an Operations; requests come with
a stand-in for pyfuse3's RequestContext. Nothing here mounts, so the adapter is never
``mounted`` and queues no invalidation; what needs a live request (readdir_reply) is
replaced by a stand-in, said where. Checked elsewhere, not again here:
tests/test_robust.py (an unexpected error in getattr, opendir, lookup or a read answers
that one request EIO, FORGET never raises, background tasks start again, the lazy
invalidation) and tests/test_tree_manager.py (an unknown command's EINVAL in the
writer's MNT/error only; a listing's snapshot).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import select
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import pytest

from vsfs import errors
from vsfs.fuse_ops import (
    TIMEOUT,
    DirHandle,
    DocumentHandle,
    EventsHandle,
    LineHandle,
    Operations,
    ReadHandle,
    UploadHandle,
)
from vsfs.manager import Manager
from vsfs.model import VolumeDef
from vsfs.state import StateDir
from vsfs.tree import Tree

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "reference.md"
FORMAT = logging.Formatter()


@dataclass(frozen=True)
class Ctx:
    """Stands in for pyfuse3.RequestContext, whose fields only pyfuse3 itself can set
    (cdef readonly). pid 0: no process whose signals the adapter would look at."""

    uid: int
    gid: int = 100
    pid: int = 0
    umask: int = 0o022


ALICE = Ctx(uid=1000)
BOB = Ctx(uid=2000)


@dataclass
class Adapter:
    m: Manager
    tree: Tree
    ops: Operations

    async def ino(self, *path: str, ctx: Ctx = ALICE) -> int:
        """The inode of MNT/path, looked up name by name as the kernel does."""
        ino = pyfuse3.ROOT_INODE
        for name in path:
            ino = (await self.ops.lookup(ino, os.fsencode(name), ctx)).st_ino
        return ino

    async def open(self, *path: str, flags: int = os.O_RDONLY, ctx: Ctx = ALICE) -> int:
        return (await self.ops.open(await self.ino(*path, ctx=ctx), flags, ctx)).fh

    async def write_file(self, *path: str, data: bytes, ctx: Ctx = ALICE) -> None:
        """open, write, flush, release: `echo DATA > MNT/path`."""
        fh = await self.open(*path, flags=os.O_WRONLY, ctx=ctx)
        try:
            await self.ops.write(fh, 0, data)
            await self.ops.flush(fh)
        finally:
            await self.ops.release(fh)

    def error(self, ctx: Ctx = ALICE) -> str:
        return self.tree.error_text(ctx.uid).decode()


@pytest.fixture
async def adapter(tmp_path: Path) -> Adapter:
    """Dir pool p over tmp_path/img, running, with volume v of 1 MiB."""
    m = Manager(StateDir(tmp_path / "state"))
    tree = Tree(m)
    await m.load()
    await m.define_pool(f"<pool type='dir'><name>p</name><target><path>{tmp_path / 'img'}"
                        "</path></target></pool>".encode())
    await m.build_pool("p")
    await m.start_pool("p")
    await m.create_volume("p", VolumeDef("v", 1 << 20))
    return Adapter(m, tree, Operations(tree, 0, 0))


@pytest.fixture(autouse=True)
def no_unexpected_tracebacks(caplog: pytest.LogCaptureFixture) -> Iterator[list[str]]:
    """Fails a test in which vsfs logged a traceback it did not expect: a test that
    provokes one on purpose appends a piece of its message to the list."""
    expected: list[str] = []
    caplog.set_level(logging.INFO, logger="vsfs")
    yield expected
    for record in caplog.get_records("setup") + caplog.get_records("call"):
        if record.exc_info:
            text = record.getMessage() + "\n" + FORMAT.formatException(record.exc_info)
            if not any(e in text for e in expected):
                pytest.fail(f"vsfs logged a traceback it was not expected to:\n{text}")


@dataclass
class Fields:
    """Stands in for pyfuse3.SetattrFields, whose fields only pyfuse3 can set."""

    update_atime: bool = False
    update_mtime: bool = False
    update_ctime: bool = False
    update_mode: bool = False
    update_uid: bool = False
    update_gid: bool = False
    update_size: bool = False


class Entries:
    """Stands in for pyfuse3.readdir_reply, which needs a live request's ReaddirToken:
    takes up to ``room`` entries per readdir, as a kernel's buffer would."""

    def __init__(self, room: int = 1000) -> None:
        self.room = room
        self.names: list[str] = []
        self.inos: dict[str, int] = {}
        self.next_id = 0

    def __call__(self, token: object, name: bytes, attr: pyfuse3.EntryAttributes,
                 next_id: int) -> bool:
        if self.room == 0:
            return False
        self.room -= 1
        self.names.append(os.fsdecode(name))
        self.inos[os.fsdecode(name)] = attr.st_ino
        self.next_id = next_id
        return True


# ---------------------------------------------------------------- errors


VSFS_ERRORS = [errors.Invalid, errors.Exists, errors.NotFound, errors.Busy,
               errors.NotEmpty, errors.NoSpace, errors.Unsupported, errors.Denied,
               errors.Canceled, errors.CrossDevice, errors.BackendFailed,
               errors.CommandNoSpace]


def test_every_error_of_the_family_is_listed_here_and_in_the_reference() -> None:
    """Each VsfsError's errno is one docs/reference.md's "Errors" table names."""
    def subclasses(cls: type) -> set[type]:
        return {c for s in cls.__subclasses__() for c in (s, *subclasses(s))}
    in_vsfs = {c for c in subclasses(errors.VsfsError) if c.__module__ == "vsfs.errors"}
    assert in_vsfs == set(VSFS_ERRORS)
    text = REFERENCE.read_text()
    table = text[text.index("## Errors"):]
    table = table[:table.index("\n## ", 1)]
    named = set(re.findall(r"^\| (E[A-Z]+)(?: / (E[A-Z]+))? \|", table, re.M))
    listed = {getattr(errno, n) for pair in named for n in pair if n}
    for cls in VSFS_ERRORS:
        assert cls.errno in listed, cls  # by number: EOPNOTSUPP is ENOTSUP on Linux


async def fail_unlink_and_write(adapter: Adapter, monkeypatch: pytest.MonkeyPatch,
                                error: Exception) -> tuple[int, int]:
    """The tree's callbacks raise ``error`` for ALICE's `rm volumes/v` (a request with a
    context) and BOB's `echo yes > autostart` (a write on a handle: no context); the
    errnos they get. BOB's write is tried twice and then closed, as Python's buffered
    files do."""
    async def fail(*args: object) -> None:
        raise error

    monkeypatch.setattr(adapter.m, "delete_volume", fail)
    monkeypatch.setattr(adapter.m, "set_autostart", fail)
    volumes = await adapter.ino("pools", "p", "volumes")
    with pytest.raises(pyfuse3.FUSEError) as rm:
        await adapter.ops.unlink(volumes, b"v", ALICE)
    fh = await adapter.open("pools", "p", "autostart", flags=os.O_WRONLY, ctx=BOB)
    with pytest.raises(pyfuse3.FUSEError) as echo:
        await adapter.ops.write(fh, 0, b"yes\n")
    # Tried again: the first answer again, not a new one.
    with pytest.raises(pyfuse3.FUSEError) as again:
        await adapter.ops.write(fh, 0, b"yes\n")
    assert again.value.errno == echo.value.errno
    await adapter.ops.flush(fh)  # a refused value is not applied at close either
    await adapter.ops.release(fh)
    monkeypatch.undo()
    return rm.value.errno, echo.value.errno


@pytest.mark.parametrize("cls", VSFS_ERRORS, ids=lambda c: c.__name__)
async def test_a_refusal_is_its_errno_and_its_message_goes_to_its_user(
        adapter: Adapter, cls: type[errors.VsfsError], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A request with a context tells its caller; one on a handle tells the user who
    opened it. Nobody else's MNT/error changes, and no traceback is logged."""
    errnos = await fail_unlink_and_write(adapter, monkeypatch,
                                         cls(f"refused by {cls.__name__}"))
    assert errnos == (cls.errno, cls.errno)
    assert adapter.error(ALICE) == adapter.error(BOB) == f"refused by {cls.__name__}\n"
    assert adapter.error(Ctx(uid=3000)) == ""
    assert f"refused ({errno.errorcode[cls.errno]}): refused by" in caplog.text


async def test_an_unexpected_error_is_eio_logged_and_named_to_its_user(
        adapter: Adapter, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        no_unexpected_tracebacks: list[str]) -> None:
    """Through a directory action (unlink) and a value's write: EIO, the traceback in
    the log, "internal error" in the caller's MNT/error; the adapter goes on."""
    no_unexpected_tracebacks.append("KeyError: 'injected'")
    errnos = await fail_unlink_and_write(adapter, monkeypatch, KeyError("injected"))
    assert errnos == (errno.EIO, errno.EIO)
    for user in (ALICE, BOB):
        assert adapter.error(user).startswith("internal error: KeyError('injected')")
    assert caplog.text.count("KeyError: 'injected'") == 2  # both tracebacks logged
    await adapter.write_file("pools", "p", "autostart", data=b"yes\n")
    assert adapter.m.entry("p").autostart


async def test_refusals_of_the_adapter_itself_are_said(adapter: Adapter) -> None:
    """What the adapter refuses without asking the tree: EPERM/EACCES/EISDIR/EINVAL,
    with the reason in the caller's MNT/error where there is one to give."""
    ops = adapter.ops
    pools = await adapter.ino("pools")
    state = await adapter.ino("pools", "p", "state")
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.open(state, os.O_WRONLY, ALICE)
    assert e.value.errno == errno.EACCES
    assert adapter.error() == "MNT/pools/p/state is read-only\n"
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.open(await adapter.ino("pools", "p", "ctl"), os.O_RDONLY, ALICE)
    assert e.value.errno == errno.EACCES
    assert adapter.error() == "MNT/pools/p/ctl is write-only\n"
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.open(await adapter.ino("events"), os.O_RDWR, ALICE)
    assert e.value.errno == errno.EACCES
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.open(pools, os.O_RDONLY, ALICE)
    assert e.value.errno == errno.EISDIR
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.unlink(pools, b"p", ALICE)
    assert e.value.errno == errno.EPERM
    assert adapter.error() == "MNT/pools/p cannot be removed\n"
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.create(pools, b"x", 0o644, os.O_WRONLY, ALICE)
    assert e.value.errno == errno.EACCES
    # chmod of a vsfs file: EPERM; truncating a value file to 0 is `echo x >`'s first
    # step and allowed, to anything else EACCES.
    attr = pyfuse3.EntryAttributes()
    attr.st_mode = 0o600
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.setattr(state, attr, Fields(update_mode=True), None, ALICE)
    assert e.value.errno == errno.EPERM
    assert adapter.error().startswith("MNT/pools/p/state: vsfs's files keep their modes")
    autostart = await adapter.ino("pools", "p", "autostart")
    size = Fields(update_size=True)
    attr.st_size = 0
    assert (await ops.setattr(autostart, attr, size, None, ALICE)).st_ino == autostart
    attr.st_size = 5
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.setattr(autostart, attr, size, None, ALICE)
    assert e.value.errno == errno.EACCES
    # readlink of what is no link
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.readlink(state, ALICE)
    assert e.value.errno == errno.EINVAL


# ---------------------------------------------------------------- inodes


async def test_an_inode_stays_while_looked_up_and_its_number_is_never_reused(
        adapter: Adapter) -> None:
    ops = adapter.ops
    p = await adapter.ino("pools", "p")
    first = await ops.lookup(p, b"state", ALICE)
    again = await ops.lookup(p, b"state", ALICE)
    assert again.st_ino == first.st_ino  # one inode per (path, kind)
    assert first.entry_timeout == first.attr_timeout == TIMEOUT
    await ops.forget([(first.st_ino, 1)])
    assert (await ops.getattr(first.st_ino, ALICE)).st_ino == first.st_ino  # one lookup left
    await ops.forget([(first.st_ino, 1)])
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.getattr(first.st_ino, ALICE)
    assert e.value.errno == errno.ENOENT  # forgotten: the number means nothing now
    later = await ops.lookup(p, b"state", ALICE)
    assert later.st_ino > first.st_ino
    # The root is never forgotten; a FORGET of an unknown inode changes nothing.
    await ops.forget([(pyfuse3.ROOT_INODE, 5), (10**9, 1)])
    assert (await ops.getattr(pyfuse3.ROOT_INODE, ALICE)).st_ino == pyfuse3.ROOT_INODE


async def test_a_listing_counts_a_lookup_for_each_entry_it_hands_out(
        adapter: Adapter, monkeypatch: pytest.MonkeyPatch) -> None:
    """readdir_reply that returned True is a lookup (pyfuse3's readdirplus); an entry
    that did not fit is not, and the next readdir starts from the offset handed out."""
    ops = adapter.ops
    p = await adapter.ino("pools", "p")
    fh = await ops.opendir(p, ALICE)
    assert isinstance(ops._dirs[fh], DirHandle)
    reply = Entries(room=3)
    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    await ops.readdir(fh, 0, object())  # type: ignore[arg-type]
    assert reply.names == ["xml", "define", "ctl"]
    reply.room = 1000
    await ops.readdir(fh, reply.next_id, object())  # type: ignore[arg-type]
    assert reply.names[3:6] == ["state", "type", "uuid"]
    assert reply.names[-2:] == ["volumes", "volinfo"]
    assert len(set(reply.names)) == len(reply.names)
    await ops.releasedir(fh)
    assert fh not in ops._dirs
    with pytest.raises(pyfuse3.FUSEError) as e:  # released: EBADF
        await ops.readdir(fh, 0, object())  # type: ignore[arg-type]
    assert e.value.errno == errno.EBADF
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.releasedir(fh)
    assert e.value.errno == errno.EBADF
    # The listing's one lookup of `state` keeps it; a FORGET of that one drops it.
    state = reply.inos["state"]
    assert (await ops.getattr(state, ALICE)).st_ino == state
    await ops.forget([(state, 1)])
    with pytest.raises(pyfuse3.FUSEError):
        await ops.getattr(state, ALICE)


async def test_command_files_get_an_inode_per_lookup(adapter: Adapter) -> None:
    """ctl and define (written, never read): each lookup a new inode, not to be cached,
    so that each open has its own inode lock (architecture.md)."""
    ops = adapter.ops
    p = await adapter.ino("pools", "p")
    one = await ops.lookup(p, b"ctl", ALICE)
    two = await ops.lookup(p, b"ctl", ALICE)
    assert one.st_ino != two.st_ino
    assert one.entry_timeout == 0
    define = await ops.lookup(p, b"define", ALICE)
    assert define.entry_timeout == 0
    assert (await ops.lookup(p, b"define", ALICE)).st_ino != define.st_ino
    # Both stay usable while looked up, and each open of them is its own.
    fh1 = (await ops.open(one.st_ino, os.O_WRONLY, ALICE)).fh
    fh2 = (await ops.open(two.st_ino, os.O_WRONLY, ALICE)).fh
    await ops.write(fh1, 0, b"refresh\n")
    await ops.write(fh2, 0, b"refresh\n")  # not "one value per open" of the first
    for fh in (fh1, fh2):
        await ops.flush(fh)
        await ops.release(fh)
    await ops.forget([(one.st_ino, 1)])
    with pytest.raises(pyfuse3.FUSEError):
        await ops.getattr(one.st_ino, ALICE)
    assert (await ops.getattr(two.st_ino, ALICE)).st_ino == two.st_ino


# ---------------------------------------------------------------- handles


async def test_a_snapshot_handle_serves_what_the_open_rendered(adapter: Adapter) -> None:
    ops = adapter.ops
    fh = await adapter.open("pools", "p", "autostart")
    assert isinstance(ops._handles[fh], ReadHandle)
    assert await ops.read(fh, 0, 100) == b"no\n"
    await adapter.m.set_autostart("p", True)
    assert await ops.read(fh, 0, 100) == b"no\n"  # this open's snapshot
    assert await ops.read(fh, 1, 1) == b"o"
    await ops.release(fh)
    assert fh not in ops._handles
    assert await ops.read(await adapter.open("pools", "p", "autostart"), 0, 100) == b"yes\n"
    # MNT/error: each reader its own.
    adapter.tree.record_error(BOB.uid, "bob's")
    assert await ops.read(await adapter.open("error", ctx=BOB), 0, 100) == b"bob's\n"
    assert await ops.read(await adapter.open("error"), 0, 100) == b""


async def test_a_handle_not_open_is_ebadf(adapter: Adapter) -> None:
    ops = adapter.ops
    fh = await adapter.open("README")
    await ops.release(fh)
    for call in (lambda: ops.read(fh, 0, 10), lambda: ops.write(fh, 0, b"x"),
                 lambda: ops.flush(fh), lambda: ops.fsync(fh, False),
                 lambda: ops.release(fh), lambda: ops.poll(0, fh, None, ALICE)):
        with pytest.raises(pyfuse3.FUSEError) as e:
            await call()
        assert e.value.errno == errno.EBADF


async def test_a_value_is_applied_at_its_newline_once_per_open(adapter: Adapter) -> None:
    ops = adapter.ops
    fh = await adapter.open("pools", "p", "autostart", flags=os.O_WRONLY)
    handle = ops._handles[fh]
    assert isinstance(handle, LineHandle)
    assert await ops.write(fh, 0, b"ye") == 2  # `dd bs=1`: a line in pieces
    assert not adapter.m.entry("p").autostart
    await ops.write(fh, 2, b"s\n")
    assert adapter.m.entry("p").autostart  # applied by the write, not at close
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.write(fh, 4, b"no\n")
    assert e.value.errno == errno.EINVAL
    assert "'yes' was applied already" in adapter.error()
    await ops.release(fh)
    assert adapter.m.entry("p").autostart
    # Without a newline: applied at close (flush).
    fh = await adapter.open("pools", "p", "autostart", flags=os.O_WRONLY)
    await ops.write(fh, 0, b"no")
    assert adapter.m.entry("p").autostart
    await ops.flush(fh)
    assert not adapter.m.entry("p").autostart
    await ops.release(fh)
    # O_RDWR: the same handle reads what the open rendered.
    fh = await adapter.open("pools", "p", "autostart", flags=os.O_RDWR)
    assert isinstance(ops._handles[fh], LineHandle)
    assert await ops.read(fh, 0, 100) == b"no\n"
    await ops.release(fh)


async def test_an_xml_document_is_acted_on_once_whole(adapter: Adapter,
                                                       tmp_path: Path) -> None:
    ops = adapter.ops
    fh = await adapter.open("pools", "define", flags=os.O_WRONLY)
    assert isinstance(ops._handles[fh], DocumentHandle)
    doc = (f"<pool type='dir'><name>q</name><target><path>{tmp_path / 'q'}</path>"
           "</target></pool>\n").encode()
    await ops.write(fh, 0, doc[:20])
    assert "q" not in adapter.m.pools
    await ops.write(fh, 20, doc[20:])
    assert "q" in adapter.m.pools  # whole: defined by the write itself
    await ops.flush(fh)
    await ops.release(fh)
    # Out of order: EINVAL, nothing done.
    fh = await adapter.open("pools", "define", flags=os.O_WRONLY)
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.write(fh, 7, b"<pool")
    assert e.value.errno == errno.EINVAL
    await ops.release(fh)
    # Cut off: refused at close, saying so.
    fh = await adapter.open("pools", "define", flags=os.O_WRONLY)
    await ops.write(fh, 0, doc[:30])
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.flush(fh)
    assert e.value.errno == errno.EINVAL
    assert adapter.error().startswith("malformed or incomplete XML document")
    await ops.release(fh)


async def test_a_value_file_that_takes_a_document_switches_at_the_first_write(
        adapter: Adapter) -> None:
    """sources/TYPE takes a HOST line or a <source> document: the open is a line until
    a first write that starts with "<"."""
    ops = adapter.ops
    fh = await adapter.open("sources", "iscsi-direct", flags=os.O_WRONLY)
    assert isinstance(ops._handles[fh], LineHandle)
    await ops.write(fh, 0, b"  <source>")
    assert isinstance(ops._handles[fh], DocumentHandle)
    await ops.release(fh)  # never whole, never acted on; release says nothing


async def test_an_upload_handle_writes_the_new_volume(adapter: Adapter) -> None:
    """create (truncate, cp): an upload, a regular file while open and the volume's
    symlink after its last close, under another inode number."""
    ops = adapter.ops
    volumes = await adapter.ino("pools", "p", "volumes")
    fi, attr = await ops.create(volumes, b"new.img", 0o644, os.O_WRONLY | os.O_CREAT, ALICE)
    handle = ops._handles[fi.fh]
    assert isinstance(handle, UploadHandle)
    assert attr.entry_timeout == 0  # to be looked up again once it is a symlink
    assert await ops.write(fi.fh, 0, b"hello") == 5
    assert await ops.read(fi.fh, 0, 10) == b"hello"
    size = pyfuse3.EntryAttributes()
    size.st_size = 4096
    assert (await ops.setattr(attr.st_ino, size, Fields(update_size=True), fi.fh,
                              ALICE)).st_size == 4096
    # A second open of the same upload: the volume is settled at the last release.
    fh2 = (await ops.open(attr.st_ino, os.O_RDONLY, ALICE)).fh
    assert isinstance(ops._handles[fh2], UploadHandle)
    await ops.fsync(fi.fh, False)
    await ops.flush(fi.fh)
    await ops.release(fi.fh)
    # Still open: its inode still answers (fstat of the open descriptor).
    assert (await ops.getattr(attr.st_ino, ALICE)).st_size == 4096
    await ops.release(fh2)
    assert adapter.m.entry("p").volumes["new.img"].capacity == 4096
    with pytest.raises(pyfuse3.FUSEError) as e:  # closed: the name leads to a symlink now
        await ops.getattr(attr.st_ino, ALICE)
    assert e.value.errno == errno.ENOENT
    after = await ops.lookup(volumes, b"new.img", ALICE)
    assert after.st_ino != attr.st_ino
    assert await ops.readlink(after.st_ino, ALICE) == os.fsencode(
        adapter.m.entry("p").volumes["new.img"].path)


async def test_an_events_handle_has_its_own_cursor(adapter: Adapter) -> None:
    ops = adapter.ops
    events = await adapter.ino("events")
    fi = await ops.open(events, os.O_RDONLY | os.O_NONBLOCK, ALICE)
    handle = ops._handles[fi.fh]
    assert isinstance(handle, EventsHandle)
    assert fi.nonseekable and fi.direct_io
    with pytest.raises(pyfuse3.FUSEError) as e:  # nothing new, and O_NONBLOCK
        await ops.read(fi.fh, 0, 4096)
    assert e.value.errno == errno.EAGAIN

    class Poll:
        notified = 0

        def notify(self) -> None:
            self.notified += 1

    poll = Poll()
    assert await ops.poll(events, fi.fh, poll, ALICE) == 0  # type: ignore[arg-type]
    await adapter.m.create_volume("p", VolumeDef("w", 4096))
    assert poll.notified == 1
    ready = await ops.poll(events, fi.fh, None, ALICE)
    assert ready & select.POLLIN
    text = await ops.read(fi.fh, 0, 10)  # part of a line: the rest is kept for it
    while b" volume p/w created" not in text:
        text += await ops.read(fi.fh, 0, 4096)
    assert re.fullmatch(rb"(\d+ \S+ [a-z]+ \S+ [a-z]+( .*)?\n)+", text), text
    assert re.search(rb"^\d+ \S+ job \d+ started create p/w\n", text, re.M), text
    # A reader opened now starts from now; a value file's handle is always ready.
    later = await ops.open(events, os.O_RDONLY | os.O_NONBLOCK, ALICE)
    with pytest.raises(pyfuse3.FUSEError):
        await ops.read(later.fh, 0, 4096)
    readme = await adapter.open("README")
    assert await ops.poll(0, readme, None, ALICE) & select.POLLOUT
    for fh in (fi.fh, later.fh, readme):
        await ops.release(fh)
    assert not ops._handles
