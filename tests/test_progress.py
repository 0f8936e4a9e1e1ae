"""How far a copy got: vsfs.proc's parsers of the commands' own progress output, on
what the commands really printed (tests/data/progress/, recorded here), and the looks
at a running command (rchar of /proc/PID/io, a file's size)."""

from __future__ import annotations

import os
import random
import re
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import trio

from vsfs import proc
from vsfs.backends.dir import DirBackend
from vsfs.errors import Canceled
from vsfs.jobs import Job, Jobs, JobState
from vsfs.model import PoolDef, VolumeDef
from vsfs.proc import (
    MAX_LINE,
    BlkdiscardProgress,
    DdProgress,
    Growth,
    ProgressWatch,
    QemuImgProgress,
    RbdProgress,
)

DATA = Path(__file__).parent / "data" / "progress"
T = TypeVar("T")
MiB = 1 << 20


def recorded(name: str) -> bytes:
    return (DATA / name).read_bytes()


def pieces(data: bytes, how: str) -> Iterator[bytes]:
    """``data`` as a pipe may hand it over: at once, line by line, byte by byte, in
    random cuts."""
    if how == "whole":
        yield data
    elif how == "lines":
        yield from re.findall(rb"[^\r\n]*[\r\n]|[^\r\n]+$", data)
    elif how == "bytes":
        yield from (data[i:i + 1] for i in range(len(data)))
    else:
        rng = random.Random(how)
        i = 0
        while i < len(data):
            n = rng.randint(1, 40)
            yield data[i:i + n]
            i += n


async def as_job(body: Callable[[], Awaitable[T]]) -> tuple[Job, T, list[tuple[int, int]]]:
    """Await ``body`` as a job (vsfs.jobs), as the manager runs a long operation: the
    job, what the body returned, and the job's (done, total) every 20 ms meanwhile."""
    board = Jobs(lambda change: None)
    job = board.begin("copy", "copied", [])
    seen: list[tuple[int, int]] = []

    async def sample() -> None:
        while True:
            seen.append((job.done, job.total))
            await trio.sleep(0.02)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample)
        async with board.run(job):
            result = await body()
        nursery.cancel_scope.cancel()
    return job, result, seen


def trace(watch: ProgressWatch, data: bytes, how: str = "lines") -> list[int]:
    """``done`` after each piece, repeats left out."""
    seen: list[int] = []
    for piece in pieces(data, how):
        watch.feed(piece)
        if not seen or seen[-1] != watch.done:
            seen.append(watch.done)
    return seen


# (recording, watch, what done ends at, some values done passes on the way)
RECORDED: list[tuple[str, Callable[[], ProgressWatch], int, list[int]]] = [
    ("qemu-img-convert-p.stdout", lambda: QemuImgProgress(300 * MiB), 300 * MiB,
     [int(300 * MiB * 1.33 / 100), int(300 * MiB * 50.67 / 100)]),
    ("qemu-img-convert-p-fails.stdout", lambda: QemuImgProgress(300 * MiB), 0, []),
    ("dd-status-progress.stderr", lambda: DdProgress(2048 * MiB), 2048 * MiB,
     [533725184, 846200832, 2057306112]),
    # dd's total is unknown to it: what it copied is all there is.
    ("dd-status-progress.stderr", lambda: DdProgress(0), 2048 * MiB, [533725184]),
    ("blkdiscard-zeroout-step-v.stdout", lambda: BlkdiscardProgress(3 << 30), 3 << 30,
     [140488704, 140488704 + 142417920, 2968207360 + 204783616]),
    ("rbd-cp.stderr", lambda: RbdProgress(300 * MiB), 300 * MiB,
     [300 * MiB // 100, 300 * MiB * 50 // 100, 300 * MiB * 98 // 100]),
    ("rbd-import.stderr", lambda: RbdProgress(300 * MiB), 300 * MiB, [300 * MiB * 4 // 100]),
    ("rbd-cp-exists.stderr", lambda: RbdProgress(300 * MiB), 0, []),
]


@pytest.mark.parametrize(("name", "make", "end", "passes"), RECORDED,
                         ids=[f"{r[0]}-{i}" for i, r in enumerate(RECORDED)])
def test_recorded_output(name: str, make: Callable[[], ProgressWatch], end: int,
                         passes: list[int]) -> None:
    watch = make()
    steps = trace(watch, recorded(name), "lines")
    assert watch.done == end
    assert steps == sorted(steps), "progress went back"
    for value in passes:
        assert value in steps
    if watch.total:
        assert max(steps) <= watch.total
    # However the pipe cuts it, the same end, by the same steps.
    for how in ("whole", "bytes", "cuts"):
        other = make()
        assert set(trace(other, recorded(name), how)) <= {0, *steps}
        assert other.done == end


def test_recorded_progress_moves_often() -> None:
    """A line at each percent or second: many steps, not one at the end."""
    assert len(trace(QemuImgProgress(300 * MiB), recorded("qemu-img-convert-p.stdout"))) > 50
    assert len(trace(RbdProgress(300 * MiB), recorded("rbd-cp.stderr"))) > 50
    assert len(trace(DdProgress(2048 * MiB), recorded("dd-status-progress.stderr"))) >= 6
    assert len(trace(BlkdiscardProgress(3 << 30),
                     recorded("blkdiscard-zeroout-step-v.stdout"))) >= 20


TOTAL = 1000 * MiB
LONG = b"x" * (MAX_LINE + 10)

# (watch, its stream's bytes, what done is after them)
LINES: list[tuple[Callable[[], ProgressWatch], bytes, int]] = [
    # qemu-img
    (lambda: QemuImgProgress(TOTAL), b"    (25.00/100%)\r", TOTAL // 4),
    (lambda: QemuImgProgress(TOTAL), b"    (25.00/100%)", 0),  # not ended yet
    (lambda: QemuImgProgress(TOTAL), b"    (100.00/100%)\r\n", TOTAL),
    (lambda: QemuImgProgress(TOTAL), b"    (50.00/100%)\r    (10.00/100%)\r", TOTAL // 2),
    (lambda: QemuImgProgress(TOTAL), b"    (150.00/100%)\r", 0),
    (lambda: QemuImgProgress(TOTAL), b"    (abc/100%)\r(12/10%)\r12.5%\r", 0),
    (lambda: QemuImgProgress(TOTAL), b"qemu-img: Could not open 'x': No such file\n", 0),
    (lambda: QemuImgProgress(TOTAL), b"\xff\xfe(\x00\r\r\n\n", 0),
    (lambda: QemuImgProgress(0), b"    (50.00/100%)\r", 0),  # no total: no bytes
    # A line too long to be one of progress is skipped whole, its end too.
    (lambda: QemuImgProgress(TOTAL), LONG + b" (30.00/100%)\r    (20.00/100%)\r", TOTAL // 5),
    # dd
    (lambda: DdProgress(TOTAL), b"\r5242880 bytes (5.2 MB, 5.0 MiB) copied, 1 s, 5 MB/s", 0),
    (lambda: DdProgress(TOTAL), b"\r5242880 bytes (5.2 MB, 5.0 MiB) copied, 1 s, 5 MB/s\r",
     5242880),
    (lambda: DdProgress(TOTAL), b"2+0 records in\n2+0 records out\n", 0),
    (lambda: DdProgress(TOTAL), b"dd: error writing '/dev/x': No space left on device\n", 0),
    (lambda: DdProgress(TOTAL), b"bytes copied\r-5 bytes copied\r12 kbytes copied\r", 0),
    (lambda: DdProgress(TOTAL), b"%d bytes (x) copied\r" % (TOTAL * 2), TOTAL),  # capped
    # rbd
    (lambda: RbdProgress(TOTAL), b"\rImage copy: 7% complete...", 0),
    (lambda: RbdProgress(TOTAL), b"\rImage copy: 7% complete...\r", TOTAL * 7 // 100),
    (lambda: RbdProgress(TOTAL), b"\rImage copy: 100% complete...done.\n", TOTAL),
    (lambda: RbdProgress(TOTAL), b"\rImage copy: 7% complete...failed.\n", TOTAL * 7 // 100),
    (lambda: RbdProgress(TOTAL), b"\rImage copy: 700% complete...\r", 0),
    (lambda: RbdProgress(TOTAL), b"\rImage copy: x% complete...\rrbd: copy failed\n", 0),
    (lambda: RbdProgress(TOTAL), b"2026-12-02T14:19 -1 librbd: 5% complete... no\n", 0),
    # blkdiscard
    (lambda: BlkdiscardProgress(TOTAL),
     b"/dev/sdb: Zero-filled 1048576 bytes from the offset 2097152\n", 3 * MiB),
    (lambda: BlkdiscardProgress(TOTAL),
     b"/dev/sdb: Discarded 1048576 bytes from the offset 0\n", MiB),
    (lambda: BlkdiscardProgress(TOTAL),
     b"/dev/sdb: Zero-filled 1048576 bytes from the offset 2097152 and\n", 0),
    (lambda: BlkdiscardProgress(TOTAL), b"blkdiscard: /dev/sdb: BLKZEROOUT ioctl failed\n", 0),
    (lambda: BlkdiscardProgress(TOTAL),
     b"/dev/sdb: Zero-filled 1048576 bytes from the offset 2097152", 0),  # not ended yet
]


@pytest.mark.parametrize(("make", "data", "done"), LINES, ids=[repr(x[1][:40]) for x in LINES])
def test_lines(make: Callable[[], ProgressWatch], data: bytes, done: int) -> None:
    watch = make()
    watch.feed(data)
    assert watch.done == done


def test_an_endless_line_is_not_kept() -> None:
    """Output without a line end (a command gone wrong) is not gathered up in memory."""
    watch = DdProgress(TOTAL)
    for _ in range(1000):
        watch.feed(b"1" * 10000)
    assert len(watch._partial) <= MAX_LINE
    watch.feed(b" bytes copied\r7 bytes copied\r")
    assert watch.done == 7  # the endless line's end was not taken for a number


def test_qemu_img_between_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Between two whole percents (a GiB of 100 GiB), what qemu-img has read moves done
    on, never as far as the next percent, which qemu-img says itself."""
    total = 100 << 30
    reads = iter([5 << 30, 5 << 30, (5 << 30) + 300 * MiB, (5 << 30) + 900 * MiB,
                  (5 << 30) + (5 << 30), (7 << 30), (7 << 30) + 200 * MiB])
    monkeypatch.setattr(proc, "read_chars", lambda pid: next(reads))
    watch = QemuImgProgress(total)
    watch.feed(b"    (0.00/100%)\r    (1.00/100%)\r")
    step = total // 100
    assert watch.done == step
    watch.poll(1)  # the first look after a step: where reading stands
    assert watch.done == step
    watch.poll(1)
    assert watch.done == step  # nothing read since
    watch.poll(1)
    assert watch.done == step + 300 * MiB
    watch.poll(1)
    assert watch.done == step + 900 * MiB
    watch.poll(1)
    assert watch.done == 2 * step - 1  # not past the next step
    watch.feed(b"    (2.00/100%)\r")
    assert watch.done == 2 * step
    watch.poll(1)  # a new step: reading counted from here
    assert watch.done == 2 * step
    watch.poll(1)
    assert watch.done == 2 * step + 200 * MiB


def test_qemu_img_poll_without_proc_io(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proc, "read_chars", lambda pid: None)
    watch = QemuImgProgress(TOTAL)
    watch.feed(b"    (3.00/100%)\r")
    watch.poll(1)
    watch.poll(1)
    assert watch.done == TOTAL * 3 // 100


def test_read_chars_of_a_process() -> None:
    here = proc.read_chars(os.getpid())
    assert here is not None and here > 0
    assert proc.read_chars(2 ** 22 + 12345) is None  # no such process


def test_growth(tmp_path: Path) -> None:
    path = tmp_path / "copy"
    watch = Growth(str(path), 10 * MiB)
    assert watch.polls()  # it looks, every POLL_EVERY
    watch.poll(1)
    assert watch.done == 0  # not made yet
    path.write_bytes(b"\0" * MiB)
    watch.poll(1)
    assert watch.done == MiB
    with path.open("r+b") as f:
        f.truncate(20 * MiB)
    watch.poll(1)
    assert watch.done == 10 * MiB  # never past the total
    path.unlink()
    watch.poll(1)
    assert watch.done == 10 * MiB  # never back


def test_a_total_alone() -> None:
    """A command that says nothing (one call, one ioctl): 0 of its total until it ends."""
    watch = ProgressWatch(TOTAL)
    watch.feed(b"anything\n")
    watch.poll(1)
    assert (watch.done, watch.total, watch.polls()) == (0, TOTAL, False)


# ------------------------------------------------------------------ a backend's copy


@pytest.fixture
def dir_pool(tmp_path: Path) -> tuple[DirBackend, Path]:
    pool = tmp_path / "pool"
    pool.mkdir()
    with (pool / "src.raw").open("wb") as f:
        block = os.urandom(MiB)  # data, not zeros: qemu-img skips zeros at once
        for _ in range(768):
            f.write(block)
    return DirBackend(PoolDef(type="dir", name="p", uuid="u", target_path=str(pool))), pool


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
async def test_a_dir_clone_reports_progress(dir_pool: tuple[DirBackend, Path],
                                            fmt: str) -> None:
    """cp (raw to raw) by its file's growth, qemu-img convert by its own lines: the job
    sees the copy's bytes, of the source's size, as they go."""
    backend, _ = dir_pool
    await backend.refresh()
    source = await backend.volume("src.raw")
    job, vol, seen = await as_job(lambda: backend.clone_volume(
        VolumeDef(name="copy", capacity=0, format=fmt), source))
    assert vol.format == fmt and vol.capacity == 768 * MiB
    assert {total for _, total in seen} <= {0, 768 * MiB}  # 0 before the copy starts
    if fmt == "qcow2":  # cp may be done before the first look
        assert any(0 < done < 768 * MiB for done, _ in seen), seen
    assert job.progress() == f"{768 * MiB} {768 * MiB}"


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
async def test_a_cancelled_dir_clone_leaves_nothing(dir_pool: tuple[DirBackend, Path],
                                                    fmt: str) -> None:
    """A job's cancel: the copy is killed at once and its hidden file removed."""
    backend, pool = dir_pool
    await backend.refresh()
    source = await backend.volume("src.raw")
    board = Jobs(lambda change: None)
    job = board.begin("clone", "cloned", [])

    async def canceller() -> None:
        # Once the copy runs: its hidden file is there.
        while len(os.listdir(pool)) < 2:
            await trio.sleep(0.005)
        job.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(canceller)
        t0 = trio.current_time()
        with pytest.raises(Canceled):
            async with board.run(job):
                await backend.clone_volume(VolumeDef(name="copy", capacity=0, format=fmt),
                                           source)
        assert trio.current_time() - t0 < 1.0
    assert job.state is JobState.CANCELLED
    assert os.listdir(pool) == ["src.raw"]
