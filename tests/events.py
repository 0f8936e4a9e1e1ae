"""A reader of ``MNT/events`` for the mount tests, as a user has one: ``cat MNT/events``.

The reader is a ``cat`` process; the test reads its output from a pipe with bounded
waits, so no wait of a test depends on the daemon's own poll() support (tested on its
own in tests/test_mount_jobs.py). Every line is checked against the contract's format
(``SEQ TIME KIND OBJECT EVENT [DETAIL]``, SEQ increasing, TIME ISO 8601 UTC) as it
arrives.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import select
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from support import abort_connection

LINE = re.compile(r"(\d+) (\S+) (pool|volume|job|host) (\S+) (\S+)(?: (.+))?")
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z")


@dataclass(frozen=True)
class Event:
    seq: int
    time: str
    kind: str
    obj: str
    event: str
    detail: str
    raw: str

    @property
    def text(self) -> str:
        """The line without SEQ and TIME: ``volume p/a created``, ``job 3 started clone …``."""
        tail = f" {self.detail}" if self.detail else ""
        return f"{self.kind} {self.obj} {self.event}{tail}"

    def matches(self, text: str) -> bool:
        """Whether the line is ``text``, or ``text`` followed by more (a DETAIL)."""
        return self.text == text or self.text.startswith(text + " ")


def parse(raw: str) -> Event:
    """One line of ``MNT/events``; AssertionError if it breaks the contract's format."""
    m = LINE.fullmatch(raw)
    assert m is not None, f"not an event line: {raw!r}"
    seq, stamp, kind, obj, event, detail = m.groups()
    assert TIME.fullmatch(stamp), f"TIME is not ISO 8601 UTC: {raw!r}"
    when = datetime.datetime.fromisoformat(stamp)
    now = datetime.datetime.now(datetime.UTC)
    assert abs((now - when).total_seconds()) < 120, f"TIME is not now in UTC: {raw!r}"
    return Event(int(seq), stamp, kind, obj, event, detail or "", raw)


class EventReader:
    """``cat MNT/events``, opened now; its lines as they come."""

    def __init__(self, mnt: Path) -> None:
        self.mnt = mnt
        self.path = mnt / "events"
        self.events: list[Event] = []
        self._buf = b""
        self._eof = False
        self.proc = subprocess.Popen(["cat", str(self.path)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            wait_opened(self.proc, self.path)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> EventReader:
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(check=typ is None)

    def pump(self, timeout: float) -> bool:
        """Take what ``cat`` wrote within ``timeout`` seconds; whether anything came."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], max(0.0, timeout))
        if not ready:
            return False
        data = os.read(fd, 1 << 16)
        if not data:
            self._eof = True
            err = self.proc.stderr.read().decode() if self.proc.stderr else ""
            raise AssertionError(f"cat {self.path} ended: {err or 'end of file'}")
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            ev = parse(line.decode())
            if self.events:
                last = self.events[-1].seq
                assert ev.seq > last, f"SEQ does not increase: {last} then {ev.raw!r}"
            self.events.append(ev)
        return True

    def wait_for(self, text: str, timeout: float = 5.0, start: int = 0) -> Event:
        """The first line (from index ``start``) matching ``text``, waiting up to
        ``timeout`` seconds for it to come."""
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.events[start:]:
                if ev.matches(text):
                    return ev
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no event {text!r} within {timeout} s; got:\n"
                                     + "\n".join(e.raw for e in self.events))
            self.pump(left)

    def drain(self, quiet: float = 0.5) -> None:
        """Take lines until none comes for ``quiet`` seconds (at most 10 s in all)."""
        deadline = time.monotonic() + 10
        while self.pump(quiet):
            assert time.monotonic() < deadline, "events kept coming for 10 s"

    def texts(self) -> list[str]:
        return [e.text for e in self.events]

    def find(self, text: str) -> list[Event]:
        return [e for e in self.events if e.matches(text)]

    def assert_order(self, *texts: str) -> None:
        """The lines seen include ``texts`` in this order (other lines may come between)."""
        at = 0
        for text in texts:
            for i in range(at, len(self.events)):
                if self.events[i].matches(text):
                    at = i + 1
                    break
            else:
                raise AssertionError(f"{text!r} does not follow {texts[:texts.index(text)]} "
                                     "in:\n" + "\n".join(e.raw for e in self.events))

    def close(self, check: bool = True) -> None:
        """End the reader by its PID: a blocked reader must die of SIGTERM. One that does
        not is freed by aborting the connection (the test then fails, if it has not)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                abort_connection(self.mnt)
                self.proc.kill()
                self.proc.wait(timeout=10)
                if check:
                    raise AssertionError(f"cat {self.path}, blocked in read, did not die of "
                                         "SIGTERM within 5 s") from None
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


def wait_opened(proc: subprocess.Popen[bytes], path: Path, timeout: float = 10.0) -> None:
    """Until ``proc`` has ``path`` open (its open() returned: its cursor is set)."""
    pid = proc.pid
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise AssertionError(f"{proc.args!r} exited {proc.returncode}: {err}")
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                        return
        assert time.monotonic() < deadline, f"process {pid} did not open {path} in {timeout} s"
        time.sleep(0.01)
