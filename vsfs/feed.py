"""The change feed: every change to pools, volumes, jobs and host devices, in order.

The manager publishes typed changes here, for what vsfs does and for what it
notices from outside (its polls, rescans, uevents) alike. Consumers subscribe:
the FUSE adapter decides which kernel entries a change invalidates, and
``MNT/events`` streams the same changes to users as lines (INTERFACE.md,
"Events"). One mechanism: nothing else tells anyone that something changed.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import trio

log = logging.getLogger(__name__)

# A reader further behind than this many lines gets "lost N" instead of them: the
# daemon's memory stays bounded whatever its readers do.
BACKLOG = 10_000

def escape(name: str) -> str:
    r"""A name as an event line shows it: space, ``\``, ``/`` and control characters as
    ``\xNN``, so that a line splits into its fields at spaces (``read -r``)."""
    out = []
    for c in name:
        if c in " \\/" or ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\x{ord(c):02x}")
        else:
            out.append(c)
    return "".join(out)


def ref(*names: str) -> str:
    """``POOL`` or ``POOL/VOL``, each name escaped."""
    return "/".join(escape(n) for n in names)


@dataclass(frozen=True)
class Change:
    """One change. ``names`` is the object: (pool,), (pool, volume), (job id,) or
    (host device,); ``detail`` is shown after the event, as given (names in it escaped
    by the publisher: ``ref``). ``touches`` is not shown: the volumes a consumer may
    have to forget along with it (those of a stopped pool, those a job holds)."""

    kind: str
    names: tuple[str, ...]
    event: str
    detail: str = ""
    touches: tuple[tuple[str, str], ...] = ()


def _iso(now: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


class Feed:
    """Publishes changes to subscribers and keeps the last BACKLOG as event lines."""

    def __init__(self) -> None:
        self.seq = 0
        self._lines: deque[tuple[int, bytes]] = deque(maxlen=BACKLOG)
        self._subscribers: list[Callable[[Change], None]] = []
        # Woken at each change: readers waiting in read(), and poll() handles.
        self._wake = trio.Event()
        self._pollers: dict[object, Callable[[], None]] = {}
        # The daemon is going: waiting readers get the end of the file.
        self.closed = False

    def subscribe(self, fn: Callable[[Change], None]) -> None:
        """Call ``fn`` with every change from now on, in the publisher's task: it must
        not block (queue work, never wait)."""
        self._subscribers.append(fn)

    def publish(self, change: Change) -> None:
        """Record a change and tell every subscriber and reader. Never raises: a change
        that happened must not fail the action that made it."""
        self.seq += 1
        obj = ref(*change.names)
        tail = f" {change.detail}" if change.detail else ""
        line = f"{self.seq} {_iso(time.time())} {change.kind} {obj} {change.event}{tail}\n"
        self._lines.append((self.seq, line.encode()))
        for fn in self._subscribers:
            try:
                fn(change)
            except Exception:
                log.exception("a subscriber of the change feed failed on %s", line.strip())
        self._wake.set()
        self._wake = trio.Event()
        pollers, self._pollers = self._pollers, {}
        for notify in pollers.values():
            try:
                notify()
            except Exception:
                log.exception("waking a poll() of events failed")

    # ------------------------------------------------------------- readers

    def cursor(self) -> int:
        """Where a reader opening now starts: after the last change so far."""
        return self.seq

    def ready(self, cursor: int) -> bool:
        return self.seq > cursor

    def take(self, cursor: int, limit: int) -> tuple[bytes, int]:
        """Lines after ``cursor``, whole, about ``limit`` bytes at most (at least one
        line, whatever its length), and the cursor after them. A reader whose next line
        is no longer kept gets ``SEQ TIME lost N`` first (SEQ: the last one lost)."""
        if self.seq <= cursor:
            return b"", cursor
        out = bytearray()
        oldest = self._lines[0][0] if self._lines else self.seq + 1
        if oldest > cursor + 1:
            lost = oldest - cursor - 1
            cursor = oldest - 1
            out += f"{cursor} {_iso(time.time())} lost {lost}\n".encode()
        # The lines are numbered without gaps: the first wanted is at a known index.
        start = cursor + 1 - oldest
        for i in range(start, len(self._lines)):
            seq, line = self._lines[i]
            if out and len(out) + len(line) > limit:
                break
            out += line
            cursor = seq
        return bytes(out), cursor

    async def wait(self, cursor: int) -> None:
        """Until there is a line after ``cursor``, or the feed is closed."""
        while self.seq <= cursor and not self.closed:
            await self._wake.wait()

    def close(self) -> None:
        """The daemon stops: wake every waiting reader (they read the end of the file),
        so that no request keeps the main loop from ending."""
        self.closed = True
        self._wake.set()
        self._wake = trio.Event()

    def on_next(self, key: object, notify: Callable[[], None]) -> None:
        """Call ``notify`` once, at the next change (a poll() handle); a later call with
        the same key replaces it, as the kernel's newer handle replaces the older."""
        self._pollers[key] = notify

    def forget(self, key: object) -> None:
        """A reader closed: nothing to wake for it any more."""
        self._pollers.pop(key, None)
