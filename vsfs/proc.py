"""The one way vsfs runs an outside command.

A command runs until it ends, times out, or the task awaiting it is cancelled (a job's
``cancel``, vsfs.jobs): then it is killed (SIGKILL) and reaped before trio.Cancelled goes
on, so that the caller's clean-up never removes a file that a copy still writes to.

A long command can be watched (``progress``, a ProgressWatch): its own progress output
is parsed as it comes, and/or something it changes is looked at every POLL_EVERY
seconds; the bytes done go to the job it runs for (vsfs.jobs.report).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shlex
import signal
import subprocess
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import ClassVar, Literal

import trio

from . import jobs
from .errors import BackendFailed, CommandNoSpace

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 120.0
# How often a watched command's progress is looked at (and passed on to its job): the
# job's progress file is to be at most a second old.
POLL_EVERY = 0.5
# Of a stream that progress is read from, only its end is kept (its error message, if
# any): a long copy writes many progress lines.
KEEP_TAIL = 64 << 10
# A progress line longer than this is no progress line: it is skipped, not kept.
MAX_LINE = 4096
# How long a killed command is waited for: one that does not die by then (stuck in the
# kernel, on a hung NFS server) is left to finish dying, and said so.
REAP_WAIT = 10.0


def command_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a command: ``env`` (or the daemon's own) in the C locale.

    vsfs tells failures apart by what commands say ("No space left on device"), and
    that must not depend on the host's language; libvirt runs its children the same way.
    """
    out = dict(os.environ if env is None else env)
    out["LC_ALL"] = "C"
    out.pop("LANGUAGE", None)
    return out


# ------------------------------------------------------------------------ progress

_LINE_END = re.compile(rb"[\r\n]")


class ProgressWatch:
    """How far a running command got: ``done`` bytes of ``total`` (0 where unknown).

    Told by the command itself, on the output ``stream`` it writes its progress to,
    which ``feed`` takes in pieces cut anywhere and hands on line by line (lines end at
    \\r or \\n) to ``line``; and/or by ``poll``, a look every POLL_EVERY seconds at the
    running command or at what it writes. Subclasses parse one command's output; a line
    they do not understand is ignored, and ``done`` never goes back nor past ``total``.
    """

    stream: ClassVar[Literal["stdout", "stderr"] | None] = None

    def __init__(self, total: int) -> None:
        self.total = max(0, total)
        self.done = 0
        self._partial = b""
        self._overlong = False  # the line being read is past MAX_LINE: skipped

    def feed(self, data: bytes) -> None:
        *lines, rest = _LINE_END.split(self._partial + data)
        if lines and self._overlong:
            lines[0] = b""  # the end of a line too long to be one of progress
            self._overlong = False
        if len(rest) > MAX_LINE:
            rest, self._overlong = b"", True
        self._partial = rest
        for raw in lines:
            if raw.strip() and len(raw) <= MAX_LINE:
                self.line(raw.decode("utf-8", errors="replace"))

    def line(self, text: str) -> None:
        """One line of the command's progress stream."""

    def poll(self, pid: int) -> None:
        """A look at the running command (process ``pid``) or what it writes. Blocking:
        called in a worker thread, and abandoned if the command ends meanwhile."""

    def advance(self, done: int) -> None:
        """``done`` bytes are done: forward only, and never past a known total."""
        if self.total:
            done = min(done, self.total)
        self.done = max(self.done, done)

    def polls(self) -> bool:
        return type(self).poll is not ProgressWatch.poll


def read_chars(pid: int) -> int | None:
    """Bytes process ``pid`` has read through read(2) and its kin (``rchar`` of
    /proc/PID/io, its threads' included); None when it cannot be read. Blocking."""
    try:
        with open(f"/proc/{pid}/io", "rb") as f:
            for line in f:
                if line.startswith(b"rchar:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


class QemuImgProgress(ProgressWatch):
    """``qemu-img convert -p``: "    (NN.NN/100%)" on stdout, \\r after each.

    qemu-img prints only when it got a whole percent further than it last printed (its
    progress's min_skip, util/qemu-progress.c), and SIGUSR1 does not make it print
    sooner: -p leaves the signal blocked, and without -p it prints at the next step
    only. For 100 GiB a percent is a GiB, seconds apart: in between, what qemu-img has
    read since the step was seen (/proc/PID/io) moves ``done`` on, never as far as the
    next step. ``total``: the source's virtual size (the percent is of it)."""

    stream = "stdout"
    _PERCENT = re.compile(r"\(\s*(\d{1,3}(?:\.\d+)?)/100%\)")

    def __init__(self, total: int) -> None:
        super().__init__(total)
        self._step = 0  # bytes at the percent last printed
        self._read_at_step: int | None = None  # what it had read when a poll first saw it

    def line(self, text: str) -> None:
        m = self._PERCENT.search(text)
        if m is None:
            return
        percent = float(m.group(1))
        if percent > 100:
            return
        step = int(self.total * percent / 100)
        if step > self._step:
            self._step = step
            self._read_at_step = None
        self.advance(step)

    def poll(self, pid: int) -> None:
        read = read_chars(pid)
        if read is None or not self.total:
            return
        if self._read_at_step is None:
            self._read_at_step = read
            return
        # Short of the next step: that one qemu-img prints itself.
        ceiling = self._step + self.total // 100 - 1
        self.advance(min(self._step + read - self._read_at_step, ceiling))


class DdProgress(ProgressWatch):
    """``dd status=progress``: "N bytes (…) copied, T s, R MB/s" on stderr, each second,
    \\r after each; its summary at the end says the same of all it copied."""

    stream = "stderr"
    _BYTES = re.compile(r"^(\d+) bytes\b.*\bcopied")

    def line(self, text: str) -> None:
        m = self._BYTES.match(text.strip())
        if m is not None:
            self.advance(int(m.group(1)))


class RbdProgress(ProgressWatch):
    """``rbd cp``, ``import``, ``export`` (without --no-progress): "OPERATION: N%
    complete..." on stderr, \\r before each, at each whole percent (so for 100 GiB every
    GiB: nothing local shows a copy between two cluster nodes going on in between);
    "...done." or "...failed." at the end."""

    stream = "stderr"
    _PERCENT = re.compile(r"^[^:]*: (\d{1,3})% complete\.\.\.(?:done\.|failed\.)?$")

    def line(self, text: str) -> None:
        m = self._PERCENT.match(text.strip())
        if m is not None and int(m.group(1)) <= 100:
            self.advance(self.total * int(m.group(1)) // 100)


class BlkdiscardProgress(ProgressWatch):
    """``blkdiscard --step N --verbose`` (with --zeroout or not): "DEV: Zero-filled N bytes
    from the offset O" on stdout, once a second (and once at the end), for what it did
    since the line before; the device from its start (no --offset)."""

    stream = "stdout"
    _DONE = re.compile(r"(?:Zero-filled|Discarded) (\d+) bytes from the offset (\d+)$")

    def line(self, text: str) -> None:
        m = self._DONE.search(text.strip())
        if m is not None:
            self.advance(int(m.group(2)) + int(m.group(1)))


class Growth(ProgressWatch):
    """A command that says nothing of its progress but writes a file from its start to
    its end (``cp --sparse=always``, writing past holes by seeking): the size of
    ``path`` so far. Not for devices, whose size is fixed."""

    def __init__(self, path: str, total: int) -> None:
        super().__init__(total)
        self.path = path

    def poll(self, pid: int) -> None:
        with contextlib.suppress(OSError):
            self.advance(os.stat(self.path).st_size)


# The deadline of the command ``_report`` runs for, if it is watched: pushed back at
# each step forward (run: for a watched command, ``timeout`` is how long it may make
# no progress, not how long it may take).
_stall: trio.lowlevel.RunVar[dict[int, tuple[trio.CancelScope, float, list[int]]]] = \
    trio.lowlevel.RunVar("vsfs_stall")


def _report(watch: ProgressWatch) -> None:
    jobs.report(watch.done, watch.total)
    try:
        scope, timeout, seen = _stall.get()[id(watch)]
    except (LookupError, KeyError):
        return
    if watch.done > seen[0]:
        seen[0] = watch.done
        scope.deadline = trio.current_time() + timeout


class _Capture:
    """What a command writes on one stream: all of it; or, for the stream its progress
    is read from, its last KEEP_TAIL bytes (enough for the error message at its end)."""

    def __init__(self, watch: ProgressWatch | None) -> None:
        self.watch = watch
        self._chunks: list[bytes] = []
        self._size = 0

    def take(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self.watch is not None:
            self.watch.feed(data)
            _report(self.watch)
            if self._size > 2 * KEEP_TAIL:
                tail = b"".join(self._chunks)[-KEEP_TAIL:]
                self._chunks, self._size = [tail], len(tail)

    def value(self) -> bytes:
        return b"".join(self._chunks)


async def _pump(stream: trio.abc.ReceiveStream, capture: _Capture) -> None:
    while data := await stream.receive_some(65536):
        capture.take(bytes(data))  # no copy: FdStream gives bytes


async def _tick(watch: ProgressWatch, pid: Callable[[], int | None]) -> None:
    """Every POLL_EVERY seconds: ``watch.poll`` (in a worker thread: a stat may hang on
    a network filesystem), and the job told."""
    while True:
        now = pid()
        if now is not None and watch.polls():
            await trio.to_thread.run_sync(watch.poll, now, abandon_on_cancel=True)
        _report(watch)
        await trio.sleep(POLL_EVERY)


async def _collect(stdout: trio.abc.ReceiveStream, stderr: trio.abc.ReceiveStream,
                   out: _Capture, err: _Capture, watch: ProgressWatch | None,
                   pid: Callable[[], int | None]) -> None:
    """Read both streams to their ends, polling ``watch`` meanwhile."""
    async with trio.open_nursery() as outer:
        if watch is not None:
            outer.start_soon(_tick, watch, pid)
        async with trio.open_nursery() as inner:
            inner.start_soon(_pump, stdout, out)
            inner.start_soon(_pump, stderr, err)
        outer.cancel_scope.cancel()


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


@contextlib.contextmanager
def _ungrouped() -> Iterator[None]:
    """What this module's nurseries raise, as if there were none: trio.Cancelled (one, for
    all their tasks), else the one error, so that callers catch BackendFailed, OSError
    and Cancelled as they catch them from any other call."""
    try:
        yield
    except BaseExceptionGroup as group:
        cancelled, rest = group.split(trio.Cancelled)
        errors = _leaves(rest) if rest is not None else []
        if not errors and cancelled is not None:
            raise _leaves(cancelled)[0] from None
        if len(errors) == 1:
            raise errors[0] from None
        raise


async def _reap(wait: Callable[[], Awaitable[object]], argv: Sequence[str]) -> None:
    """Wait for a killed command to be gone, even while being cancelled."""
    with trio.CancelScope(shield=True), trio.move_on_after(REAP_WAIT) as waited:
        await wait()
    if waited.cancelled_caught:
        log.warning("%s: still not gone %g s after SIGKILL", argv[0], REAP_WAIT)


# ------------------------------------------------------------------------ run


async def run(argv: Sequence[str], timeout: float = DEFAULT_TIMEOUT,
              secret: str | None = None, env: Mapping[str, str] | None = None,
              umask: int = -1, dies_with_daemon: bool = False,
              progress: ProgressWatch | None = None) -> str:
    """Run ``argv`` and return its standard output.

    A non-zero exit or a time-out raises BackendFailed carrying the command's
    own error message, which ends up in ``MNT/error``. ``secret`` (a password
    among the arguments) is masked wherever the command is logged or quoted.
    ``umask``: the command's (files it makes private until vsfs sets their modes).
    ``dies_with_daemon``: killed if the daemon dies first (a copy into a temporary
    file that nobody would finish). ``progress``: what tells how far it got, passed on
    to the job it runs for at least once a second; of the stream it reads, only the
    last KEEP_TAIL bytes are kept (and returned, for stdout). A watched command's
    ``timeout`` is how long it may go without progress, not how long it may take: a
    copy of terabytes takes hours, and a job can be cancelled.

    Cancelling the awaiting task kills the command (SIGKILL) and waits until it is
    gone before trio.Cancelled goes on.
    """
    def masked(text: str) -> str:
        return text.replace(secret, "********") if secret else text

    log.debug("run: %s", masked(shlex.join(argv)))
    name = argv[0]
    out = _Capture(progress if progress is not None and progress.stream == "stdout" else None)
    err = _Capture(progress if progress is not None and progress.stream == "stderr" else None)
    try:
        stalls = _stall.get()
    except LookupError:
        stalls = {}
        _stall.set(stalls)
    try:
        with trio.fail_after(timeout) as deadline, _ungrouped():
            if progress is not None:
                stalls[id(progress)] = (deadline, timeout, [progress.done])
                _report(progress)  # its total, from the start
            if dies_with_daemon:
                returncode = await _run_held(["setpriv", "--pdeathsig", "KILL", "--", *argv],
                                             command_env(env), umask, out, err, progress)
            else:
                returncode = await _run_here(list(argv), command_env(env), umask, out, err,
                                             progress)
    except trio.TooSlowError:
        what = "no progress for" if progress is not None else "no answer after"
        raise BackendFailed(f"{name}: {what} {timeout:g} s") from None
    except OSError as e:
        raise BackendFailed(f"{name}: {e.strerror}") from None
    finally:
        if progress is not None:
            stalls.pop(id(progress), None)
    if returncode != 0:
        stderr = masked(err.value().decode(errors="replace").strip())
        error = stderr or f"exit status {returncode}"
        last = error.splitlines()[-1]
        # Many tools start their messages with their own name already.
        last = last.removeprefix(f"{name}: ")
        if "No space left on device" in stderr:
            raise CommandNoSpace(f"{name}: {last}", returncode, stderr)
        raise BackendFailed(f"{name}: {last}", returncode, stderr)
    return out.value().decode(errors="replace")


async def _run_here(argv: list[str], env: dict[str, str], umask: int, out: _Capture,
                    err: _Capture, watch: ProgressWatch | None) -> int:
    """Run a command started from trio's own thread; its exit status."""
    proc = await trio.lowlevel.open_process(argv, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            env=env, umask=umask)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        await _collect(proc.stdout, proc.stderr, out, err, watch, lambda: proc.pid)
        return await proc.wait()
    finally:
        if proc.returncode is None:  # cancelled, timed out, or broken
            proc.kill()
            await _reap(proc.wait, argv)
        with trio.CancelScope(shield=True):
            await proc.stdout.aclose()
            await proc.stderr.aclose()


# The threads that wait for commands which die with the daemon: as many as there are such
# commands, apart from trio's default limiter, which request handlers share.
_HOLDERS: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("vsfs_holders")


class _Held:
    """A command that the worker thread which started it waits for (_run_held), and
    what trio's side may do to it meanwhile: kill it, whenever asked, before it even
    started (the thread kills it at once then) and never once reaped (the pidfd, where
    the kernel has them, makes even that race harmless: a reused PID is not signalled)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._pidfd: int | None = None
        self._killed = False
        self._ended = False

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return None if proc is None or self._ended else proc.pid

    def started(self, proc: subprocess.Popen[bytes]) -> None:
        """In the holding thread, once it started ``proc``."""
        with self._lock:
            self._proc = proc
            with contextlib.suppress(OSError, AttributeError):
                self._pidfd = os.pidfd_open(proc.pid)
            if self._killed:
                self._signal()

    def ended(self) -> None:
        """In the holding thread, once it reaped the command."""
        with self._lock:
            self._ended = True
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None

    def kill(self) -> None:
        with self._lock:
            self._killed = True
            if self._proc is not None and not self._ended:
                self._signal()

    def _signal(self) -> None:
        assert self._proc is not None
        with contextlib.suppress(ProcessLookupError):
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            else:
                os.kill(self._proc.pid, signal.SIGKILL)


async def _kill_when_cancelled(held: _Held) -> None:
    try:
        await trio.sleep_forever()
    finally:
        held.kill()  # nothing, once the command ended


async def _run_held(argv: list[str], env: dict[str, str], umask: int, out: _Capture,
                    err: _Capture, watch: ProgressWatch | None) -> int:
    """Run a command under ``setpriv --pdeathsig`` from a thread that waits for it.

    The parent-death signal follows the thread that started the process, not the
    daemon, and trio starts commands from worker threads that it ends after 10 s idle:
    a copy started so would be killed then, midway. The thread that starts this one
    waits for it, so it ends only with the command, or with the daemon.

    The waiting thread cannot be interrupted: a cancellation (or the time-out) kills the
    command from trio's side (_Held), and the thread, which then returns at once, is
    waited for. Output comes through pipes made here and read by trio."""
    try:
        limiter = _HOLDERS.get()
    except LookupError:
        limiter = trio.CapacityLimiter(math.inf)
        _HOLDERS.set(limiter)
    held = _Held()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    stdout, stderr = trio.lowlevel.FdStream(out_r), trio.lowlevel.FdStream(err_r)
    ran = False

    def hold() -> int:
        nonlocal ran
        ran = True
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out_w,
                                    stderr=err_w, env=env, umask=umask)
        finally:
            os.close(out_w)  # the command has them: its end is the end of the streams
            os.close(err_w)
        held.started(proc)
        try:
            return proc.wait()
        finally:
            held.ended()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_kill_when_cancelled, held)
            collected = trio.Event()

            async def collect() -> None:
                await _collect(stdout, stderr, out, err, watch, lambda: held.pid)
                collected.set()

            nursery.start_soon(collect)
            # Not cancellable (the thread holds the command): returns once it ended, by
            # itself or killed by _kill_when_cancelled.
            returncode = await trio.to_thread.run_sync(hold, limiter=limiter)
            await collected.wait()
            nursery.cancel_scope.cancel()
        return returncode
    finally:
        if not ran:  # cancelled before the thread started: the pipes' ends are ours
            os.close(out_w)
            os.close(err_w)
        stdout.close()
        stderr.close()
