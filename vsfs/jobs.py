"""Long operations as jobs: what runs, on which volumes, how far along, how to stop it.

A job holds the volumes it touches, and nothing else: the manager asks ``holder``
before any action on a volume and refuses a conflicting one at once (EBUSY, the
job named), instead of making it wait behind a pool-wide lock. Holds are shared
(a clone's source: others may read it too) or exclusive (the volume being made,
wiped or written).

Progress comes from the copy itself: whatever runs inside the job calls
``report`` (a command's own progress output, parsed in vsfs.proc, or a copy
loop's counter); the job is found through a context variable, so backends need
no job argument. ``cancel`` cancels the job's trio scope: a command it runs is
killed (vsfs.proc) and the backend's clean-up removes what was half made.

INTERFACE.md, "Jobs", is the contract; ended jobs stay KEEP_ENDED seconds, the
newest KEEP_ENDED_MAX of them.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import StrEnum

import trio

from .errors import Busy, Canceled, VsfsError
from .feed import Change

log = logging.getLogger(__name__)

KEEP_ENDED = 15 * 60.0
KEEP_ENDED_MAX = 100


class JobState(StrEnum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


VolRef = tuple[str, str]  # (pool, volume)


@dataclass(eq=False)
class Job:
    id: int
    what: str
    # How a refusal names what the job does to a volume: "p/big is being cloned (job 7)".
    verb: str
    # (pool, volume) -> exclusive?
    holds: dict[VolRef, bool]
    # Volumes the job makes: not listed until it ends well (a refresh that finds one
    # half made leaves it out).
    creates: frozenset[VolRef] = frozenset()
    # Bytes of free space each pool keeps for it until it ends: two copies started at
    # once do not both count the same free space.
    reserved: dict[str, int] = field(default_factory=dict)
    state: JobState = JobState.RUNNING
    done: int = 0
    total: int = 0
    error: str = ""
    ended_at: float | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    ended: trio.Event = field(default_factory=trio.Event)
    # Asked to stop: by its ctl (a job outside a scope of ours, an upload, looks here).
    cancelled: bool = False
    # The process whose write started it and waits for it (0: none known): a signal
    # sent to it (^C) cancels the job, as ^C stops a cp.
    requester: int = 0
    # Called at its cancel, for a job that runs in no scope of ours (an upload, whose
    # writer may not write again for a while): it must stop it within a second.
    on_cancel: Callable[[], object] | None = None

    @property
    def running(self) -> bool:
        return self.state is JobState.RUNNING

    def progress(self) -> str:
        return f"{self.done} {self.total}"

    def conflict(self, pool: str, name: str) -> str:
        return f"{pool}/{name} is being {self.verb} (job {self.id})"

    def cancel(self) -> bool:
        """Stop it (its scope is cancelled; the command it runs is killed); whether it
        was still running."""
        if not self.running:
            return False
        self.cancelled = True
        self.scope.cancel()
        if self.on_cancel is not None:
            self.on_cancel()
        return True

    def pools(self) -> set[str]:
        return {p for p, _ in self.holds} | set(self.reserved)


_current: contextvars.ContextVar[Job | None] = contextvars.ContextVar("vsfs_job", default=None)
# Set by the adapter around a write that may start a job: the writing process.
REQUESTER: contextvars.ContextVar[int] = contextvars.ContextVar("vsfs_requester", default=0)


def report(done: int, total: int | None = None) -> None:
    """Progress of the job this task (or worker thread) runs for, if any: ``done`` bytes
    of ``total`` (left as it was when None). Cheap: call it as often as you like."""
    job = _current.get()
    if job is not None:
        job.done = max(0, done)
        if total is not None:
            job.total = max(0, total)


class Jobs:
    """Every job, running or recently ended, by id."""

    def __init__(self, publish: Callable[[Change], None],
                 clock: Callable[[], float] = trio.current_time) -> None:
        self._publish = publish
        self._clock = clock
        self._ids = itertools.count(1)
        self._jobs: dict[int, Job] = {}
        # The running ones apart: every action on a volume asks about them.
        self._running: dict[int, Job] = {}

    # ------------------------------------------------------------- lookups

    def get(self, job_id: int) -> Job | None:
        self.prune()
        return self._jobs.get(job_id)

    def ids(self) -> list[int]:
        self.prune()
        return list(self._jobs)

    def running(self) -> Iterator[Job]:
        return iter(list(self._running.values()))

    def holder(self, pool: str, name: str, exclusive: bool = True) -> Job | None:
        """The running job an action on pool/name would conflict with: any job holding
        it, for an action that changes it (``exclusive``); one holding it exclusively,
        for one that only reads it."""
        for job in self._running.values():
            held = job.holds.get((pool, name))
            if held is not None and (exclusive or held):
                return job
        return None

    def in_pool(self, pool: str) -> Job | None:
        """A running job that holds a volume of the pool, or space in it."""
        return next((j for j in self.running() if pool in j.pools()), None)

    def creating(self, pool: str) -> set[str]:
        return {n for j in self.running() for p, n in j.creates if p == pool}

    def reserved(self, pool: str) -> int:
        """Free space of the pool that running jobs will still take: what each reserved,
        less what it has written so far (which the pool counts as used already)."""
        return sum(max(0, j.reserved.get(pool, 0) - j.done) for j in self.running())

    # ------------------------------------------------------------- lifecycle

    def begin(self, what: str, verb: str, holds: Iterable[tuple[VolRef, bool]],
              creates: Iterable[VolRef] = (), reserved: dict[str, int] | None = None) -> Job:
        """A job holding ``holds`` ((pool, volume), exclusive), started now; EBUSY naming
        the job in the way. Checked and taken at once (no await between): two actions
        racing for one volume cannot both pass."""
        wanted = dict(holds)
        for (pool, name), exclusive in wanted.items():
            other = self.holder(pool, name, exclusive)
            if other is not None:
                raise Busy(other.conflict(pool, name))
        self.prune()
        job = Job(next(self._ids), what, verb, wanted, frozenset(creates), dict(reserved or {}),
                  requester=REQUESTER.get())
        self._jobs[job.id] = self._running[job.id] = job
        log.info("job %d started: %s", job.id, what)
        self._publish(Change("job", (str(job.id),), "started", what, tuple(wanted)))
        return job

    def finish(self, job: Job, error: BaseException | None = None) -> None:
        """End a job: done, or failed (``error``), or cancelled (asked to, and it
        stopped with an error: Cancelled, or what its clean-up raised)."""
        if not job.running:
            return
        if job.cancelled and error is not None:
            job.state = JobState.CANCELLED  # not a failure: its error file stays empty
        elif error is not None:
            job.state = JobState.FAILED
            job.error = (error.message if isinstance(error, VsfsError)
                         else f"internal error: {error!r}")
        else:
            job.state = JobState.DONE
            if job.total:
                job.done = job.total
            else:
                job.total = job.done
        job.ended_at = self._clock()
        del self._running[job.id]
        job.ended.set()
        log.info("job %d %s: %s%s", job.id, job.state.value, job.what,
                 f" ({job.error})" if job.error else "")
        self._publish(Change("job", (str(job.id),), job.state.value, job.what,
                             tuple(job.holds)))

    @asynccontextmanager
    async def run(self, job: Job) -> AsyncIterator[Job]:
        """Run the body as the job: its progress reports reach it, its cancel stops it.
        Leaves with the job ended; a cancelled job raises Canceled (ECANCELED) to the
        writer that started it."""
        token = _current.set(job)
        try:
            with job.scope:
                yield job
        except BaseException as e:
            if isinstance(e, trio.Cancelled):
                job.cancelled = True  # stopped from outside (the daemon stops)
            self.finish(job, e)
            if job.cancelled and isinstance(e, VsfsError | trio.Cancelled):
                raise Canceled(f"job {job.id} was cancelled: {job.what}") from None
            raise
        finally:
            _current.reset(token)
        if job.scope.cancelled_caught:
            self.finish(job, Canceled("cancelled"))
            raise Canceled(f"job {job.id} was cancelled: {job.what}")
        # Done, even if a cancel came as it ended (too late to stop anything): what it
        # made is there and listed, and its writer is told so.
        job.cancelled = False
        self.finish(job)

    def prune(self) -> None:
        """Forget ended jobs older than KEEP_ENDED, and all but the newest KEEP_ENDED_MAX."""
        if len(self._jobs) == len(self._running):
            return
        now = self._clock()
        ended = [j for j in self._jobs.values() if j.ended_at is not None]
        old = {j.id for j in ended if j.ended_at is not None and now - j.ended_at > KEEP_ENDED}
        if len(ended) - len(old) > KEEP_ENDED_MAX:
            keep = sorted((j for j in ended if j.id not in old),
                          key=lambda j: (j.ended_at, j.id))[-KEEP_ENDED_MAX:]
            old |= {j.id for j in ended} - {j.id for j in keep}
        for job_id in old:
            del self._jobs[job_id]
