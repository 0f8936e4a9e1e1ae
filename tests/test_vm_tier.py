"""The VM tier: boot Debian's kernel under QEMU (tests/vm/) and run tests/guest/ inside.

The host kernel here has no device-mapper, NFS client or iSCSI initiator; the guest has
them all. One pytest session runs in the guest on this checkout and venv; its result, a
junit report and the daemon logs come back through the results share.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent


# A race in the initiator of Debian 12's kernel (iscsi_tcp, seen with 6.1.0-56): when the
# target refuses a login (test_iscsi_chap's wrong password), the connection's cleanup
# sometimes dereferences a socket already released, and the guest kernel oopses. It is
# not vsfs's doing (no user space program can make the kernel oops), and it is rare; a
# run that dies of exactly this is run once more in a fresh guest, and says so.
GUEST_KERNEL_BUGS = ("RIP: 0010:iscsi_sw_tcp_release_conn",)


def run_guest(work: Path) -> tuple[subprocess.CompletedProcess[str], str, Path]:
    results = work / "results"
    results.mkdir(parents=True)
    console = work / "console.log"
    argv = ["bash", str(REPO / "tests/vm/run-vm.sh"), "--disks", "3", "--results",
            str(results), "--log", str(console), "--timeout", "2400", "--",
            sys.executable, "-m", "pytest", "tests/guest", "-p", "no:cacheprovider", "-q",
            "-rA", "--color=no", "--junitxml=/vsfs-results/junit.xml"]
    res = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=2700,
                         check=False)
    text = console.read_text(errors="replace") if console.exists() else ""
    # What the guest said is part of this test's output, pass or fail.
    print(text[-20000:])
    for log in sorted(results.glob("*.log")):
        print(f"--- daemon log {log.name} ---\n{log.read_text(errors='replace')[-5000:]}")
    return res, text, results


def test_guest_suite(tmp_path: Path) -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is missing: run tests/vm/setup-vm.sh (.ci/test does)")
    res, text, results = run_guest(tmp_path / "run1")
    bug = next((b for b in GUEST_KERNEL_BUGS if b in text), None)
    if res.returncode != 0 and bug is not None:
        print(f"WARNING: the guest kernel oopsed ({bug}), a known bug of its own; "
              "running the guest suite once more in a fresh guest")
        res, text, results = run_guest(tmp_path / "run2")
    assert res.returncode == 0, f"guest suite failed ({res.returncode}): {res.stderr[-3000:]}"
    junit = (results / "junit.xml").read_text()
    assert 'failures="0"' in junit and 'errors="0"' in junit
    assert 'skipped="0"' in junit, "nothing may skip in the guest"
    assert "tests=\"0\"" not in junit


def test_guest_tests_are_not_collected_on_the_host() -> None:
    assert os.environ.get("VSFS_VM") != "1"
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                          "-p", "no:cacheprovider", "tests"], cwd=REPO, capture_output=True,
                         text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ids = [ln for ln in res.stdout.splitlines() if "::" in ln]
    assert any(i.startswith("tests/test_vm_tier.py::") for i in ids), res.stdout[-3000:]
    assert not [i for i in ids if i.startswith("tests/guest/")]
