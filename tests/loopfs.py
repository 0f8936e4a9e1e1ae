"""A tiny pyfuse3 filesystem for tests/test_fuse_loop.py (run as a script:
loopfs.py MNT).

It checks the request loop of the pyfuse3 that vsfs runs on (stock, or built with
.ci/patches/pyfuse3-fast-loop.patch), not vsfs:
handlers that wait must not hold up others, and trio locks must pass between
handlers. The root holds only symlinks, whose readlink handlers behave as their
names say:

- ``slow``  waits until ``fast`` has been read;  ``fast`` answers at once;
- ``gate``  answers "open" once GATE readers wait in it together;
- ``hold``  takes a lock and keeps it until ``take`` waits for it; ``take`` takes it;
- ``nNNN``  (COUNT of them) answer "/t/nNNN" at once.
"""

from __future__ import annotations

import errno
import stat
import sys

import pyfuse3
import trio

COUNT = 200
GATE = 5
WAIT = 20.0  # seconds a waiting handler gives up after ("timeout" is then read)

NAMES = [b"slow", b"fast", b"gate", b"hold", b"take"] + [b"n%03d" % i for i in range(COUNT)]


class LoopFs(pyfuse3.Operations):
    def __init__(self) -> None:
        super().__init__()
        self.fast_read = trio.Event()
        self.gate_open = trio.Event()
        self.at_gate = 0
        self.lock = trio.Lock()
        self.take_waits = trio.Event()

    @staticmethod
    def attr(ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        if ino == pyfuse3.ROOT_INODE:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
        else:
            a.st_mode = stat.S_IFLNK | 0o777
            a.st_nlink = 1
            a.st_size = 8
        a.entry_timeout = 0
        a.attr_timeout = 0
        return a

    @staticmethod
    def name_of(ino: int) -> bytes:
        return NAMES[ino - pyfuse3.ROOT_INODE - 1]

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self.attr(inode)

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE or name not in NAMES:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.attr(pyfuse3.ROOT_INODE + 1 + NAMES.index(name))

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        for i in range(start_id, len(NAMES)):
            ino = pyfuse3.ROOT_INODE + 1 + i
            if not pyfuse3.readdir_reply(token, NAMES[i], self.attr(ino), i + 1):
                return

    async def releasedir(self, fh: int) -> None:
        pass

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        name = self.name_of(inode)
        if name == b"slow":
            with trio.move_on_after(WAIT):
                await self.fast_read.wait()
                return b"slow"
            return b"timeout"
        if name == b"fast":
            self.fast_read.set()
            return b"fast"
        if name == b"gate":
            self.at_gate += 1
            if self.at_gate >= GATE:
                self.gate_open.set()
            with trio.move_on_after(WAIT):
                await self.gate_open.wait()
                return b"open"
            return b"timeout"
        if name == b"hold":
            async with self.lock:
                with trio.move_on_after(WAIT):
                    await self.take_waits.wait()
                    await trio.sleep(0.05)  # let ``take`` park on the lock
                    return b"held"
            return b"timeout"
        if name == b"take":
            self.take_waits.set()
            async with self.lock:
                return b"taken"
        return b"/t/" + name


async def serve() -> None:
    await pyfuse3.main()


def main() -> None:
    options = set(pyfuse3.default_options) | {"fsname=loopfs"}
    pyfuse3.init(LoopFs(), sys.argv[1], options)
    clean = False
    try:
        trio.run(serve)
        clean = True
    finally:
        pyfuse3.close(unmount=clean)


if __name__ == "__main__":
    main()
