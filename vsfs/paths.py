"""Where a mount keeps things by default: its state directory and its runtime files."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def runtime_dir(state_dir: Path) -> Path:
    """Where a mount keeps runtime files: one directory per state directory."""
    tag = hashlib.sha256(os.fsencode(os.path.abspath(state_dir))).hexdigest()[:12]
    if os.geteuid() == 0:
        return Path("/run/vsfs") / tag
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/vsfs-{os.geteuid()}"
    return Path(base) / "vsfs" / tag


def default_state_dir() -> Path:
    """The state directory a mount uses when none is given: the system's for root, the
    user's own (XDG) for anyone else."""
    if os.geteuid() == 0:
        return Path("/var/lib/vsfs/storage")
    data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(data) / "vsfs" / "storage"
