"""The request loop of the pyfuse3 vsfs runs on (.ci/patches/pyfuse3-fast-loop.patch).

The patch serves a request whose handler does not wait in the reading task and
reads the next one at once; only a handler that waits gets another task to read
meanwhile. These tests mount tests/loopfs.py, a tiny filesystem whose handlers
wait on each other, and read it with readlink and ls: if a waiting handler held
up the loop, or a lock could not pass between handlers, they would time out or
the filesystem would die. On the stock pyfuse3 (.venv-stock) they check the same
properties of pyfuse3's own loop.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyfuse3
import pytest

from vsfs import fuse_ops

LOOPFS = Path(__file__).with_name("loopfs.py")
TIMEOUT = 60  # seconds for any one command; loopfs's handlers give up after 20


class LoopMount:
    def __init__(self, path: Path, proc: subprocess.Popen[bytes]) -> None:
        self.path = path
        self.proc = proc

    def readlink(self, name: str) -> subprocess.Popen[str]:
        return subprocess.Popen(["readlink", str(self.path / name)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)


def answer(proc: subprocess.Popen[str]) -> str:
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err
    return out.strip()


@pytest.fixture
def loopfs(tmp_path: Path) -> Iterator[LoopMount]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    err = open(tmp_path / "stderr", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([sys.executable, str(LOOPFS), str(mnt)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 20
        while not os.path.ismount(mnt):
            assert proc.poll() is None, f"loopfs exited {proc.returncode}"
            assert time.monotonic() < deadline, "loopfs did not mount within 20 s"
            time.sleep(0.02)
        yield LoopMount(mnt, proc)
        assert proc.poll() is None, "loopfs died"
    finally:
        if os.path.ismount(mnt):
            res = subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
            if res.returncode != 0:
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        err.close()
    log = (tmp_path / "stderr").read_text(errors="replace")
    assert "Traceback" not in log, log
    assert rc == 0, log


@pytest.mark.fuse
def test_waiting_handler_does_not_hold_up_others(loopfs: LoopMount) -> None:
    slow = loopfs.readlink("slow")
    time.sleep(0.2)  # so that "slow" is waiting in its handler before "fast" comes
    assert answer(loopfs.readlink("fast")) == "fast"
    assert answer(slow) == "slow"


@pytest.mark.fuse
def test_handlers_wait_together(loopfs: LoopMount) -> None:
    # Each of the five waits until all five are in: one task per waiting handler.
    readers = [loopfs.readlink("gate") for _ in range(5)]
    assert [answer(r) for r in readers] == ["open"] * 5


@pytest.mark.fuse
def test_lock_passes_between_handlers(loopfs: LoopMount) -> None:
    hold = loopfs.readlink("hold")
    time.sleep(0.2)
    # "take" parks on the lock "hold" has, and is handed it when "hold" lets go.
    assert answer(loopfs.readlink("take")) == "taken"
    assert answer(hold) == "held"


@pytest.mark.fuse
def test_requests_in_a_row(loopfs: LoopMount) -> None:
    # Served back to back by one task without waiting for the descriptor.
    for _ in range(3):
        # (The named links wait in their handlers: only the numbered ones are listed.)
        res = subprocess.run(["bash", "-c", 'ls -l "$1"/n*', "x", str(loopfs.path)],
                             capture_output=True, text=True, timeout=TIMEOUT, check=True)
        links = [line.split(" -> ") for line in res.stdout.splitlines() if " -> " in line]
        numbered = {Path(line[0].split()[-1]).name: line[1] for line in links}
        assert numbered == {f"n{i:03d}": f"/t/n{i:03d}" for i in range(200)}


@pytest.mark.fuse
def test_parallel_readers(loopfs: LoopMount) -> None:
    script = 'for i in $(seq -w 0 199); do readlink "${1}n$i" & done; wait'
    res = subprocess.run(["bash", "-c", script, "x", f"{loopfs.path}/"], capture_output=True,
                         text=True, timeout=TIMEOUT, check=True)
    assert sorted(res.stdout.split()) == [f"/t/n{i:03d}" for i in range(200)]


def test_read_spin_is_set_on_either_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """vsfs's set_read_spin hands pyfuse3 the spin in nanoseconds, and none when the
    daemon may use only one CPU (polling there would keep the client from running).
    On a pyfuse3 without set_read_spin (stock, and .ci/patches since the read-spin patch
    was dropped: docs/performance.md, "pyfuse3 builds") it does nothing and does not fail."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    setter = getattr(pyfuse3, "set_read_spin", None)
    if setter is None:
        fuse_ops.set_read_spin(50)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {1})
        fuse_ops.set_read_spin(50)
        assert not hasattr(pyfuse3, "set_read_spin")
        return
    set_to: list[int] = []

    def record(nanoseconds: int) -> None:
        set_to.append(nanoseconds)
        setter(nanoseconds)  # the patched build's own setter: it must take the value

    monkeypatch.setattr(pyfuse3, "set_read_spin", record)
    fuse_ops.set_read_spin(50)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {1})
    fuse_ops.set_read_spin(50)
    assert set_to == [50_000, 0]
    with pytest.raises(ValueError):
        setter(-1)
