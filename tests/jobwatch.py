"""Watching a job of a block backend's pool while it runs, for the logical (in the QEMU
guest) and rbd job tests: tests/guest/test_jobs_logical.py, tests/test_rbd_jobs.py. The
dir pool's job tests (tests/test_mount_jobs.py) hold the value readers used here."""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from support import Mount
from test_mount_jobs import Copy, find_job, jobs_text, progress, state, timed, value, wait_ended

BUSY = "Device or resource busy"
CANCELED = "Operation canceled"  # what a shell says of a write that got ECANCELED


class Sampler(threading.Thread):
    """Reads a job's progress every 50 ms while it runs: (time, DONE, TOTAL)."""

    def __init__(self, job: Path) -> None:
        super().__init__(daemon=True)
        self.job = job
        self.samples: list[tuple[float, int, int]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            with contextlib.suppress(OSError, ValueError):
                done, total = progress(self.job)
                self.samples.append((time.monotonic(), done, total))
                if state(self.job) != "running":
                    return
            time.sleep(0.05)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)


def check_growth(samples: list[tuple[float, int, int]], total: int) -> None:
    """DONE grew while the copy ran, never went back, never past TOTAL (the source's
    size), and changed at least once a second between its first move and its end."""
    dones = [d for _, d, _ in samples]
    assert dones == sorted(dones), f"DONE went back: {dones}"
    assert all(t == total for _, _, t in samples), f"TOTAL is not {total}: {samples}"
    between = sorted({d for d in dones if 0 < d < total})
    assert len(between) >= 3, f"DONE did not grow while the copy ran: {dones}"
    moving = [(t, d) for t, d, _ in samples if 0 < d < total]
    changes = [t for (_, prev), (t, d) in itertools.pairwise(moving) if d != prev]
    times = [moving[0][0], *changes]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # Sampled every 50 ms by a test on the same busy machine: 1 s, and some slack.
    assert max(gaps, default=0.0) < 1.5, f"progress stood still {max(gaps):.2f} s: {samples}"


def copied_some(copy: Copy, m: Path, job: Path, slice_s: float = 0.3,
                slices: int = 40) -> int:
    """Let the paused ``copy`` go on in slices until the job's progress shows some of its
    work done (0 < DONE < TOTAL), paused again; that DONE."""
    for _ in range(slices):
        copy.run_for(slice_s)
        deadline = time.monotonic() + 2  # what it printed reaches the job meanwhile
        while time.monotonic() < deadline:
            done, total = progress(job)
            if done > 0:
                assert done < total, f"progress {done} {total} with the copy still paused"
                assert state(job) == "running", jobs_text(m)
                return done
            time.sleep(0.05)
    raise AssertionError(f"no progress after {slices} slices of {slice_s} s: {jobs_text(m)}")


class Writer:
    """``echo 'LINE' > CTL &`` in a shell of its own, as a user starts a job in the
    background. Not a thread of the test: a descriptor of the ctl file open in the test
    would be inherited by every command the test starts meanwhile, and Linux 6.1 (the
    guest's) makes the child's close of it (fuse_flush) wait for the ctl's inode lock,
    which the blocked write holds until the job ends."""

    def __init__(self, ctl: Path, line: str) -> None:
        self.proc = subprocess.Popen(["bash", "-c", 'echo "$1" > "$2"', "writer", line,
                                      str(ctl)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        self.err = ""

    def ended(self, timeout: float) -> bool:
        """Whether it has returned, waiting up to ``timeout`` seconds."""
        deadline = time.monotonic() + max(0.0, timeout)
        while self.proc.poll() is None:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        _, self.err = self.proc.communicate(timeout=10)
        return True

    def end(self) -> None:
        """Gone, whatever happened (killed by its PID if it still waits)."""
        if not self.ended(10):
            self.proc.kill()
            self.proc.communicate(timeout=10)


@dataclass
class Held:
    """What a test started beside its jobs, to be let go at its end."""

    copies: list[Copy] = field(default_factory=list)
    writers: list[Writer] = field(default_factory=list)

    def writer(self, ctl: Path, line: str) -> Writer:
        w = Writer(ctl, line)
        self.writers.append(w)
        return w


@dataclass
class Clone:
    """A clone started by a writer, its job and its copy (paused)."""

    what: str
    writer: Writer
    job: Path
    copy: Copy
    vi: Path  # the source's volinfo/V

    @property
    def jid(self) -> int:
        return int(self.job.name)


def start_clone(held: Held, m: Mount, pool: str, name: str, new: str, source: Path,
                timeout: float = 10.0) -> Clone:
    """``echo 'clone NEW' > volinfo/NAME/ctl &``; its job, found, and its copy (the
    process with ``source`` on its command line), paused once it is seen, within
    ``timeout`` seconds: the job holds the source, and volinfo/NAME/job leads to it."""
    vi = m.path / "pools" / pool / "volinfo" / name
    what = f"clone {pool}/{name} -> {pool}/{new}"
    writer = held.writer(vi / "ctl", f"clone {new}")
    job = find_job(m.path, what, timeout=timeout)
    copy = Copy.catch(source, timeout=timeout)
    held.copies.append(copy)
    assert state(job) == "running", jobs_text(m.path)
    assert value(job / "what") == what
    assert os.readlink(vi / "job") == f"../../../../jobs/{job.name}"
    assert (vi / "job" / "state").read_text() == "running\n"
    return Clone(what, writer, job, copy, vi)


def runs_to_its_end(m: Mount, clone: Clone, size: int, timeout: float = 300) -> None:
    """The clone's paused copy goes on to its end, its progress followed: the job is
    done, its writer's write succeeded, DONE grew and ended at ``size size``, no error
    is kept, and volinfo/V/job is gone."""
    sampler = Sampler(clone.job)
    sampler.start()
    try:
        clone.copy.resume()
        assert wait_ended(clone.job, timeout) == "done", jobs_text(m.path)
    finally:
        sampler.stop()
    assert clone.writer.ended(30) and clone.writer.proc.returncode == 0, clone.writer.err
    assert progress(clone.job) == (size, size)
    check_growth(sampler.samples, size)
    assert (clone.job / "error").read_text().strip() == ""
    assert not os.path.lexists(clone.vi / "job"), "volinfo/V/job stays after the job"


def timed_alone(m: Mount, pool: str) -> tuple[float, float]:
    """How long a create (``truncate -s 8M``) and a remove of a volume take with nothing
    else running: the seconds of each."""
    vols = m.path / "pools" / pool / "volumes"
    res, made = timed(f"truncate -s 8M {vols}/small")
    assert res.returncode == 0, res.stderr
    res, removed = timed(f"rm {vols}/small")
    assert res.returncode == 0, res.stderr
    print(f"with no clone: create {made:.2f} s, remove {removed:.2f} s")
    return made, removed


def changes_refused(m: Mount, clone: Clone, pool: str, name: str, new: str,
                    answer: float) -> None:
    """With the clone's copy paused: what would change its source is EBUSY at once,
    naming the job (rm, wipe, mv, a new capacity); so is the new name; the pool does not
    stop under it; and a refresh, which finds what is being made, does not list it."""
    p = m.path / "pools" / pool
    vols, vi = p / "volumes", p / "volinfo" / name
    bigger = 2 * int(value(vi / "capacity"))
    for cmd in (f"rm {vols}/{name}", f"echo wipe > {vi}/ctl",
                f"mv {vols}/{name} {vols}/moved", f"echo {bigger} > {vi}/capacity"):
        res = clone.copy.guarded(cmd, answer)
        assert res.returncode != 0 and BUSY in res.stderr, (cmd, res.stderr)
        why = f"{pool}/{name} is being cloned (job {clone.jid})"
        assert why in m.error(), (cmd, m.error())
    res = clone.copy.guarded(f"truncate -s 1M {vols}/{new}", answer)
    assert BUSY in res.stderr, res.stderr
    assert f"{pool}/{new} is being cloned (job {clone.jid})" in m.error(), m.error()
    res = clone.copy.guarded(f"echo stop > {p}/ctl", answer)
    assert BUSY in res.stderr, res.stderr
    assert f"job {clone.jid}" in m.error(), m.error()
    assert value(p / "state") == "running"
    res = clone.copy.guarded(f"echo refresh > {p}/ctl", answer)
    assert res.returncode == 0, res.stderr
    assert new not in os.listdir(vols), "a half-made clone is listed"
    assert state(clone.job) == "running", jobs_text(m.path)


@contextlib.contextmanager
def ending_jobs(m: Mount) -> Iterator[Held]:
    """Whatever happened, no job of the test still runs when the mount goes: the copies
    the test paused go on, what still runs is cancelled and waited for (boundedly), and
    so are the writers that started them."""
    held = Held()
    try:
        yield held
    finally:
        for copy in held.copies:
            copy.resume()
        with contextlib.suppress(OSError):
            for name in os.listdir(m.path / "jobs"):
                job = m.path / "jobs" / name
                with contextlib.suppress(OSError):
                    if state(job) == "running":
                        (job / "ctl").write_text("cancel\n")
                        wait_ended(job, 60)
        for w in held.writers:
            w.end()
