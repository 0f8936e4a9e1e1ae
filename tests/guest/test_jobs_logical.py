"""Long operations as jobs on a logical (LVM) pool, and MNT/events, in the QEMU guest.

The dir pool's tests (tests/test_mount_jobs.py) on a volume group: a volume of random
data is cloned by a real copy (``qemu-img convert`` into an LV made at its size), so
what runs beside it can be seen: another volume of the pool made and another removed
meanwhile, the source refused with EBUSY naming the job, the pool's stop refused, the
job's progress, its cancel, a clone without room, and the events of each, read by
``cat MNT/events`` as a user does (tests/events.py), opened before acting.

As in the dir pool's tests, the copy is held by the test as a slow disk would hold it
(paused while the test looks at what runs beside it: tests/test_mount_jobs.Copy). Here
that is needed twice over: under TCG a running qemu-img starves the guest (a shell
took 4 s to start beside it), and the clone of all the test disks allow takes some
10 s, less than the checks beside it.

Under TCG every LVM command takes a second or two by itself (lvcreate 1.7-2.8 s,
lvremove 1.2-3.5 s, measured in this guest), and vsfs runs three or four for a create:
a create or remove cannot take "well under a second" here whatever vsfs does. What
shows that they do not wait for the clone is that they end while the clone's copy is
paused, and within twice the time the same create and remove take with no clone (the
issue's benchmark target); the same bound holds for the removal of a cancelled clone's
LV once the copy is gone, which itself must be within a second of the cancel.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from events import EventReader
from jobwatch import (
    CANCELED,
    changes_refused,
    copied_some,
    ending_jobs,
    runs_to_its_end,
    start_clone,
    timed_alone,
)
from support import Mount, sh
from test_logical import define_vg
from test_mount_jobs import jobs_doing, jobs_text, state, value, wait_ended

pytestmark = [pytest.mark.guest, pytest.mark.fuse, pytest.mark.root]

MiB = 1 << 20
# The cloned volume: random data, as big as the test disks allow (three of 512 MiB, one
# group of 1524 MiB: the source and one clone fit, a second clone does not).
SIZE = 512 * MiB
VG = "vsfsjobs"
# How long a refusal may take in the guest with the copy paused (bash starts, vsfs
# answers): one that waits for the clone would wait for ever.
ANSWER = 10.0


def lvs() -> list[str]:
    return sorted(sh(f"lvs --noheadings -o lv_name {VG}", check=True).stdout.split())


def test_logical_clone_is_a_job(vsfs: Mount, disks: list[str]) -> None:
    m = vsfs.path
    v = m / "pools" / "vg"
    vols, big = v / "volumes", v / "volinfo" / "big"
    source = Path(f"/dev/{VG}/big")
    with EventReader(m) as ev, ending_jobs(vsfs) as held:
        define_vg(vsfs, "vg", disks[:3], vg=VG)
        sh(f"echo build > {v}/ctl && echo start > {v}/ctl", check=True)
        sh(f"truncate -s {SIZE} {vols}/big", check=True)
        sh(f"dd if=/dev/urandom of={vols}/big bs=1M count={SIZE // MiB} oflag=direct "
           "status=none", check=True)
        ev.wait_for("volume vg/big created")

        # The same create and remove with no clone running: what they cost here.
        made_alone, removed_alone = timed_alone(vsfs, "vg")
        sh(f"truncate -s 8M {vols}/old", check=True)

        # ---- a clone refusing what would change its source, then cancelled half way
        before, listed = lvs(), sorted(os.listdir(vols))
        assert before == ["big", "old"] and listed == ["big", "old"]
        clone = start_clone(held, vsfs, "vg", "big", "big3", source, timeout=120)
        job, jid, what, copy = clone.job, clone.jid, clone.what, clone.copy
        changes_refused(vsfs, clone, "vg", "big", "big3", ANSWER)
        assert lvs() == ["big", "big3", "old"]
        copied_some(copy, m, job)

        t0 = time.monotonic()
        sh(f"echo cancel > {job}/ctl", check=True)
        while copy.alive():
            assert time.monotonic() - t0 < 1.0, "the copy still runs 1 s after the cancel"
            time.sleep(0.01)
        # Then its LV goes (lvremove), and the job ends.
        bound = 1.0 + 2 * removed_alone
        st = wait_ended(job, t0 + bound - time.monotonic())
        assert st == "cancelled", f"{st} {bound:.1f} s after the cancel: {jobs_text(m)}"
        back = clone.writer.ended(t0 + bound - time.monotonic())
        took = time.monotonic() - t0
        assert back, f"the clone's writer still waits {took:.1f} s after the cancel"
        print(f"cancel: writer back after {took:.2f} s")
        assert clone.writer.proc.returncode != 0 and CANCELED in clone.writer.err, \
            f"the writer got {clone.writer.err!r}, not ECANCELED"
        assert lvs() == before, "the cancelled clone left an LV"
        assert sorted(os.listdir(vols)) == listed
        assert not os.path.exists(f"/dev/{VG}/big3")
        assert not os.path.lexists(big / "job")
        assert value(v / "state") == "running"
        ev.wait_for(f"job {jid} cancelled {what}")
        assert ev.find("volume vg/big3") == []
        ev.assert_order("volume vg/old created", f"job {jid} started {what}",
                        "pool vg refreshed", f"job {jid} cancelled {what}")

        # ---- a clone that runs to its end while the pool goes on
        clone = start_clone(held, vsfs, "vg", "big", "big2", source, timeout=120)
        job, jid, what, copy = clone.job, clone.jid, clone.what, clone.copy
        copied_some(copy, m, job)
        # Another volume of the pool is made, and another removed, meanwhile: not
        # waiting for the clone (paused, it would never end), and together as fast as
        # with no clone (one LVM command alone varies twofold here from run to run).
        alone = made_alone + removed_alone
        took = 0.0
        for cmd in (f"truncate -s 8M {vols}/small", f"rm {vols}/old"):
            t1 = time.monotonic()
            res = copy.guarded(cmd, ANSWER + 2 * alone)
            took += time.monotonic() - t1
            print(f"while the clone runs: {cmd.split()[0]} {time.monotonic() - t1:.2f} s")
            assert res.returncode == 0, f"{cmd}: {res.stderr}"
        assert took < max(1.0, 2 * alone), \
            f"a create and a remove took {took:.2f} s while job {jid} ran ({alone:.2f} s " \
            "without)"
        assert state(job) == "running", jobs_text(m)
        assert "small" in lvs() and "old" not in lvs()
        # Then the copy goes on to its end, its progress followed.
        runs_to_its_end(vsfs, clone, SIZE)
        assert lvs() == ["big", "big2", "small"]
        assert sorted(os.listdir(vols)) == ["big", "big2", "small"]
        sh(f"cmp /dev/{VG}/big /dev/{VG}/big2", check=True)
        ev.wait_for(f"job {jid} done {what}")
        for between in ("volume vg/small created", "volume vg/old deleted"):
            ev.assert_order(f"job {jid} started {what}", between, "volume vg/big2 created",
                            f"job {jid} done {what}")
        assert len(ev.find("volume vg/big2 created")) == 1

        # ---- no room for another copy: ENOSPC, nothing left
        free = int(value(v / "free"))
        assert free < SIZE, f"{free} bytes free: room for a clone after all"
        res = sh(f"echo 'clone big4' > {big}/ctl")
        assert "No space left on device" in res.stderr, res.stderr
        assert vsfs.error()
        assert lvs() == ["big", "big2", "small"], "the refused clone left an LV"
        assert sorted(os.listdir(vols)) == ["big", "big2", "small"]
        for job in jobs_doing(m, "clone vg/big -> vg/big4"):
            assert state(job) == "failed", jobs_text(m)
        assert not os.path.lexists(big / "job")

        for name in ("small", "big2", "big"):
            sh(f"rm {vols}/{name}", check=True)
        sh(f"echo stop > {v}/ctl && echo delete > {v}/ctl", check=True)
        ev.wait_for("pool vg deleted")
        ev.drain()
        assert ev.find("volume vg/big4") == []
        ev.assert_order("pool vg defined", "pool vg built", "pool vg started",
                        "volume vg/big created", "volume vg/small created",
                        "volume vg/small deleted", "volume vg/old created",
                        "volume vg/big2 created", "volume vg/small deleted",
                        "volume vg/big2 deleted", "volume vg/big deleted", "pool vg stopped",
                        "pool vg deleted")
    vsfs.assert_clean_log()


def test_logical_events_of_changes_made_outside(vsfs: Mount, disks: list[str]) -> None:
    """An LV made, resized and removed by hand is seen at the next refresh (logical pools
    are not polled) as a volume created, resized and deleted."""
    m = vsfs.path
    v = m / "pools" / "vg"
    with EventReader(m) as ev:
        define_vg(vsfs, "vg", disks[:1], vg=VG)
        sh(f"echo build > {v}/ctl && echo start > {v}/ctl", check=True)
        sh(f"lvcreate -q -y -n byhand -L 8M {VG}", check=True)
        sh(f"echo refresh > {v}/ctl", check=True)
        ev.wait_for("volume vg/byhand created")
        assert os.listdir(v / "volumes") == ["byhand"]
        sh(f"lvextend -q -L 16M {VG}/byhand", check=True)
        sh(f"echo refresh > {v}/ctl", check=True)
        ev.wait_for(f"volume vg/byhand resized {16 * MiB}")
        sh(f"lvremove -q -f {VG}/byhand", check=True)
        sh(f"echo refresh > {v}/ctl", check=True)
        ev.wait_for("volume vg/byhand deleted")
        assert os.listdir(v / "volumes") == []
        sh(f"echo stop > {v}/ctl && echo delete > {v}/ctl", check=True)
        ev.wait_for("pool vg deleted")
        ev.assert_order("pool vg defined", "pool vg built", "pool vg started",
                        "volume vg/byhand created", "pool vg refreshed",
                        "volume vg/byhand resized", "pool vg refreshed",
                        "volume vg/byhand deleted", "pool vg refreshed", "pool vg stopped",
                        "pool vg deleted")
    vsfs.assert_clean_log()
