"""vsfs.proc.run: the one way commands run."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from test_progress import as_job
from trio._core import _thread_cache

from vsfs.errors import BackendFailed, Canceled, CommandNoSpace
from vsfs.jobs import Jobs, JobState
from vsfs.proc import KEEP_TAIL, Growth, QemuImgProgress, run


@pytest.fixture
def german(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The daemon's environment on a host set up in German: a locale this test makes
    (localedef, from Debian's locales package) and LANG naming it."""
    locales = tmp_path / "locales"
    locales.mkdir()
    subprocess.run(["localedef", "-i", "de_DE", "-f", "UTF-8", str(locales / "de_DE.UTF-8")],
                   check=True, capture_output=True)
    env = {"LOCPATH": str(locales), "LANG": "de_DE.UTF-8", "LANGUAGE": "de"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("LC_ALL", raising=False)
    monkeypatch.delenv("LC_MESSAGES", raising=False)
    return env


async def test_commands_fail_in_english_whatever_the_locale(tmp_path: Path,
                                                            german: dict[str, str]) -> None:
    src = tmp_path / "data"
    src.write_bytes(b"x" * 65536)
    # The host really speaks German: the same command run as the user would is not English.
    said = subprocess.run(["cp", str(src), "/dev/full"], capture_output=True, text=True,
                          env=os.environ.copy(), check=False).stderr
    assert "No space left on device" not in said and said.strip(), said

    with pytest.raises(CommandNoSpace) as e:
        await run(["cp", str(src), "/dev/full"])
    assert e.value.errno == 28  # ENOSPC, not EIO
    assert "No space left on device" in e.value.message


async def test_a_command_that_dies_with_the_daemon_outlives_the_thread_that_started_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The parent-death signal (setpriv --pdeathsig) follows the thread that started the
    command, and trio starts commands from worker threads that it ends once idle (after
    10 s; 0.2 s here): a long copy must not be killed midway when that thread goes."""
    monkeypatch.setattr(_thread_cache, "IDLE_TIMEOUT", 0.2)
    await run(["sleep", "1.5"], dies_with_daemon=True)


MiB = 1 << 20
HOW = pytest.mark.parametrize("held", [False, True], ids=["here", "held"])


async def started(pidfile: Path) -> int:
    """The PID a command wrote (``echo $$ > FILE; exec ...``), once it did."""
    with trio.fail_after(10):
        while True:
            with contextlib.suppress(FileNotFoundError, ValueError):
                text = pidfile.read_text()
                if text.endswith("\n"):
                    return int(text)
            await trio.sleep(0.01)


def gone(pid: int) -> bool:
    """Dead and reaped: a zombie still has its /proc entry."""
    return not os.path.exists(f"/proc/{pid}")


@HOW
async def test_a_cancelled_command_is_killed_and_reaped_within_a_second(tmp_path: Path,
                                                                        held: bool) -> None:
    pidfile = tmp_path / "pid"
    caught: list[BaseException] = []
    scope = trio.CancelScope()

    async def victim() -> None:
        with scope:
            try:
                await run(["sh", "-c", f"echo $$ > {pidfile}; exec sleep 30"],
                          dies_with_daemon=held)
            except BaseException as e:
                caught.append(e)
                raise

    async with trio.open_nursery() as nursery:
        nursery.start_soon(victim)
        pid = await started(pidfile)
        assert not gone(pid)
        t0 = trio.current_time()
        scope.cancel()
    assert trio.current_time() - t0 < 1.0
    assert gone(pid)
    # trio.Cancelled itself, not a group of them: callers' `except` clauses see it.
    assert [type(e) for e in caught] == [trio.Cancelled]


@HOW
async def test_a_command_cancelled_before_it_starts_never_runs(tmp_path: Path,
                                                               held: bool) -> None:
    marker = tmp_path / "ran"
    fds = len(os.listdir("/proc/self/fd"))
    with trio.CancelScope() as scope:
        scope.cancel()
        await run(["touch", str(marker)], dies_with_daemon=held)
    assert scope.cancelled_caught
    await trio.sleep(0.3)
    assert not marker.exists()
    assert len(os.listdir("/proc/self/fd")) == fds  # the pipes made for it are closed


@HOW
async def test_a_job_cancel_stops_its_command(tmp_path: Path, held: bool) -> None:
    """What MNT/jobs/ID/ctl's cancel does: the job's scope is cancelled, the command is
    killed, the writer gets ECANCELED, within a second."""
    pidfile = tmp_path / "pid"
    board = Jobs(lambda change: None)
    job = board.begin("clone p/a -> p/b", "cloned", [(("p", "b"), True)])

    async def canceller() -> None:
        pid = await started(pidfile)
        job.cancel()
        await job.ended.wait()
        assert gone(pid)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(canceller)
        t0 = trio.current_time()
        with pytest.raises(Canceled):
            async with board.run(job):
                await run(["sh", "-c", f"echo $$ > {pidfile}; exec sleep 30"],
                          dies_with_daemon=held, progress=Growth(str(pidfile), 0))
        assert trio.current_time() - t0 < 2.0
    assert job.state is JobState.CANCELLED


@HOW
async def test_a_time_out_kills_the_command(tmp_path: Path, held: bool) -> None:
    pidfile = tmp_path / "pid"
    t0 = trio.current_time()
    with pytest.raises(BackendFailed, match=r"sh: no answer after 0\.5 s"):
        await run(["sh", "-c", f"echo $$ > {pidfile}; exec sleep 30"], timeout=0.5,
                  dies_with_daemon=held)
    assert trio.current_time() - t0 < 1.5
    assert gone(await started(pidfile))


@HOW
async def test_a_watched_command_times_out_only_when_it_stalls(held: bool) -> None:
    """A watched copy may take longer than its time-out, as long as it moves (terabytes
    take hours); one that stops moving for the time-out is killed."""
    moving = "for p in 10 20 30 40 50 60; do printf '    (%s.00/100%%)\\r' $p; sleep 0.3; done"
    stuck = "printf '    (10.00/100%%)\\r'; exec sleep 30"
    t0 = trio.current_time()
    await run(["sh", "-c", moving], timeout=1.0, dies_with_daemon=held,
              progress=QemuImgProgress(100 * MiB))
    assert trio.current_time() - t0 > 1.5  # longer than the time-out: it moved
    t0 = trio.current_time()
    with pytest.raises(BackendFailed, match=r"sh: no progress for 1 s"):
        await run(["sh", "-c", stuck], timeout=1.0, dies_with_daemon=held,
                  progress=QemuImgProgress(100 * MiB))
    assert trio.current_time() - t0 < 2.5


@HOW
async def test_failures_come_through_as_before(held: bool) -> None:
    with pytest.raises(CommandNoSpace):
        await run(["sh", "-c", "head -c 65536 /dev/zero > /dev/full"], dies_with_daemon=held)
    with pytest.raises(BackendFailed, match="sh: oops"):
        await run(["sh", "-c", "echo partial; echo oops >&2; exit 3"], dies_with_daemon=held)
    with pytest.raises(BackendFailed, match="No such file or directory"):
        await run(["/nonexistent/command"], dies_with_daemon=held)
    assert await run(["printf", "a\\nb"], dies_with_daemon=held) == "a\nb"


@HOW
async def test_progress_reaches_the_job_while_the_command_runs(held: bool) -> None:
    """Lines the command prints reach MNT/jobs/ID/progress as they come, not at its end."""
    total = 100 * MiB
    script = "for p in 10 20 30; do printf '    (%s.00/100%%)\\r' $p; sleep 0.3; done"
    job, _, seen = await as_job(lambda: run(["sh", "-c", script], dies_with_daemon=held,
                                            progress=QemuImgProgress(total)))
    for percent in (10, 20, 30):
        assert (total * percent // 100, total) in seen
    assert job.state is JobState.DONE


async def test_growth_is_looked_at_every_half_second(tmp_path: Path) -> None:
    """A command that says nothing: its file's size, while it grows."""
    out = tmp_path / "copy"
    script = f"for i in 1 2 3 4; do head -c 1048576 /dev/zero >> {out}; sleep 0.4; done"
    _, _, seen = await as_job(lambda: run(["sh", "-c", script],
                                          progress=Growth(str(out), 4 * MiB),
                                          dies_with_daemon=True))
    assert len({done for done, _ in seen} & {MiB, 2 * MiB, 3 * MiB}) >= 2, seen


async def test_a_watched_stream_is_not_kept_whole() -> None:
    """Progress lines can be many (a 100 GiB copy): only the stream's end is kept."""
    make = "print(''.join(f'    ({i // 200}.00/100%)\\r' for i in range(20000)), end='')"
    watch = QemuImgProgress(100 * MiB)
    out = await run([sys.executable, "-c", make], progress=watch)
    assert len(out) <= 2 * KEEP_TAIL
    assert out.endswith("    (99.00/100%)\r")
    assert watch.done == 99 * MiB


async def test_qemu_img_convert_reports_its_progress(tmp_path: Path) -> None:
    """The real thing: `qemu-img convert -p`, as the backends run it."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    with src.open("wb") as f:
        f.write(os.urandom(MiB) * 32)
    watch = QemuImgProgress(32 * MiB)
    out = await run(["qemu-img", "convert", "-p", "-f", "raw", "-O", "qcow2", str(src),
                     str(dst)], dies_with_daemon=True, progress=watch)
    assert "(100.00/100%)" in out
    assert watch.done == 32 * MiB
