"""A refused write changes nothing: mutated input written to every file that takes it.

Each case is written as a user writes it (opened, written in one or a few writes, closed).
For every write or close that is refused: the errno is one of the contract's (never EIO, an
internal error), and the pools, their volumes, the files in their directories and the state
directory are exactly as they were before it. What succeeds is undone before the next case.
No entity is ever expanded, no file or network resource fetched (a listener the test runs
on 127.0.0.1 must see no connection), and the daemon logs no traceback.

Two drivers run the same cases: the FUSE adapter called directly (many cases, quickly), and
a real mount (fewer cases, through the kernel). The seed is fixed: a failure reproduces.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pyfuse3
import pytest
from support import Mount, free_port
from test_mount_errors import state_bytes

from vsfs.fuse_ops import Operations
from vsfs.manager import Manager
from vsfs.model import VolumeDef
from vsfs.state import StateDir
from vsfs.tree import Tree
from vsfs.xmlio import format_pool

SEED = 20261202
# The contract's errnos (INTERFACE.md, "Errors") that a write can meet here; EIO is the
# backend's command failing, which none of these cases runs into: there it would be an
# internal error.
CONTRACT = {errno.EINVAL, errno.EEXIST, errno.ENOENT, errno.EBUSY, errno.ENOTEMPTY,
            errno.ENOSPC, errno.EOPNOTSUPP, errno.EACCES, errno.EPERM}

VOL_SIZE = 1 << 20

# Where each case is written (P is a running dir pool holding volume V, Q an inactive one).
TARGETS = {
    "pools/define": ("pools", "define"),
    "P/xml": ("pools", "P", "xml"),
    "Q/xml": ("pools", "Q", "xml"),
    "P/define": ("pools", "P", "define"),
    "Q/define": ("pools", "Q", "define"),
    "P/ctl": ("pools", "P", "ctl"),
    "P/autostart": ("pools", "P", "autostart"),
    "V/capacity": ("pools", "P", "volinfo", "V", "capacity"),
    "V/ctl": ("pools", "P", "volinfo", "V", "ctl"),
}

ODD_NAMES = [b"a\x01b", b"\x1b[31mred", b"tab\there", b"new\nline", b"\xff\xfe", b"caf\xc3",
             b"a/b", b"/", b".hidden", b".", b"..", b"x" * 300, "é".encode() * 130, b"",
             b" ", b"define", b"del\x7f", b"nul\x00", b"-", b"'quoted", b"sp ace"]
HUGE = [b"9" * 5000, b"0" * 5000 + b"1", b"1" * 4301, b"18446744073709551616",
        b"340282366920938463463374607431768211456", b"-" + b"9" * 5000]
TOKENS = [b"<", b">", b"/>", b"</", b"&", b"&amp;", b"&#0;", b"&#x110000;", b"&lol;", b"]]>",
          b"<![CDATA[", b"<!--", b"-->", b"<?", b"?>", b"\x00", b"\xff", b"\xc3", b"'", b'"',
          b"=", b"\n", b"\r", b" ", b"xmlns=''", b"xmlns:p='urn:p'", b"p:", b"<!DOCTYPE x>",
          b"<?xml version='1.0'?>", b"\xef\xbb\xbf", b"<!ENTITY a 'b'>"]
TAGS = [b"pool", b"volume", b"name", b"uuid", b"source", b"target", b"path", b"permissions",
        b"mode", b"owner", b"group", b"capacity", b"allocation", b"format", b"host",
        b"device", b"backingStore", b"encryption", b"features", b"x"]
TRAILERS = [b"\n<", b"\n<!-- x", b"<?pi", b"\n<!", b"<!-- a --><", b"junk", b"<pool/>",
            b"\n<volume/>", b"\x00", b"\n<!-- ok -->\n", b"  \n", b"<?ok?>"]
POOL_WORDS = [b"start", b"stop", b"refresh", b"build", b"build --overwrite", b"delete",
              b"frobnicate", b"start now", b"build --force", b"'unbalanced", b"st\xffop"]
VOL_WORDS = [b"wipe", b"wipe zero", b"wipe other", b"delete", b"delete now", b"clone",
             b"clone a b c", b"snapshot", b"shrink", b"shrink 1G", b"resize 2M",
             b"clone NAME", b"clone NAME Q", b"clone NAME nosuch", b"snapshot NAME",
             b"shrink NUMBER"]
SIZES = [b"2M", b"1G", b"0", b"-1", b"1.5G", b"10Q", b"1T", b"1E", b"16EiB", b"1 M B",
         b"\xd9\xa1\xd9\xa0", b"0x10", b"1_000", b"+5"]


def _root(doc: bytes) -> bytes:
    """The root element's name: b"pool" of b"<pool type='dir'>..."."""
    return doc[1:].split(b">")[0].split(b" ")[0]


@dataclass
class Case:
    target: str
    data: bytes
    chunks: list[bytes]
    what: str
    secret: bool = False  # an XXE case: the secret must never show


class Corpus:
    """Mutated input, from valid documents and lines; deterministic for one seed."""

    def __init__(self, rnd: random.Random, base: Path, port: int, secret: Path) -> None:
        self.rnd = rnd
        self.targets = base / "targets"
        self.port = port
        self.secret = secret

    def pool_doc(self, name: bytes | None = None) -> bytes:
        r = self.rnd
        name = name if name is not None else b"n%d" % r.randrange(50)
        extra = r.choice([b"", b"<source/>", b"<uuid>11111111-2222-4333-8444-5555555555%02d</uuid>"
                          % r.randrange(100),
                          b"<target><permissions><mode>0755</mode><owner>0</owner>"
                          b"<group>0</group></permissions></target>"])
        return (b"<pool type='dir'><name>" + name + b"</name>" + extra
                + b"<target><path>" + bytes(self.targets) + b"/" + name
                + b"</path></target></pool>\n")

    def vol_doc(self, name: bytes | None = None) -> bytes:
        r = self.rnd
        name = name if name is not None else b"w%d" % r.randrange(50)
        extra = r.choice([b"", b"<allocation>0</allocation>",
                          b"<target><format type='raw'/><permissions><mode>0600</mode>"
                          b"</permissions></target>",
                          b"<target><format type='qcow2'/><encryption format='luks'/></target>"])
        return (b"<volume><name>" + name + b"</name><capacity unit='K'>%d</capacity>"
                % r.choice([4, 64, 1024]) + extra + b"</volume>\n")

    def mutate_xml(self, doc: bytes) -> tuple[bytes, str, bool]:
        r = self.rnd
        # A huge document costs 16 writes and a parse of 1 MiB each time it may have
        # ended: a few of them tell as much as many.
        kind = r.choices(["truncate", "flip", "delete", "insert", "tag", "untag", "bomb",
                          "xxe-file", "xxe-net", "xinclude", "huge", "prefix", "trailer",
                          "name", "number", "uuid", "twice"],
                         weights=[2, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0.2, 1, 2, 2, 2, 1, 1])[0]
        b = bytearray(doc)
        secret = False
        if kind == "truncate":
            del b[r.randrange(len(b)):]
        elif kind == "flip":
            for _ in range(r.randint(1, 3)):
                b[r.randrange(len(b))] = r.randrange(256)
        elif kind == "delete":
            k = r.randrange(len(b))
            del b[k:k + r.randint(1, 16)]
        elif kind == "insert":
            k = r.randrange(len(b) + 1)
            b[k:k] = r.choice(TOKENS)
        elif kind == "tag":
            k = r.randrange(len(b) + 1)
            tag = r.choice(TAGS)
            b[k:k] = r.choice([b"<" + tag + b">", b"</" + tag + b">", b"<" + tag + b"/>"])
        elif kind == "untag":
            starts = [i for i, c in enumerate(b) if c == ord("<")]
            k = r.choice(starts)
            end = b.find(b">", k)
            del b[k:end + 1]
        elif kind == "bomb":
            root = _root(doc)
            lol = b"<!ENTITY lol0 'lol'>" + b"".join(
                b"<!ENTITY lol%d '%s'>" % (i, b"&lol%d;" % (i - 1) * 10) for i in range(1, 10))
            b = bytearray(b"<?xml version='1.0'?><!DOCTYPE " + root + b" [" + lol + b"]>"
                          + doc.replace(b"</name>", b"&lol9;</name>", 1))
        elif kind == "xxe-file":
            b = bytearray(b"<!DOCTYPE " + _root(doc) + b" [<!ENTITY xxe SYSTEM 'file://"
                          + bytes(self.secret) + b"'>]>"
                          + doc.replace(b"</name>", b"&xxe;</name>", 1))
            secret = True
        elif kind == "xxe-net":
            url = b"http://127.0.0.1:%d/" % self.port
            root = _root(doc)
            b = bytearray(r.choice([
                b"<!DOCTYPE " + root + b" SYSTEM '" + url + b"dtd'>" + doc,
                b"<!DOCTYPE " + root + b" [<!ENTITY net SYSTEM '" + url + b"e'>]>"
                + doc.replace(b"</name>", b"&net;</name>", 1),
                b"<!DOCTYPE " + root + b" [<!ENTITY % p SYSTEM '" + url + b"p'> %p;]>" + doc,
            ]))
        elif kind == "xinclude":
            b = bytearray(doc.replace(b"<name>", b"<xi:include xmlns:xi='http://www.w3.org/"
                                      b"2001/XInclude' href='http://127.0.0.1:%d/x'/><name>"
                                      % self.port, 1))
        elif kind == "huge":
            # About 2 MiB: of white space, of comments, or one long name.
            pad = r.choice([b" ", b"<!-- -->", b"x"])
            pad *= (2 << 20) // len(pad) + r.randrange(1000)
            b = bytearray(doc.replace(b"</name>", pad + b"</name>", 1))
        elif kind == "prefix":
            which = r.choice([b"pool", b"volume", b"name", b"target"])
            b = bytearray(doc.replace(b"<" + which, b"<p:" + which, 1)
                          .replace(b"</" + which, b"</p:" + which, 1))
        elif kind == "trailer":
            b += r.choice(TRAILERS)
        elif kind == "name":
            odd = r.choice(ODD_NAMES)
            b = bytearray(doc.replace(doc[doc.index(b"<name>") + 6:doc.index(b"</name>")],
                                      odd, 1))
        elif kind == "number":
            tag = r.choice([b"capacity", b"allocation", b"owner", b"group", b"mode"])
            huge = r.choice(HUGE)
            if b"<" + tag in b:
                k = b.index(b">", b.index(b"<" + tag)) + 1
                b[k:b.index(b"<", k)] = huge
            else:
                b = bytearray(doc.replace(b"<name>", b"<" + tag + b">" + huge + b"</" + tag
                                          + b"><name>", 1))
        elif kind == "uuid":
            b = bytearray(doc.replace(b"<name>", r.choice(
                [b"<uuid></uuid>", b"<uuid/>", b"<uuid> </uuid>", b"<uuid>xyz</uuid>"])
                + b"<name>", 1))
        elif kind == "twice":
            b = bytearray(doc.rstrip() + doc)
        return bytes(b), kind, secret

    def mutate_line(self, words: list[bytes]) -> tuple[bytes, str]:
        r = self.rnd
        line = r.choice(words)
        line = line.replace(b"NAME", r.choice([*ODD_NAMES, b"c%d" % r.randrange(9)]))
        line = line.replace(b"NUMBER", r.choice(HUGE + SIZES))
        kind = r.choice(["lines", "blank", "control", "huge", "utf8", "cr", "plain", "long"])
        if kind == "lines":
            line = b"\n".join([line] + [r.choice(words) for _ in range(r.randint(1, 3))])
        elif kind == "blank":
            line = b"\n" * r.randint(0, 2) + line + b"\n" * r.randint(1, 3) + b" \n"
            line += r.choice([b"", r.choice(words)])
        elif kind == "control":
            k = r.randrange(len(line) + 1)
            line = line[:k] + bytes([r.choice([0, 1, 7, 9, 11, 12, 27, 127])]) + line[k:]
        elif kind == "huge":
            line = line + b" " + r.choice(HUGE)
        elif kind == "utf8":
            line = line + r.choice([b"\xff", b"\xc3", b"\xed\xa0\x80"])
        elif kind == "cr":
            line = line + b"\r\n" + r.choice(words)
        elif kind == "long":
            line = line + b" " + b"y" * r.choice([300, 300, 300, 70_000])
        return line + r.choice([b"\n", b"", b"\n\n"]), "line-" + kind

    def case(self) -> Case:
        r = self.rnd
        target = r.choice(list(TARGETS))
        secret = False
        if target == "pools/define":
            data, what, secret = self.mutate_xml(self.pool_doc())
        elif target in ("P/xml", "Q/xml"):
            data, what, secret = self.mutate_xml(self.pool_doc(target[0].encode()))
        elif target in ("P/define", "Q/define"):
            data, what, secret = self.mutate_xml(self.vol_doc())
        elif target == "P/ctl":
            data, what = self.mutate_line(POOL_WORDS)
        elif target == "P/autostart":
            data, what = self.mutate_line([b"yes", b"no", b"maybe", b"1", b"on", b"off", *HUGE])
        elif target == "V/capacity":
            data, what = self.mutate_line(SIZES + HUGE)
        else:
            data, what = self.mutate_line(VOL_WORDS)
        chunks = [data]
        if r.random() < 0.2 and len(data) > 2:
            cuts = sorted(r.sample(range(1, len(data)), min(r.randint(1, 2), len(data) - 1)))
            chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        elif len(data) > 128 << 10:
            chunks = [data[i:i + (128 << 10)] for i in range(0, len(data), 128 << 10)]
        return Case(target, data, chunks, what, secret)


@dataclass
class Listener:
    """A TCP listener on 127.0.0.1 that counts who connects (no one should)."""

    port: int = field(default_factory=free_port)
    connections: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", self.port))
        self.sock.listen(16)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, addr = self.sock.accept()
            except OSError:
                return
            self.connections.append(addr)
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    lst = Listener()
    yield lst
    lst.close()


def secret_file(base: Path) -> tuple[Path, bytes]:
    marker = b"VSFS-XXE-SECRET-%d" % random.Random(SEED).randrange(10**9)
    path = base / "secret.txt"
    path.write_bytes(marker + b"\n")
    return path, marker


def files_under(root: Path) -> dict[str, tuple[int, ...]]:
    """Every entry under root: its kind and mode, size, mtime and owner."""
    out: dict[str, tuple[int, ...]] = {}
    if not root.exists():
        return out
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_size, st.st_mtime_ns,
                                            st.st_uid, st.st_gid)
    return out


def check_refusal(case: Case, err: int, before: Any, after: Any, error_text: Callable[[], str],
                  marker: bytes) -> None:
    where = f"{case.what} -> {case.target}: {case.data[:120]!r}"
    assert err in CONTRACT, f"errno {errno.errorcode.get(err, err)} for {where}: {error_text()}"
    assert after == before, f"a refused write changed something: {where}: {error_text()}"
    if case.secret:
        assert marker.decode() not in error_text()


# ---------------------------------------------------------------- the adapter, no mount


# Stands in for a request's pyfuse3.RequestContext, whose fields only pyfuse3 can set.
CTX = cast(pyfuse3.RequestContext, SimpleNamespace(uid=0, gid=0, pid=1, umask=0o22))


class AdapterWorld:
    """Manager, tree and FUSE adapter in this process; writes go to Operations."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.targets = base / "targets"
        self.state = base / "state"
        self.m = Manager(StateDir(self.state))
        self.tree = Tree(self.m)
        self.ops = Operations(self.tree, 0, 0)

    async def setup(self) -> None:
        m = self.m
        await m.load()
        for name in ("P", "Q"):
            await m.define_pool(b"<pool type='dir'><name>%s</name><target><path>%s/%s</path>"
                                b"</target></pool>" % (name.encode(), bytes(self.targets),
                                                       name.encode()))
            await m.build_pool(name)
        await m.start_pool("P")
        await m.create_volume("P", VolumeDef("V", VOL_SIZE))
        self.q_pool = m.entry("Q").pool

    async def ino(self, path: tuple[str, ...]) -> int:
        ino = pyfuse3.ROOT_INODE
        for name in path:
            ino = (await self.ops.lookup(ino, name.encode(), CTX)).st_ino
        return ino

    async def write(self, case: Case, between: Callable[[], Any]) -> tuple[int | None, Any]:
        """Open, write the chunks, close. The first refusal's errno (or None) and the
        snapshot taken after the last write that succeeded."""
        try:
            ino = await self.ino(TARGETS[case.target])
        except pyfuse3.FUSEError:  # V deleted meanwhile: a lookup is no write
            return None, None
        fi = await self.ops.open(ino, os.O_WRONLY, CTX)
        before = between()
        off = 0
        try:
            for chunk in case.chunks:
                try:
                    await self.ops.write(fi.fh, off, chunk)
                except pyfuse3.FUSEError as e:
                    return e.errno, before
                off += len(chunk)
                before = between()
            try:
                await self.ops.flush(fi.fh)
            except pyfuse3.FUSEError as e:
                return e.errno, before
            return None, before
        finally:
            await self.ops.release(fi.fh)

    def snapshot(self) -> Any:
        pools = {}
        for name, e in sorted(self.m.pools.items()):
            pools[name] = (e.state, e.autostart, e.pool,
                           sorted((v.name, v.capacity, v.format) for v in e.volumes.values()))
        return (pools, files_under(self.targets), state_bytes(self.state))

    def error(self) -> str:
        return self.tree.error_text(0).decode()

    async def restore(self) -> None:
        """Undo what succeeded: back to P running with V alone, Q inactive, no others."""
        m = self.m
        for name, e in list(m.pools.items()):
            if name not in ("P", "Q"):
                if e.running:
                    await m.stop_pool(name)
                await m.undefine_pool(name)
        q = m.entry("Q")
        if q.running:
            await m.stop_pool("Q")
        if q.pool != self.q_pool:
            await m.redefine_pool("Q", format_pool(self.q_pool))
        if not (self.targets / "Q").exists():
            await m.build_pool("Q")
        p = m.entry("P")
        if not p.running:
            if not (self.targets / "P").exists():
                await m.build_pool("P")
            await m.start_pool("P")
        # V last: while a snapshot of it is there, it is a backing store, in use.
        for name in sorted(p.volumes, key=lambda n: n == "V"):
            vol = p.volumes[name]
            if name != "V" or vol.capacity != VOL_SIZE or vol.format != "raw":
                await m.delete_volume("P", name)
        if "V" not in p.volumes:
            await m.create_volume("P", VolumeDef("V", VOL_SIZE))
        for name in ("P", "Q"):
            if m.entry(name).autostart:
                await m.set_autostart(name, False)


@pytest.mark.parametrize("count", [400, pytest.param(15000, marks=pytest.mark.slow)])
async def test_refused_writes_change_nothing_through_the_adapter(
        tmp_path: Path, listener: Listener, caplog: pytest.LogCaptureFixture,
        count: int) -> None:
    caplog.set_level(logging.INFO)
    secret, marker = secret_file(tmp_path)
    corpus = Corpus(random.Random(SEED + count), tmp_path, listener.port, secret)
    refused = 0
    succeeded: Counter[str] = Counter()

    world = AdapterWorld(tmp_path)
    await world.setup()
    for _ in range(count):
        case = corpus.case()
        err, before = await world.write(case, world.snapshot)
        if err is None:
            succeeded[f"{case.target} {case.what}"] += 1
            await world.restore()
            continue
        refused += 1
        check_refusal(case, err, before, world.snapshot(), world.error, marker)
    await world.restore()
    assert not listener.connections
    assert "internal error" not in caplog.text
    assert not any(r.exc_info for r in caplog.records)
    assert refused > 5 * succeeded.total(), (refused, succeeded.most_common())


# ---------------------------------------------------------------- a real mount


class MountWorld:
    """The same through a real mount, as a user writes: open, os.write, close."""

    def __init__(self, vsfs: Mount) -> None:
        self.vsfs = vsfs
        self.mnt = vsfs.path
        self.targets = vsfs.base / "targets"
        self.q_xml = b""

    def setup(self) -> None:
        for name in ("P", "Q"):
            self.vsfs.define(self.vsfs.pool_xml(name, self.targets / name))
            self._line(("pools", name, "ctl"), b"build\n")
        self._line(("pools", "P", "ctl"), b"start\n")
        self._create_v()
        self.q_xml = (self.vsfs.state / "Q.xml").read_bytes()

    def _path(self, path: tuple[str, ...]) -> Path:
        return self.mnt.joinpath(*path)

    def _line(self, path: tuple[str, ...], data: bytes) -> None:
        fd = os.open(self._path(path), os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def _create_v(self) -> None:
        # Just after V was deleted through its ctl, the kernel may still hold its entry, a
        # symlink to the file that is gone (O_CREAT follows it: ENOENT) until the
        # invalidation, sent on the side, arrives: at most the entry's 1 s.
        deadline = time.monotonic() + 2
        while True:
            try:
                fd = os.open(self.mnt / "pools/P/volumes/V", os.O_WRONLY | os.O_CREAT, 0o600)
                break
            except FileNotFoundError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        try:
            os.ftruncate(fd, VOL_SIZE)
        finally:
            os.close(fd)

    def write(self, case: Case, between: Callable[[], Any]) -> tuple[int | None, Any]:
        try:
            fd = os.open(self._path(TARGETS[case.target]), os.O_WRONLY | os.O_TRUNC)
        except FileNotFoundError:
            return None, None
        before = between()
        err = None
        try:
            for chunk in case.chunks:
                try:
                    os.write(fd, chunk)
                except OSError as e:
                    err = e.errno
                    break
                before = between()
        finally:
            try:
                os.close(fd)  # the refusal of close (FLUSH), when the writes were taken
            except OSError as e:
                err = e.errno if err is None else err
        return err, before

    def snapshot(self) -> Any:
        pools = {}
        for name in sorted(os.listdir(self.mnt / "pools")):
            if name == "define":
                continue
            d = self.mnt / "pools" / name
            state = (d / "state").read_text()
            pools[name] = (state, (d / "autostart").read_text(), (d / "uuid").read_text(),
                           sorted(os.listdir(d / "volumes")))
        return (pools, files_under(self.targets), state_bytes(self.vsfs.state))

    def error(self) -> str:
        return self.vsfs.error()

    def restore(self) -> None:
        pools = self.mnt / "pools"
        for name in os.listdir(pools):
            if name not in ("define", "P", "Q"):
                if (pools / name / "state").read_text() != "inactive\n":
                    self._line(("pools", name, "ctl"), b"stop\n")
                os.rmdir(pools / name)
        if (pools / "Q/state").read_text() != "inactive\n":
            self._line(("pools", "Q", "ctl"), b"stop\n")
        if (self.vsfs.state / "Q.xml").read_bytes() != self.q_xml:
            self._line(("pools", "Q", "xml"), self.q_xml)
        if not (self.targets / "Q").exists():
            self._line(("pools", "Q", "ctl"), b"build\n")
        if (pools / "P/state").read_text() != "running\n":
            if not (self.targets / "P").exists():
                self._line(("pools", "P", "ctl"), b"build\n")
            self._line(("pools", "P", "ctl"), b"start\n")
        v = self.targets / "P" / "V"
        # V last: while a snapshot of it is there, it is a backing store, in use.
        for name in sorted(os.listdir(pools / "P/volumes"), key=lambda n: n == "V"):
            if name != "V" or not v.is_file() or v.stat().st_size != VOL_SIZE:
                os.unlink(pools / "P/volumes" / name)
        # The listing, not a lookup: the kernel may still hold the entry of a V deleted a
        # moment ago (its invalidation is sent on the side, and entries live 1 s).
        if "V" not in os.listdir(pools / "P/volumes"):
            self._create_v()
        for name in ("P", "Q"):
            if (pools / name / "autostart").read_text() != "no\n":
                self._line(("pools", name, "autostart"), b"no\n")


@pytest.mark.fuse
@pytest.mark.slow
def test_refused_writes_change_nothing_through_a_mount(vsfs: Mount, listener: Listener) -> None:
    secret, marker = secret_file(vsfs.base)
    corpus = Corpus(random.Random(SEED + 1), vsfs.base, listener.port, secret)
    world = MountWorld(vsfs)
    world.setup()
    refused = 0
    succeeded: Counter[str] = Counter()
    for _ in range(2500):
        case = corpus.case()
        err, before = world.write(case, world.snapshot)
        if err is None:
            succeeded[f"{case.target} {case.what}"] += 1
            world.restore()
            continue
        refused += 1
        check_refusal(case, err, before, world.snapshot(), world.error, marker)
    world.restore()
    assert vsfs.proc is not None and vsfs.proc.poll() is None, "the daemon is gone"
    assert not listener.connections
    assert marker not in b"".join(state_bytes(vsfs.state).values())
    assert refused > 5 * succeeded.total(), (refused, succeeded.most_common())
    vsfs.assert_clean_log()


def test_the_corpus_holds_what_it_should(tmp_path: Path) -> None:
    """Each kind of mutation is made, for every file, within the cases the tests run."""
    corpus = Corpus(random.Random(SEED), tmp_path, 1, tmp_path / "s")
    seen: dict[str, set[str]] = {}
    for _ in range(6000):
        case = corpus.case()
        seen.setdefault(case.target, set()).add(case.what)
    assert set(seen) == set(TARGETS)
    for target in ("pools/define", "P/xml", "Q/xml", "P/define", "Q/define"):
        assert {"bomb", "xxe-file", "xxe-net", "huge", "prefix", "trailer", "number",
                "name", "truncate", "tag", "untag", "uuid"} <= seen[target], target
    for target in ("P/ctl", "V/ctl", "V/capacity", "P/autostart"):
        assert {"line-lines", "line-blank", "line-huge", "line-utf8"} <= seen[target]
