"""The manager, the tree and the FUSE adapter called directly, without a mount."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pyfuse3
import pytest
import trio
import trio.testing

from vsfs.errors import Busy, Exists, Invalid, NoSpace, NotFound
from vsfs.fuse_ops import Operations
from vsfs.manager import Manager
from vsfs.model import VolumeDef
from vsfs.state import StateDir
from vsfs.tree import FILES, Dir, File, Link, Stream, Tree, readme_text, source_query

DOCS = Path(__file__).resolve().parent.parent / "docs"


def pool_xml(name: str, target: Path) -> bytes:
    return (f"<pool type='dir'><name>{name}</name><target><path>{target}</path></target>"
            "</pool>").encode()


def make(tmp_path: Path) -> tuple[Manager, Tree]:
    m = Manager(StateDir(tmp_path / "state"))
    return m, Tree(m)


@pytest.fixture
async def manager(tmp_path: Path) -> tuple[Manager, Tree]:
    """A manager, loaded from the empty state directory tmp_path/state, and its tree."""
    m, tree = make(tmp_path)
    await m.load()
    return m, tree


@pytest.fixture
async def running_pool(tmp_path: Path, manager: tuple[Manager, Tree]) -> tuple[Manager, Tree]:
    """A manager and tree with dir pool p over tmp_path/img, built and started."""
    m, tree = manager
    await m.define_pool(pool_xml("p", tmp_path / "img"))
    await m.build_pool("p")
    await m.start_pool("p")
    return m, tree


async def test_manager_pool_and_volume_rules(tmp_path: Path,
                                             manager: tuple[Manager, Tree]) -> None:
    m, _ = manager
    await m.define_pool(pool_xml("p", tmp_path / "img"))
    with pytest.raises(Exists):
        await m.define_pool(pool_xml("p", tmp_path / "img2"))
    with pytest.raises(Invalid, match="not active"):
        await m.create_volume("p", VolumeDef("v", 1024))
    await m.build_pool("p")
    await m.start_pool("p")
    with pytest.raises(Busy):
        await m.undefine_pool("p")
    vol = await m.create_volume("p", VolumeDef("v", 1 << 20))
    assert vol.path == str(tmp_path / "img" / "v") and vol.format == "raw"
    assert os.path.getsize(vol.path) == 1 << 20
    with pytest.raises(Exists):
        await m.create_volume("p", VolumeDef("v", 1024))
    with pytest.raises(NoSpace):
        await m.create_volume("p", VolumeDef("huge", 1 << 62))
    assert not (tmp_path / "img" / "huge").exists()
    with pytest.raises(Invalid):
        await m.create_volume("p", VolumeDef("../escape", 1024))
    assert m.by_path(vol.path) == ("p", vol)
    assert m.by_key(vol.key) == ("p", vol)
    await m.snapshot_volume("p", "v", "s")
    with pytest.raises(Busy, match="backing store"):
        await m.delete_volume("p", "v")
    await m.delete_volume("p", "s")
    await m.delete_volume("p", "v")
    with pytest.raises(NotFound):
        await m.delete_volume("p", "v")
    await m.stop_pool("p")
    await m.undefine_pool("p")
    assert list((tmp_path / "state").glob("*.xml")) == []


async def test_volume_listing_matches_lookups(tmp_path: Path,
                                              running_pool: tuple[Manager, Tree]) -> None:
    """volumes/ is listed in one pass (Dir.entries): it must show what a lookup of each
    name finds, an upload in progress as a regular file, and nothing once stopped."""
    m, tree = running_pool
    for name in ("a", "b"):
        await m.create_volume("p", VolumeDef(name, 1024))
    upload = await m.uploads.begin("p", "c")
    vols = tree.resolve(("pools", "p", "volumes"))
    assert isinstance(vols, Dir) and vols.entries is not None
    listed = tree.children(vols)
    one_by_one = [(n, vols.child(n)) for n in vols.names()]
    assert listed == one_by_one
    assert [(n, type(node).__name__) for n, node in listed] == [
        ("a", "Link"), ("b", "Link"), ("c", "UploadFile")]
    assert [node.target for _, node in listed if isinstance(node, Link)] == [
        str(tmp_path / "img" / "a"), str(tmp_path / "img" / "b")]
    await m.uploads.close(upload)
    await m.stop_pool("p")
    assert tree.children(vols) == []


async def test_autostart_pool_starts_on_load(tmp_path: Path,
                                             manager: tuple[Manager, Tree]) -> None:
    m, _ = manager
    await m.define_pool(pool_xml("a", tmp_path / "img"))
    await m.build_pool("a")
    await m.set_autostart("a", True)
    (tmp_path / "img" / "disk").write_bytes(b"x")
    m2, _ = make(tmp_path)
    await m2.load()
    assert m2.entry("a").running and list(m2.entry("a").volumes) == ["disk"]


def _instances(pattern: str) -> str:
    return (pattern.replace("<pool>", "p").replace("<vol>", "v").replace("<uuid>", "UUID")
            .replace("<key>", "KEY").replace("<local path>", "LOCALPATH"))


async def test_files_table_matches_the_tree(tmp_path: Path,
                                            running_pool: tuple[Manager, Tree]) -> None:
    m, tree = running_pool
    vol = await m.create_volume("p", VolumeDef("v", 1024))
    uuid = m.entry("p").pool.uuid
    # A job holding the volume: jobs/<id>/ and volinfo/v/job exist while it runs.
    job = m.jobs.begin("wipe p/v", "wiped", [(("p", "v"), True)])
    documented = set()
    for pattern, access, _ in FILES:
        path = _instances(pattern).rstrip("/").replace("<id>", str(job.id))
        path = path.replace("UUID", uuid).replace("KEY", vol.key.replace("/", "\\x2f"))
        path = path.replace("LOCALPATH", vol.path.lstrip("/"))
        path = path.replace("<dev>", next(iter(m.host.devices())))
        path = path.replace("<type>", "netfs").replace("<host>", "127.0.0.1")
        node = tree.resolve(tuple(path.split("/")))
        assert node is not None, f"{pattern} is in FILES but not in the tree"
        kind = Stream if path == "events" else {"link": Link, "dir": Dir}.get(access, File)
        assert isinstance(node, kind), pattern
        if isinstance(node, File):
            assert ("r" in access) == (node.read is not None or path == "error"), pattern
            assert ("w" in access) == (node.write is not None), pattern
        documented.add(_instances(pattern).rstrip("/"))
    # and nothing in the tree goes undocumented
    dev = next(iter(m.host.devices()))
    for base in ["", "sources", "pools", "pools/p", "pools/p/volinfo/v",
                 f"host/volinfo/{dev}", "jobs", f"jobs/{job.id}"]:
        node = tree.resolve(tuple(base.split("/")) if base else ())
        assert isinstance(node, Dir)
        for name, child in tree.children(node):
            full = f"{base}/{name}".lstrip("/").replace(f"/{dev}/", "/<dev>/")
            full = re.sub(r"^jobs/\d+", "jobs/<id>", full)
            if isinstance(child, Dir) and any(d.startswith(full + "/") for d in documented):
                continue
            assert full in documented, f"{full} is in the tree but not in FILES"


def test_docs_and_readme_name_every_file() -> None:
    reference = (DOCS / "reference.md").read_text()
    readme = readme_text()
    for pattern, _, _ in FILES:
        assert f"`{pattern}`" in reference, f"docs/reference.md lacks {pattern}"
        assert pattern in readme


def request(uid: int, gid: int, pid: int, umask: int) -> pyfuse3.RequestContext:
    """Stands in for a request's pyfuse3.RequestContext, whose fields only pyfuse3 itself
    can set (cdef readonly)."""
    return cast(pyfuse3.RequestContext, SimpleNamespace(uid=uid, gid=gid, pid=pid, umask=umask))


async def adapter_with_pool(tmp_path: Path, ctx: pyfuse3.RequestContext
                            ) -> tuple[Tree, Operations, pyfuse3.EntryAttributes]:
    """The adapter over a tree with pool p defined (inactive), and the entry of pools/."""
    m, tree = make(tmp_path)
    await m.load()
    await m.define_pool(pool_xml("p", tmp_path / "img"))
    ops = Operations(tree, 0, 0)
    return tree, ops, await ops.lookup(pyfuse3.ROOT_INODE, b"pools", ctx)


async def test_adapter_maps_errors_and_records_them(tmp_path: Path) -> None:
    ctx = request(uid=1234, gid=1234, pid=1, umask=0o22)

    tree, ops, pools = await adapter_with_pool(tmp_path, ctx)
    p = await ops.lookup(pools.st_ino, b"p", ctx)
    ctl = await ops.lookup(p.st_ino, b"ctl", ctx)
    fi = await ops.open(ctl.st_ino, os.O_WRONLY, ctx)
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.write(fi.fh, 0, b"frobnicate\n")
    assert e.value.errno == errno.EINVAL
    await ops.release(fi.fh)
    assert tree.error_text(1234).startswith(b"unknown command 'frobnicate'")
    assert tree.error_text(0) == b""
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.lookup(p.st_ino, b"nope", ctx)
    assert e.value.errno == errno.ENOENT
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.rmdir(pools.st_ino, b"nope", ctx)
    assert e.value.errno == errno.ENOENT
    # a readdir snapshot: offsets are stable and the listing is complete
    fh = await ops.opendir(p.st_ino, ctx)
    assert [n for n, _ in ops._dirs[fh].entries][:3] == ["xml", "define", "ctl"]
    await ops.releasedir(fh)
    # inode numbers are never reused
    await ops.forget([(ctl.st_ino, 1)])
    again = await ops.lookup(p.st_ino, b"ctl", ctx)
    assert again.st_ino != ctl.st_ino


def test_readme_lists_verbs() -> None:
    text = readme_text()
    assert re.search(r"truncate -s 10G pools/P/volumes/V", text)
    assert text.endswith("\n")


async def test_duplicate_uuid_in_the_state_directory_is_left_out(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = StateDir(tmp_path / "state")
    state.ensure()
    uuid = "11111111-2222-4333-8444-555555555555"
    for name in ("a", "b"):
        (state.path / f"{name}.xml").write_text(
            f"<pool type='dir'><name>{name}</name><uuid>{uuid}</uuid>"
            f"<target><path>{tmp_path / name}</path></target></pool>")

    m = Manager(state)
    await m.load()
    assert sorted(m.pools) == ["a"]
    assert "pool b: UUID 11111111-2222-4333-8444-555555555555 is pool a's already" in caplog.text
    assert (state.path / "b.xml").exists()  # left as it was, for the user to mend


async def test_one_directory_under_two_spellings_is_one_target(
        tmp_path: Path, manager: tuple[Manager, Tree]) -> None:
    m, _ = manager
    (tmp_path / "img").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "img")
    await m.define_pool(pool_xml("p", tmp_path / "img"))
    for i, spelling in enumerate([f"{tmp_path}/./img", f"{tmp_path}/other/../img",
                                  f"{tmp_path}/link", f"{tmp_path}//img/"]):
        with pytest.raises(Exists, match="already uses target"):
            # A string, not a Path: pathlib would drop the "." and "//" itself.
            await m.define_pool(f"<pool type='dir'><name>q{i}</name><target><path>"
                                f"{spelling}</path></target></pool>".encode())
    await m.define_pool(pool_xml("r", tmp_path / "other"))
    assert sorted(m.pools) == ["p", "r"]
    # Redefining a pool onto another's directory is refused too.
    with pytest.raises(Exists, match="already uses target"):
        await m.redefine_pool("r", pool_xml("r", tmp_path / "link"))


async def test_volumes_made_by_commands_are_private_until_done(
        tmp_path: Path, running_pool: tuple[Manager, Tree]) -> None:
    m, _ = running_pool
    backend = m.pools["p"].backend
    target = tmp_path / "img"
    script = 'umask > "$1"; ls -a "$(dirname "$1")" >> "$1"'
    await backend._made_by(  # type: ignore[attr-defined]
        lambda tmp: ["sh", "-c", script, "sh", tmp], str(target / "v"), 0o640,
        os.getuid(), os.getgid())
    text = (target / "v").read_text()
    assert text.startswith("0077\n")  # nobody else could open it while it was made
    assert ".vsfs-new-" in text  # under a hidden name, not yet a volume
    assert os.stat(target / "v").st_mode & 0o777 == 0o640
    assert os.listdir(target) == ["v"]
    with pytest.raises(Exists):  # never over one made meanwhile
        await backend._made_by(  # type: ignore[attr-defined]
            lambda tmp: ["touch", tmp], str(target / "v"), 0o600, -1, -1)
    assert os.listdir(target) == ["v"]
    # What a daemon that died left half made goes at the pool's next start.
    (target / ".vsfs-new-0123456789abcdef").write_text("half")
    await m.stop_pool("p")
    await m.start_pool("p")
    assert os.listdir(target) == ["v"]


@pytest.mark.parametrize("port", ["9" * 5000, "\u00b2", "65536", "0", "-1", ""])
def test_bad_ports_are_invalid(port: str) -> None:
    with pytest.raises(Invalid):
        source_query(f"host=h:{port}" if port else "host=h&port=")


async def test_a_task_waiting_for_an_undefined_pool_acts_on_nothing(
        tmp_path: Path, manager: tuple[Manager, Tree]) -> None:
    """set_autostart waiting for the lock while the pool is undefined: NotFound, and no
    autostart link left for a pool that is gone."""
    m, _ = manager
    await m.define_pool(pool_xml("p", tmp_path / "img"))
    entry = m.pools["p"]
    release = trio.Event()
    outcome: list[object] = []

    async def hold() -> None:
        async with entry.locked():
            await release.wait()

    async def autostart() -> None:
        try:
            await m.set_autostart("p", True)
            outcome.append("done")
        except NotFound as e:
            outcome.append(e)

    async with trio.open_nursery() as n:
        n.start_soon(hold)
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(m.undefine_pool, "p")
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(autostart)
        await trio.testing.wait_all_tasks_blocked()
        release.set()
    assert "p" not in m.pools
    assert len(outcome) == 1 and isinstance(outcome[0], NotFound), outcome
    assert not (tmp_path / "state" / "autostart" / "p.xml").is_symlink()


async def test_a_raw_wipe_keeps_the_size_throughout(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    running_pool: tuple[Manager, Tree]
                                                    ) -> None:
    """A wipe killed midway (kill -9 of the daemon) must not leave a volume of size 0:
    the blocks are dropped with the size kept, not by truncating to 0 and back."""
    m, _ = running_pool
    await m.create_volume("p", VolumeDef(name="v", capacity=4 << 20))
    path = tmp_path / "img" / "v"
    path.write_bytes(b"x" * (4 << 20))
    sizes: list[int] = []
    truncate = os.ftruncate

    def recorded(fd: int, length: int) -> None:
        sizes.append(length)
        truncate(fd, length)

    monkeypatch.setattr(os, "ftruncate", recorded)
    await m.wipe_volume("p", "v")
    monkeypatch.setattr(os, "ftruncate", truncate)
    assert 0 not in sizes
    assert path.read_bytes() == bytes(4 << 20)
    assert os.stat(path).st_blocks == 0
