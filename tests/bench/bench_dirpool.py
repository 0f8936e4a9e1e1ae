#!/usr/bin/env python3
"""Benchmark: a vsfs ``dir`` pool against the same operations on a plain directory.

Run from the repository root (root, /dev/fuse and fusermount3 needed)::

    python tests/bench/bench_dirpool.py [--count N] [--repeat R] [--json FILE]
                                        [--workdir DIR] [--fresh-fs SIZE]
                                        [--clone-size SIZE]

One run mounts vsfs in a temporary directory, defines and starts a dir pool, and
times real tools (truncate, ls -l, find -L, cat, rm) on N volumes through the
mount and on N plain files on the same filesystem (the baseline), phase by phase.
Every timing includes the start of the tool's process, on both sides, so the
ratio is what a user sees. With virsh and libvirtd installed (Debian:
libvirt-clients, libvirt-daemon) it also times virsh vol-list --details and
vol-create-as on the same files, through a libvirtd of its own when none answers.
Last, it creates and removes volumes while a clone of a large volume of random
data runs in the same pool, against the same with no clone (a long operation
holds only its volumes: nothing else in the pool should wait for it).
Only the standard library is used; the name does not start with ``test_`` so that
pytest never collects it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

SIZE = 1 << 20  # truncate -s 1M
MOUNT_WAIT = 30.0  # seconds for the mount to appear
UMOUNT_WAIT = 30.0  # seconds for the daemon to exit after fusermount3 -u
KERNEL_TIMEOUT = 1.0  # vsfs's entry/attr timeout (vsfs/fuse_ops.py TIMEOUT)
ENV = {**os.environ, "LC_ALL": "C"}  # the same sorting and messages on both sides

# The project's targets (docs/performance.md).
TARGET_LS_MS = 60.0
TARGET_LS_RATIO = 5.0
TARGET_VIRSH_FACTOR = 5.0
TARGET_CREATE_RATE = 500.0
TARGET_DURING_CLONE = 2.0  # a create while a clone runs: at most this many times one alone

CLONE_PAUSE = 0.1  # seconds between the samples taken while the clone runs
CLONE_WAIT = 900.0  # seconds the clone may take
CLONE_SLACK = 256 << 20  # free space wanted beyond the source and its copy
CLONE_ALONE = 15  # samples with no copy running (at least; R if more)


class BenchError(Exception):
    """The benchmark cannot go on; printed as one line."""


@dataclass
class Row:
    """One operation: its vsfs and baseline times in milliseconds."""

    op: str
    vsfs_ms: float | None
    base_ms: float | None
    runs: int = 1
    note: str = ""
    vsfs_all_ms: list[float] = field(default_factory=list)
    base_all_ms: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        if self.vsfs_ms is None or self.base_ms is None or self.base_ms <= 0:
            return None
        return self.vsfs_ms / self.base_ms


@dataclass
class Results:
    count: int
    repeat: int
    date: str
    machine: str
    kernel: str
    python: str
    workdir_fs: str
    revision: str
    rows: list[Row] = field(default_factory=list)
    create_rate_vsfs: float = 0.0
    create_rate_base: float = 0.0
    create_extra_ms: float = 0.0
    batch_rate_vsfs: float = 0.0
    batch_rate_base: float = 0.0
    pids_during: dict[str, int] = field(default_factory=dict)
    # CPU steal (ms) during each of vsfs's first listings, and the median of those
    # listings that lost none: this VM's neighbours make that figure swing.
    first_ls_steal_ms: list[float] = field(default_factory=list)
    first_ls_no_steal_ms: float | None = None
    first_ls_no_steal_runs: int = 0
    virsh_ms: float | None = None
    virsh_note: str = "n/a"
    virsh_via: str = ""
    virsh_create_ms: float | None = None
    # Creating and removing a volume while a clone of clone_size bytes of random data
    # runs in the same pool ("vsfs" of each row), against the same with no clone
    # ("baseline" of each row).
    clone_size: int = 0
    clone_rows: list[Row] = field(default_factory=list)
    clone_ms: float | None = None
    clone_progress: list[str] = field(default_factory=list)
    clone_after: int = 0
    clone_note: str = ""
    daemon_rc: int | None = None
    daemon_traceback: bool = False
    targets: dict[str, bool] = field(default_factory=dict)


# ---------------------------------------------------------------- helpers


def run(argv: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; fail with its error output if it fails."""
    res = subprocess.run(list(argv), capture_output=True, text=True, env=ENV, cwd=cwd,
                         check=False)
    if res.returncode != 0:
        err = res.stderr.strip().splitlines()
        raise BenchError(f"{' '.join(argv)[:120]}: exit {res.returncode}: "
                         f"{err[-1] if err else ''}")
    return res


def answers(argv: Sequence[str]) -> bool:
    """Whether a command succeeds within 10 s."""
    try:
        res = subprocess.run(list(argv), capture_output=True, env=ENV, timeout=10, check=False)
    except subprocess.TimeoutExpired:
        return False
    return res.returncode == 0


def timed(argv: Sequence[str]) -> tuple[float, str]:
    """Milliseconds one command took (process start included) and its output."""
    t0 = time.perf_counter_ns()
    res = run(argv)
    return (time.perf_counter_ns() - t0) / 1e6, res.stdout


def steal_ms() -> float | None:
    """CPU time the hypervisor has taken from this VM so far (all CPUs), in ms; in
    10 ms steps. A listing that loses CPU this way waits at every request."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return int(fields[8]) * 1000 / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def timed_steal(argv: Sequence[str]) -> tuple[float, str, float | None]:
    """As timed(), and the CPU steal during the run (None where unknown)."""
    before = steal_ms()
    ms, out = timed(argv)
    after = steal_ms()
    return ms, out, None if before is None or after is None else after - before


def bash(script: str, *args: str) -> list[str]:
    """argv for ``bash -c SCRIPT`` with positional arguments $1..."""
    return ["bash", "-c", script, "bench", *args]


def last_pid() -> int | None:
    """The last PID handed out (threads count too); None where it cannot be read."""
    try:
        return int(Path("/proc/sys/kernel/ns_last_pid").read_text())
    except (OSError, ValueError):
        return None


def pid_delta(before: int | None, after: int | None) -> int:
    if before is None or after is None:
        return -1
    try:
        pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    except (OSError, ValueError):
        pid_max = 1 << 22
    return (after - before) % pid_max


def check_lines(what: str, out: str, expected: int, value: str | None = None) -> None:
    lines = out.splitlines()
    if len(lines) != expected:
        raise BenchError(f"{what}: {len(lines)} lines of output, expected {expected}")
    if value is not None:
        bad = [ln for ln in lines if ln != value]
        if bad:
            raise BenchError(f"{what}: {len(bad)} lines are not {value!r} (e.g. {bad[0]!r})")


def fs_type(path: Path) -> str:
    for argv in (["findmnt", "-n", "-o", "FSTYPE", "-T", str(path)],
                 ["stat", "-f", "-c", "%T", str(path)]):
        with contextlib.suppress(OSError):
            res = subprocess.run(argv, capture_output=True, text=True, check=False)
            if res.returncode == 0 and res.stdout.strip():
                return res.stdout.strip()
    return "?"


def revision() -> str:
    """The checkout measured: commit, and "-dirty" with uncommitted changes."""
    repo = Path(__file__).resolve().parents[2]
    with contextlib.suppress(OSError):
        res = subprocess.run(["git", "-C", str(repo), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, check=False)
        if res.returncode == 0:
            return res.stdout.strip()
    return "?"


def median(values: list[float]) -> float:
    return statistics.median(values)


def parse_size(text: str) -> int:
    """Bytes from ``N``, ``NK``, ``NM``, ``NG`` or ``NT`` (powers of 1024, an ``iB`` after
    the letter allowed)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = 1
    if t[-1:] in ("K", "M", "G", "T"):
        scale = 1 << (10 * ("KMGT".index(t[-1]) + 1))
        t = t[:-1]
    if not t.isdigit():
        raise ValueError(f"not a size: {text!r}")
    return int(t) * scale


def write_random(path: Path, size: int) -> None:
    """``size`` bytes of random data into ``path``, on disk and out of the page cache
    (so that a copy of it reads the disk, as a copy of a real template would); written
    under a hidden name first, which no pool lists."""
    tmp = path.with_name(f".{path.name}.bench-tmp")
    chunk = 4 << 20
    with open(tmp, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    tmp.rename(path)


PopenT = TypeVar("PopenT", bound="subprocess.Popen[Any]")


@contextlib.contextmanager
def reaped(proc: PopenT) -> Iterator[PopenT]:
    """The process, killed and waited for if it still runs when the block is left."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def drop_cache(path: Path) -> None:
    """Take a file's pages out of the page cache (its data is on disk)."""
    with open(path, "rb") as f:
        os.fdatasync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def shown_size(size: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    return f"{size} bytes"


# ---------------------------------------------------------------- the mount


class Mount:
    """vsfs mounted in the foreground as a child process."""

    def __init__(self, root: Path, python: str = sys.executable,
                 src: Path | None = None) -> None:
        self.root = root
        # The interpreter (a venv with its own pyfuse3 in --pyfuse3-builds) and the vsfs
        # checkout it runs (default: the one installed in that interpreter).
        self.python = python
        self.src = src
        self.mnt = root / "mnt"
        self.state = root / "state"
        self.images = root / "images"
        self.log = root / "vsfs.log"
        self.stderr = root / "vsfs.stderr"
        self.proc: subprocess.Popen[bytes] | None = None
        self.rc: int | None = None

    @property
    def pool(self) -> Path:
        return self.mnt / "pools" / "bench"

    def start(self) -> None:
        for d in (self.mnt, self.state, self.images):
            d.mkdir()
        argv = [self.python, "-m", "vsfs", "mount", str(self.mnt), "--foreground",
                "--state-dir", str(self.state), "--log-file", str(self.log),
                "--log-level", "WARNING"]
        env = None
        if self.src is not None:
            env = {**os.environ, "PYTHONPATH": str(self.src)}
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err, env=env,
                                         cwd=self.src)
        deadline = time.monotonic() + MOUNT_WAIT
        while not os.path.ismount(self.mnt):
            if self.proc.poll() is not None:
                raise BenchError(f"vsfs exited with {self.proc.returncode} before mounting; "
                                 f"see {self.stderr} and {self.log}")
            if time.monotonic() > deadline:
                raise BenchError(f"vsfs did not mount {self.mnt} within {MOUNT_WAIT:g} s")
            time.sleep(0.02)
        xml = (f"<pool type='dir'><name>bench</name><target><path>{self.images}</path>"
               "</target></pool>")
        (self.mnt / "pools" / "define").write_text(xml)
        (self.pool / "ctl").write_text("start\n")
        state = (self.pool / "state").read_text().strip()
        if state != "running":
            raise BenchError(f"pool bench is {state!r} after start, not 'running'")

    def stop(self) -> None:
        """Unmount (lazily if need be) and wait for the daemon; never raises."""
        if self.proc is None:
            return
        if os.path.ismount(self.mnt):
            res = subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True,
                                 text=True, check=False)
            if res.returncode != 0:
                print(f"warning: fusermount3 -u failed ({res.stderr.strip()}); "
                      "unmounting lazily", file=sys.stderr)
                subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], check=False)
        try:
            self.rc = self.proc.wait(timeout=UMOUNT_WAIT)
        except subprocess.TimeoutExpired:
            print("warning: vsfs did not exit after the unmount; sending SIGTERM",
                  file=sys.stderr)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.rc = self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.rc = self.proc.wait()

    def traceback_in_log(self) -> bool:
        found = False
        for f in (self.log, self.stderr):
            with contextlib.suppress(OSError):
                found = found or "Traceback" in f.read_text(errors="replace")
        return found


class PrivateLibvirtd:
    """libvirtd with only its storage driver, its socket and (as a non-root user) all its
    state under the benchmark's directory, for the libvirt figures when no libvirtd of
    the host's answers. Stopped at the end; the host's libvirt is not configured or used.
    As root the storage driver keeps its state in /run/libvirt and reads pool
    definitions from /etc/libvirt/storage, so it is not started when any are there: it
    would start the autostart ones."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        """Start it; the URI to give virsh -c."""
        daemon = shutil.which("libvirtd") or "/usr/sbin/libvirtd"
        drivers = sorted(Path("/usr/lib").glob("*/libvirt/connection-driver/"
                                                "libvirt_driver_storage.so"))
        if not os.access(daemon, os.X_OK) or not drivers:
            raise BenchError("libvirtd not installed: apt install libvirt-daemon")
        if os.geteuid() == 0 and any(Path("/etc/libvirt/storage").glob("*.xml")):
            raise BenchError("no libvirtd answers, and /etc/libvirt/storage holds pools "
                             "that a libvirtd of ours would start")
        (self.root / "drivers").mkdir(parents=True)
        (self.root / "drivers" / drivers[0].name).symlink_to(drivers[0])
        conf = self.root / "libvirtd.conf"
        conf.write_text(f'unix_sock_dir = "{self.root}"\nunix_sock_ro_perms = "0700"\n'
                        'unix_sock_rw_perms = "0700"\nauth_unix_ro = "none"\n'
                        'auth_unix_rw = "none"\n')
        env = {**ENV, "LIBVIRT_DRIVER_DIR": str(self.root / "drivers"),
               "XDG_CONFIG_HOME": str(self.root / "config"),
               "XDG_CACHE_HOME": str(self.root / "cache"),
               "XDG_RUNTIME_DIR": str(self.root / "run")}
        with open(self.root / "libvirtd.log", "wb") as log:
            self.proc = subprocess.Popen([daemon, "--config", str(conf), "--pid-file",
                                          str(self.root / "libvirtd.pid")],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env=env)
        uri = f"storage+unix:///system?socket={self.root}/libvirt-sock"
        if os.geteuid() != 0:
            uri = f"storage+unix:///session?socket={self.root}/libvirt-sock"
        deadline = time.monotonic() + 20
        while not answers(["virsh", "-q", "-c", uri, "pool-list", "--all"]):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log_lines = (self.root / "libvirtd.log").read_text(errors="replace")
                last = [ln for ln in log_lines.splitlines() if "error" in ln][-1:]
                raise BenchError(f"our libvirtd did not answer: {last[0] if last else ''}")
            time.sleep(0.1)
        return uri

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


# ---------------------------------------------------------------- the runs


class Bench:
    def __init__(self, root: Path, count: int, repeat: int, res: Results,
                 clone_size: int = 0) -> None:
        self.root = root
        self.n = count
        self.repeat = repeat
        self.res = res
        self.clone_size = clone_size
        self.base = root / "base"
        self.files = self.base / "files"  # what truncate makes (the images)
        self.links = self.base / "links"  # symlinks to them, like volumes/
        self.info = self.base / "info"  # NAME/capacity, like volinfo/

    def names(self) -> list[str]:
        width = len(str(self.n))
        return [f"v{i:0{width}d}" for i in range(1, self.n + 1)]

    def create_loop(self, directory: Path) -> float:
        # seq -w pads to the width of N, as names() does.
        script = 'for i in $(seq -w 1 "$2"); do truncate -s 1M "$1/v$i" || exit 1; done'
        ms, _ = timed(bash(script, str(directory), str(self.n)))
        return ms

    def create_batch(self, directory: Path) -> float:
        """One truncate process for all N (names w…): creation without process starts."""
        paths = [str(directory / ("w" + n[1:])) for n in self.names()]
        ms, _ = timed(["truncate", "-s", "1M", *paths])
        made = sorted(p.name for p in directory.iterdir() if p.name.startswith("w"))
        if made != sorted(Path(p).name for p in paths):
            raise BenchError(f"{directory}: {len(made)} of {self.n} files made by one truncate")
        return ms

    def repeated(self, argv: Sequence[str], check: Callable[[str], None],
                 pause: float = 0.0, pids: str | None = None) -> list[float]:
        """Times of ``repeat`` runs; with ``pids``, also the fewest PIDs a run used
        beyond its own process (a thread or process started by vsfs takes one)."""
        times = []
        extra: list[int] = []
        for _ in range(self.repeat):
            if pause:
                time.sleep(pause)
            p0 = last_pid()
            ms, out = timed(argv)
            extra.append(pid_delta(p0, last_pid()) - 1)
            check(out)
            times.append(ms)
        if pids is not None:
            self.res.pids_during[pids] = min(extra)
        return times

    def add(self, op: str, vsfs: list[float], base: list[float], note: str = "") -> None:
        self.res.rows.append(Row(op, median(vsfs) if vsfs else None,
                                 median(base) if base else None, max(len(vsfs), len(base)),
                                 note, vsfs, base))

    # ---- checks of outputs

    def ls_check(self, out: str) -> None:
        # "total N" and one line per entry.
        check_lines("ls -l", out, self.n + 1)

    def find_check(self, out: str) -> None:
        check_lines("find -L", out, self.n, str(SIZE))

    def cat_check(self, out: str) -> None:
        check_lines("cat capacities", out, self.n, str(SIZE))

    # ---- the phases: both sides create, then both read, then both delete, so
    # that neither side creates files right after the other deleted a thousand
    # (ext4 skips recently freed inodes, which makes creating files much slower).

    def create_both(self, m: Mount, t: dict[str, dict[str, list[float]]]) -> None:
        for d in (self.files, self.links, self.info):
            d.mkdir(parents=True)
        t["base"]["create"] = [self.create_loop(self.files)]
        made = sorted(os.listdir(self.files))
        if made != self.names():
            raise BenchError(f"baseline: {len(made)} files made, expected {self.n}")
        for name in made:
            os.symlink(self.files / name, self.links / name)
            (self.info / name).mkdir()
            (self.info / name / "capacity").write_text(f"{SIZE}\n")

        vols = m.pool / "volumes"
        t["vsfs"]["create"] = [self.create_loop(vols)]
        listed = sorted(os.listdir(vols))
        if listed != self.names():
            raise BenchError(f"vsfs: {len(listed)} volumes listed, expected {self.n}")
        on_disk = sorted(os.listdir(m.images))
        if on_disk != self.names():
            raise BenchError(f"vsfs: {len(on_disk)} image files made, expected {self.n}")
        bad = [n for n in on_disk if os.stat(m.images / n).st_size != SIZE]
        if bad:
            raise BenchError(f"vsfs: {len(bad)} images are not {SIZE} bytes, e.g. {bad[0]}")

    def read_side(self, t: dict[str, list[float]], links: Path, info: Path,
                  tag: str | None) -> None:
        """ls -l, find -L and cat on one side; ``tag`` names the PID counts (vsfs only)."""
        # Let vsfs's entry/attr caches of what the loop made expire first.
        time.sleep(KERNEL_TIMEOUT + 0.1)
        ls = ["ls", "-l", str(links)]
        ms, out, stolen = timed_steal(ls)
        self.ls_check(out)
        t["ls_cold"] = [ms]
        t["ls_cold_steal"] = [] if stolen is None else [stolen]
        t["ls"] = self.repeated(ls, self.ls_check, pids=tag and "ls -l (warm)")
        t["ls_expired"] = self.repeated(ls, self.ls_check, pause=KERNEL_TIMEOUT + 0.1,
                                        pids=tag and "ls -l (expired)")
        find = ["find", "-L", str(links), "-type", "f", "-printf", "%s\\n"]
        t["find"] = self.repeated(find, self.find_check, pids=tag and "find -L")
        cat = bash('cat "$1"/*/capacity', str(info))
        t["cat"] = self.repeated(cat, self.cat_check, pids=tag and "cat capacities")

    def batch_both(self, m: Mount, t: dict[str, dict[str, list[float]]]) -> None:
        t["base"]["batch"] = [self.create_batch(self.files)]
        t["vsfs"]["batch"] = [self.create_batch(m.pool / "volumes")]

    def delete_both(self, m: Mount, t: dict[str, dict[str, list[float]]]) -> None:
        run(bash('rm "$1"/w*', str(self.files)))
        run(bash('rm "$1"/w*', str(m.pool / "volumes")))
        ms, _ = timed(bash('rm "$1"/v*', str(self.files)))
        t["base"]["rm"] = [ms]
        if os.listdir(self.files):
            raise BenchError("baseline: rm left files behind")
        shutil.rmtree(self.base)
        vols = m.pool / "volumes"
        ms, _ = timed(bash('rm "$1"/v*', str(vols)))
        t["vsfs"]["rm"] = [ms]
        if os.listdir(vols) or os.listdir(m.images):
            raise BenchError("vsfs: rm left volumes behind")

    def run(self, m: Mount) -> None:
        t: dict[str, dict[str, list[float]]] = {"base": {}, "vsfs": {}}
        print(f"creating {self.n} files, then {self.n} volumes ...", flush=True)
        self.create_both(m, t)
        print("reading (baseline, then vsfs) ...", flush=True)
        self.read_side(t["base"], self.links, self.info, None)
        self.virsh()
        self.read_side(t["vsfs"], m.pool / "volumes", m.pool / "volinfo", "vsfs")
        print(f"creating {self.n} more on each side with one truncate ...", flush=True)
        self.batch_both(m, t)
        print("deleting ...", flush=True)
        self.delete_both(m, t)
        if self.repeat > 1:
            print(f"{self.repeat - 1} more first listings after creating {self.n} ...",
                  flush=True)
            self.first_listings(m, t)
        self.collect(t["vsfs"], t["base"])
        if self.clone_size:
            print(f"creating and removing volumes with and without a "
                  f"{shown_size(self.clone_size)} clone running ...", flush=True)
            self.during_clone(m)

    def create_remove(self, path: Path) -> tuple[float, float]:
        """Milliseconds a ``truncate -s 1M`` of a new file or volume took, and an ``rm``
        of it."""
        made, _ = timed(["truncate", "-s", "1M", str(path)])
        if not os.path.lexists(path):
            raise BenchError(f"{path} is not there after truncate")
        gone, _ = timed(["rm", str(path)])
        if os.path.lexists(path):
            raise BenchError(f"{path} is still there after rm")
        return made, gone

    def samples(self, directory: Path, prefix: str, count: int | None = None,
                running: Callable[[], bool] | None = None) -> tuple[list[float], list[float]]:
        """create_remove() of new names in ``directory``, CLONE_PAUSE apart: ``count``
        times, or for as long as ``running()`` says so after the sample (a sample that
        ended after the copy it was to overlap is counted in ``clone_after``)."""
        made: list[float] = []
        gone: list[float] = []
        i = 0
        while count is None or i < count:
            time.sleep(CLONE_PAUSE)
            a, b = self.create_remove(directory / f"{prefix}{i}")
            i += 1
            if running is not None and not running():
                self.res.clone_after += 1
                break
            made.append(a)
            gone.append(b)
        return made, gone

    def during_clone(self, m: Mount) -> None:
        """A volume created and removed (``truncate -s 1M``, then ``rm``) while a clone of
        a large volume of random data runs in the same pool, sample after sample
        CLONE_PAUSE apart for as long as it runs, against CLONE_ALONE samples (or R) of the
        same with no copy running; only samples that ended while the clone's job was still
        running count. Two controls tell what the copy itself costs the machine, whoever
        runs it: the same volumes made while ``cp`` copies the same file outside vsfs (what
        vsfs runs for the clone of a raw file), and plain files made in a plain directory
        meanwhile. The source leaves the page cache before each copy, so every copy reads
        the disk, as a copy of a real template would."""
        size = self.clone_size
        free = shutil.disk_usage(m.images).free
        if free < 2 * size + CLONE_SLACK:
            self.res.clone_note = (f"n/a (the clone needs {(2 * size + CLONE_SLACK) >> 20} "
                                   f"MiB free, {free >> 20} MiB here; see --fresh-fs)")
            return
        self.res.clone_size = size
        vols, info = m.pool / "volumes", m.pool / "volinfo"
        big = m.images / "big"
        write_random(big, size)
        (m.pool / "ctl").write_text("refresh\n")
        capacity = int((info / "big" / "capacity").read_text())
        if capacity != size:
            raise BenchError(f"volume big has capacity {capacity} after refresh, not {size}")
        plain = self.root / "plain"
        plain.mkdir()
        count = max(self.repeat, CLONE_ALONE)
        alone = self.samples(vols, "alone", count)
        plain_alone = self.samples(plain, "alone", count)

        def outside_copy(directory: Path) -> tuple[list[float], list[float]]:
            """Samples in ``directory`` while cp copies ``big`` outside vsfs."""
            drop_cache(big)
            with reaped(subprocess.Popen(["cp", "--reflink=auto", "--sparse=always", str(big),
                                          str(plain / "copy")], env=ENV,
                                         stdin=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)) as cp:
                got = self.samples(directory, "cp", running=lambda: cp.poll() is None)
                cp.wait(timeout=CLONE_WAIT)
            if cp.returncode != 0:
                raise BenchError(f"cp of {big} failed (exit {cp.returncode})")
            (plain / "copy").unlink()
            run(["sync", "-f", str(m.images)])
            return got

        plain_cp = outside_copy(plain)
        vsfs_cp = outside_copy(vols)
        shutil.rmtree(plain)

        drop_cache(big)
        # bash's EPOCHREALTIME around the write: the clone's own duration.
        script = 's=$EPOCHREALTIME; echo "clone big2" > "$1" || exit 1; echo "$s $EPOCHREALTIME"'
        with reaped(subprocess.Popen(bash(script, str(info / "big" / "ctl")), env=ENV,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)) as writer:
            job = self.clone_job(m, writer)

            def running() -> bool:
                state = (job / "state").read_text().strip()
                self.res.clone_progress.append((job / "progress").read_text().strip())
                return state == "running" and writer.poll() is None

            during = self.samples(vols, "during", running=running)
            out, err = writer.communicate(timeout=CLONE_WAIT)
        if writer.returncode != 0:
            raise BenchError(f"the clone failed: {err.strip()}")
        start, end = (float(x) for x in out.split())
        self.res.clone_ms = (end - start) * 1e3
        state = (job / "state").read_text().strip()
        progress = (job / "progress").read_text().strip()
        if state != "done" or progress != f"{size} {size}":
            raise BenchError(f"the clone's job ended {state!r} with progress {progress!r}")
        self.res.clone_progress.append(progress)
        if int((info / "big2" / "capacity").read_text()) != size:
            raise BenchError("the clone big2 does not have the source's capacity")
        run(["rm", str(vols / "big"), str(vols / "big2")])
        if os.listdir(m.images):
            raise BenchError(f"vsfs: volumes left behind in {m.images}")

        gib = shown_size(size)
        for op, (during_ms, alone_ms) in (
                (f"vsfs: create a volume (truncate -s 1M) while a {gib} clone runs in the pool",
                 (during[0], alone[0])),
                ("vsfs: remove it (rm), the same", (during[1], alone[1])),
                (f"vsfs: create a volume while cp copies {gib} outside vsfs",
                 (vsfs_cp[0], alone[0])),
                ("vsfs: remove it (rm), the same", (vsfs_cp[1], alone[1])),
                (f"plain directory: truncate -s 1M while cp copies {gib}",
                 (plain_cp[0], plain_alone[0])),
                ("plain directory: rm, the same", (plain_cp[1], plain_alone[1]))):
            self.res.clone_rows.append(Row(op, median(during_ms) if during_ms else None,
                                           median(alone_ms), len(during_ms), "", during_ms,
                                           alone_ms))

    def clone_job(self, m: Mount, writer: subprocess.Popen[str]) -> Path:
        """The directory of the clone's job, once volinfo/big/job leads to it."""
        link = m.pool / "volinfo" / "big" / "job"
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(FileNotFoundError):
                return m.mnt / "jobs" / os.readlink(link).rsplit("/", 1)[-1]
            if writer.poll() is not None:
                raise BenchError("the clone ended before volinfo/big/job was seen "
                                 f"(exit {writer.returncode}): make --clone-size larger")
            if time.monotonic() > deadline:
                raise BenchError("volinfo/big/job did not appear within 30 s of the clone")
            time.sleep(0.002)

    def first_listings(self, m: Mount, t: dict[str, dict[str, list[float]]]) -> None:
        """More samples of the first ``ls -l`` after creating N (the noisiest figure):
        each round creates N on both sides with one truncate, lets the caches
        expire, lists once and deletes."""
        sides = (("base", self.files, self.files), ("vsfs", m.pool / "volumes", m.images))
        self.files.mkdir(parents=True, exist_ok=True)
        for _ in range(self.repeat - 1):
            for side, d, store in sides:
                self.create_batch(d)
                time.sleep(KERNEL_TIMEOUT + 0.1)
                ms, out, stolen = timed_steal(["ls", "-l", str(d)])
                self.ls_check(out)
                t[side]["ls_cold"].append(ms)
                if stolen is not None:
                    t[side]["ls_cold_steal"].append(stolen)
                run(bash('rm "$1"/w*', str(d)))
                if os.listdir(store):
                    raise BenchError(f"{side}: rm left files behind in {store}")

    def virsh(self) -> None:
        """virsh vol-list --details of a transient libvirt pool on the baseline files, and
        virsh vol-create-as per volume: through the host's libvirtd if one answers, else
        through a libvirtd of our own (PrivateLibvirtd)."""
        if shutil.which("virsh") is None:
            self.res.virsh_note = "n/a (virsh not installed: apt install libvirt-clients)"
            return
        private: PrivateLibvirtd | None = None
        if answers(["virsh", "-q", "pool-list", "--all"]):
            virsh = ["virsh", "-q"]
            self.res.virsh_via = "the host's libvirtd"
        else:
            private = PrivateLibvirtd(self.root / "libvirt")
            try:
                virsh = ["virsh", "-q", "-c", private.start()]
            except BenchError as e:
                private.stop()
                self.res.virsh_note = f"n/a ({e})"
                return
            self.res.virsh_via = "a libvirtd of the benchmark's own (storage driver only)"
        name = f"vsfs-bench-{os.getpid()}"
        try:
            run([*virsh, "pool-create-as", name, "dir", "--target", str(self.files)])
            try:
                times = self.repeated([*virsh, "vol-list", name, "--details"],
                                      lambda out: check_lines("virsh vol-list", out, self.n))
                self.res.virsh_ms = median(times)
                self.res.virsh_note = f"median of {len(times)}"
                made = []
                for i in range(self.repeat):
                    ms, _ = timed([*virsh, "vol-create-as", name, f"lv{i}", "1M"])
                    made.append(ms)
                self.res.virsh_create_ms = median(made)
            finally:
                subprocess.run([*virsh, "pool-destroy", name], capture_output=True,
                               check=False)
                for leftover in self.files.glob("lv*"):
                    leftover.unlink()
        except BenchError as e:
            self.res.virsh_note = f"n/a ({e})"
        finally:
            if private is not None:
                private.stop()

    def collect(self, v: dict[str, list[float]], b: dict[str, list[float]]) -> None:
        n = self.n
        self.add(f"create {n} (truncate -s 1M, one loop)", v["create"], b["create"])
        self.add(f"create {n} more (one truncate -s 1M for all)", v["batch"], b["batch"])
        self.add("ls -l volumes/ (first after creating, caches expired)", v["ls_cold"],
                 b["ls_cold"])
        self.add("ls -l volumes/ (warm, back to back)", v["ls"], b["ls"])
        self.add("ls -l volumes/ (1.1 s apart: caches expired)", v["ls_expired"],
                 b["ls_expired"])
        self.add("find -L volumes/ -type f -printf %s", v["find"], b["find"])
        self.add("cat volinfo/*/capacity (one cat)", v["cat"], b["cat"])
        self.add(f"rm volumes/v* ({n}, one rm)", v["rm"], b["rm"])
        self.res.create_rate_vsfs = n / (v["create"][0] / 1e3)
        self.res.create_rate_base = n / (b["create"][0] / 1e3)
        self.res.create_extra_ms = (v["create"][0] - b["create"][0]) / n
        self.res.batch_rate_vsfs = n / (v["batch"][0] / 1e3)
        self.res.batch_rate_base = n / (b["batch"][0] / 1e3)
        steal = v.get("ls_cold_steal", [])
        if len(steal) == len(v["ls_cold"]):
            self.res.first_ls_steal_ms = steal
            quiet = [ms for ms, st in zip(v["ls_cold"], steal, strict=True) if st == 0]
            self.res.first_ls_no_steal_runs = len(quiet)
            self.res.first_ls_no_steal_ms = median(quiet) if quiet else None


# ---------------------------------------------------------------- report


def fmt_ms(ms: float | None) -> str:
    return "n/a" if ms is None else f"{ms:.1f} ms" if ms < 10_000 else f"{ms / 1e3:.2f} s"


def judge(res: Results) -> None:
    ls_rows = [r for r in res.rows if r.op.startswith("ls -l")]
    worst = max((r.vsfs_ms or 0.0) for r in ls_rows)
    worst_ratio = max((r.ratio or 0.0) for r in ls_rows)
    res.targets = {
        f"ls -l of {res.count} volumes < {TARGET_LS_MS:g} ms (every regime)":
            worst < TARGET_LS_MS,
        f"ls -l <= {TARGET_LS_RATIO:g}x native (every regime)": worst_ratio <= TARGET_LS_RATIO,
        f">= {TARGET_CREATE_RATE:g} creations/s via a truncate loop "
        f"(the native loop here: {res.create_rate_base:.0f}/s)":
            res.create_rate_vsfs >= TARGET_CREATE_RATE,
        f">= {TARGET_CREATE_RATE:g} creations/s via one truncate for all":
            res.batch_rate_vsfs >= TARGET_CREATE_RATE,
        "no process started by vsfs during ls/find/cat (PID counter)":
            all(v == 0 for v in res.pids_during.values()),
    }
    if res.virsh_ms is not None:
        res.targets[f"ls -l >= {TARGET_VIRSH_FACTOR:g}x faster than virsh vol-list --details "
                    f"(every regime; virsh here: {res.virsh_ms:.0f} ms)"] = (
            res.virsh_ms >= TARGET_VIRSH_FACTOR * worst)
    if res.clone_rows:
        create = res.clone_rows[0]
        res.targets[f"a create while a {shown_size(res.clone_size)} clone runs <= "
                    f"{TARGET_DURING_CLONE:g}x a create alone (medians)"] = (
            create.ratio is not None and create.ratio <= TARGET_DURING_CLONE)


def grid(head: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table, columns padded."""
    widths = [max(len(row[i]) for row in (head, *body)) for i in range(len(head))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
            *(line(row) for row in body)]


def clone_table(res: Results) -> list[str]:
    """The rows measured with and without a clone running (during_clone)."""
    if not res.clone_rows:
        return [f"while a clone runs: {res.clone_note or 'not measured (--clone-size 0)'}"]
    head = ("operation", "during the copy", "alone", "ratio")
    body = [(f"{r.op} [median of {len(r.vsfs_all_ms)} / {len(r.base_all_ms)}]",
             fmt_ms(r.vsfs_ms), fmt_ms(r.base_ms),
             "n/a" if r.ratio is None else f"{r.ratio:.2f}x") for r in res.clone_rows]
    during = res.clone_rows[0].vsfs_all_ms
    seen = [p for p in res.clone_progress if p]
    dones = sorted({int(p.split()[0]) for p in seen if p.split()[0].isdigit()})
    return [
        *grid(head, body),
        "",
        f"the clone (echo 'clone big2' > volinfo/big/ctl) took {fmt_ms(res.clone_ms)}; "
        f"{len(during)} samples ended while its job ran"
        + (f"; slowest create during it {fmt_ms(max(during))}" if during else "")
        + (f"; {res.clone_after} samples that ended after their copy left out"
           if res.clone_after else ""),
        f"its progress, read after each sample: {len(dones)} different DONE values, "
        f"last {seen[-1] if seen else 'n/a'}",
    ]


def table(res: Results) -> str:
    head = ("operation", "vsfs", "baseline", "ratio")
    body = [(r.op + (f" [median of {r.runs}]" if r.runs > 1 else ""), fmt_ms(r.vsfs_ms),
             fmt_ms(r.base_ms), "n/a" if r.ratio is None else f"{r.ratio:.2f}x")
            for r in res.rows]
    body.append(("virsh vol-list --details (libvirt)", fmt_ms(res.virsh_ms), "",
                 res.virsh_note if res.virsh_ms is None else ""))
    if res.virsh_ms is not None:
        listing = [r.vsfs_ms for r in res.rows if r.op.startswith("ls -l") and r.vsfs_ms]
        body.append(("  vsfs's ls -l, how many times faster (slowest regime)", "", "",
                     f"{res.virsh_ms / max(listing):.1f}x" if listing else "n/a"))
    out = grid(head, body)
    out += [
        "",
        f"creation rate: vsfs {res.create_rate_vsfs:.0f}/s, baseline "
        f"{res.create_rate_base:.0f}/s (truncate process start included); vsfs adds "
        f"{res.create_extra_ms:.2f} ms per volume; with one truncate for all: vsfs "
        f"{res.batch_rate_vsfs:.0f}/s, baseline {res.batch_rate_base:.0f}/s"
        + ("" if res.virsh_create_ms is None else
           f"; virsh vol-create-as: {res.virsh_create_ms:.1f} ms per volume"),
        *([f"libvirt figures through {res.virsh_via}"] if res.virsh_via else []),
        "first ls -l after creating, vsfs: CPU steal per run "
        f"{[round(x) for x in res.first_ls_steal_ms]} ms; median of the "
        f"{res.first_ls_no_steal_runs} runs without steal: {fmt_ms(res.first_ls_no_steal_ms)}",
        "PIDs used by others during a run (fewest over the runs; 0 = vsfs started no "
        "process or thread): " + ", ".join(f"{k} {v}" for k, v in res.pids_during.items()),
        "",
        *clone_table(res),
        "",
        "targets:",
    ]
    out += [f"  [{'met' if ok else 'MISSED'}] {name}" for name, ok in res.targets.items()]
    return "\n".join(out)


# ---------------------------------------------------------------- a fresh filesystem


class FreshFs:
    """A new ext4 on a loop device, mounted for one run (``--fresh-fs``).

    ext4 skips inodes freed in the last minutes when it allocates, so creation on a
    filesystem where much was just deleted (by a test suite, or the previous run) is
    up to twice as slow, on both sides. A filesystem of its own makes runs comparable.
    """

    def __init__(self, workdir: Path, size: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="vsfs-bench-fs-", dir=workdir))
        self.size = size
        self.image = self.dir / "fs.img"
        self.mnt = self.dir / "mnt"
        self.loop: str | None = None

    def __enter__(self) -> Path:
        try:
            run(["truncate", "-s", self.size, str(self.image)])
            # Inode tables and journal written now, not by a kernel thread during the run.
            run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                 str(self.image)])
            self.loop = run(["losetup", "-f", "--show", str(self.image)]).stdout.strip()
            self.mnt.mkdir()
            run(["mount", self.loop, str(self.mnt)])
        except BaseException:
            self.__exit__()
            raise
        return self.mnt

    def __exit__(self, *exc: object) -> None:
        if os.path.ismount(self.mnt):
            res = subprocess.run(["umount", str(self.mnt)], capture_output=True, check=False)
            if res.returncode != 0:
                print(f"warning: could not unmount {self.mnt}; leaving {self.dir}",
                      file=sys.stderr)
                return
        if self.loop is not None:
            subprocess.run(["losetup", "-d", self.loop], capture_output=True, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------- pyfuse3 builds
#
# --pyfuse3-builds: the same workloads against vsfs mounted on pyfuse3 3.5.0 built
# without patches (stock) and with each of .ci/patches/ (with those it needs), each
# build in a venv of its own, all mounted at once and measured in turns, so that every
# figure is set against stock measured in the same run.

PYFUSE3_VERSION = "3.5.0"
REPO = Path(__file__).resolve().parents[2]
PATCH_DIR = REPO / ".ci" / "patches"
BUILD_CACHE = Path("/var/cache/vsfs-bench")
LOOP_COUNT = 200  # processes in the loops of one cat / one truncate each


@dataclass
class Build:
    """pyfuse3 built from its sdist with ``patches`` applied in order."""

    name: str
    patches: list[Path]
    # Besides stock, the build this one is compared with: a patch that only applies on
    # top of another ("Needs:" in its header) is measured on top of it.
    base: str = "stock"
    python: str = ""  # its venv's interpreter, once made
    features: str = ""


def patch_name(path: Path) -> str:
    return path.name.removeprefix("pyfuse3-").removesuffix(".patch")


def patch_needs(path: Path) -> list[str]:
    """The patches (file names) a patch applies on top of: its header's ``Needs:``."""
    needs: list[str] = []
    for line in path.read_text().splitlines():
        if line.startswith(("--- ", "diff ")):
            break
        if line.lower().startswith("needs:"):
            needs += [w for w in line.split(":", 1)[1].split() if w.endswith(".patch")]
    return needs


def plan_builds(patches: list[Path]) -> list[Build]:
    """stock, each patch (on top of what it needs) and, with two or more, all of them."""
    by_name = {p.name: p for p in patches}
    builds = [Build("stock", [])]
    for p in patches:
        try:
            needs = [by_name[n] for n in patch_needs(p)]
        except KeyError as e:
            raise BenchError(f"{p.name} needs {e.args[0]}, which is not among the "
                             "patches") from None
        name = "+".join([*(patch_name(n) for n in needs), patch_name(p)])
        builds.append(Build(name, [*needs, p], "+".join(patch_name(n) for n in needs)
                            or "stock"))
    if len(patches) > 1:
        builds.append(Build("all", sorted(patches)))
    return builds


def pinned(module: str) -> str:
    """``module==VERSION`` as installed where the benchmark runs, else just the name."""
    try:
        from importlib.metadata import version  # noqa: PLC0415 (only this mode needs it)
        return f"{module}=={version(module)}"
    except Exception:
        return module


def make_build(build: Build, cache: Path) -> None:
    """The venv of one build under *cache*, keyed by the patches' contents; made once."""
    digest = hashlib.sha256(PYFUSE3_VERSION.encode())
    for p in build.patches:
        digest.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    venv = cache / f"pyfuse3-{PYFUSE3_VERSION}-{build.name}-{digest.hexdigest()[:12]}"
    build.python = str(venv / "bin" / "python")
    ready = venv / ".ready"
    if not ready.exists():
        print(f"bench: building pyfuse3 {PYFUSE3_VERSION} '{build.name}' in {venv}",
              file=sys.stderr)
        shutil.rmtree(venv, ignore_errors=True)
        run(["/usr/bin/python3", "-m", "venv", str(venv)])
        pip = [build.python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        run([*pip, *(pinned(m) for m in ("trio", "lxml", "pyudev"))])
        sdist = cache / f"pyfuse3-{PYFUSE3_VERSION}.tar.gz"
        if not sdist.exists():
            run([build.python, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                 "--no-deps", "--no-binary", "pyfuse3", f"pyfuse3=={PYFUSE3_VERSION}",
                 "-d", str(cache)])
        work = Path(tempfile.mkdtemp(prefix="build-", dir=cache))
        try:
            run(["tar", "xzf", str(sdist), "-C", str(work)])
            src = work / f"pyfuse3-{PYFUSE3_VERSION}"
            for p in build.patches:
                run(["patch", "-s", "-d", str(src), "-p1", "-i", str(p)])
            # Every build, stock too, is compiled from Cython by the same Cython, so
            # that the patches are all that differs.
            (src / "src" / "pyfuse3" / "__init__.c").unlink()
            run([*pip, "--no-deps", str(src)])
        finally:
            shutil.rmtree(work, ignore_errors=True)
        ready.write_text("".join(f"{p.name}\n" for p in build.patches))
    probe = ("import pyfuse3; f = [n for n, ok in ("
             "('noflush', hasattr(pyfuse3.FileInfo(), 'noflush')), "
             "('set_read_spin', hasattr(pyfuse3, 'set_read_spin')), "
             "('enable_cache_symlinks', hasattr(pyfuse3.Operations, 'enable_cache_symlinks'))"
             ") if ok]; print(', '.join(f) or 'none')")
    build.features = run([build.python, "-c", probe]).stdout.strip()


# (key, what is timed, what it is for). Each round runs every workload on every build
# before the next workload, builds in a rotating order.
BUILD_WORKLOADS = [
    ("ls_cold", "ls -l volumes/, cold (after drop_caches)", "cache-symlinks, fast loop"),
    ("ls_warm", "ls -l volumes/, warm (back to back)", "cache-symlinks"),
    ("stat", "stat volinfo/*/capacity (one stat), expired", "fast loop"),
    ("cat", "cat volinfo/*/capacity (one cat), expired", "noflush, fast loop"),
    ("cat_loop", f"{LOOP_COUNT} x cat volinfo/V/capacity (a cat each)", "noflush, read spin"),
    ("create_loop", f"create {LOOP_COUNT}: a truncate -s 1M each", "read spin, fast loop"),
    ("create_batch", "create N: one truncate -s 1M for all", "read spin, fast loop"),
    ("rm", f"rm of those N + {LOOP_COUNT} (one rm)", "fast loop"),
]


def drop_caches() -> None:
    """Drop the kernel's dentries and inodes (all filesystems: vsfs's cached symlink
    targets go with their inodes), then read ls back in, and let the FORGETs settle."""
    Path("/proc/sys/vm/drop_caches").write_text("2\n")
    run(["ls", "-l", "/usr/bin/ls"])
    time.sleep(0.5)


class BuildBench:
    """Each build's vsfs, mounted side by side, and the samples of every workload."""

    def __init__(self, root: Path, builds: list[Build], count: int, repeat: int,
                 src: Path | None) -> None:
        self.root = root
        self.builds = builds
        self.n = count
        self.repeat = repeat
        self.src = src
        self.mounts: dict[str, Mount] = {}
        self.samples: dict[str, dict[str, list[float]]] = {
            key: {b.name: [] for b in builds} for key, _, _ in BUILD_WORKLOADS}

    def names(self, prefix: str, count: int) -> list[str]:
        return [f"{prefix}{i:04d}" for i in range(1, count + 1)]

    def start(self) -> None:
        for b in self.builds:
            m = Mount(self.root / b.name, b.python, self.src)
            self.mounts[b.name] = m
            (self.root / b.name).mkdir()
            m.start()
            vols = m.pool / "volumes"
            run(["truncate", "-s", "1M", *(str(vols / n) for n in self.names("v", self.n))])
            churn = self.root / b.name / "churn"
            churn.mkdir()
            (m.mnt / "pools" / "define").write_text(
                f"<pool type='dir'><name>churn</name><target><path>{churn}</path>"
                "</target></pool>")
            (m.mnt / "pools" / "churn" / "ctl").write_text("start\n")

    def stop(self) -> None:
        for m in self.mounts.values():
            m.stop()

    def sample(self, key: str, build: str, argv: Sequence[str],
               check: Callable[[str], None]) -> None:
        ms, out = timed(argv)
        check(out)
        self.samples[key][build].append(ms)

    def round(self, order: list[Build]) -> None:
        n = self.n
        drop_caches()
        for b in order:
            vols = self.mounts[b.name].pool / "volumes"
            self.sample("ls_cold", b.name, ["ls", "-l", str(vols)],
                        lambda out: check_lines("ls -l", out, n + 1))
        for b in order:
            vols = self.mounts[b.name].pool / "volumes"
            run(["ls", "-l", str(vols)])
            self.sample("ls_warm", b.name, ["ls", "-l", str(vols)],
                        lambda out: check_lines("ls -l", out, n + 1))
        # (stat -c %s gives a value file's size, which vsfs need not know before a read.)
        for key, script, value in (
                ("stat", 'cd "$1" && exec stat -c %s volinfo/*/capacity', None),
                ("cat", 'cd "$1" && exec cat volinfo/*/capacity', str(SIZE))):
            time.sleep(KERNEL_TIMEOUT + 0.1)
            for b in order:
                self.sample(key, b.name, bash(script, str(self.mounts[b.name].pool)),
                            functools.partial(check_lines, key, expected=n, value=value))
        loop = 'for i in $(seq "$2"); do cat "$1" || exit 1; done'
        for b in order:
            capfile = self.mounts[b.name].pool / "volinfo" / "v0001" / "capacity"
            self.sample("cat_loop", b.name, bash(loop, str(capfile), str(LOOP_COUNT)),
                        lambda out: check_lines("cat loop", out, LOOP_COUNT, str(SIZE)))
        loop = 'for i in $(seq -w 1 "$2"); do truncate -s 1M "$1/c0$i" || exit 1; done'
        for b in order:
            vols = self.mounts[b.name].mnt / "pools" / "churn" / "volumes"
            self.sample("create_loop", b.name, bash(loop, str(vols), str(LOOP_COUNT)),
                        lambda out: None)
        for b in order:
            vols = self.mounts[b.name].mnt / "pools" / "churn" / "volumes"
            self.sample("create_batch", b.name,
                        ["truncate", "-s", "1M", *(str(vols / w) for w in self.names("w", n))],
                        lambda out: None)
        for b in order:
            churn = self.root / b.name / "churn"
            made = len(os.listdir(churn))
            if made != n + LOOP_COUNT:
                raise BenchError(f"{b.name}: {made} volumes in the churn pool, expected "
                                 f"{n + LOOP_COUNT}")
            vols = self.mounts[b.name].mnt / "pools" / "churn" / "volumes"
            self.sample("rm", b.name, bash('rm "$1"/*', str(vols)), lambda out: None)
            if os.listdir(churn):
                raise BenchError(f"{b.name}: rm left {len(os.listdir(churn))} images")

    def run(self) -> None:
        for r in range(self.repeat):
            k = r % len(self.builds)
            self.round(self.builds[k:] + self.builds[:k])
            print(f"bench: round {r + 1} of {self.repeat} done", file=sys.stderr)


def builds_table(bench: BuildBench) -> str:
    """Workload x build: medians, each build's relative to stock's of the same run; for a
    build measured on top of another, also relative to that one."""
    builds = bench.builds
    on_top = [b for b in builds if b.base != "stock"]
    head = ("workload", "stock", *(b.name for b in builds[1:]),
            *(f"{b.name} / {b.base}" for b in on_top), "stock min-max")
    body = []
    for key, what, _ in BUILD_WORKLOADS:
        s = bench.samples[key]
        med = {b.name: median(s[b.name]) for b in builds}
        stock = med["stock"]
        body.append((
            what, fmt_ms(stock),
            *(f"{fmt_ms(med[b.name])} {med[b.name] / stock:.2f}x" for b in builds[1:]),
            *(f"{med[b.name] / med[b.base]:.2f}x" for b in on_top),
            f"{fmt_ms(min(s['stock']))}-{fmt_ms(max(s['stock']))}"))
    return "\n".join(grid(head, body))


def bench_builds(args: argparse.Namespace) -> int:
    """--pyfuse3-builds: make (or reuse) the builds, mount one vsfs on each, measure."""
    patches = args.patch or sorted(PATCH_DIR.glob("pyfuse3-*.patch"))
    try:
        builds = plan_builds([p.resolve() for p in patches])
        args.build_cache.mkdir(parents=True, exist_ok=True)
        for b in builds:
            make_build(b, args.build_cache)
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    if os.geteuid() != 0:
        print("bench: --pyfuse3-builds needs root (drop_caches, tmpfs)", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="vsfs-bench-builds-", dir=args.workdir))
    # Everything on a tmpfs of its own: no ext4 inode allocation noise in the creations.
    run(["mount", "-t", "tmpfs", "-o", "size=1G,mode=0755", "vsfs-bench", str(root)])
    bench = BuildBench(root, builds, args.count, args.repeat, args.src)
    try:
        status = run_status(bench.start, bench.run)
    finally:
        bench.stop()
        for name, m in bench.mounts.items():
            if m.rc not in (0, None) or m.traceback_in_log():
                print(f"warning: {name}: the daemon exited with {m.rc}; its log:\n"
                      f"{m.log.read_text(errors='replace')[-2000:] if m.log.exists() else ''}",
                      file=sys.stderr)
                status = status or 1
        if any(os.path.ismount(m.mnt) for m in bench.mounts.values()):
            print(f"warning: a vsfs mount is left under {root}", file=sys.stderr)
        else:
            subprocess.run(["umount", str(root)], check=False)
            shutil.rmtree(root, ignore_errors=True)
    if status:
        return status
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    print(f"\n{date}, {platform.machine()}, {os.cpu_count()} CPUs, kernel "
          f"{platform.release()}, Python {platform.python_version()}, vsfs "
          f"{revision() if args.src is None else args.src}, N = {args.count}, "
          f"medians of {args.repeat} rounds, all on tmpfs\n")
    for b in builds:
        print(f"  {b.name}: {', '.join(p.name for p in b.patches) or 'no patches'} "
              f"(pyfuse3 has: {b.features})")
    print()
    print(builds_table(bench))
    if args.json is not None:
        args.json.write_text(json.dumps({
            "date": date, "kernel": platform.release(), "count": args.count,
            "repeat": args.repeat,
            "builds": [{"name": b.name, "patches": [p.name for p in b.patches],
                        "base": b.base, "features": b.features} for b in builds],
            "samples_ms": bench.samples}, indent=2) + "\n")
        print(f"\nfigures written to {args.json}")
    return 0


# ---------------------------------------------------------------- main


def run_status(*steps: Callable[[], None]) -> int:
    """Run the steps; the exit status, with a benchmark error or ^C printed as one line."""
    try:
        for step in steps:
            step()
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--count", type=int, default=1000, help="volumes to create (default 1000)")
    p.add_argument("--repeat", type=int, default=7,
                   help="runs of each read-only operation; the median is shown (default 7)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                   help="where the temporary directory goes (default /var/tmp)")
    p.add_argument("--fresh-fs", metavar="SIZE", default=None,
                   help="run on a new ext4 of this size (truncate's units, e.g. 4G) made in "
                        "the workdir on a loop device, and removed afterwards (root only)")
    p.add_argument("--clone-size", metavar="SIZE", default="2G",
                   help="the volume of random data cloned while volumes are created and "
                        "removed (K/M/G/T; default 2G; needs twice that free; 0: skip)")
    p.add_argument("--pyfuse3-builds", action="store_true",
                   help="instead of the run above: vsfs on pyfuse3 built stock, with each "
                        "patch of .ci/patches (or --patch) and with all, side by side "
                        "(root only)")
    p.add_argument("--patch", type=Path, action="append", default=[],
                   help="with --pyfuse3-builds: a patch to measure (repeatable; default "
                        ".ci/patches/pyfuse3-*.patch)")
    p.add_argument("--build-cache", type=Path, default=BUILD_CACHE,
                   help=f"with --pyfuse3-builds: where the builds' venvs are kept "
                        f"(default {BUILD_CACHE})")
    p.add_argument("--src", type=Path, default=None,
                   help="with --pyfuse3-builds: the vsfs checkout to mount (default: the "
                        "one each build's python finds, i.e. this one)")
    args = p.parse_args(argv)
    if args.count < 1 or args.repeat < 1:
        p.error("--count and --repeat must be at least 1")
    try:
        args.clone_size = parse_size(args.clone_size)
    except ValueError as e:
        p.error(f"--clone-size: {e}")
    if args.fresh_fs is not None and os.geteuid() != 0:
        p.error("--fresh-fs needs root (losetup, mount)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.pyfuse3_builds:
        return bench_builds(args)
    tools = ["fusermount3", "truncate", "bash", "ls", "find", "cat", "rm", "seq"]
    if args.fresh_fs is not None:
        tools += ["mkfs.ext4", "losetup", "mount", "umount"]
    for tool in tools:
        if shutil.which(tool) is None:
            print(f"bench: {tool} is missing", file=sys.stderr)
            return 2
    if args.fresh_fs is None:
        return bench_in(args, args.workdir)
    try:
        with FreshFs(args.workdir, args.fresh_fs) as workdir:
            return bench_in(args, workdir)
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1


def bench_in(args: argparse.Namespace, workdir: Path) -> int:
    """One run with its temporary directory under *workdir*."""
    root = Path(tempfile.mkdtemp(prefix="vsfs-bench-", dir=workdir))
    res = Results(
        count=args.count, repeat=args.repeat,
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.node()}",
        kernel=platform.release(), python=platform.python_version(),
        workdir_fs=fs_type(root) + (" (made for this run)" if args.fresh_fs else ""),
        revision=revision(),
    )
    mount = Mount(root)
    bench = Bench(root, args.count, args.repeat, res, args.clone_size)
    try:
        status = run_status(mount.start, lambda: bench.run(mount))
    finally:
        mount.stop()
        res.daemon_rc = mount.rc
        res.daemon_traceback = mount.traceback_in_log()
        if mount.rc not in (0, None):
            print(f"warning: the vsfs daemon exited with status {mount.rc}", file=sys.stderr)
        if res.daemon_traceback:
            print(f"warning: the vsfs log has a Traceback:\n{mount.log.read_text()[-3000:]}",
                  file=sys.stderr)
        if os.path.ismount(mount.mnt):
            print(f"warning: {mount.mnt} is still mounted; leaving {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    if status != 0:
        return status
    judge(res)
    print(f"\n{res.count} volumes, {res.date}, {res.machine}, kernel {res.kernel}, "
          f"Python {res.python}, {res.workdir_fs}, vsfs {res.revision}\n")
    print(table(res))
    if args.json is not None:
        data = asdict(res)
        for key, rows in (("rows", res.rows), ("clone_rows", res.clone_rows)):
            for row, out in zip(rows, data[key], strict=True):
                out["ratio"] = row.ratio
        args.json.write_text(json.dumps(data, indent=2) + "\n")
        print(f"\nfigures written to {args.json}")
    if mount.rc not in (0, None) or res.daemon_traceback:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
