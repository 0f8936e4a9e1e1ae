"""A daemon killed at any moment leaves nothing half-made and loses nothing acknowledged.

The first tests kill deterministically: a manager abandoned in the middle of an upload
(what `kill -9` leaves of it: its files and its journal), a daemon killed with a volume
half-copied or an fs pool's copy under its temporary name. ``test_kill9_under_load``
kills the daemon a hundred times (``VSFS_CRASH_CYCLES``) while four writer processes
(tests/crash_load.py) create volumes with ``truncate``, ``cp`` and ``clone``, delete them,
define and undefine pools and flip their autostart, through the mount, in a dir pool and an
fs pool (ext4 on a loop device, the loopdev fixture); after each kill it mounts again on the same
mount point and checks that every acknowledged action is there, the one in flight happened
wholly or not at all, and no temporary file, half-written volume or autostart link without
its definition is left. Run it alone: ``.venv/bin/pytest tests/test_crash.py -s``
(docs/testing.md). The logical pool's share runs in the QEMU guest
(tests/guest/test_crash_logical.py), using what is here.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from crash_load import MiB, Model, Vol, replay, resolve, sha256
from support import Mount, abort_connection, sh

from vsfs.manager import Manager
from vsfs.paths import runtime_dir
from vsfs.state import JOURNAL_NAME, InFlight, StateDir, read_in_flight

CRASH_LOAD = Path(__file__).with_name("crash_load.py")
CYCLES = int(os.environ.get("VSFS_CRASH_CYCLES", "100"))
WRITERS = 4
DEATH_BOUND = 10.0  # s for a killed daemon to be gone
WRITER_BOUND = 60.0  # s for the writers to see the mount die and stop
READY_BOUND = 60.0  # s for the writers to start (Python under TCG is slow)
# Lines the daemon logs when it cleans up after a kill (counted for the summary).
CLEANUPS = {
    "upload removed": "removed: vsfs stopped while it was being written",
    "temporary volume file removed": "left unfinished",
    "state temporary file removed": "left by a write that never finished",
    "autostart link without definition removed": "has no definition",
    "someone else's volume kept": "is not the one vsfs was writing",
}


# ---------------------------------------------------------------- a manager abandoned


def _pool_xml(name: str, target: Path) -> bytes:
    return (f"<pool type='dir'><name>{name}</name><target><path>{target}</path></target>"
            "</pool>").encode()


def in_flight(state: Path) -> list[str]:
    """The names the journal of uploads has in flight."""
    return [r.name for r in read_in_flight(state / JOURNAL_NAME)]


@pytest.fixture
async def autostarted(tmp_path: Path) -> Manager:
    """The daemon about to be killed: a manager on tmp_path/state with dir pool p over
    tmp_path/img, built, started and autostarted."""
    m = Manager(StateDir(tmp_path / "state"))
    await m.load()
    await m.define_pool(_pool_xml("p", tmp_path / "img"))
    await m.build_pool("p")
    await m.start_pool("p")
    await m.set_autostart("p", True)
    return m


async def _restarted(state: Path) -> Manager:
    """What the next daemon does after a kill: the same state directory, loaded anew (the
    killed one's descriptors and records stay as a kill leaves them)."""
    m = Manager(StateDir(state))
    await m.load()
    return m


async def test_an_upload_cut_short_is_removed_when_its_pool_starts(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, autostarted: Manager) -> None:
    state, img = tmp_path / "state", tmp_path / "img"
    m = autostarted
    whole = await m.uploads.begin("p", "whole")
    await m.uploads.truncate(whole, 3 * MiB)
    await m.uploads.close(whole)
    assert in_flight(state) == []
    cut = await m.uploads.begin("p", "cut")
    await m.uploads.truncate(cut, 96 * MiB)
    os.pwrite(cut.fd, b"x" * 4096, 0)
    empty = await m.uploads.begin("p", "empty")  # truncate killed before its size
    assert sorted(in_flight(state)) == ["cut", "empty"]
    # killed here
    m2 = await _restarted(state)
    assert sorted(m2.pools["p"].volumes) == ["whole"]
    assert sorted(os.listdir(img)) == ["whole"]
    assert os.path.getsize(img / "whole") == 3 * MiB
    assert in_flight(state) == [], "dealt with"
    del empty
    assert "pool p: volume cut removed: vsfs stopped while it was being written" in caplog.text
    assert "pool p: volume empty removed" in caplog.text


async def test_only_the_volume_that_was_being_made_is_removed(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, autostarted: Manager) -> None:
    """A file made under the same name after the crash is someone else's: kept, even when
    the filesystem gives it the same inode number (ext4 does, at once)."""
    state, img = tmp_path / "state", tmp_path / "img"
    caplog.set_level(logging.INFO)

    m = autostarted
    up = await m.uploads.begin("p", "v")
    await m.uploads.truncate(up, MiB)
    ino = os.fstat(up.fd).st_ino
    os.close(up.fd)
    # killed here; before the next start, someone makes their own v
    os.unlink(img / "v")
    (img / "v").write_bytes(b"theirs")
    print("same inode number again:", os.stat(img / "v").st_ino == ino)
    m2 = await _restarted(state)
    assert sorted(m2.pools["p"].volumes) == ["v"]
    assert (img / "v").read_bytes() == b"theirs"
    assert in_flight(state) == []
    assert "volume v is not the one vsfs was writing when it stopped: left alone" in caplog.text


async def test_a_volume_being_made_when_killed_is_told_by_its_time(
        tmp_path: Path, autostarted: Manager) -> None:
    """Killed after the record, before the backend said what it made: only an empty file
    made since the record is taken for it; a file with bytes, or older, is not."""
    state, img = tmp_path / "state", tmp_path / "img"
    m = autostarted
    uuid = m.pools["p"].pool.uuid
    now = time.time_ns()
    # "old" was there seconds before the record said a volume of that name was asked
    # for; the others were made just after it.
    lines = [InFlight("dead-1", uuid, "new", now), InFlight("dead-2", uuid, "data", now),
             InFlight("dead-3", uuid, "old", now + 5 * 10**9)]
    (img / "old").write_bytes(b"")
    (img / "new").write_bytes(b"")
    (img / "data").write_bytes(b"bytes")
    (state / JOURNAL_NAME).write_bytes(b"".join(r.line() for r in lines) + b'{"id": "x')
    m2 = await _restarted(state)
    assert sorted(m2.pools["p"].volumes) == ["data", "old"]
    assert in_flight(state) == []


async def test_a_change_after_settling_is_in_flight_again(tmp_path: Path,
                                                         autostarted: Manager) -> None:
    """A descriptor still open after the first close (a shell's `> V`) may change the
    volume again: in flight until the next close settles it."""
    state = tmp_path / "state"
    m = autostarted
    up = await m.uploads.begin("p", "v")
    await m.uploads.settle(up)  # the first close: listed, settled
    assert in_flight(state) == []
    await m.uploads.truncate(up, 8 * MiB)
    assert in_flight(state) == ["v"]
    # killed here
    m2 = await _restarted(state)
    assert list(m2.pools["p"].volumes) == []


async def test_litter_of_killed_writes_goes_at_load(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture,
                                                   autostarted: Manager) -> None:
    state, img = tmp_path / "state", tmp_path / "img"
    caplog.set_level(logging.INFO)

    m = autostarted
    uuid = m.pools["p"].pool.uuid
    # what kills leave: half-written definitions and links, a link whose definition
    # went first, a runtime file being replaced, a copy under its temporary name
    (state / ".tmp-abcd1234").write_text("<pool")
    (state / "autostart" / ".tmp-0123456789abcdef").symlink_to("../p.xml")
    (state / "autostart" / "gone.xml").symlink_to("../gone.xml")
    run = runtime_dir(state) / uuid
    run.mkdir(parents=True)
    (run / ".tmp-xyz").write_text("mon_host = ")
    (run / "ceph.conf").write_text("[global]\n")
    (img / ".vsfs-new-0123456789abcdef").write_bytes(b"half a copy")
    (state / "keep.txt").write_text("not ours to judge")
    m2 = await _restarted(state)
    assert m2.pools["p"].running
    assert sorted(os.listdir(state)) == ["autostart", "keep.txt", "p.xml"]
    assert sorted(os.listdir(state / "autostart")) == ["p.xml"]
    assert sorted(os.listdir(run)) == ["ceph.conf"]
    assert os.listdir(img) == []
    run.joinpath("ceph.conf").unlink()
    run.rmdir()
    assert "autostart link" in caplog.text and "pool gone has no definition" in caplog.text
    assert ".vsfs-new-0123456789abcdef, left unfinished" in caplog.text


# ---------------------------------------------------------------- killed through the mount


def kill_daemon(m: Mount) -> None:
    """kill -9 the daemon; it must be gone within DEATH_BOUND. If not, its connection is
    aborted (which frees whatever waits on it) and the test fails saying so."""
    proc = m.proc
    assert proc is not None
    proc.send_signal(signal.SIGKILL)
    try:
        proc.wait(timeout=DEATH_BOUND)
    except subprocess.TimeoutExpired:
        stack = _stacks(proc.pid)
        aborted = abort_connection(m.path)
        try:
            proc.wait(timeout=DEATH_BOUND)
            late = "it died once its FUSE connection was aborted"
        except subprocess.TimeoutExpired:
            late = "not even once its FUSE connection was aborted; it is left behind"
        m.proc = None  # never waited for again: teardown must not hang on it
        pytest.fail(f"the daemon (pid {proc.pid}) did not die within {DEATH_BOUND:g} s of "
                    f"SIGKILL, {late} (connection found: {aborted}); it waited in:\n{stack}")
    finally:
        if proc.stderr:
            proc.stderr.close()
    m.proc = None


def detach(mnt: Path) -> None:
    """What a user does after a crash: the dead mount goes (lazily). The daemon's watchdog
    may have done it already, and then there is nothing to say."""
    subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False, capture_output=True)


def _stacks(pid: int) -> str:
    out = []
    try:
        tasks = sorted(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return "(gone)"
    for tid in tasks[:20]:
        try:
            frames = Path(f"/proc/{pid}/task/{tid}/stack").read_text().split("\n")[:4]
        except OSError:
            frames = ["?"]
        out.append(f"  thread {tid}: " + " < ".join(f.split()[-1] for f in frames if f))
    return "\n".join(out)


def test_kill9_midway_through_cp_leaves_no_volume(vsfs: Mount) -> None:
    target = vsfs.dir_pool()
    p = vsfs.path / "pools" / "p"
    sh(f"echo yes > {p}/autostart && truncate -s 2M {p}/volumes/kept", check=True)
    # cp, still copying; truncate, before it gave the size
    half = os.open(p / "volumes" / "half", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(half, b"x" * (3 * MiB))
    empty = os.open(p / "volumes" / "empty", os.O_WRONLY | os.O_CREAT, 0o644)
    kill_daemon(vsfs)
    for fd in (half, empty):
        with contextlib.suppress(OSError):  # the connection is gone: close says so
            os.close(fd)
    detach(vsfs.path)
    vsfs.start()
    assert sorted(os.listdir(p / "volumes")) == ["kept"]
    assert sorted(os.listdir(target)) == ["kept"]
    assert in_flight(vsfs.state) == []
    log = vsfs.log.read_text()
    assert "volume half removed: vsfs stopped while it was being written" in log
    assert "volume empty removed" in log


def test_kill9_while_a_redirection_writes_leaves_no_volume(vsfs: Mount) -> None:
    """`cat img > V`: the shell opens V, duplicates it and closes the first descriptor
    before cat writes anything, which settles V (empty) at once; the data comes later
    through the copy. Killed then, V is half-written: gone at the next start too."""
    target = vsfs.dir_pool()
    p = vsfs.path / "pools" / "p"
    sh(f"echo yes > {p}/autostart", check=True)
    first = os.open(p / "volumes" / "redirected", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    copy = os.dup(first)
    os.close(first)  # settled: listed, empty, not in flight any more
    os.write(copy, b"x" * (3 * MiB))
    kill_daemon(vsfs)
    with contextlib.suppress(OSError):
        os.close(copy)
    detach(vsfs.path)
    vsfs.start()
    assert os.listdir(p / "volumes") == []
    assert os.listdir(target) == []
    assert "volume redirected removed" in vsfs.log.read_text()


def fs_pool(m: Mount, dev: str, name: str = "f") -> Path:
    """An autostart fs pool on ``dev`` (ext4, made by build), started; its mount point."""
    target = m.base / f"{name}-mnt"
    f = m.define(f"<pool type='fs'><name>{name}</name><source><device path='{dev}'/>"
                 f"<format type='ext4'/></source><target><path>{target}</path></target>"
                 "</pool>")
    sh(f"echo build > {f}/ctl && echo start > {f}/ctl && echo yes > {f}/autostart",
       check=True)
    return target


def stop_fs_pool(m: Mount, target: Path, name: str = "f") -> None:
    """Stop the fs pool through the mount if it answers; unmount it anyway."""
    if m.proc is not None and os.path.ismount(m.path):
        sh(f"echo stop > {m.path}/pools/{name}/ctl")
    if os.path.ismount(target):
        subprocess.run(["umount", "-l", str(target)], check=False)


@pytest.mark.root
def test_an_adopted_fs_pool_loses_what_a_killed_daemon_left(vsfs: Mount,
                                                           loopdev: str) -> None:
    """A pool still mounted when the daemon comes back is adopted, not started: its
    leftovers (a clone's temporary file, an upload cut short) go all the same."""
    target = fs_pool(vsfs, loopdev)
    f = vsfs.path / "pools" / "f"
    try:
        sh(f"truncate -s 8M {f}/volumes/a", check=True)
        (target / ".vsfs-new-00112233aabbccdd").write_bytes(b"a clone, cut short")
        fd = os.open(f / "volumes" / "b", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"y" * MiB)
        kill_daemon(vsfs)
        with contextlib.suppress(OSError):
            os.close(fd)
        detach(vsfs.path)
        assert os.path.ismount(target), "the fs pool stays mounted: it is adopted"
        vsfs.start()
        assert (f / "state").read_text() == "running\n"
        assert sorted(os.listdir(f / "volumes")) == ["a"]
        assert sorted(os.listdir(target)) == ["a", "lost+found"]
    finally:
        stop_fs_pool(vsfs, target)


# ---------------------------------------------------------------- a hundred kills


class Crashes:
    """The kill cycles: the pools under load, how to see their volumes, the writers'
    model, and what happened (for the summary)."""

    def __init__(self, m: Mount, pools: dict[str, dict[str, Any]],
                 look: Callable[[str], dict[str, Vol]], litter: Callable[[str], list[str]],
                 seed: int, pause: tuple[float, float]) -> None:
        self.m = m
        self.pools = pools
        self.look = look  # pool -> its volumes as the mount shows them
        self.litter = litter  # pool -> what must not be there (temporary files, ...)
        self.rnd = random.Random(seed)
        self.pause = pause  # seconds of load before a kill: from, to
        self.model = Model({p: {} for p in pools})
        self.serial = 0
        self.src = m.base / "src.img"
        self.src.write_bytes(self.rnd.randbytes(8 * MiB))
        self.src_vol = Vol(8 * MiB, sha256(self.src))
        self.stats: collections.Counter[str] = collections.Counter()
        self.fixed = set(pools)

    def run(self, cycles: int, what: str) -> None:
        """Kill the daemon ``cycles`` times; what happened is printed (pytest -s)."""
        n = -1
        try:
            for n in range(cycles):
                self.cycle(n)
        finally:
            print(f"\n{n + 1} kills of {cycles} ({what}):\n{self.summary()}")
        assert "Traceback" not in self.m.log.read_text()

    def cycle(self, n: int) -> None:
        writers = self._start_writers(n)
        try:
            self._wait_ready(writers)
            time.sleep(self.rnd.uniform(*self.pause))
            kill_daemon(self.m)
            self._wait_writers(writers)
        finally:
            for proc, _ in writers:
                if proc.poll() is None:
                    proc.kill()  # only on a failure above: by its PID, ours
                    proc.wait()
        detach(self.m.path)
        self.m.start()
        self.check([log for _, log in writers])

    def _start_writers(self, n: int) -> list[tuple[subprocess.Popen[bytes], Path]]:
        writers = []
        for i in range(WRITERS):
            mine = Model({p: {k: v for k, v in vols.items() if k.startswith(f"w{i}-")}
                          for p, vols in self.model.volumes.items()},
                         {k: v for k, v in self.model.pools.items() if k.startswith(f"w{i}p")})
            log = self.m.base / f"writer{i}-{n}.log"
            cfg = {"mnt": str(self.m.path), "writer": i, "seed": self.rnd.randrange(1 << 30),
                   "log": str(log), "src": str(self.src), "src_size": self.src_vol.size,
                   "src_digest": self.src_vol.digest, "pools": self.pools,
                   "model": mine.to_json(), "serial": self.serial,
                   "nowhere": str(self.m.base / "nowhere"), "max_vols": 5, "max_pools": 3,
                   "pool_ops": 0.3, "seconds": 300}
            path = self.m.base / f"writer{i}.json"
            path.write_text(json.dumps(cfg))
            with open(self.m.base / f"writer{i}.err", "ab") as err:
                proc = subprocess.Popen([sys.executable, str(CRASH_LOAD), str(path)],
                                        stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=err)
            writers.append((proc, log))
        return writers

    @staticmethod
    def _wait_ready(writers: list[tuple[subprocess.Popen[bytes], Path]]) -> None:
        deadline = time.monotonic() + READY_BOUND
        for proc, log in writers:
            while not (log.exists() and log.read_text().startswith('{"t": "ready"}')):
                assert proc.poll() is None, f"writer {proc.args!r} exited {proc.returncode}"
                assert time.monotonic() < deadline, f"writer {proc.args!r} did not start"
                time.sleep(0.02)

    def _wait_writers(self, writers: list[tuple[subprocess.Popen[bytes], Path]]) -> None:
        deadline = time.monotonic() + WRITER_BOUND
        for proc, _ in writers:
            try:
                rc = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                stack = _stacks(proc.pid)
                pytest.fail(f"writer {proc.pid} still runs {WRITER_BOUND:g} s after the "
                            f"daemon was killed; it waits in:\n{stack}")
            assert rc == 0, f"writer {proc.args!r} failed: see {self.m.base}/writer*.err"

    def check(self, logs: list[Path]) -> None:
        """What the remounted filesystem must show."""
        doubts = []
        for log in logs:
            r = replay(self.model, log, self.src_vol)
            self.stats["acknowledged"] += r.acked
            self.stats["failed, changing nothing"] += r.failed
            doubts += r.in_doubt
            self.serial = max(self.serial, r.last_serial + 1)
        seen = {p: self.look(p) for p in self.pools}
        pools = self.m.path / "pools"
        names = set(os.listdir(pools)) - {"define"}
        assert self.fixed <= names, f"a pool under load is gone: {sorted(names)}"
        for p in self.fixed:
            assert (pools / p / "state").read_text() == "running\n"
        own = {n: (pools / n / "autostart").read_text() == "yes\n" for n in names - self.fixed}
        for op in doubts:
            outcome = resolve(self.model, op, self.src_vol, seen, own)
            self.stats[f"{op['op']} in flight: {outcome}"] += 1
        for p in self.pools:
            assert seen[p] == self.model.volumes[p], f"pool {p}: volumes differ"
            assert self.litter(p) == [], f"pool {p}: left behind"
        assert own == self.model.pools, "the writers' pools differ"
        self.check_state()

    def check_state(self) -> None:
        state = self.m.state
        for d in (state, state / "autostart"):
            hidden = [n for n in os.listdir(d) if n.startswith(".") and n != JOURNAL_NAME]
            assert hidden == [], f"{d}: litter"
        assert in_flight(state) == [], "the journal of uploads still has something in flight"
        links = set(os.listdir(state / "autostart"))
        assert links <= set(os.listdir(state)), "an autostart link without its definition"
        assert list(runtime_dir(state).rglob(".tmp-*")) == [], "runtime directory: litter"

    def summary(self) -> str:
        text = self.m.log.read_text()
        for what, line in CLEANUPS.items():
            self.stats[what] = text.count(line)
        return "\n".join(f"  {k}: {v}" for k, v in sorted(self.stats.items()))


def file_volumes(m: Mount, digests: dict[tuple[int, int, int], str]
                 ) -> Callable[[str], dict[str, Vol]]:
    """A dir-like pool's volumes as the mount lists them, with the digest of those that
    hold bytes (kept by inode, size and mtime: each is read once)."""
    def look(pool: str) -> dict[str, Vol]:
        out = {}
        vols = m.path / "pools" / pool / "volumes"
        for name in os.listdir(vols):
            path = os.readlink(vols / name)
            st = os.stat(path)
            digest = None
            if st.st_blocks:
                key = (st.st_ino, st.st_size, st.st_mtime_ns)
                if key not in digests:
                    digests[key] = sha256(path)
                digest = digests[key]
            out[name] = Vol(st.st_size, digest)
        return out
    return look


@pytest.mark.slow
@pytest.mark.root
def test_kill9_under_load(vsfs: Mount, loopdev: str) -> None:
    m = vsfs
    targets = {"d": m.dir_pool("d"), "f": fs_pool(m, loopdev)}
    sh(f"echo yes > {m.path}/pools/d/autostart", check=True)
    ops = ["truncate", "truncate", "cp", "clone", "rm"]
    # 256 MiB fills most of the fs pool: creations and clones are refused for space now and
    # then, and a refused action must change nothing.
    sizes = [MiB, 4 * MiB, 16 * MiB, 64 * MiB, 256 * MiB]
    pools = {p: {"ops": ops, "sizes": sizes} for p in targets}

    def litter(pool: str) -> list[str]:
        listed = set(os.listdir(m.path / "pools" / pool / "volumes"))
        there = set(os.listdir(targets[pool])) - {"lost+found"}
        return sorted(there ^ listed)

    crashes = Crashes(m, pools, file_volumes(m, {}), litter, seed=CYCLES,
                      pause=(0.3, 1.5))
    try:
        crashes.run(CYCLES, "dir and fs pools")
    finally:
        stop_fs_pool(m, targets["f"])
