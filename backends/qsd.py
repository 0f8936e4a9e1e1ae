"""A qemu-storage-daemon that gives volumes without a local device a local path.

One daemon per pool, driven over QMP: each exported volume is a block node
(QEMU's own rbd driver, say) exported over FUSE onto a regular file, so any
tool can open, read, write and size it while the bytes move in QEMU's C code,
never through vsfs.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import trio

from vsfs.errors import BackendFailed, Busy, NoSpace
from vsfs.proc import run

from .cmdout import json_object

log = logging.getLogger(__name__)

QMP_TIMEOUT = 60.0


class QmpError(BackendFailed):
    """QEMU refused a command; ``error_class`` is QMP's class for it."""

    def __init__(self, message: str, error_class: str) -> None:
        super().__init__(message)
        self.error_class = error_class


def node_id(kind: str, name: str) -> str:
    """A QMP id for a volume: QEMU allows only short names of letters, digits and -._"""
    return kind + hashlib.sha256(name.encode()).hexdigest()[:24]


class StorageDaemon:
    def __init__(self, run_dir: Path, label: str) -> None:
        self.dir = run_dir
        self.label = label
        self.socket = run_dir / "qmp.sock"
        self.pidfile = run_dir / "qsd.pid"
        self.exports_dir = run_dir / "volumes"

    # ---------------------------------------------------------------- QMP

    async def command(self, execute: str, **arguments: Any) -> Any:
        """One QMP command on a fresh connection; its return value."""
        try:
            return await self._command(execute, arguments)
        except (OSError, trio.BrokenResourceError, trio.TooSlowError) as e:
            raise BackendFailed(f"{self.label}: qemu-storage-daemon does not answer "
                                f"({e})") from None

    async def _command(self, execute: str, arguments: dict[str, Any]) -> Any:
        with trio.fail_after(QMP_TIMEOUT):
            stream = await trio.open_unix_socket(str(self.socket))
            async with stream:
                reader = _Lines(stream)
                await reader.message()  # the greeting
                for cmd in ({"execute": "qmp_capabilities"},
                            {"execute": execute, "arguments": arguments}):
                    await stream.send_all(json.dumps(cmd).encode() + b"\n")
                    while True:
                        msg = await reader.message()
                        if "event" in msg:
                            continue
                        if "error" in msg:
                            err = msg["error"]
                            raise QmpError(f"qemu-storage-daemon: {err.get('desc', err)}",
                                           str(err.get("class", "")))
                        break
                return msg.get("return")

    async def alive(self) -> bool:
        try:
            await self.command("query-version")
        except BackendFailed:
            return False
        return True

    # ---------------------------------------------------------------- life

    async def start(self, objects: list[str]) -> None:
        """Start the daemon unless one from before (a restart of vsfs) still answers."""
        if await self.alive():
            return
        self.exports_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        argv = ["qemu-storage-daemon", "--daemonize", "--pidfile", str(self.pidfile),
                "--chardev", f"socket,id=qmp,path={self.socket},server=on,wait=off",
                "--monitor", "chardev=qmp,mode=control"]
        for obj in objects:
            argv += ["--object", obj]
        await run(argv, timeout=60)
        log.info("%s: qemu-storage-daemon started", self.label)

    async def stop(self) -> None:
        """Remove every export, then end the daemon. Exports in use are taken from their
        users: the pool's stop refuses before (Manager.held, volume_users)."""
        if not await self.alive():
            return
        for export in await self.command("query-block-exports"):
            await self._remove(export["id"], export["node-name"])
        with contextlib.suppress(BackendFailed):
            await self.command("quit")
        with trio.move_on_after(10):
            while self.socket.exists() and await self.alive():
                await trio.sleep(0.05)
        log.info("%s: qemu-storage-daemon stopped", self.label)

    # ---------------------------------------------------------------- exports

    def path_of(self, name: str) -> str:
        return str(self.exports_dir / name)

    async def exported(self) -> dict[str, str]:
        """Export id -> node name of what the daemon exports now."""
        return {e["id"]: e["node-name"] for e in await self.command("query-block-exports")}

    async def export(self, name: str, blockdev: dict[str, Any], writable: bool) -> str:
        """Export a block node over FUSE at a file named ``name``; its path."""
        node, eid = node_id("n", name), node_id("e", name)
        path = self.path_of(name)
        if eid in await self.exported():
            return path
        with contextlib.suppress(QmpError):
            await self.command("blockdev-del", **{"node-name": node})  # left from a failure
        await trio.to_thread.run_sync(_touch, path)
        await self.command("blockdev-add", **{"node-name": node, **blockdev})
        try:
            await self.command("block-export-add", type="fuse", id=eid,
                               **{"node-name": node}, mountpoint=path, writable=writable,
                               growable=writable)
        except BaseException:
            with trio.CancelScope(shield=True), contextlib.suppress(BackendFailed):
                await self.command("blockdev-del", **{"node-name": node})
            raise
        return path

    async def unexport(self, name: str) -> None:
        eid = node_id("e", name)
        exports = await self.exported()
        if eid in exports:
            await self._remove(eid, exports[eid])
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path_of(name))

    async def _remove(self, eid: str, node: str) -> None:
        # QEMU ends the FUSE session at once, open descriptors and all (their next read or
        # write fails with ENOTCONN; seen with QEMU 7.2): whoever withdraws an export checks
        # first that no process holds it (ExportingBackend.volume_users).
        await self.command("block-export-del", id=eid)
        # The export is gone once QEMU has unmounted it: wait for that.
        with trio.move_on_after(5):
            while eid in await self.exported():
                await trio.sleep(0.02)
        if eid in await self.exported():
            raise Busy(f"{self.label}: the local path of a volume is still open")
        await self.command("blockdev-del", **{"node-name": node})

    async def resize(self, name: str, size: int) -> None:
        """Resize an exported volume through its export (a writable one): QEMU truncates
        the image and answers with the new size, which the kernel then serves at once.
        A QMP ``block_resize`` resizes the image only: the kernel keeps serving the size
        it cached (QEMU's exports cache attributes for a second), so ``qemu-img info`` on
        the path would see the old size right after the resize returned."""
        path = self.path_of(name)
        try:
            await trio.to_thread.run_sync(os.truncate, path, size)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise NoSpace(f"{self.label}: resizing {name}: {e.strerror}") from None
            raise BackendFailed(f"{self.label}: resizing {name}: {e.strerror}") from None


def _touch(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.close(fd)


class _Lines:
    """JSON messages off a QMP stream, one per line."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    async def message(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise BackendFailed("qemu-storage-daemon closed its monitor")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return parse_qmp(line)


# QMP, one JSON object a line (qemu-storage-daemon 7.2):
#   {"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ...},
#    "capabilities": ["oob"]}}
#   {"return": {}}
#   {"error": {"class": "GenericError", "desc": "Export 'nosuch' is not found"}}
def parse_qmp(line: bytes) -> dict[str, Any]:
    return json_object(line.decode(errors="replace"), "qemu-storage-daemon's monitor")
