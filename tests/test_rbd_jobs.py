"""Long operations as jobs on an rbd pool, and MNT/events, against a real Ceph cluster.

The dir pool's tests (tests/test_mount_jobs.py) on RBD: an image of random data is
cloned by ``rbd cp`` inside the cluster, so what runs beside it can be seen: another
image of the pool made and removed at once, the source refused with EBUSY naming the
job, the pool's stop refused, the job's progress, its cancel (no partial image left), a
clone without room, and the events of each, read by ``cat MNT/events`` as a user does
(tests/events.py), opened before acting. Images made by hand (``rbd create``) appear
as events too: rbd pools poll ``rbd ls``.

As in the dir pool's tests, the copy (the ``rbd cp`` process) is held by the test as a
slow cluster would hold it: paused while the test looks at what runs beside it
(tests/test_mount_jobs.Copy). On this machine's two cores a running ``rbd cp`` makes
every other Ceph client three times slower (a create, four ``rbd``/``rados`` commands,
took 2.3 s beside it, 0.56 s alone): that is the machine, not a wait for the clone.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from ceph_cluster import CephCluster, rbd_export
from events import EventReader
from jobwatch import (
    CANCELED,
    Held,
    changes_refused,
    copied_some,
    ending_jobs,
    runs_to_its_end,
    start_clone,
    timed_alone,
)
from support import Mount, sh
from test_mount_jobs import jobs_doing, jobs_text, state, value, wait_ended

from vsfs.backends.rbd import POLL_EVERY

pytestmark = [pytest.mark.fuse, pytest.mark.root, pytest.mark.ceph]

MiB = 1 << 20
# The cloned image: random data (the cluster's OSD keeps it in RAM, 1 GiB in all: the
# source, a clone and a cancelled clone's part fit).
SIZE = 256 * MiB
# How long a refusal may take with the copy paused; one that waits for the clone would
# wait for ever.
ANSWER = 5.0

MakePool = Callable[[Mount, str], Path]


# How long a cancelled rbd clone may take, after its copy stopped (within a second), to
# fence the killed copy's client and remove the partial image.
REMOVAL = 5.0


def images(ceph: CephCluster) -> list[str]:
    return sorted(ceph.cli("rbd", "ls", ceph.pool).stdout.decode().split())


@pytest.fixture(autouse=True)
def no_images_left(ceph: CephCluster) -> Iterator[None]:
    """After each test (and after rbd_pool has stopped its pools), no image is left: one
    a killed ``rbd`` client still watches (a cancelled copy) is freed by blocklisting
    that client, which is gone, as Ceph's documentation says to."""
    yield
    for image in images(ceph):
        ceph.cli("rbd", "snap", "purge", f"{ceph.pool}/{image}", check=False)
        if ceph.cli("rbd", "rm", "--no-progress", f"{ceph.pool}/{image}",
                    check=False).returncode == 0:
            continue
        status = ceph.cli("rbd", "status", "--format", "json", f"{ceph.pool}/{image}",
                          check=False)
        with contextlib.suppress(ValueError):
            for watcher in json.loads(status.stdout).get("watchers", []):
                ceph.cli("ceph", "osd", "blocklist", "add", watcher["address"], check=False)
        ceph.cli("rbd", "rm", "--no-progress", f"{ceph.pool}/{image}")


@pytest.fixture(scope="module")
def data() -> bytes:
    return os.urandom(SIZE)


@pytest.fixture
def rbd_big(vsfs: Mount, ceph: CephCluster, rbd_pool: MakePool,
            data: bytes) -> Iterator[tuple[Path, EventReader, Held]]:
    """Pool ``r`` with image ``big`` (random data, imported by hand and found by a
    refresh), a reader of MNT/events opened before the pool was defined, and what the
    test starts beside its jobs (writers, paused copies). Jobs still running at the end
    are cancelled; the images are removed by rbd_pool and no_images_left."""
    with EventReader(vsfs.path) as ev, ending_jobs(vsfs) as held:
        p = rbd_pool(vsfs, "r")
        ceph.cli("rbd", "import", "--no-progress", "-", f"{ceph.pool}/big", stdin=data)
        sh(f"echo refresh > {p}/ctl", check=True)
        assert os.listdir(p / "volumes") == ["big"]
        assert value(p / "volinfo" / "big" / "capacity") == str(SIZE)
        ev.wait_for("volume r/big created")
        ev.assert_order("pool r defined", "pool r started", "volume r/big created",
                        "pool r refreshed")
        yield p, ev, held


def test_rbd_clone_runs_while_the_pool_goes_on(
        vsfs: Mount, ceph: CephCluster, data: bytes,
        rbd_big: tuple[Path, EventReader, Held]) -> None:
    m = vsfs.path
    p, ev, held = rbd_big
    vols = p / "volumes"
    timed_alone(vsfs, "r")  # for the record
    clone = start_clone(held, vsfs, "r", "big", "big2", Path(f"{ceph.pool}/big"))
    job, jid, what, copy = clone.job, clone.jid, clone.what, clone.copy
    copied_some(copy, m, job)
    # Another image of the pool is made and removed meanwhile, each in well under a
    # second: not waiting for the clone.
    for cmd in (f"truncate -s 8M {vols}/small", f"rm {vols}/small"):
        t1 = time.monotonic()
        res = copy.guarded(cmd, ANSWER)
        took = time.monotonic() - t1
        print(f"while the clone runs: {cmd.split()[0]} {took:.2f} s")
        assert res.returncode == 0, f"{cmd}: {res.stderr}"
        assert took < 1.0, f"{cmd} took {took:.2f} s while job {jid} ran"
    assert "small" not in images(ceph)
    changes_refused(vsfs, clone, "r", "big", "big2", ANSWER)

    # Then the copy goes on to its end, its progress followed.
    runs_to_its_end(vsfs, clone, SIZE)
    assert images(ceph) == ["big", "big2"]
    assert sorted(os.listdir(vols)) == ["big", "big2"]
    assert rbd_export(ceph, "big2") == data

    ev.wait_for(f"job {jid} done {what}")
    ev.assert_order(f"job {jid} started {what}", "volume r/small created",
                    "volume r/small deleted", "pool r refreshed", "volume r/big2 created",
                    f"job {jid} done {what}")
    assert len(ev.find("volume r/big2 created")) == 1
    sh(f"rm {vols}/big2 && echo stop > {p}/ctl", check=True)
    ev.wait_for("pool r stopped")
    ev.assert_order(f"job {jid} done {what}", "volume r/big2 deleted", "pool r stopped")
    vsfs.assert_clean_log()


def test_rbd_clone_cancelled(vsfs: Mount, ceph: CephCluster,
                             rbd_big: tuple[Path, EventReader, Held]) -> None:
    m = vsfs.path
    p, ev, held = rbd_big
    vols, big = p / "volumes", p / "volinfo" / "big"
    before, listed = images(ceph), sorted(os.listdir(vols))
    assert before == listed == ["big"]
    clone = start_clone(held, vsfs, "r", "big", "big2", Path(f"{ceph.pool}/big"))
    job, jid, what, copy = clone.job, clone.jid, clone.what, clone.copy
    copied_some(copy, m, job)
    assert "big2" in images(ceph), "no image is being copied into"
    assert "big2" not in os.listdir(vols), "a half-made clone is listed"

    t0 = time.monotonic()
    sh(f"echo cancel > {job}/ctl", check=True)
    while copy.alive():
        assert time.monotonic() - t0 < 1.0, "the copy still runs 1 s after the cancel"
        time.sleep(0.01)
    # The copy stopped within the second; the job ends once the partial image is gone.
    # A killed `rbd cp` still watches it (Ceph times a watch out after 30 s): vsfs fences
    # that client (`ceph osd blocklist add`, ~0.7 s here) and removes the image (`rbd rm`
    # deletes each object written: ~1 s for this one). REMOVAL bounds both, far below the
    # 30 s a removal waited before the fence.
    st = wait_ended(job, t0 + REMOVAL - time.monotonic())
    if st != "cancelled":
        # Say how it ended, and what it left, for the failure's message.
        st = wait_ended(job, 60)
        raise AssertionError(f"job {jid} still ran {REMOVAL} s after the cancel; it ended "
                             f"{st} after {time.monotonic() - t0:.1f} s, leaving the images "
                             f"{images(ceph)} (before: {before}); MNT/error: "
                             f"{vsfs.error()!r}; {jobs_text(m)}")
    assert clone.writer.ended(t0 + REMOVAL - time.monotonic()), \
        "the write of the clone command is still waiting after the partial image went"
    assert clone.writer.proc.returncode != 0 and CANCELED in clone.writer.err, \
        f"the writer got {clone.writer.err!r}, not ECANCELED"
    assert "cancel" in vsfs.error()
    assert images(ceph) == before, "the cancelled clone left an image"
    assert sorted(os.listdir(vols)) == listed
    assert not os.path.lexists(big / "job")
    assert value(p / "state") == "running"
    ev.wait_for(f"job {jid} cancelled {what}")
    ev.assert_order(f"job {jid} started {what}", f"job {jid} cancelled {what}")
    # Nothing of it turns up later either (the next poll of rbd ls included).
    ev.drain(quiet=POLL_EVERY + 1.5)
    assert images(ceph) == before
    assert ev.find("volume r/big2") == []
    vsfs.assert_clean_log()


def test_rbd_clone_into_a_pool_without_room(vsfs: Mount, ceph: CephCluster,
                                            rbd_pool: MakePool) -> None:
    m = vsfs.path
    with EventReader(m) as ev:
        p = rbd_pool(vsfs, "r")
        vols = p / "volumes"
        # Thin: 4 GiB of nothing, more than the whole cluster holds.
        sh(f"truncate -s 4G {vols}/huge", check=True)
        free = int(value(p / "free"))
        assert free < 4 << 30, f"{free} bytes free: room for a clone after all"
        res = sh(f"echo 'clone huge2' > {p}/volinfo/huge/ctl")
        assert "No space left on device" in res.stderr, res.stderr
        assert vsfs.error()
        assert images(ceph) == ["huge"], "the refused clone left an image"
        assert os.listdir(vols) == ["huge"]
        # If a job was started for it, it failed, and says why.
        what = "clone r/huge -> r/huge2"
        for job in jobs_doing(m, what):
            assert state(job) == "failed", jobs_text(m)
            assert value(job / "error"), jobs_text(m)
            ev.wait_for(f"job {job.name} failed {what}")
        assert not os.path.lexists(p / "volinfo" / "huge" / "job")
        sh(f"rm {vols}/huge", check=True)
        ev.wait_for("volume r/huge deleted")
        ev.drain()
        assert ev.find("volume r/huge2") == []
        ev.assert_order("pool r defined", "pool r started", "volume r/huge created",
                        "volume r/huge deleted")
    vsfs.assert_clean_log()


def test_rbd_events_of_changes_made_outside(vsfs: Mount, ceph: CephCluster,
                                            rbd_pool: MakePool) -> None:
    """Images made, resized and removed by hand (``rbd``) are seen by the pool's poll of
    ``rbd ls`` (every POLL_EVERY seconds), with no refresh: volume events."""
    wait = POLL_EVERY + 5  # a poll, and a margin
    with EventReader(vsfs.path) as ev:
        p = rbd_pool(vsfs, "r")
        ceph.cli("rbd", "create", "--size", "8M", f"{ceph.pool}/outside")
        ev.wait_for("volume r/outside created", timeout=wait)
        assert os.listdir(p / "volumes") == ["outside"]
        ceph.cli("rbd", "resize", "--size", "16M", f"{ceph.pool}/outside")
        ev.wait_for(f"volume r/outside resized {16 * MiB}", timeout=wait)
        ceph.cli("rbd", "rm", "--no-progress", f"{ceph.pool}/outside")
        ev.wait_for("volume r/outside deleted", timeout=wait)
        assert os.listdir(p / "volumes") == []
        sh(f"echo stop > {p}/ctl", check=True)
        ev.wait_for("pool r stopped")
        ev.assert_order("pool r defined", "pool r started", "volume r/outside created",
                        "volume r/outside resized", "volume r/outside deleted",
                        "pool r stopped")
    vsfs.assert_clean_log()
