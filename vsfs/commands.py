"""The command languages of the ``ctl`` files: what a line written to one means.

    pools/P/ctl          start | stop | refresh | delete | build [--overwrite|--no-overwrite]
    pools/P/volinfo/V/ctl  delete | wipe [zero] | shrink SIZE | clone NEW [POOL] | snapshot NEW
    jobs/N/ctl           cancel
    pools/P/autostart    yes | no (also 1/0, true/false, on/off)

A line is split into words as a shell splits them (quote a name with spaces), checked
against its language, and handed to one public ``Manager`` action, which keeps every
rule. Nothing here touches a pool: a line that does not parse is EINVAL before any
action starts. docs/reference.md lists the same verbs.
"""

from __future__ import annotations

import shlex
from collections.abc import Awaitable, Callable

from .errors import Invalid
from .jobs import Job
from .manager import Manager
from .units import parse_size

POOL_VERBS = "start, stop, build, refresh or delete"
VOLUME_VERBS = "wipe, clone NEW [POOL], snapshot NEW, shrink SIZE or delete"


def words(line: str) -> list[str]:
    """A ctl line's words, quoted as in a shell: clone 'my disk' 'other pool'."""
    try:
        return shlex.split(line)
    except ValueError as e:
        raise Invalid(f"cannot split {line.strip()!r} into words: {e}") from None


def parse_bool(text: str) -> bool:
    """An ``autostart`` value."""
    value = text.strip().lower()
    if value in ("yes", "1", "true", "on"):
        return True
    if value in ("no", "0", "false", "off"):
        return False
    raise Invalid(f"expected yes or no, not {text.strip()!r}")


def build_overwrite(args: list[str]) -> bool:
    """``build``'s options: whether it may overwrite what a device holds (the last
    of --overwrite and --no-overwrite wins, as with virsh)."""
    overwrite = False
    for arg in args:
        if arg == "--overwrite":
            overwrite = True
        elif arg == "--no-overwrite":
            overwrite = False
        else:
            raise Invalid(f"unknown build option {arg!r}; expected --overwrite or "
                          "--no-overwrite")
    return overwrite


async def pool_command(m: Manager, name: str, line: str) -> None:
    """Carry out one line written to ``pools/NAME/ctl``."""
    said = words(line)
    if not said:
        raise Invalid(f"empty command; expected {POOL_VERBS}")
    cmd, args = said[0], said[1:]
    if cmd == "build":
        await m.build_pool(name, build_overwrite(args))
        return
    plain: dict[str, Callable[[str], Awaitable[None]]] = {
        "start": m.start_pool,
        "stop": m.stop_pool,
        "refresh": m.refresh_pool,
        "delete": m.delete_pool,
    }
    action = plain.get(cmd)
    if action is None:
        raise Invalid(f"unknown command {cmd!r}; expected {POOL_VERBS}")
    if args:
        raise Invalid(f"{cmd!r} takes no arguments")
    await action(name)


async def volume_command(m: Manager, pool: str, name: str, line: str) -> None:
    """Carry out one line written to ``pools/POOL/volinfo/NAME/ctl``."""
    said = words(line)
    if not said:
        raise Invalid(f"empty command; expected {VOLUME_VERBS}")
    cmd, args = said[0], said[1:]
    if cmd == "delete" and not args:
        await m.delete_volume(pool, name)
    elif cmd == "wipe" and args in ([], ["zero"]):
        await m.wipe_volume(pool, name)
    elif cmd == "shrink" and len(args) == 1:
        await m.shrink_volume(pool, name, parse_size(args[0]))
    elif cmd == "clone" and len(args) in (1, 2):
        await m.clone_volume(pool, name, args[1] if len(args) == 2 else pool, args[0])
    elif cmd == "snapshot" and len(args) == 1:
        await m.snapshot_volume(pool, name, args[0])
    elif cmd in ("delete", "wipe", "clone", "snapshot", "shrink"):
        raise Invalid(f"bad arguments for {cmd!r}; expected {VOLUME_VERBS}")
    else:
        raise Invalid(f"unknown command {cmd!r}; expected {VOLUME_VERBS}")


def job_command(job: Job, line: str) -> None:
    """Carry out one line written to ``jobs/N/ctl``: only ``cancel``."""
    if words(line) != ["cancel"]:
        raise Invalid("expected cancel")
    if not job.cancel():
        raise Invalid(f"job {job.id} has ended already ({job.state.value})")
