"""Long operations as jobs on a dir pool, and MNT/events, through a real mount (issue 13).

INTERFACE.md, "Concurrency, jobs and events", is the contract. A 2 GiB volume of random
data is cloned by a real copy (cp), so that what runs beside it can be seen: other
volumes made and removed at once, the source refused with EBUSY naming the job, the job's
progress, its cancel. How long a copy of 2 GiB takes depends on the host's memory (the
page cache copies it in under a second, or in seven): the test holds the copy where it
needs it, as a slow disk would, by pausing and resuming the copying process (``Copy``).
MNT/events is read by `cat`, as a user does (tests/events.py), and by select(), poll(),
epoll and a blocking read."""

from __future__ import annotations

import contextlib
import errno
import os
import select
import shutil
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from events import EventReader, parse, wait_opened
from support import Mount, abort_connection, sh

pytestmark = pytest.mark.fuse

MiB = 1 << 20
BIG = 2 << 30  # the cloned volume: 2 GiB of random data
BUSY = "Device or resource busy"
CANCELED = "Operation canceled"


# ------------------------------------------------------------------ the 2 GiB source


@contextlib.contextmanager
def ext4_on_loop(img: Path, size: int, mnt: Path) -> Iterator[str]:
    """An ext4 filesystem of ``size`` bytes in ``img`` on a loop device of its own,
    mounted on ``mnt``; its device. Unmounted, detached (partx -d, then losetup -d) and
    its image removed afterwards, whatever happened."""
    img.write_bytes(b"")
    os.truncate(img, size)
    mnt.mkdir()
    dev = sh(f"losetup -f --show {img}", check=True).stdout.strip()
    try:
        sh(f"mkfs.ext4 -q {dev} && mount {dev} {mnt}", check=True)
        yield dev
    finally:
        if os.path.ismount(mnt) and sh(f"umount {mnt}").returncode != 0:
            sh(f"umount -l {mnt}")
        sh(f"partx -d {dev}")
        sh(f"losetup -d {dev}")
        img.unlink()


def reflinks(directory: Path) -> bool:
    """Whether copies in ``directory`` can share extents (then a clone is instant)."""
    a, b = directory / ".probe-a", directory / ".probe-b"
    a.write_bytes(b"x" * 4096)
    try:
        return subprocess.run(["cp", "--reflink=always", str(a), str(b)], check=False,
                              capture_output=True).returncode == 0
    finally:
        a.unlink()
        b.unlink(missing_ok=True)


@contextlib.contextmanager
def copying_fs(base: Path) -> Iterator[Path]:
    """Where the pools' directories go: ``base``, or an ext4 loop filesystem made there
    when ``base``'s filesystem shares extents (a clone would be instant there)."""
    if not reflinks(base):
        yield base
        return
    if os.geteuid() != 0:
        pytest.skip(f"{base} makes reflinked (instant) copies; an ext4 loop fs needs root")
    with ext4_on_loop(base / "ext4.img", 8 << 30, base / "ext4"):
        yield base / "ext4"


@dataclass
class Source:
    """The 2 GiB file, made once a module; each test's pool gets a hard link to it (no
    copy). A test that changed it (a resize or wipe let through by a bug) has it made
    again for the next."""

    path: Path
    made: tuple[int, int] = (0, 0)  # size, mtime_ns

    def fresh(self) -> Path:
        st = self.path.stat() if self.path.exists() else None
        if st is None or (st.st_size, st.st_mtime_ns) != self.made:
            # 32 MiB from /dev/urandom, each copy of it numbered: random bytes, no zero
            # block (a sparse copy would skip it), in some 5 s instead of urandom's 10.
            chunk = bytearray(os.urandom(32 * MiB))
            with open(self.path, "wb") as f:
                for i in range(BIG // len(chunk)):
                    chunk[:8] = i.to_bytes(8, "little")
                    f.write(chunk)
            st = self.path.stat()
            self.made = (st.st_size, st.st_mtime_ns)
        return self.path


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Source]:
    with copying_fs(tmp_path_factory.mktemp("jobs-data")) as data:
        src = Source(data / "big.src")
        try:
            yield src
        finally:
            src.path.unlink(missing_ok=True)


# ------------------------------------------------------------------ pools and jobs


class Copy:
    """The process copying for a clone (cp, qemu-img: the source's path is among its
    arguments), held by the test as a slow disk would hold it: paused (SIGSTOP) while the
    test looks at what runs beside it, resumed (SIGCONT) for slices of its work. The
    daemon started it and ends it; the test only pauses and resumes it, and only while
    it is still that process (its start time is checked: a PID may be reused)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = self._stat()[0]

    def _stat(self) -> tuple[str | None, str]:
        """Its start time (field 22 of /proc/PID/stat) and state (field 3)."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None, "gone"
        return fields[19], fields[0]

    def _state(self) -> str:
        """Its state (R, S, D, T, Z...), or "gone" once it is not this process any more."""
        start, st = self._stat()
        return st if start is not None and start == self.start else "gone"

    def alive(self) -> bool:
        return self._state() not in ("gone", "Z", "X")

    def _signal(self, sig: signal.Signals) -> bool:
        if not self.alive():
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)
            return True
        return False

    @classmethod
    def catch(cls, source: Path, exclude: frozenset[int] = frozenset(),
              timeout: float = 10.0) -> Copy:
        """The copy reading ``source``, paused as soon as it is seen (a copy from the
        page cache takes under a second)."""
        deadline = time.monotonic() + timeout
        while True:
            for pid in filter(str.isdigit, os.listdir("/proc")):
                if int(pid) in exclude:
                    continue
                with contextlib.suppress(OSError):
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                    if os.fsencode(source) in argv:
                        copy = cls(int(pid))
                        if copy.pause():
                            return copy
            assert time.monotonic() < deadline, f"no copy of {source} within {timeout} s"
            time.sleep(0.002)

    def pause(self) -> bool:
        """Stopped, once the kernel says so; False if it has ended."""
        if not self._signal(signal.SIGSTOP):
            return False
        deadline = time.monotonic() + 5
        while self.alive():
            if self._state() in ("T", "t"):
                return True
            assert time.monotonic() < deadline, f"copy {self.pid} did not stop"
            time.sleep(0.001)
        return False

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def run_for(self, seconds: float) -> None:
        """Let it copy for ``seconds``, then pause it again; it must not have ended."""
        self.resume()
        time.sleep(seconds)
        assert self.pause(), "the copy ended within one slice: the test proves nothing"

    def guarded(self, cmd: str, timeout: float = 5.0) -> subprocess.CompletedProcess[str]:
        """``cmd`` in a shell while the copy is paused. One that waits for the copy
        would wait for ever: after ``timeout`` s the copy goes on (the job can end and
        the command with it) and the test fails, saying what the command did then."""
        proc = subprocess.Popen(["bash", "-c", cmd], stdin=subprocess.DEVNULL, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.resume()
            out, err = proc.communicate(timeout=600)
            raise AssertionError(f"{cmd!r} waited for the clone: still waiting {timeout} s "
                                 f"into it, it ended (exit {proc.returncode}, {err.strip()!r})"
                                 " once the copy went on and the job could end") from None
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)



@dataclass
class Pools:
    """A mount with dir pool ``p`` holding ``big`` (the 2 GiB source), its directory
    beside the source's; commands started in the background, ended afterwards."""

    m: Mount
    data: Path
    writers: list[subprocess.Popen[str]] = field(default_factory=list)
    copies: list[Copy] = field(default_factory=list)

    @property
    def target(self) -> Path:
        return self.data / "p"

    @property
    def p(self) -> Path:
        return self.m.path / "pools" / "p"

    def vi(self, vol: str = "big") -> Path:
        return self.p / "volinfo" / vol

    def add_pool(self, name: str, target: Path | None = None) -> Path:
        """Define, build and start dir pool ``name`` as a user would; its directory."""
        target = target or self.data / name
        self.m.define(self.m.pool_xml(name, target))
        sh(f"echo build > {self.m.path}/pools/{name}/ctl", check=True)
        sh(f"echo start > {self.m.path}/pools/{name}/ctl", check=True)
        return target

    def background(self, cmd: str) -> subprocess.Popen[str]:
        """``cmd &`` in a shell."""
        proc = subprocess.Popen(["bash", "-c", cmd], stdin=subprocess.DEVNULL, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.writers.append(proc)
        return proc

    def catch(self, source: Path | None = None) -> Copy:
        """The copy of ``source`` (``big``) that a clone just started, paused."""
        copy = Copy.catch(source or self.target / "big",
                          exclude=frozenset(c.pid for c in self.copies))
        self.copies.append(copy)
        return copy

    def end_jobs(self) -> None:
        """Let paused copies go on, cancel what still runs (a test that failed half way:
        its writers may start more) and wait for the writers, boundedly."""
        for copy in self.copies:
            copy.resume()
        jobs = self.m.path / "jobs"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                for name in os.listdir(jobs):
                    with contextlib.suppress(OSError):
                        if (jobs / name / "state").read_text() == "running\n":
                            (jobs / name / "ctl").write_text("cancel\n")
            if all(w.poll() is not None for w in self.writers):
                break
            time.sleep(0.1)
        for proc in self.writers:
            if proc.poll() is None:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)


@pytest.fixture
def jp(vsfs: Mount, source: Source, tmp_path: Path) -> Iterator[Pools]:
    data = source.path.parent / tmp_path.name
    data.mkdir()
    pools = Pools(vsfs, data)
    try:
        vsfs.define(vsfs.pool_xml("p", pools.target))
        sh(f"echo build > {pools.p}/ctl", check=True)
        os.link(source.fresh(), pools.target / "big")
        sh(f"echo start > {pools.p}/ctl", check=True)
        assert os.listdir(pools.p / "volumes") == ["big"]
        assert (pools.vi() / "capacity").read_text() == f"{BIG}\n"
        yield pools
    finally:
        try:
            pools.end_jobs()
            # Unmounted before the 2 GiB files go (the copies of 2 GiB would fill /tmp).
            vsfs.stop()
        finally:
            shutil.rmtree(data, ignore_errors=True)


def value(path: Path) -> str:
    """A value file's one value: it ends with a newline, like sysfs."""
    text = path.read_text()
    assert text.endswith("\n"), f"{path}: {text!r} does not end with a newline"
    return text[:-1]


def state(job: Path) -> str:
    return value(job / "state")


def progress(job: Path) -> tuple[int, int]:
    text = value(job / "progress")
    done, total = text.split(" ")
    return int(done), int(total)


def jobs_text(mnt: Path) -> str:
    """Every job, for a failure's message."""
    lines = []
    with contextlib.suppress(OSError):
        for name in sorted(os.listdir(mnt / "jobs"), key=int):
            d = mnt / "jobs" / name
            with contextlib.suppress(OSError):
                lines.append(f"{name}: {(d / 'what').read_text().strip()!r} "
                             f"{(d / 'state').read_text().strip()} "
                             f"{(d / 'progress').read_text().strip()} "
                             f"{(d / 'error').read_text().strip()!r}")
    return "\n".join(lines) or "(no jobs)"


def jobs_doing(mnt: Path, what: str) -> list[Path]:
    found = []
    for name in sorted(os.listdir(mnt / "jobs"), key=int):
        with contextlib.suppress(FileNotFoundError):
            if (mnt / "jobs" / name / "what").read_text() == what + "\n":
                found.append(mnt / "jobs" / name)
    return found


def find_job(mnt: Path, what: str, timeout: float = 10.0) -> Path:
    """``MNT/jobs/<id>`` of the job whose ``what`` is ``what``, once it is there."""
    deadline = time.monotonic() + timeout
    while True:
        found = jobs_doing(mnt, what)
        if found:
            assert len(found) == 1, f"two jobs {what!r}:\n{jobs_text(mnt)}"
            return found[0]
        assert time.monotonic() < deadline, \
            f"no job {what!r} within {timeout} s:\n{jobs_text(mnt)}"
        time.sleep(0.02)


def wait_ended(job: Path, timeout: float) -> str:
    """The job's state once it is no longer running, or ``running`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while (st := state(job)) == "running" and time.monotonic() < deadline:
        time.sleep(0.02)
    return st


def wait_progress(job: Path, expected: tuple[int, int], timeout: float = 3.0) -> None:
    """Until ``progress`` reads ``expected`` (it is updated at least once a second)."""
    deadline = time.monotonic() + timeout
    while (got := progress(job)) != expected:
        assert time.monotonic() < deadline, f"progress {got}, expected {expected}"
        time.sleep(0.05)


def timed(cmd: str) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    res = sh(cmd)
    return res, time.monotonic() - t0


def holders_of(paths: list[Path], under: list[Path]) -> list[str]:
    """Processes that have one of ``paths``, or a file below one of ``under``, open or
    on their command line: what a copy still running would show."""
    exact = {str(p) for p in paths}
    prefixes = tuple(f"{d}/" for d in under)
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            argv = [a.decode(errors="replace") for a in
                    Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
            if exact & set(argv):
                found.append(f"{pid} runs {argv}")
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link in exact or link.startswith(prefixes):
                        found.append(f"{pid} ({argv[0]}) has {link} open")
    return found


class CtlWriter(threading.Thread):
    """Writes a command to a ctl file with plain Python file I/O, in a thread; the
    OSError it got from the write or the close, if any.

    Unbuffered, so that the error is the write's own (a buffered writer whose write
    failed writes the same bytes again at close(), and gets the first errno again)."""

    def __init__(self, ctl: Path, line: str) -> None:
        super().__init__(daemon=True)
        self.ctl, self.line = ctl, line
        self.error: OSError | None = None

    def run(self) -> None:
        try:
            with open(self.ctl, "wb", buffering=0) as f:
                f.write(self.line.encode() + b"\n")
        except OSError as e:
            self.error = e


def cancel_within_a_second(m: Mount, job: Path, writer: CtlWriter) -> None:
    """``echo cancel > MNT/jobs/<id>/ctl``: within a second the job is ``cancelled`` and
    the write that started it has returned ECANCELED, the reason in ``MNT/error``."""
    t0 = time.monotonic()
    sh(f"echo cancel > {job}/ctl", check=True)
    st = wait_ended(job, t0 + 1.0 - time.monotonic())
    assert st == "cancelled", f"{st} 1 s after the cancel: {jobs_text(m.path)}"
    writer.join(timeout=max(0.0, t0 + 1.0 - time.monotonic()))
    assert not writer.is_alive(), "the write of the command is still waiting 1 s after " \
                                  "the cancel"
    assert writer.error is not None and writer.error.errno == errno.ECANCELED, \
        f"the writer got {writer.error!r}, not ECANCELED"
    assert "cancel" in m.error()


# ------------------------------------------------------------------ clone as a job


def test_clone_runs_while_the_pool_goes_on(jp: Pools) -> None:
    m, p, vols = jp.m.path, jp.p, jp.p / "volumes"
    what = "clone p/big -> p/big2"
    with EventReader(m) as ev:
        writer = jp.background(f"echo 'clone big2' > {jp.vi()}/ctl")
        job = find_job(m, what)
        jid = int(job.name)
        copy = jp.catch()
        assert state(job) == "running"
        assert str(jid) in os.listdir(m / "jobs")
        assert {"what", "state", "progress", "error", "ctl"} <= set(os.listdir(job))
        assert os.readlink(jp.vi() / "job") == f"../../../../jobs/{jid}"
        assert (jp.vi() / "job" / "state").read_text() == "running\n"

        # Another volume of the same pool is made, resized, listed and removed, each in
        # well under a second, while the clone verifiably goes on; every value answers.
        for cmd in (f"truncate -s 1M {vols}/small", f"echo 2M > {p}/volinfo/small/capacity",
                    f"ls -l {vols}/", f"rm {vols}/small",
                    f"cat {p}/capacity {p}/allocation {p}/free {p}/state {p}/xml",
                    f"cd {jp.vi()} && cat capacity allocation format path key xml"):
            t0 = time.monotonic()
            res = copy.guarded(cmd)
            took = time.monotonic() - t0
            assert res.returncode == 0, f"{cmd}: {res.stderr}"
            assert took < 1.0, f"{cmd} took {took:.2f} s while job {jid} ran"
            assert state(job) == "running"
            if cmd.startswith("truncate"):
                assert os.stat(jp.target / "small").st_size == MiB
            if cmd.startswith("echo"):
                assert os.stat(jp.target / "small").st_size == 2 * MiB
        assert not (jp.target / "small").exists()

        # progress: DONE TOTAL, TOTAL the source's size, DONE growing as the copy goes
        # on (updated at least once a second).
        seen = [progress(job)]
        for _ in range(3):
            copy.run_for(0.1)
            deadline = time.monotonic() + 1.5
            while (now := progress(job)) == seen[-1]:
                assert time.monotonic() < deadline, f"DONE did not grow: {seen}"
                time.sleep(0.05)
            seen.append(now)
            assert state(job) == "running"
        dones = [d for d, _ in seen]
        assert dones == sorted(dones) and 0 < dones[-1] < BIG, f"DONE: {seen}"
        assert all(t == BIG for d, t in seen if d > 0), f"TOTAL is not {BIG}: {seen}"
        copy.resume()
        assert wait_ended(job, 300) == "done", jobs_text(m)
        _, err = writer.communicate(timeout=30)
        assert writer.returncode == 0, err

        assert progress(job) == (BIG, BIG)
        assert value(job / "what") == what
        assert (job / "error").read_text().strip() == ""
        assert not os.path.lexists(jp.vi() / "job"), "volinfo/big/job stays after the job"
        assert os.readlink(vols / "big2") == str(jp.target / "big2")
        assert sorted(os.listdir(jp.target)) == ["big", "big2"]
        sh(f"cmp {jp.target}/big {vols}/big2", check=True)

        ev.wait_for(f"job {jid} done {what}")
        ev.wait_for("volume p/big2 created")
        ev.assert_order(f"job {jid} started {what}", "volume p/small created",
                        "volume p/small resized", "volume p/small deleted",
                        f"job {jid} done {what}")
        ev.assert_order(f"job {jid} started {what}", "volume p/big2 created")
        assert [e.detail for e in ev.find(f"job {jid} started")] == [what]
        assert len(ev.find("volume p/big2 created")) == 1
    jp.m.assert_clean_log()


def test_source_is_busy_while_cloned(jp: Pools) -> None:
    m, p, vols, vi = jp.m.path, jp.p, jp.p / "volumes", jp.vi()
    before = sorted(os.listdir(jp.target))
    ino = os.stat(jp.target / "big").st_ino
    first = jp.background(f"echo 'clone big2' > {vi}/ctl")
    job = find_job(m, "clone p/big -> p/big2")
    jid = int(job.name)
    copy = jp.catch()
    why = f"p/big is being cloned (job {jid})"

    # What would change the source: EBUSY at once, the job named in MNT/error.
    for cmd in (f"rm {vols}/big", f"echo 1G > {vi}/capacity", f"echo 3G > {vi}/capacity",
                f"mv {vols}/big {vols}/moved", f"echo wipe > {vi}/ctl",
                f"echo delete > {vi}/ctl"):
        res = copy.guarded(cmd)
        assert res.returncode != 0 and BUSY in res.stderr, f"{cmd}: {res.stderr}"
        assert why in jp.m.error(), f"{cmd}: {jp.m.error()!r}"
    # The volume being made: its name is taken by the job.
    res = copy.guarded(f"truncate -s 1M {vols}/big2")
    assert res.returncode != 0 and BUSY in res.stderr, res.stderr
    assert f"(job {jid})" in jp.m.error()
    # The pool: not stopped, deleted or undefined under the job.
    res = copy.guarded(f"echo stop > {p}/ctl")
    assert BUSY in res.stderr, res.stderr
    assert f"job {jid}" in jp.m.error()
    assert value(p / "state") == "running"
    for cmd in (f"echo delete > {p}/ctl", f"rmdir {p}"):
        res = copy.guarded(cmd)
        assert res.returncode != 0 and BUSY in res.stderr, f"{cmd}: {res.stderr}"
    assert p.is_dir() and value(p / "state") == "running"
    assert state(job) == "running"
    st = os.stat(jp.target / "big")
    assert (st.st_ino, st.st_size) == (ino, BIG)

    # Reading it is no conflict: a second clone of the source runs beside the first.
    second = jp.background(f"echo 'clone big3' > {vi}/ctl")
    try:
        job2 = find_job(m, "clone p/big -> p/big3")
    except AssertionError:
        copy.resume()
        second.wait(timeout=300)
        raise AssertionError("a second clone of the source did not start while the first "
                             f"ran; once it could go on: {jobs_text(m)}") from None
    jp.catch()
    assert state(job2) == "running" and state(job) == "running", jobs_text(m)
    assert os.readlink(vi / "job") in (f"../../../../jobs/{jid}",
                                       f"../../../../jobs/{job2.name}")
    res = copy.guarded(f"rm {vols}/big")
    assert BUSY in res.stderr, res.stderr

    for c in jp.copies:
        c.resume()
    for j in (job, job2):
        sh(f"echo cancel > {j}/ctl", check=True)
    for j, w in ((job, first), (job2, second)):
        assert wait_ended(j, 5) == "cancelled", jobs_text(m)
        _, err = w.communicate(timeout=5)
        assert w.returncode != 0 and CANCELED in err, err
    assert sorted(os.listdir(jp.target)) == before
    assert sorted(os.listdir(vols)) == ["big"]
    jp.m.assert_clean_log()


@pytest.mark.parametrize("dest", ["p", "q"])
def test_cancel_stops_a_clone_and_leaves_nothing(jp: Pools, dest: str) -> None:
    m = jp.m.path
    dest_dir = jp.target if dest == "p" else jp.add_pool("q")
    before = sorted(os.listdir(dest_dir))  # with hidden files
    before_src = sorted(os.listdir(jp.target))
    what = f"clone p/big -> {dest}/big2"
    with EventReader(m) as ev:
        writer = CtlWriter(jp.vi() / "ctl", "clone big2" if dest == "p" else "clone big2 q")
        writer.start()
        job = find_job(m, what)
        jid = int(job.name)
        copy = jp.catch()
        copy.run_for(0.1)  # a partial copy to undo
        deadline = time.monotonic() + 1.5
        while progress(job)[0] == 0:
            assert time.monotonic() < deadline, f"no progress: {jobs_text(m)}"
            time.sleep(0.05)
        if dest == "q":
            # The pool the copy goes to cannot be stopped under it either.
            res = copy.guarded(f"echo stop > {m}/pools/q/ctl")
            assert BUSY in res.stderr, res.stderr
            assert f"job {jid}" in jp.m.error()
        assert state(job) == "running"

        copy.resume()  # as a copy on a slow disk: running when the cancel comes
        cancel_within_a_second(jp.m, job, writer)

        assert sorted(os.listdir(dest_dir)) == before, "the cancelled clone left something"
        assert sorted(os.listdir(jp.target)) == before_src
        assert "big2" not in os.listdir(m / "pools" / dest / "volumes")
        assert not os.path.lexists(jp.vi() / "job")
        assert not copy.alive(), "the copy still runs after the cancel"
        assert holders_of([jp.target / "big"], [dest_dir]) == [], "the copy still runs"
        assert os.stat(jp.target / "big").st_size == BIG
        assert (job / "error").read_text() == "", "a cancelled job did not fail: no error"

        ev.wait_for(f"job {jid} cancelled {what}")
        ev.drain()
        assert ev.find(f"volume {dest}/big2 created") == []
    jp.m.assert_clean_log()


def test_a_stopping_signal_to_the_writer_cancels_its_job(jp: Pools) -> None:
    """^C (or a kill) to the shell that waits for its clone cancels the job at once, as ^C
    stops a cp; a signal that stops nothing (SIGCHLD of a child in the background) does
    not."""
    m = jp.m.path
    before = sorted(os.listdir(jp.target))
    shell = subprocess.Popen(["bash", "-c", f"sleep 0.2 & echo 'clone big2' > {jp.vi()}/ctl"],
                             stderr=subprocess.PIPE, text=True)
    job = find_job(m, "clone p/big -> p/big2")
    copy = jp.catch()
    copy.run_for(0.4)  # the background sleep ends meanwhile: SIGCHLD to the shell
    assert state(job) == "running", "SIGCHLD to the writer cancelled its job"
    copy.resume()
    t0 = time.monotonic()
    shell.send_signal(signal.SIGINT)
    shell.communicate(timeout=5)
    assert time.monotonic() - t0 < 1.0, "the interrupted writer waited"
    assert shell.returncode != 0
    assert wait_ended(job, 1.0) == "cancelled"
    assert sorted(os.listdir(jp.target)) == before, "the interrupted clone left something"
    jp.m.assert_clean_log()


def test_free_space_a_clone_reserved_is_not_given_to_a_truncate(jp: Pools) -> None:
    """While a clone copies, the space it will still take counts as used for new volumes,
    made by XML and by truncate alike."""
    m, vols = jp.m.path, jp.p / "volumes"
    writer = jp.background(f"echo 'clone big2' > {jp.vi()}/ctl")
    job = find_job(m, "clone p/big -> p/big2")
    copy = jp.catch()
    try:
        free = int(value(jp.p / "free"))
        done, total = progress(job)
        fits = free - (total - done)  # what is left once the copy is whole
        assert fits > 0
        res = copy.guarded(f"truncate -s {fits + total // 2} {vols}/greedy")
        assert "No space left on device" in res.stderr, res.stderr
        assert "greedy" not in os.listdir(vols)
        res = copy.guarded(f"truncate -s {max(fits // 2, 1)} {vols}/modest")
        assert res.returncode == 0, res.stderr
    finally:
        copy.resume()
    assert writer.wait(timeout=60) == 0
    assert state(job) == "done"
    jp.m.assert_clean_log()


@pytest.fixture
def tinyfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB ext4 filesystem on a loop device, mounted; gone afterwards."""
    mnt = tmp_path / "tiny"
    with ext4_on_loop(tmp_path / "tiny.img", 64 * MiB, mnt):
        yield mnt


@pytest.mark.root
def test_clone_into_a_pool_without_room(tinyfs: Path, jp: Pools) -> None:
    m = jp.m.path
    tiny = jp.add_pool("tiny", tinyfs / "images")
    assert os.statvfs(tiny).f_bavail * os.statvfs(tiny).f_frsize < 64 * MiB
    before = sorted(os.listdir(tiny))
    before_src = sorted(os.listdir(jp.target))
    what = "clone p/big -> tiny/big2"
    with EventReader(m) as ev:
        res = sh(f"echo 'clone big2 tiny' > {jp.vi()}/ctl")
        assert res.returncode != 0 and "No space left on device" in res.stderr, res.stderr
        assert jp.m.error()
        assert sorted(os.listdir(tiny)) == before, "the refused clone left something"
        assert sorted(os.listdir(jp.target)) == before_src
        assert os.listdir(m / "pools" / "tiny" / "volumes") == []
        assert not os.path.lexists(jp.vi() / "job")
        # If a job was started for it, it failed, and says why.
        for job in jobs_doing(m, what):
            assert state(job) == "failed", jobs_text(m)
            assert value(job / "error"), jobs_text(m)
            ev.wait_for(f"job {job.name} failed {what}")
        ev.drain()
        assert ev.find("volume tiny/big2") == []
    jp.m.assert_clean_log()


def corrupt_qcow2(path: Path) -> None:
    """A qcow2 image whose header is sound (qemu-img info reads it) but whose first L2
    table offset is unaligned: reading its data fails, so a copy of it fails."""
    sh(f"qemu-img create -q -f qcow2 {path} 16M && "
       f"qemu-io -c 'write -P 0x55 0 1M' {path} >/dev/null", check=True)
    with open(path, "r+b") as f:
        (l1,) = struct.unpack(">Q", f.read(48)[40:48])
        f.seek(l1)
        (entry,) = struct.unpack(">Q", f.read(8))
        f.seek(l1)
        f.write(struct.pack(">Q", entry + 0x200))


def test_failed_job_keeps_its_reason(vsfs: Mount) -> None:
    target = vsfs.dir_pool()
    p = vsfs.path / "pools" / "p"
    corrupt_qcow2(target / "c")
    sh(f"echo refresh > {p}/ctl", check=True)
    assert value(p / "volinfo" / "c" / "format") == "qcow2"
    what = "clone p/c -> p/c2"
    with EventReader(vsfs.path) as ev:
        res = sh(f"echo 'clone c2' > {p}/volinfo/c/ctl")
        assert res.returncode != 0 and "Input/output error" in res.stderr, res.stderr
        job = find_job(vsfs.path, what, timeout=1)
        assert state(job) == "failed"
        reason = value(job / "error")
        assert "corrupt" in reason or "error while reading" in reason, reason
        assert os.listdir(target) == ["c"], "the failed clone left something"
        assert os.listdir(p / "volumes") == ["c"]
        ev.wait_for(f"job {job.name} failed {what}")
        ev.assert_order(f"job {job.name} started {what}", f"job {job.name} failed {what}")
    # It stays, as it ended, for whoever looks later.
    assert state(job) == "failed" and value(job / "error") == reason
    vsfs.assert_clean_log()


# ------------------------------------------------------------------ uploads


def test_upload_is_a_job(vsfs: Mount) -> None:
    target = vsfs.dir_pool()
    vols = vsfs.path / "pools" / "p" / "volumes"
    chunk = os.urandom(MiB)
    what = "upload p/up"
    with EventReader(vsfs.path) as ev:
        with open(vols / "up", "wb", buffering=0) as f:
            for _ in range(4):
                f.write(chunk)
            job = find_job(vsfs.path, what, timeout=3)
            jid = int(job.name)
            assert state(job) == "running"
            wait_progress(job, (4 * MiB, 0))  # bytes written so far, TOTAL unknown
            for _ in range(3):
                f.write(chunk)
            wait_progress(job, (7 * MiB, 0))
            assert state(job) == "running"
            # Another volume meanwhile: the upload holds only its own.
            res, took = timed(f"truncate -s 1M {vols}/other && rm {vols}/other")
            assert res.returncode == 0 and took < 1.0, (res.stderr, took)
        assert wait_ended(job, 5) == "done", jobs_text(vsfs.path)
        assert progress(job)[0] == 7 * MiB
        assert (job / "error").read_text().strip() == ""
        assert (target / "up").read_bytes() == chunk * 7
        ev.wait_for(f"job {jid} done {what}")
        ev.assert_order(f"job {jid} started {what}", f"job {jid} done {what}")
    vsfs.assert_clean_log()


def test_upload_cancelled(vsfs: Mount) -> None:
    target = vsfs.dir_pool()
    vols = vsfs.path / "pools" / "p" / "volumes"
    what = "upload p/up"
    f = open(vols / "up", "wb", buffering=0)  # noqa: SIM115 (closed below, checked)
    try:
        f.write(os.urandom(MiB))
        job = find_job(vsfs.path, what, timeout=3)
        t0 = time.monotonic()
        sh(f"echo cancel > {job}/ctl", check=True)
        st = wait_ended(job, t0 + 1.0 - time.monotonic())
        assert st == "cancelled", f"{st} 1 s after the cancel"
        with pytest.raises(OSError) as e:
            f.write(os.urandom(MiB))
        assert e.value.errno == errno.ECANCELED, e.value
        # The close tells it too: a writer that writes nothing more learns it there.
        with pytest.raises(OSError) as e:
            f.close()
        assert e.value.errno == errno.ECANCELED, e.value
    finally:
        with contextlib.suppress(OSError):
            f.close()
    # Its partial result is removed.
    deadline = time.monotonic() + 2
    while "up" in os.listdir(target) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.listdir(target) == [], "the cancelled upload left its volume"
    assert os.listdir(vols) == []
    vsfs.assert_clean_log()


# ------------------------------------------------------------------ MNT/events


def test_events_of_a_pool_and_its_volumes(vsfs: Mount) -> None:
    m = vsfs.path
    q = m / "pools" / "q"
    with EventReader(m) as ev:
        vsfs.define(vsfs.pool_xml("q", vsfs.base / "images-q"))
        for cmd in (f"echo build > {q}/ctl", f"echo start > {q}/ctl",
                    f"truncate -s 1M '{q}/volumes/a b'",
                    f"mv '{q}/volumes/a b' {q}/volumes/c",
                    f"echo 2M > {q}/volinfo/c/capacity", f"rm {q}/volumes/c",
                    f"echo refresh > {q}/ctl", f"echo stop > {q}/ctl",
                    f"echo delete > {q}/ctl", f"rmdir {q}"):
            sh(cmd, check=True)
        ev.wait_for("pool q undefined")
        ev.assert_order("pool q defined", "pool q built", "pool q started",
                        r"volume q/a\x20b created", r"volume q/a\x20b renamed q/c",
                        "volume q/c resized", "volume q/c deleted", "pool q refreshed",
                        "pool q stopped", "pool q deleted", "pool q undefined")
        assert [e.detail for e in ev.find(r"volume q/a\x20b renamed")] == ["q/c"]
        assert ev.find("volume q/a b") == []
    vsfs.assert_clean_log()


def test_events_of_changes_made_outside(vsfs: Mount) -> None:
    target = vsfs.dir_pool()
    with EventReader(vsfs.path) as ev:
        with open(target / "outside.img", "w") as f:
            f.write("made by another tool\n")
        # vsfs polls dir pools about once a second: a bounded wait.
        ev.wait_for("volume p/outside.img created", timeout=10)
        (target / "with space").write_bytes(b"")
        ev.wait_for(r"volume p/with\x20space created", timeout=10)
        os.remove(target / "outside.img")
        ev.wait_for("volume p/outside.img deleted", timeout=10)
        ev.assert_order("volume p/outside.img created", "volume p/outside.img deleted")
    vsfs.assert_clean_log()


def _read_lines_until_quiet(fd: int, wanted: bytes, timeout: float = 5.0) -> bytes:
    """What ``fd`` gives until ``wanted`` came and nothing more is ready for 0.5 s."""
    out = b""
    deadline = time.monotonic() + timeout
    while True:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready and wanted in out:
            return out
        assert time.monotonic() < deadline, f"no {wanted!r}, or never quiet: {out!r}"
        if ready:
            data = os.read(fd, 1 << 16)
            assert data, "end of file on MNT/events"
            out += data


def test_events_select_poll_and_epoll_sleep_until_a_change(vsfs: Mount) -> None:
    vsfs.dir_pool()
    vols = vsfs.path / "pools" / "p" / "volumes"
    fd = os.open(vsfs.path / "events", os.O_RDONLY)
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    ep = select.epoll()
    ep.register(fd, select.EPOLLIN)
    try:
        def by_select(t: float) -> list[object]:
            return list(select.select([fd], [], [], t)[0])

        def by_poll(t: float) -> list[object]:
            return list(poller.poll(t * 1000))

        def by_epoll(t: float) -> list[object]:
            return list(ep.poll(t))

        for n, wait in enumerate((by_select, by_poll, by_epoll)):
            # Nothing changes: it sleeps (not ready after 0.5 s).
            assert wait(0.5) == [], f"ready with nothing to read ({n})"
            # A change from another thread wakes it.
            maker = threading.Timer(0.3, sh, [f"truncate -s 1M {vols}/v{n}"],
                                    {"check": True})
            maker.start()
            t0 = time.monotonic()
            woke = wait(10)
            took = time.monotonic() - t0
            maker.join(timeout=30)
            assert woke, f"not woken by the change ({n})"
            assert took >= 0.2, f"woke before the change ({n}: {took:.2f} s)"
            _read_lines_until_quiet(fd, f"volume p/v{n} created".encode())
            # All read: it sleeps again.
            assert wait(0.5) == [], f"still ready after everything was read ({n})"
    finally:
        ep.close()
        os.close(fd)
    vsfs.assert_clean_log()


def test_events_opened_nonblocking_never_wait(vsfs: Mount) -> None:
    vsfs.dir_pool()
    fd = os.open(vsfs.path / "events", os.O_RDONLY | os.O_NONBLOCK)
    try:
        t0 = time.monotonic()
        with pytest.raises(BlockingIOError):
            os.read(fd, 4096)
        assert time.monotonic() - t0 < 0.5
        sh(f"truncate -s 1M {vsfs.path}/pools/p/volumes/nb", check=True)
        assert b"volume p/nb created" in _read_lines_until_quiet(fd, b"volume p/nb created")
    finally:
        os.close(fd)


def test_events_read_waits_for_the_next_line(vsfs: Mount) -> None:
    vsfs.dir_pool()
    vols = vsfs.path / "pools" / "p" / "volumes"
    fd = os.open(vsfs.path / "events", os.O_RDONLY)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(os.read(fd, 1 << 16)), daemon=True)
    try:
        reader.start()
        reader.join(timeout=0.5)
        assert reader.is_alive(), f"read returned with nothing changed: {got}"
        sh(f"truncate -s 1M {vols}/w", check=True)
        reader.join(timeout=5)
        assert not reader.is_alive(), "read did not return after a change"
        data = got[0].decode()
        lines = [parse(line) for line in data.split("\n")[:-1]]  # whole lines
        # Woken by the change: a line of it (the volume's, or that of a job making it).
        assert any(e.obj == "p/w" or e.detail.endswith(" p/w") for e in lines), data
    finally:
        if reader.is_alive():  # a read that never returns: free it, the test has failed
            abort_connection(vsfs.path)
            reader.join(timeout=10)
        with contextlib.suppress(OSError):
            os.close(fd)
    vsfs.assert_clean_log()


def test_events_each_open_is_its_own_cursor(vsfs: Mount) -> None:
    vsfs.dir_pool()
    vols = vsfs.path / "pools" / "p" / "volumes"
    with EventReader(vsfs.path) as a:
        sh(f"truncate -s 1M {vols}/v1", check=True)
        first = a.wait_for("volume p/v1 created")
        with EventReader(vsfs.path) as b:
            sh(f"truncate -s 1M {vols}/v2", check=True)
            b.wait_for("volume p/v2 created")
            a.wait_for("volume p/v2 created")
            a.drain()
            b.drain()
            # b sees from its open on, a everything since its own: a's reading took
            # nothing from b.
            assert b.find("volume p/v1") == [], b.texts()
            assert all(e.seq > first.seq for e in b.events), b.texts()
            assert b.texts() and a.texts()[-len(b.texts()):] == b.texts()
    vsfs.assert_clean_log()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_blocked_events_reader_dies_of_a_signal(vsfs: Mount, sig: signal.Signals) -> None:
    path = vsfs.path / "events"
    proc = subprocess.Popen(["cat", str(path)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_opened(proc, path)
        time.sleep(0.5)
        assert proc.poll() is None, "cat ended with nothing to read"
        proc.send_signal(sig)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"cat {path}, blocked in read, still runs 5 s after "
                                 f"{sig.name}") from None
        assert proc.returncode == -sig, proc.returncode
    finally:
        if proc.poll() is None:
            abort_connection(vsfs.path)
            proc.kill()
            proc.wait(timeout=10)
        proc.communicate(timeout=5)
    # The mount goes on: a new reader gets the next change.
    vsfs.dir_pool()
    with EventReader(vsfs.path) as ev:
        sh(f"truncate -s 1M {vsfs.path}/pools/p/volumes/after", check=True)
        ev.wait_for("volume p/after created")
    vsfs.assert_clean_log()
