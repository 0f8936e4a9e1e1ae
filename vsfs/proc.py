"""The one way vsfs runs an outside command."""

from __future__ import annotations

import logging
import math
import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence

import trio

from .errors import BackendFailed, CommandNoSpace

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 120.0


def command_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a command: ``env`` (or the daemon's own) in the C locale.

    vsfs tells failures apart by what commands say ("No space left on device"), and
    that must not depend on the host's language; libvirt runs its children the same way.
    """
    out = dict(os.environ if env is None else env)
    out["LC_ALL"] = "C"
    out.pop("LANGUAGE", None)
    return out


async def run(argv: Sequence[str], timeout: float = DEFAULT_TIMEOUT,
              secret: str | None = None, env: Mapping[str, str] | None = None,
              umask: int = -1, dies_with_daemon: bool = False) -> str:
    """Run ``argv`` and return its standard output.

    A non-zero exit or a time-out raises BackendFailed carrying the command's
    own error message, which ends up in ``MNT/error``. ``secret`` (a password
    among the arguments) is masked wherever the command is logged or quoted.
    ``umask``: the command's (files it makes private until vsfs sets their modes).
    ``dies_with_daemon``: killed if the daemon dies first (a copy into a temporary
    file that nobody would finish).
    """
    def masked(text: str) -> str:
        return text.replace(secret, "********") if secret else text

    log.debug("run: %s", masked(shlex.join(argv)))
    name = argv[0]
    try:
        if dies_with_daemon:
            result = await _run_held(["setpriv", "--pdeathsig", "KILL", "--", *argv],
                                     timeout, command_env(env), umask)
        else:
            with trio.fail_after(timeout):
                result = await trio.run_process(
                    list(argv), capture_stdout=True, capture_stderr=True, check=False,
                    stdin=subprocess.DEVNULL, env=command_env(env), umask=umask,
                )
    except (trio.TooSlowError, subprocess.TimeoutExpired):
        raise BackendFailed(f"{name}: no answer after {timeout:g} s") from None
    except OSError as e:
        raise BackendFailed(f"{name}: {e.strerror}") from None
    if result.returncode != 0:
        stderr = masked(result.stderr.decode(errors="replace").strip())
        err = stderr or f"exit status {result.returncode}"
        last = err.splitlines()[-1]
        # Many tools start their messages with their own name already.
        last = last.removeprefix(f"{name}: ")
        if "No space left on device" in stderr:
            raise CommandNoSpace(f"{name}: {last}", result.returncode, stderr)
        raise BackendFailed(f"{name}: {last}", result.returncode, stderr)
    return result.stdout.decode(errors="replace")


# The threads that wait for commands which die with the daemon: as many as there are such
# commands, apart from trio's default limiter, which request handlers share.
_HOLDERS: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("vsfs_holders")


async def _run_held(argv: list[str], timeout: float, env: dict[str, str],
                    umask: int) -> subprocess.CompletedProcess[bytes]:
    """Run a command under ``setpriv --pdeathsig`` from a thread that waits for it.

    The parent-death signal follows the thread that started the process, not the
    daemon, and trio starts commands from worker threads that it ends after 10 s idle:
    a copy started so would be killed then, midway. The thread that starts this one
    waits for it, so it ends only with the command, or with the daemon. A trio
    cancellation waits for the command to end (no caller cancels one now; a job's
    cancel would have to kill it)."""
    try:
        limiter = _HOLDERS.get()
    except LookupError:
        limiter = trio.CapacityLimiter(math.inf)
        _HOLDERS.set(limiter)
    return await trio.to_thread.run_sync(
        lambda: subprocess.run(argv, capture_output=True, stdin=subprocess.DEVNULL,
                               env=env, umask=umask, timeout=timeout, check=False),
        limiter=limiter)
