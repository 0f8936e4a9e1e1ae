"""vsfs with faults injected, for tests/test_faults.py: ``python faulty_vsfs.py mount …``.

The real command (vsfs.cli.main) with a few of its inner functions made to fail the
way a bug would, so that a test can check what a bug costs: one request answered
with EIO, a background task started again, and the mount going on. Nothing here
is in vsfs itself; each fault is triggered by a name the test chooses:

- listing a directory that holds an entry named ``boom`` raises RuntimeError;
- reading a value of a volume named ``badfd`` raises OSError(EBADF), as a closed
  descriptor did in readdir once (issue 12);
- the pool poll and the host device watch raise RuntimeError on their first run;
- the kernel's FORGET raises (after `echo 2 > /proc/sys/vm/drop_caches`);
- the watchdog cannot be started (EAGAIN, as on a host at its process limit).
"""

from __future__ import annotations

import errno
import subprocess
import sys
from typing import Any

import trio

from vsfs import cli, fuse_ops, manager, tree


def main() -> int:
    children = tree.Tree.children

    def faulty_children(self: tree.Tree, node: tree.Dir) -> Any:
        out = children(self, node)
        if any(name == "boom" for name, _ in out):
            raise RuntimeError("injected: a listing that fails")
        return out

    refresh_volume = manager.Manager.refresh_volume

    async def faulty_refresh_volume(self: manager.Manager, pool: str, name: str) -> Any:
        if name == "badfd":
            raise OSError(errno.EBADF, "Bad file descriptor (injected)")
        return await refresh_volume(self, pool, name)

    def fail_first(method: Any, what: str) -> Any:
        calls = 0

        async def run(self: manager.Manager) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                await trio.sleep(0.2)
                raise RuntimeError(f"injected: {what} fails once")
            await method(self)
        return run

    forget = fuse_ops.Operations._forget

    def faulty_forget(self: fuse_ops.Operations, inode_list: Any) -> None:
        forget(self, inode_list)
        raise RuntimeError("injected: forget fails")

    popen = subprocess.Popen

    def faulty_popen(argv: Any, *args: Any, **kwargs: Any) -> Any:
        if "vsfs.watchdog" in argv:
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable (injected)")
        return popen(argv, *args, **kwargs)

    # cli starts the watchdog with subprocess.Popen: the module cli imported.
    subprocess.Popen = faulty_popen  # type: ignore[misc,assignment]  # a function for the class
    tree.Tree.children = faulty_children  # type: ignore[method-assign]
    manager.Manager.refresh_volume = faulty_refresh_volume  # type: ignore[method-assign]
    manager.Manager.poll = fail_first(manager.Manager.poll, "the poll")  # type: ignore[method-assign]
    manager.Manager.watch_host = fail_first(  # type: ignore[method-assign]
        manager.Manager.watch_host, "the host watch")
    fuse_ops.Operations._forget = faulty_forget  # type: ignore[method-assign]
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
