"""The ctl command languages (vsfs/commands.py): what each line means, and that a line
that does not parse is refused before any action starts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vsfs import commands
from vsfs.errors import Busy, Invalid, Unsupported
from vsfs.jobs import Jobs
from vsfs.manager import Manager
from vsfs.model import PoolState, VolumeDef
from vsfs.state import StateDir


@pytest.mark.parametrize(("line", "words"), [
    ("start\n", ["start"]),
    ("  clone  b2   other \n", ["clone", "b2", "other"]),
    ("clone 'my disk' \"other pool\"", ["clone", "my disk", "other pool"]),
    ("", []),
    ("\n", []),
])
def test_words_split_as_a_shell_does(line: str, words: list[str]) -> None:
    assert commands.words(line) == words


def test_unbalanced_quotes_are_einval() -> None:
    with pytest.raises(Invalid, match="cannot split"):
        commands.words("clone 'b2")


@pytest.mark.parametrize(("text", "value"), [
    *((t, True) for t in ("yes", "1", "true", "on", "YES\n", " On ")),
    *((t, False) for t in ("no", "0", "false", "off", "No\n")),
])
def test_autostart_values(text: str, value: bool) -> None:
    assert commands.parse_bool(text) is value


@pytest.mark.parametrize("text", ["", "maybe", "2", "yes no"])
def test_bad_autostart_values(text: str) -> None:
    with pytest.raises(Invalid, match="expected yes or no"):
        commands.parse_bool(text)


@pytest.mark.parametrize(("args", "overwrite"), [
    ([], False),
    (["--overwrite"], True),
    (["--no-overwrite"], False),
    (["--overwrite", "--no-overwrite"], False),
    (["--no-overwrite", "--overwrite"], True),
])
def test_build_options(args: list[str], overwrite: bool) -> None:
    assert commands.build_overwrite(args) is overwrite


def test_unknown_build_option() -> None:
    with pytest.raises(Invalid, match="unknown build option '--force'"):
        commands.build_overwrite(["--force"])


@pytest.fixture
async def manager(tmp_path: Path) -> Manager:
    """A manager with dir pool p over tmp_path/img, defined and inactive."""
    m = Manager(StateDir(tmp_path / "state"))
    await m.load()
    await m.define_pool(f"<pool type='dir'><name>p</name><target><path>{tmp_path / 'img'}"
                        "</path></target></pool>".encode())
    return m


@pytest.mark.parametrize(("line", "message"), [
    ("", "empty command; expected start, stop, build, refresh or delete"),
    ("launch", "unknown command 'launch'; expected start"),
    ("start now", "'start' takes no arguments"),
    ("build --force", "unknown build option"),
    ("delete 'x", "cannot split"),
])
async def test_bad_pool_lines_change_nothing(tmp_path: Path, manager: Manager, line: str,
                                             message: str) -> None:
    with pytest.raises(Invalid, match=message):
        await commands.pool_command(manager, "p", line)
    assert manager.entry("p").state == PoolState.INACTIVE
    assert not (tmp_path / "img").exists()


async def test_pool_lines_reach_their_actions(tmp_path: Path, manager: Manager) -> None:
    await commands.pool_command(manager, "p", "build\n")
    assert (tmp_path / "img").is_dir()
    await commands.pool_command(manager, "p", "start")
    assert manager.entry("p").running
    with pytest.raises(Busy, match="already active"):
        await commands.pool_command(manager, "p", "start")
    await commands.pool_command(manager, "p", "refresh")
    await commands.pool_command(manager, "p", "stop")
    assert not manager.entry("p").running
    await commands.pool_command(manager, "p", "delete")
    assert not (tmp_path / "img").exists()


@pytest.mark.parametrize(("line", "message"), [
    ("", "empty command; expected wipe, clone NEW"),
    ("copy b", "unknown command 'copy'"),
    ("delete now", "bad arguments for 'delete'"),
    ("wipe twice", "bad arguments for 'wipe'"),
    ("clone", "bad arguments for 'clone'"),
    ("clone a b c", "bad arguments for 'clone'"),
    ("snapshot", "bad arguments for 'snapshot'"),
    ("shrink", "bad arguments for 'shrink'"),
    ("shrink 1M 2M", "bad arguments for 'shrink'"),
])
async def test_bad_volume_lines_change_nothing(tmp_path: Path, manager: Manager, line: str,
                                               message: str) -> None:
    await manager.build_pool("p")
    await manager.start_pool("p")
    await manager.create_volume("p", VolumeDef("v", 1 << 20))
    with pytest.raises(Invalid, match=message):
        await commands.volume_command(manager, "p", "v", line)
    assert sorted(os.listdir(tmp_path / "img")) == ["v"]
    assert os.path.getsize(tmp_path / "img" / "v") == 1 << 20


async def test_volume_lines_reach_their_actions(tmp_path: Path, manager: Manager) -> None:
    await manager.build_pool("p")
    await manager.start_pool("p")
    img = tmp_path / "img"
    await manager.create_volume("p", VolumeDef("v", 2 << 20))
    await commands.volume_command(manager, "p", "v", "clone 'v copy'")
    assert os.path.getsize(img / "v copy") == 2 << 20
    # Reaches the backend, which shrinks a file through capacity instead.
    with pytest.raises(Unsupported, match="shrunk by writing capacity"):
        await commands.volume_command(manager, "p", "v", "shrink 1M")
    await commands.volume_command(manager, "p", "v", "wipe zero")
    await commands.volume_command(manager, "p", "v", "snapshot s")
    assert manager.volume("p", "s").format == "qcow2"
    await commands.volume_command(manager, "p", "s", "delete")
    assert sorted(os.listdir(img)) == ["v", "v copy"]


async def test_job_lines() -> None:
    jobs = Jobs(lambda change: None)
    job = jobs.begin("wipe p/v", "wiped", [(("p", "v"), True)])
    with pytest.raises(Invalid, match="expected cancel"):
        commands.job_command(job, "stop")
    commands.job_command(job, "cancel\n")
    assert job.cancelled
    jobs.finish(job)
    with pytest.raises(Invalid, match="has ended already"):
        commands.job_command(job, "cancel")
