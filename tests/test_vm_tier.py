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

import conftest
import pytest

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent


def test_guest_suite(tmp_path: Path) -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is missing: run tests/vm/setup-vm.sh (.ci/test does)")
    results = tmp_path / "results"
    results.mkdir()
    console = tmp_path / "console.log"
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
    assert res.returncode == 0, f"guest suite failed ({res.returncode}): {res.stderr[-3000:]}"
    junit = (results / "junit.xml").read_text()
    assert 'failures="0"' in junit and 'errors="0"' in junit
    assert 'skipped="0"' in junit, "nothing may skip in the guest"
    assert "tests=\"0\"" not in junit


def test_guest_tests_are_not_collected_on_the_host() -> None:
    assert os.environ.get("VSFS_VM") != "1"
    assert conftest.collect_ignore == ["guest"]
