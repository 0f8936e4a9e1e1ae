"""The change feed and the job registry, without a mount (vsfs/feed.py, vsfs/jobs.py)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import trio
import trio.testing

from vsfs.errors import Busy, Canceled, NoSpace
from vsfs.feed import BACKLOG, Change, Feed, escape, ref
from vsfs.fuse_ops import _signal_pending
from vsfs.jobs import KEEP_ENDED, KEEP_ENDED_MAX, Jobs, JobState, report

LINE = re.compile(rb"^(\d+) (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (\S+) (\S+) (\S+)( .*)?\n$")


def lines(data: bytes) -> list[bytes]:
    return data.splitlines(keepends=True)


# ---------------------------------------------------------------- the feed

def test_names_are_escaped_so_a_line_splits_at_spaces() -> None:
    assert escape("a b") == "a\\x20b"
    assert escape("x/y\\z") == "x\\x2fy\\x5cz"
    assert escape("new\nline\x7f") == "new\\x0aline\\x7f"
    assert escape("ünï-cödé.img") == "ünï-cödé.img"
    assert ref("my pool", "a/b") == "my\\x20pool/a\\x2fb"


def test_lines_have_the_contract_format() -> None:
    feed = Feed()
    cur = feed.cursor()
    feed.publish(Change("volume", ("p", "disk one"), "renamed", ref("p", "disk two")))
    feed.publish(Change("pool", ("p",), "stopped", touches=(("p", "x"),)))
    data, cur = feed.take(cur, 4096)
    first, second = lines(data)
    m = LINE.match(first)
    assert m is not None, first
    assert m.group(1) == b"1" and m.group(3, 4, 5) == (b"volume", b"p/disk\\x20one", b"renamed")
    assert m.group(6) == b" p/disk\\x20two"
    m = LINE.match(second)
    assert m is not None and m.group(1) == b"2" and m.group(6) is None  # touches not shown
    assert feed.take(cur, 4096) == (b"", cur)


def test_each_cursor_starts_where_it_was_opened() -> None:
    feed = Feed()
    feed.publish(Change("pool", ("a",), "defined"))
    late = feed.cursor()
    feed.publish(Change("pool", ("b",), "defined"))
    data, _ = feed.take(late, 4096)
    assert data.split()[3] == b"b" and len(lines(data)) == 1
    data, _ = feed.take(0, 4096)
    assert len(lines(data)) == 2


def test_take_returns_whole_lines_within_the_limit() -> None:
    feed = Feed()
    for i in range(10):
        feed.publish(Change("pool", (f"pool{i}",), "defined"))
    one = len(feed.take(0, 4096)[0]) // 10
    data, cur = feed.take(0, one * 3 + 1)
    assert len(lines(data)) == 3 and data.endswith(b"\n") and cur == 3
    # At least one line, however small the limit.
    data, cur = feed.take(cur, 1)
    assert len(lines(data)) == 1 and cur == 4


def test_a_reader_too_far_behind_gets_lost_n_and_memory_stays_bounded() -> None:
    feed = Feed()
    cur = feed.cursor()
    for i in range(BACKLOG + 25):
        feed.publish(Change("volume", ("p", f"v{i}"), "created"))
    assert len(feed._lines) == BACKLOG
    data, cur = feed.take(cur, 200)
    first, *rest = lines(data)
    assert re.match(rb"^25 \S+ lost 25\n$", first), first
    assert rest and rest[0].startswith(b"26 ")
    data, _ = feed.take(cur, 10**9)
    assert lines(data)[-1].startswith(f"{BACKLOG + 25} ".encode())


def test_a_failing_subscriber_neither_fails_the_change_nor_the_others() -> None:
    feed = Feed()
    seen: list[Change] = []

    def broken(change: Change) -> None:
        raise RuntimeError("bug")
    feed.subscribe(broken)
    feed.subscribe(seen.append)
    change = Change("host", ("loop7",), "added")
    feed.publish(change)
    assert seen == [change] and feed.seq == 1


def test_pollers_are_woken_once_and_forgotten_on_close() -> None:
    feed = Feed()
    woken: list[str] = []
    feed.on_next(1, lambda: woken.append("first"))
    feed.on_next(1, lambda: woken.append("newer"))  # the kernel's newer handle replaces
    feed.on_next(2, lambda: woken.append("closed"))
    feed.forget(2)
    feed.publish(Change("pool", ("p",), "defined"))
    feed.publish(Change("pool", ("p",), "started"))
    assert woken == ["newer"]


async def test_wait_returns_at_the_next_change() -> None:
    feed = Feed()
    cur = feed.cursor()
    with trio.move_on_after(0.2) as scope:
        await feed.wait(cur)
    assert scope.cancelled_caught  # nothing happened: it waits
    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed.wait, cur)
        await trio.testing.wait_all_tasks_blocked()
        feed.publish(Change("pool", ("p",), "defined"))


# ---------------------------------------------------------------- jobs

class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_holds_conflict_as_exclusive_and_shared_say() -> None:
    changes: list[Change] = []
    jobs = Jobs(changes.append, Clock())
    clone = jobs.begin("clone p/a -> p/b", "cloned", [(("p", "a"), False), (("p", "b"), True)],
                       creates=[("p", "b")])
    # Another reader of the source is fine; a writer of it, or of the new name, is not.
    again = jobs.begin("clone p/a -> p/c", "cloned", [(("p", "a"), False), (("p", "c"), True)])
    with pytest.raises(Busy, match=r"p/a is being cloned \(job 1\)"):
        jobs.begin("wipe p/a", "wiped", [(("p", "a"), True)])
    with pytest.raises(Busy, match=r"p/b is being cloned \(job 1\)"):
        jobs.begin("clone p/x -> p/b", "cloned", [(("p", "x"), False), (("p", "b"), True)])
    assert jobs.holder("p", "a") is clone and jobs.holder("p", "a", exclusive=False) is None
    assert jobs.holder("p", "c", exclusive=False) is again
    assert jobs.in_pool("p") is clone and jobs.in_pool("q") is None
    assert jobs.creating("p") == {"b"}
    assert [(c.kind, c.names, c.event) for c in changes] == [
        ("job", ("1",), "started"), ("job", ("2",), "started")]
    assert changes[0].detail == "clone p/a -> p/b"
    assert changes[0].touches == (("p", "a"), ("p", "b"))


async def test_a_job_runs_to_done_failed_or_cancelled() -> None:
    changes: list[Change] = []
    jobs = Jobs(changes.append, Clock())

    ok = jobs.begin("wipe p/a", "wiped", [(("p", "a"), True)])
    async with jobs.run(ok):
        report(10, 100)
        # From a worker thread too: trio copies the context into it.
        await trio.to_thread.run_sync(report, 60)
        assert ok.progress() == "60 100"
    assert ok.state is JobState.DONE and ok.progress() == "100 100" and ok.ended.is_set()

    bad = jobs.begin("wipe p/b", "wiped", [(("p", "b"), True)])
    with pytest.raises(NoSpace):
        async with jobs.run(bad):
            raise NoSpace("pool 'p' has 0 bytes free")
    assert bad.state is JobState.FAILED and bad.error == "pool 'p' has 0 bytes free"
    assert jobs.holder("p", "b") is None  # ended: it holds nothing any more

    stopped = jobs.begin("clone p/c -> p/d", "cloned", [(("p", "c"), False)])
    cleaned = []

    async def body() -> None:
        # The writer that started the job gets ECANCELED, not trio's Cancelled.
        with pytest.raises(Canceled, match="job 3 was cancelled"):
            async with jobs.run(stopped):
                try:
                    await trio.sleep_forever()
                finally:
                    with trio.CancelScope(shield=True):
                        await trio.sleep(0.01)  # clean-up that awaits, as backends' do
                        cleaned.append(True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(body)
        await trio.testing.wait_all_tasks_blocked()
        assert stopped.cancel()
    assert cleaned == [True]
    assert stopped.state is JobState.CANCELLED and not stopped.cancel()
    assert [c.event for c in changes] == ["started", "done", "started", "failed",
                                          "started", "cancelled"]
    report(5)  # outside any job: nothing to report to, and no error

    # A cancel that comes once the work is done stops nothing: the job is done.
    late = jobs.begin("clone p/e -> p/f", "cloned", [(("p", "e"), False)])
    async with jobs.run(late):
        late.cancel()
    assert late.state is JobState.DONE


def test_reserved_space_shrinks_as_the_copy_writes() -> None:
    jobs = Jobs(lambda c: None, Clock())
    job = jobs.begin("clone p/a -> q/b", "cloned", [(("q", "b"), True)],
                     reserved={"q": 1000})
    assert jobs.reserved("q") == 1000 and jobs.reserved("p") == 0
    job.done = 400
    assert jobs.reserved("q") == 600
    jobs.finish(job)
    assert jobs.reserved("q") == 0


def test_ended_jobs_are_kept_fifteen_minutes_and_a_hundred_at_most() -> None:
    clock = Clock()
    jobs = Jobs(lambda c: None, clock)
    first = jobs.begin("wipe p/0", "wiped", [])
    jobs.finish(first)
    running = jobs.begin("wipe p/run", "wiped", [])
    clock.now = KEEP_ENDED - 1
    assert first.id in jobs.ids()
    clock.now = KEEP_ENDED + 1
    assert jobs.ids() == [running.id]  # the running one stays, however old
    for i in range(KEEP_ENDED_MAX + 20):
        clock.now += 1
        jobs.finish(jobs.begin(f"wipe p/{i}", "wiped", []))
    ids = jobs.ids()
    assert len(ids) == KEEP_ENDED_MAX + 1 and running.id in ids
    assert jobs.get(ids[1]) is not None and jobs.get(first.id) is None


# ---------------------------------------------------------------- signals of readers

def test_signal_pending_sees_a_signal_waiting_for_a_process() -> None:
    # A stopped process keeps a signal sent to it pending, as a reader of events waiting
    # in the kernel for this daemon does.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.2)
        assert not _signal_pending(child.pid)
        os.kill(child.pid, signal.SIGSTOP)
        os.kill(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not _signal_pending(child.pid):
            assert time.monotonic() < deadline, "SIGTERM never showed as pending"
            time.sleep(0.05)
    finally:
        child.kill()
        child.wait()
    assert not _signal_pending(child.pid)  # gone: nothing pending
