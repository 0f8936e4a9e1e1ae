"""vsfs.proc.run: the one way commands run."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import trio
from trio._core import _thread_cache

from vsfs.errors import CommandNoSpace
from vsfs.proc import run


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


def test_commands_fail_in_english_whatever_the_locale(tmp_path: Path,
                                                      german: dict[str, str]) -> None:
    src = tmp_path / "data"
    src.write_bytes(b"x" * 65536)
    # The host really speaks German: the same command run as the user would is not English.
    said = subprocess.run(["cp", str(src), "/dev/full"], capture_output=True, text=True,
                          env=os.environ.copy(), check=False).stderr
    assert "No space left on device" not in said and said.strip(), said

    async def main() -> None:
        with pytest.raises(CommandNoSpace) as e:
            await run(["cp", str(src), "/dev/full"])
        assert e.value.errno == 28  # ENOSPC, not EIO
        assert "No space left on device" in e.value.message

    trio.run(main)


def test_a_command_that_dies_with_the_daemon_outlives_the_thread_that_started_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The parent-death signal (setpriv --pdeathsig) follows the thread that started the
    command, and trio starts commands from worker threads that it ends once idle (after
    10 s; 0.2 s here): a long copy must not be killed midway when that thread goes."""
    monkeypatch.setattr(_thread_cache, "IDLE_TIMEOUT", 0.2)

    async def main() -> None:
        await run(["sleep", "1.5"], dies_with_daemon=True)

    trio.run(main)
