"""What a bug costs, without a mount: the adapter answers EIO for that one request
(and says why in MNT/error), FORGET never raises, and a background task that fails
is started again. tests/test_faults.py checks the same through a real mount."""

from __future__ import annotations

import errno
import logging
import time
from pathlib import Path

import pyfuse3
import pytest
import trio
from test_tree_manager import adapter_with_pool, make, request

from vsfs.cli import keep_running
from vsfs.fuse_ops import Notifier, Operations, ReadHandle
from vsfs.tree import Tree


async def test_unexpected_errors_answer_one_request(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    ctx = request(uid=1234, gid=1234, pid=1, umask=0o22)
    with caplog.at_level(logging.ERROR):
        tree, ops, pools = await adapter_with_pool(tmp_path, ctx)
        resolve = Tree.resolve

        def broken(self: Tree, path: tuple[str, ...]) -> object:
            if path == ("pools",):
                raise ValueError("injected")
            return resolve(self, path)

        tree.resolve = broken.__get__(tree)  # type: ignore[method-assign]
        for call in (lambda: ops.getattr(pools.st_ino, ctx),
                     lambda: ops.opendir(pools.st_ino, ctx),
                     lambda: ops.lookup(pools.st_ino, b"p", ctx)):
            with pytest.raises(pyfuse3.FUSEError) as e:
                await call()
            assert e.value.errno == errno.EIO
            assert b"internal error: ValueError('injected')" in tree.error_text(1234)
        tree.resolve = resolve.__get__(tree)  # type: ignore[method-assign]
        # The same adapter goes on answering.
        assert (await ops.getattr(pools.st_ino, ctx)).st_ino == pools.st_ino
        # FORGET has no answer: an error there is logged, never raised.
        ops._lookups = None  # type: ignore[assignment]
        await ops.forget([(pools.st_ino, 1)])
    assert "forget failed" in caplog.text
    assert "ValueError: injected" in caplog.text  # the traceback is in the log


async def test_read_of_a_handle_names_its_user(tmp_path: Path) -> None:
    """Requests without a context (read, write, flush) report to the handle's user."""
    ctx = request(uid=4321, gid=4321, pid=1, umask=0o22)
    m, tree = make(tmp_path)
    await m.load()
    ops = Operations(tree, 0, 0)
    readme = await ops.lookup(pyfuse3.ROOT_INODE, b"README", ctx)
    fi = await ops.open(readme.st_ino, 0, ctx)
    handle = ops._handles[fi.fh]
    assert isinstance(handle, ReadHandle)
    handle.content = None  # type: ignore[assignment]
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.read(fi.fh, 0, 10)
    assert e.value.errno == errno.EIO
    assert tree.error_text(4321).startswith(b"internal error: TypeError")


async def test_keep_running_starts_a_failed_task_again(
        caplog: pytest.LogCaptureFixture) -> None:
    runs = []

    async def task() -> None:
        runs.append(trio.current_time())
        if len(runs) < 3:
            raise RuntimeError(f"failure {len(runs)}")

    with caplog.at_level(logging.ERROR), trio.fail_after(10):
        await keep_running("the test task", task)
    assert len(runs) == 3
    assert runs[2] - runs[1] >= 1.0  # not in a tight loop
    assert caplog.text.count("the test task failed; starting it again") == 2


def test_a_lazy_invalidation_goes_within_a_moment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lazy invalidation (an upload's dentry, once closed) waits LAZY_INVALIDATE to go
    with others, not until something else wakes the notifier: a value file's write
    (`echo 2G > capacity` after `truncate`) waits for what was queued before it."""
    sent: list[tuple[int, bytes]] = []
    monkeypatch.setattr(pyfuse3, "invalidate_entry",
                        lambda ino, name: sent.append((ino, name)))
    notifier = Notifier()
    notifier.start()
    try:
        time.sleep(0.1)  # the thread waits for work now
        notifier.entry(5, b"v", lazy=True)
        assert notifier.wait_sent(notifier.queued, 0.5), "the lazy invalidation waited"
        assert sent == [(5, b"v")]
    finally:
        notifier.close()
