"""``netfs`` pools: a network filesystem (NFS; CIFS, GlusterFS where their mount helper
exists) mounted on the target; volumes are files there, as in a dir pool."""

from __future__ import annotations

import logging
import shutil
from typing import ClassVar

import trio

from vsfs.errors import BackendFailed, Busy, Invalid, Unsupported
from vsfs.model import PoolDef, PoolSource, SourceHost
from vsfs.proc import run

from . import blockdev
from .dir import DirBackend, drop_mount_point, make_mount_point

log = logging.getLogger(__name__)

HELPERS = {"cifs": "mount.cifs", "glusterfs": "mount.glusterfs"}


class NetfsBackend(DirBackend):
    pool_type: ClassVar[str] = "netfs"
    # A network mount may hang; its directory is still polled for other tools' files.
    poll_interval: ClassVar[float] = 1.0

    @classmethod
    def validate(cls, pool: PoolDef) -> None:
        super().validate(pool)
        src = pool.source
        if len(src.hosts) != 1 or not src.dir:
            raise Invalid("a netfs pool needs one <source><host name=.../> and <dir path=.../>")
        if (src.format or "auto") not in ("auto", "nfs", "cifs", "glusterfs"):
            raise Invalid(f"unknown network filesystem {src.format!r}")

    @property
    def format(self) -> str:
        return self.pool.source.format or "auto"

    @property
    def spec(self) -> str:
        host, path = self.pool.source.hosts[0].name, self.pool.source.dir or "/"
        if self.format == "cifs":
            return f"//{host}/{path.lstrip('/')}"
        return f"{host}:{path}"

    def _argv(self) -> list[str]:
        fmt = self.format
        if fmt in HELPERS and shutil.which(HELPERS[fmt]) is None:
            raise Unsupported(f"{fmt} pools need {HELPERS[fmt]}, which is not installed")
        opts = list(self.pool.mount_opts)
        host = self.pool.source.hosts[0]
        mount_type = "nfs" if fmt == "auto" else fmt
        if fmt in ("nfs", "auto"):
            ver = self.pool.source.protocol_ver
            if ver:
                opts.append(f"vers={ver}")
                if ver.startswith("4"):
                    # NFSv4 straight away: mount.nfs would first ask rpcbind, which a
                    # v4-only server need not run.
                    mount_type = "nfs4"
            if host.port:
                opts.append(f"port={host.port}")
        argv = ["mount", "-t", mount_type]
        if opts:
            argv += ["-o", ",".join(opts)]
        return [*argv, self.spec, self.root]

    async def is_running(self) -> bool:
        source = await trio.to_thread.run_sync(blockdev.mount_source, self.root)
        return source is not None and source.rstrip("/") == self.spec.rstrip("/")

    async def start(self) -> None:
        argv = self._argv()
        made_target = await make_mount_point(self.root)
        try:
            await run(argv, timeout=60)
        except BaseException:
            if made_target:
                await drop_mount_point(self.root)
            raise

    async def stop(self) -> None:
        if await trio.to_thread.run_sync(blockdev.mount_source, self.root) is None:
            return
        try:
            await run(["umount", self.root], timeout=60)
        except BackendFailed as e:
            raise Busy(f"cannot unmount {self.root}: {e.message}") from None


async def find_sources(spec: PoolSource) -> list[PoolSource]:
    """The NFS exports of a host (virsh find-storage-pool-sources netfs), from its mountd."""
    if not spec.hosts:
        raise Invalid("name the server: cat 'sources/netfs?host=HOST', or "
                      "echo HOST > sources/netfs first")
    if shutil.which("showmount") is None:
        raise Unsupported("listing NFS exports needs showmount (Debian: nfs-common)")
    host = spec.hosts[0].name
    try:
        out = await run(["showmount", "--no-headers", "--exports", host], timeout=30)
    except BackendFailed as e:
        raise BackendFailed(f"cannot list the exports of {host} (its mountd answers over "
                            f"rpcbind; an NFSv4-only server has none): {e.message}") from None
    return [PoolSource(hosts=(SourceHost(host),), dir=path, format="nfs")
            for path in parse_showmount(out)]


# showmount --no-headers --exports HOST (nfs-common 2.6.2): each export and its clients
# (comma-separated), which never hold white space; a path may:
#   /run/vsfs-nfs/a          *
#   /run/vsfs-nfs/c          10.0.0.0/8
#   /run/vsfs-nfs/with space 127.0.0.1
def parse_showmount(text: str) -> list[str]:
    """The exported paths, in the order listed."""
    paths = []
    for line in text.splitlines():
        path = line.strip().rsplit(None, 1)[0] if line.strip() else ""
        if path.startswith("/"):
            paths.append(path)
    return paths
