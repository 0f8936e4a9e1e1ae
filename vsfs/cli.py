"""The ``vsfs`` command: mount, umount and a ready-made demo."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from .errors import VsfsError
from .fuse_ops import (
    READ_SPIN_US,
    Notifier,
    Operations,
    mount,
    serve_requests,
    set_read_spin,
    terminate,
    unmount,
)
from .manager import Manager
from .paths import default_state_dir
from .state import StateDir
from .tree import Tree
from .watchdog import mount_device
from .xmlio import parse_pool

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class Refused(Exception):
    """A reason not to go on, printed as one line."""


def _default_log_file() -> Path:
    if os.geteuid() == 0:
        return Path("/var/log/vsfs/vsfs.log")
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "vsfs" / "vsfs.log"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vsfs", description="Host storage as a FUSE filesystem.")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("mount", help="mount vsfs (returns once it answers)")
    m.add_argument("mountpoint", type=Path)
    m.add_argument("--state-dir", type=Path, default=None,
                   help="pool definitions (default: /var/lib/vsfs/storage for root, "
                        "$XDG_DATA_HOME/vsfs/storage otherwise)")
    m.add_argument("--foreground", action="store_true", help="stay attached; log to stderr")
    m.add_argument("--allow-other", action="store_true",
                   help="let other users browse (they cannot change anything)")
    m.add_argument("--log-level", default="INFO",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper)
    m.add_argument("--log-file", type=Path, default=None)
    m.add_argument("--read-spin", type=_microseconds, default=READ_SPIN_US, metavar="USEC",
                   help="after answering a request, look for the next one this long "
                        f"before sleeping (default {READ_SPIN_US}; 0 never does)")
    m.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    u = sub.add_parser("umount", help="unmount vsfs")
    u.add_argument("mountpoint", type=Path)
    d = sub.add_parser("demo", help="mount vsfs with a ready demo pool and show what to try")
    d.add_argument("mountpoint", type=Path, nargs="?", default=None)
    d.add_argument("--state-dir", type=Path, default=None)
    d.add_argument("--images", type=Path, default=None,
                   help="directory of the demo pool (default: under /var/lib/vsfs or "
                        "$XDG_DATA_HOME/vsfs)")
    return p


def _microseconds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 10_000:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of microseconds "
                                         "from 0 to 10000")
    return value


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "mount":
            return cmd_mount(args)
        if args.command == "umount":
            return cmd_umount(args.mountpoint)
        return cmd_demo(args)
    except Refused as e:
        print(f"vsfs: {e}", file=sys.stderr)
        return 1


# ---------------------------------------------------------------- checks


def check_mountpoint(mnt: Path) -> None:
    try:
        st = os.stat(mnt)
    except FileNotFoundError:
        raise Refused(f"mount point {mnt} does not exist") from None
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise Refused(f"{mnt} holds a dead vsfs mount; run 'vsfs umount {mnt}' "
                          "first") from None
        raise Refused(f"mount point {mnt}: {e.strerror}") from None
    if not os.path.isdir(mnt):
        raise Refused(f"mount point {mnt} is not a directory")
    if os.path.ismount(mnt):
        raise Refused(f"{mnt} is already a mount point")
    try:
        if os.listdir(mnt):
            raise Refused(f"mount point {mnt} is not empty")
    except PermissionError:
        raise Refused(f"mount point {mnt}: permission denied") from None
    del st
    if not os.path.exists("/dev/fuse"):
        raise Refused("/dev/fuse is missing: load the fuse module (modprobe fuse)")
    if os.geteuid() != 0 and shutil.which("fusermount3") is None:
        raise Refused("fusermount3 is missing: install the fuse3 package")


def prepare_state(path: Path) -> StateDir:
    state = StateDir(path)
    try:
        state.ensure()
    except VsfsError as e:
        raise Refused(e.message) from None
    return state


# ---------------------------------------------------------------- mount


def cmd_mount(args: argparse.Namespace) -> int:
    mnt: Path = args.mountpoint.absolute()
    state_dir: Path = (args.state_dir or default_state_dir()).absolute()
    check_mountpoint(mnt)
    prepare_state(state_dir)
    if args.foreground:
        return run_daemon(mnt, state_dir, args)
    return spawn_daemon(mnt, state_dir, args)


def spawn_daemon(mnt: Path, state_dir: Path, args: argparse.Namespace) -> int:
    log_file: Path = (args.log_file or _default_log_file()).absolute()
    try:
        log_file.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Refused(f"log file {log_file}: {e.strerror}") from None
    r, w = os.pipe()
    argv = [sys.executable, "-m", "vsfs", "mount", str(mnt), "--foreground",
            "--state-dir", str(state_dir), "--log-level", args.log_level,
            "--log-file", str(log_file), "--read-spin", str(args.read_spin),
            "--ready-fd", str(w)]
    if args.allow_other:
        argv.append("--allow-other")
    child = subprocess.Popen(argv, pass_fds=(w,), stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             start_new_session=True)
    os.close(w)
    with os.fdopen(r, "rb") as ready:
        message = ready.read().decode(errors="replace").strip()
    if message != "ok":
        try:
            _, err = child.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            _, err = child.communicate()
        lines = [ln for ln in err.decode(errors="replace").splitlines() if ln.strip()]
        reason = message.removeprefix("error: ") or (lines[-1] if lines else "daemon died")
        raise Refused(f"mounting {mnt} failed: {reason}")
    assert child.stderr is not None
    child.stderr.close()
    # The daemon answers: a listing goes through its main loop.
    os.listdir(mnt)
    print(f"vsfs mounted at {mnt} (log: {log_file})")
    return 0


def _setup_logging(level: str, log_file: Path | None) -> None:
    handler: logging.Handler
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def run_daemon(mnt: Path, state_dir: Path, args: argparse.Namespace) -> int:
    _setup_logging(args.log_level, args.log_file)
    # A write lease taken for a moment to see whether a file is open elsewhere
    # (blockdev.opened_elsewhere) is broken by any open meanwhile, and the kernel then
    # signals SIGIO, whose default would end the daemon.
    signal.signal(signal.SIGIO, signal.SIG_IGN)
    ready_fd: int | None = args.ready_fd

    def tell(message: str) -> None:
        nonlocal ready_fd
        if ready_fd is not None:
            os.write(ready_fd, message.encode() + b"\n")
            os.close(ready_fd)
            ready_fd = None

    try:
        trio.run(serve, mnt, state_dir, args.allow_other, tell, args.read_spin,
                 args.log_file)
    except Refused as e:
        log.error("%s", e)
        tell(f"error: {e}")
        raise
    except BaseException as e:
        log.exception("vsfs stopped on an error")
        tell(f"error: {e!r}")
        return 1
    return 0


async def serve(mnt: Path, state_dir: Path, allow_other: bool,
                tell: Callable[[str], None], read_spin_us: int = READ_SPIN_US,
                log_file: Path | None = None) -> None:
    state = StateDir(state_dir)
    try:
        # Held until this process ends: what load() removes as litter is no one else's.
        state_lock = state.lock()
    except VsfsError as e:
        raise Refused(e.message) from None
    except OSError as e:
        raise Refused(f"state directory {state_dir}: {e.strerror}") from None
    manager = Manager(state)
    tree = Tree(manager)
    ops = Operations(tree, os.getuid(), os.getgid())
    manager.feed.subscribe(ops.on_change)
    manager.set_link_forgetter(ops.forget_link)
    await manager.load()
    # The kernel lists the mount under its real path: the one given may lead through a
    # symlink (/var/run is /run on Debian). Resolved now: once mounted, resolving it
    # would ask this very daemon, which does not answer yet.
    real_mnt = os.path.realpath(mnt)
    try:
        mount(ops, str(mnt), allow_other)
    except RuntimeError as e:
        raise Refused(f"cannot mount {mnt}: {e}") from None
    start_watchdog(real_mnt, log_file)
    ops.notifier.start()
    ops.mounted = True
    set_read_spin(read_spin_us)
    log.info("mounted %s (state directory %s)", mnt, state_dir)
    clean = False
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_on_signals, ops.notifier, manager)
            nursery.start_soon(keep_running, "the pool poll", manager.poll)
            nursery.start_soon(keep_running, "the host device watch", manager.watch_host)
            nursery.start_soon(keep_running, "the watch of jobs' writers", ops.watch_writers)
            tell("ok")
            await serve_requests()
            clean = True
            nursery.cancel_scope.cancel()
    finally:
        if not unmount(ops, clean):
            # An invalidation still waits in the kernel: the session must outlive it.
            # The watchdog aborts the connection once this process has ended.
            log.error("an invalidation still waits in the kernel; leaving the mount "
                      "to the watchdog")
        log.info("unmounted %s", mnt)
        with contextlib.suppress(OSError):
            manager.services.run_dir.rmdir()  # when no pool keeps files there
        os.close(state_lock)


def start_watchdog(mnt: str, log_file: Path | None) -> subprocess.Popen[bytes] | None:
    """The process that frees the mount if this daemon dies without unmounting it
    (vsfs/watchdog.py), at ``mnt`` as the kernel lists it (its real path). Started from
    the main thread: the kernel signals it when this thread ends, however it ends."""
    device = mount_device(mnt)
    if device is None or shutil.which("setpriv") is None:
        log.warning("no watchdog for %s: %s", mnt, "setpriv is missing (util-linux)"
                    if device is not None else "the mount is not in /proc/self/mountinfo")
        return None
    argv = ["setpriv", "--pdeathsig", "TERM", "--", sys.executable, "-m", "vsfs.watchdog",
            str(os.getpid()), device, mnt]
    if log_file is not None:
        argv.append(str(log_file))
    # Its own session: a terminal's signals are for the daemon. No descriptor of ours:
    # holding /dev/fuse would keep the very connection it may have to abort. The
    # parent-death signal blocked from the start (the mask goes through exec): one that
    # came while its Python starts would end it before it could take the signal.
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, close_fds=True,
                                start_new_session=True)
    except OSError as e:
        # A host at its process limit, say: the mount serves without one rather than
        # leaving a mount that nothing would free.
        log.error("no watchdog for %s: %s; if this daemon dies, 'vsfs umount %s' frees "
                  "the mount", mnt, e.strerror, mnt)
        return None
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


async def keep_running(name: str, task: Callable[[], Awaitable[None]]) -> None:
    """Run a background task of the mount for as long as the mount lives: an
    unexpected error is logged with its traceback and the task starts again a second
    later, instead of ending the mount with it."""
    while True:
        try:
            await task()
            return
        except Exception:
            log.exception("%s failed; starting it again in 1 s", name)
        await trio.sleep(1.0)


async def _on_signals(notifier: Notifier, manager: Manager) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %s: unmounting", signal.Signals(signum).name)
            manager.shutdown()
            # The notifier's last call may wait in the kernel for a directory lock that
            # a request holds until it is answered: stopped while the loop still answers,
            # not after, when nothing would answer that request any more.
            await trio.to_thread.run_sync(notifier.close)
            terminate()


# ---------------------------------------------------------------- umount


def cmd_umount(mnt: Path) -> int:
    mnt = mnt.absolute()
    tool = shutil.which("fusermount3")
    cmds = [[tool, "-u", str(mnt)]] if tool else []
    if os.geteuid() == 0:
        cmds.append(["umount", str(mnt)])
    errors = []
    for argv in cmds:
        res = subprocess.run(argv, capture_output=True, text=True, check=False)
        if res.returncode == 0:
            return 0
        errors.append(res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed")
    raise Refused(f"unmounting {mnt} failed: {errors[0] if errors else 'no fusermount3'}")


# ---------------------------------------------------------------- demo

DEMO_POOL = """<pool type='dir'>
  <name>demo</name>
  <target>
    <path>{path}</path>
  </target>
</pool>
"""

DEMO_QCOW2 = """<volume>
  <name>base.qcow2</name>
  <capacity unit='G'>2</capacity>
  <target><format type='qcow2'/></target>
</volume>
"""


def _demo_paths() -> tuple[Path, Path]:
    if os.geteuid() == 0:
        return Path("/mnt/vsfs"), Path("/var/lib/vsfs/demo-images")
    data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path.home() / "vsfs", Path(data) / "vsfs" / "demo-images"


def cmd_demo(args: argparse.Namespace) -> int:
    default_mnt, images = _demo_paths()
    images = (args.images or images).absolute()
    mnt: Path = (args.mountpoint or default_mnt).absolute()
    state_dir: Path = (args.state_dir or default_state_dir()).absolute()
    if os.path.ismount(mnt) and os.path.exists(mnt / "pools"):
        print(f"vsfs is already mounted at {mnt}")
    else:
        mnt.mkdir(parents=True, exist_ok=True)
        state = prepare_state(state_dir)
        if not (state_dir / "demo.xml").exists():
            images.mkdir(parents=True, exist_ok=True)
            pool = parse_pool(DEMO_POOL.format(path=images).encode())
            state.save(pool)
            state.set_autostart("demo", True)
        ns = argparse.Namespace(allow_other=False, log_level="INFO", log_file=None,
                                read_spin=READ_SPIN_US)
        check_mountpoint(mnt)
        spawn_daemon(mnt, state_dir, ns)
    vols = mnt / "pools" / "demo" / "volumes"
    if (mnt / "pools" / "demo").exists() and vols.exists() and not os.listdir(vols):
        # Made through the mount itself, as a user would.
        with open(vols / "disk1.img", "wb") as f:
            f.truncate(1 << 30)
        with open(mnt / "pools" / "demo" / "define", "w") as f:
            f.write(DEMO_QCOW2)
    me = shutil.which("vsfs") or str(Path(sys.executable).with_name("vsfs"))
    print(f"""
Mounted at {mnt}. Try:
  ls -l {mnt}/pools/demo/volumes/
  cat {mnt}/pools/demo/xml {mnt}/pools/demo/free
  truncate -s 5G {mnt}/pools/demo/volumes/web.img
  cat {mnt}/pools/demo/volinfo/web.img/xml
  echo 8G > {mnt}/pools/demo/volinfo/web.img/capacity
  echo 'snapshot web-snap' > {mnt}/pools/demo/volinfo/web.img/ctl
  qemu-img info {mnt}/pools/demo/volumes/web-snap
  rm {mnt}/pools/demo/volumes/web-snap
  cat {mnt}/README
Unmount with: {me} umount {mnt}""")
    return 0
