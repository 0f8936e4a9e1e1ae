"""A process holding a path open, as a user's program would: for the in-use tests."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def holding(path: str | Path, redirect: str = "<>") -> Iterator[int]:
    """A ``sleep`` whose shell opened ``path`` as its descriptor 4 (``exec 4<>PATH``, or
    ``exec 4<PATH`` with ``redirect='<'``), for as long as the block runs; its PID. Ended
    by that PID, whatever happened."""
    proc = subprocess.Popen(["bash", "-c", f'exec 4{redirect}"$1" && exec sleep 600', "hold",
                             str(path)], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        # Once it is sleep, its shell has opened the path.
        while Path(f"/proc/{proc.pid}/comm").read_text() != "sleep\n":
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise AssertionError(f"could not open {path}: {err}")
            assert time.monotonic() < deadline, f"opening {path} took over 20 s"
            time.sleep(0.01)
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()


def still_works(pid: int) -> bytes:
    """The first bytes read through the holder's descriptor 4: what it would read next (a
    path taken from under it fails with ENOTCONN, or reads another device's bytes)."""
    with open(f"/proc/{pid}/fd/4", "rb") as f:
        return f.read(4096)
