"""The state directory, in libvirt's own layout.

``STATE/<name>.xml`` holds each pool's definition and
``STATE/autostart/<name>.xml`` is a symlink to it for autostart pools, so a
copy of ``/etc/libvirt/storage`` is a valid state directory. Every write is
atomic: a temporary file, fsync, rename, fsync of the directory.
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import BackendFailed, Invalid, VsfsError
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


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file."""
    # Not named after the file: a name of 251 bytes leaves no room to add to it.
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
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
        self.set_autostart(name, False)
        path = self._file(name)
        try:
            path.unlink(missing_ok=True)
            _fsync_dir(self.path)
        except OSError as e:
            raise BackendFailed(f"state directory: cannot remove {path}: {e.strerror}") from None

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
            tmp = link.with_name(f".tmp-{secrets.token_hex(8)}")
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
