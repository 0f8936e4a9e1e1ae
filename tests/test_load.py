"""A busy host: hundreds of callers at once against one dir pool, as on a real host.

400 `truncate` creators, 50 `rm`s and 8 shells looping `ls -l volumes/` and `cat free`
all start together, ten rounds in a row. Every create must land, every remove must
happen, no caller may wait more than BOUND seconds and the daemon must live. A caller
that hangs (a FUSE caller in D state cannot be killed) makes the test abort the FUSE
connection, so the suite never wedges the machine, and fail.

This is not a timed assertion: BOUND is a bound on completion (a round takes a few
seconds), there only so that a hang ends as a failure. Run it alone with
``.venv/bin/pytest tests/test_load.py`` (docs/testing.md); ``VSFS_LOAD_ROUNDS`` sets
the number of rounds.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from support import Mount, MountFactory, abort_connection, sh

pytestmark = [pytest.mark.fuse, pytest.mark.slow]

ROUNDS = int(os.environ.get("VSFS_LOAD_ROUNDS", "10"))
CREATORS = 400
REMOVERS = 50
LOOPERS = 8
BOUND = 60.0


def _stack(pid: int | str) -> str:
    try:
        lines = Path(f"/proc/{pid}/stack").read_text().splitlines()[:4]
    except OSError:
        return "?"
    return " < ".join(s.split()[-1] for s in lines if s)


def _stacks(procs: list[subprocess.Popen[bytes]], daemon: int) -> str:
    """Where the callers still running wait in the kernel, and the daemon's threads
    (for the failure message)."""
    out = [f"daemon thread {t}: {_stack(f'{daemon}/task/{t}')}"
           for t in sorted(os.listdir(f"/proc/{daemon}/task"))]
    for p in procs:
        if p.poll() is None:
            out.append(f"{p.args!r}: {_stack(p.pid)}")
            for child in Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split():
                out.append(f"  its child {child}: {_stack(child)}")
    return "\n".join(out[:40])


def _round(m: Mount, target: Path, r: int) -> None:
    pool = m.path / "pools" / "lp"
    vols = pool / "volumes"
    # What the removers remove: made through the mount, as a user would.
    doomed = [f"d{r}-{i}" for i in range(REMOVERS)]
    sh(" && ".join(f"truncate -s 4K {vols}/{n}" for n in doomed), check=True)
    made = [f"c{r}-{i}" for i in range(CREATORS)]
    stop = m.base / f"stop-{r}"
    loop = (f"while [ ! -e {stop} ]; do ls -l {vols} >/dev/null; cat {pool}/free >/dev/null;"
            " done")
    start = time.monotonic()
    loopers = [subprocess.Popen(["bash", "-c", loop], stderr=subprocess.PIPE)
               for _ in range(LOOPERS)]
    workers = [subprocess.Popen(["truncate", "-s", "1M", str(vols / n)],
                                stderr=subprocess.PIPE) for n in made]
    workers += [subprocess.Popen(["rm", str(vols / n)], stderr=subprocess.PIPE)
                for n in doomed]
    everyone = loopers + workers
    try:
        for p in workers:
            p.wait(timeout=max(0.1, BOUND - (time.monotonic() - start)))
        stop.touch()
        for p in loopers:
            p.wait(timeout=max(0.1, BOUND - (time.monotonic() - start)))
    except subprocess.TimeoutExpired:
        assert m.proc is not None
        stuck = _stacks(everyone, m.proc.pid)
        abort_connection(m.path)
        for p in everyone:
            p.kill()
        for p in everyone:
            p.wait(timeout=30)
        pytest.fail(f"round {r}: callers still waiting after {BOUND:g} s; the FUSE "
                    f"connection was aborted. Where they waited:\n{stuck}")
    errors = []
    for p in workers:
        err = p.stderr.read().decode() if p.stderr is not None else ""
        if p.returncode != 0:
            errors.append(f"{p.args!r} exited {p.returncode}: {err.strip()}")
    for p in loopers:
        err = p.stderr.read().decode() if p.stderr is not None else ""
        # A volume removed between the listing and the look at it is fine; nothing else.
        bad = [ln for ln in err.splitlines() if "No such file or directory" not in ln]
        if bad:
            errors.append(f"a listing loop said: {bad[:3]}")
    for p in everyone:
        if p.stderr is not None:
            p.stderr.close()
    assert not errors, f"round {r}:\n" + "\n".join(errors[:10])
    assert m.proc is not None and m.proc.poll() is None, "the daemon died"
    on_disk = set(os.listdir(target))
    listed = set(os.listdir(vols))
    for n in made:
        assert n in on_disk and n in listed, f"round {r}: {n} did not land"
        assert os.path.getsize(target / n) == 1 << 20
    for n in doomed:
        assert n not in on_disk and n not in listed, f"round {r}: {n} was not removed"


def test_busy_host(mount_factory: MountFactory) -> None:
    m = mount_factory()
    target = m.dir_pool("lp")
    for r in range(ROUNDS):
        _round(m, target, r)
        # Each round starts from an empty pool: the listings stay the same size.
        sh(f"rm {target}/c{r}-*", check=True)
        sh(f"echo refresh > {m.path}/pools/lp/ctl", check=True)
