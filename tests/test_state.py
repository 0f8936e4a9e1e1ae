"""state.StateDir: pool definitions on disk in libvirt's own layout."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vsfs import state as state_mod
from vsfs.errors import BackendFailed, Invalid
from vsfs.model import Permissions, PoolDef, PoolSource, SourceHost
from vsfs.state import StateDir, StoredPool, atomic_write
from vsfs.xmlio import parse_pool


def _pool(name: str = "images", uuid: str = "4d1a8e5f-2b3c-4d5e-8f9a-0b1c2d3e4f50",
          target: str | None = None) -> PoolDef:
    return PoolDef(type="dir", name=name, uuid=uuid, target_path=target or f"/srv/{name}",
                   target_perms=Permissions(mode=0o755, owner=0, group=0))


UUIDS = [
    "11111111-2222-4333-8444-555555555555",
    "22222222-3333-4444-8555-666666666666",
    "33333333-4444-4555-8666-777777777777",
]


@pytest.fixture
def sd(tmp_path: Path) -> StateDir:
    d = StateDir(tmp_path / "storage")
    d.ensure()
    return d


def _names(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


# ---------------------------------------------------------------- ensure


def test_ensure_creates_dir_and_autostart(tmp_path: Path) -> None:
    d = StateDir(tmp_path / "deep" / "er" / "storage")
    assert not d.path.exists()
    d.ensure()
    assert d.path.is_dir()
    assert (d.path / "autostart").is_dir()
    assert d.autostart_dir == d.path / "autostart"
    # 0700 as libvirt's; a umask can only take bits away
    assert stat.S_IMODE(d.path.stat().st_mode) & 0o077 == 0
    assert stat.S_IMODE(d.autostart_dir.stat().st_mode) & 0o077 == 0


def test_ensure_is_idempotent_and_keeps_contents(sd: StateDir) -> None:
    sd.save(_pool())
    sd.ensure()
    assert (sd.path / "images.xml").exists()


def test_ensure_over_a_file_fails(tmp_path: Path) -> None:
    blocker = tmp_path / "storage"
    blocker.write_text("not a directory")
    with pytest.raises(BackendFailed):
        StateDir(blocker).ensure()


# ---------------------------------------------------------------- save


def test_save_writes_name_xml_that_parses_back(sd: StateDir) -> None:
    pool = _pool()
    sd.save(pool)
    f = sd.path / "images.xml"
    assert f.is_file()
    assert parse_pool(f.read_bytes()) == pool
    assert _names(sd.path) == ["autostart", "images.xml"]


def test_save_is_private(sd: StateDir) -> None:
    sd.save(_pool())
    assert stat.S_IMODE((sd.path / "images.xml").stat().st_mode) == 0o600


def test_save_replaces_a_definition(sd: StateDir) -> None:
    sd.save(_pool(target="/srv/old"))
    sd.save(_pool(target="/srv/new"))
    assert parse_pool((sd.path / "images.xml").read_bytes()).target_path == "/srv/new"
    assert _names(sd.path) == ["autostart", "images.xml"]


def test_save_keeps_everything_of_a_rich_pool(sd: StateDir) -> None:
    pool = PoolDef(
        type="netfs", name="nfs", uuid=UUIDS[0],
        source=PoolSource(hosts=(SourceHost("nfs.example.com", 2049),), dir="/export",
                          format="nfs", protocol_ver="4"),
        target_path="/mnt/nfs", mount_opts=("nosuid", "noexec"),
    )
    sd.save(pool)
    assert parse_pool((sd.path / "nfs.xml").read_bytes()) == pool


# ---------------------------------------------------------------- atomic_write


def test_atomic_write_creates_and_replaces(tmp_path: Path) -> None:
    f = tmp_path / "x.xml"
    atomic_write(f, b"first")
    assert f.read_bytes() == b"first"
    atomic_write(f, b"second, longer than the first")
    assert f.read_bytes() == b"second, longer than the first"
    atomic_write(f, b"3")
    assert f.read_bytes() == b"3"
    assert _names(tmp_path) == ["x.xml"]  # no temporary files left


def test_atomic_write_replaces_the_inode(tmp_path: Path) -> None:
    # rename, not an in-place rewrite: a reader holding the old file keeps it whole
    f = tmp_path / "x.xml"
    atomic_write(f, b"old")
    with open(f, "rb") as reader:
        atomic_write(f, b"new")
        assert reader.read() == b"old"
    assert f.read_bytes() == b"new"


def test_atomic_write_mode(tmp_path: Path) -> None:
    f = tmp_path / "x.xml"
    atomic_write(f, b"data", mode=0o640)
    assert stat.S_IMODE(f.stat().st_mode) & ~0o640 == 0
    assert stat.S_IMODE(f.stat().st_mode) & 0o600 == 0o600


def test_atomic_write_empty_and_large(tmp_path: Path) -> None:
    f = tmp_path / "x"
    atomic_write(f, b"")
    assert f.read_bytes() == b""
    big = os.urandom(3 * 1024 * 1024 + 7)
    atomic_write(f, big)
    assert f.read_bytes() == big


def test_atomic_write_failure_keeps_old_content_and_no_temp(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "x.xml"
    atomic_write(f, b"old")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("vsfs.state.os.replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write(f, b"new")
    monkeypatch.undo()
    assert f.read_bytes() == b"old"
    assert _names(tmp_path) == ["x.xml"]


def test_atomic_write_failure_while_writing_leaves_no_temp(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "x.xml"

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("vsfs.state.os.fsync", broken_fsync)
    with pytest.raises(OSError):
        atomic_write(f, b"new")
    monkeypatch.undo()
    assert _names(tmp_path) == []


# ---------------------------------------------------------------- autostart


def test_set_autostart_makes_a_relative_symlink(sd: StateDir) -> None:
    sd.save(_pool())
    sd.set_autostart("images", True)
    link = sd.autostart_dir / "images.xml"
    assert link.is_symlink()
    target = os.readlink(link)
    assert not os.path.isabs(target)
    assert target == os.path.join("..", "images.xml")
    assert link.resolve() == (sd.path / "images.xml").resolve()
    assert os.path.samefile(link, sd.path / "images.xml")
    assert _names(sd.autostart_dir) == ["images.xml"]  # no temporary link left


def test_autostart_link_survives_moving_the_directory(sd: StateDir, tmp_path: Path) -> None:
    sd.save(_pool())
    sd.set_autostart("images", True)
    moved = tmp_path / "moved"
    sd.path.rename(moved)
    assert os.path.samefile(moved / "autostart" / "images.xml", moved / "images.xml")


def test_set_autostart_twice_and_off(sd: StateDir) -> None:
    sd.save(_pool())
    sd.set_autostart("images", True)
    sd.set_autostart("images", True)
    assert (sd.autostart_dir / "images.xml").is_symlink()
    assert _names(sd.autostart_dir) == ["images.xml"]
    sd.set_autostart("images", False)
    assert not os.path.lexists(sd.autostart_dir / "images.xml")
    assert _names(sd.autostart_dir) == []
    sd.set_autostart("images", False)  # already off: fine
    assert (sd.path / "images.xml").exists()  # the definition stays


def test_set_autostart_replaces_a_stale_link(sd: StateDir) -> None:
    sd.save(_pool())
    (sd.autostart_dir / "images.xml").symlink_to("/etc/libvirt/storage/images.xml")
    sd.set_autostart("images", True)
    assert os.readlink(sd.autostart_dir / "images.xml") == os.path.join("..", "images.xml")


def test_set_autostart_needs_a_definition(sd: StateDir) -> None:
    with pytest.raises(Invalid):
        sd.set_autostart("nosuch", True)
    assert _names(sd.autostart_dir) == []


# ---------------------------------------------------------------- load


def test_load_empty(sd: StateDir) -> None:
    assert list(sd.load()) == []


def test_load_returns_pools_and_autostart_flags(sd: StateDir) -> None:
    a = _pool("alpha", UUIDS[0])
    b = _pool("beta", UUIDS[1])
    c = _pool("gamma", UUIDS[2])
    for p in (c, a, b):
        sd.save(p)
    sd.set_autostart("beta", True)
    loaded = list(sd.load())
    assert loaded == [
        StoredPool(a, False),
        StoredPool(b, True),
        StoredPool(c, False),
    ]


def test_load_after_autostart_off(sd: StateDir) -> None:
    sd.save(_pool())
    sd.set_autostart("images", True)
    sd.set_autostart("images", False)
    assert [s.autostart for s in sd.load()] == [False]


def test_load_skips_broken_xml_and_logs(sd: StateDir, caplog: pytest.LogCaptureFixture) -> None:
    sd.save(_pool("good", UUIDS[0]))
    (sd.path / "broken.xml").write_bytes(b"<pool type='dir'><name>broken</name>")
    (sd.path / "empty.xml").write_bytes(b"")
    (sd.path / "noname.xml").write_bytes(b"<pool type='dir'/>")
    with caplog.at_level(logging.ERROR, logger="vsfs.state"):
        loaded = list(sd.load())
    assert [s.pool.name for s in loaded] == ["good"]
    logged = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    for name in ("broken.xml", "empty.xml", "noname.xml"):
        assert name in logged
    # broken files are left alone, not deleted or "repaired"
    assert (sd.path / "broken.xml").read_bytes() == b"<pool type='dir'><name>broken</name>"


def test_load_skips_a_file_whose_name_mismatches_and_logs(sd: StateDir,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    sd.save(_pool("right", UUIDS[0]))
    other = _pool("inside", UUIDS[1])
    sd.save(other)
    (sd.path / "inside.xml").rename(sd.path / "outside.xml")
    with caplog.at_level(logging.ERROR, logger="vsfs.state"):
        loaded = list(sd.load())
    assert [s.pool.name for s in loaded] == ["right"]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "outside.xml" in errors[0]
    assert "inside" in errors[0]
    assert (sd.path / "outside.xml").exists()


def test_load_ignores_other_files(sd: StateDir) -> None:
    sd.save(_pool())
    (sd.path / "README").write_text("not a pool")
    (sd.path / "images.xml.bak").write_text("<pool/>")
    (sd.path / ".images.xml.tmp1234").write_text("half written")
    assert [s.pool.name for s in sd.load()] == ["images"]


def test_load_treats_a_dangling_autostart_link_as_autostart(sd: StateDir) -> None:
    # A copy of /etc/libvirt/storage: libvirt's links are absolute and point at
    # the original location, which need not exist here.
    sd.save(_pool("default", UUIDS[0]))
    sd.save(_pool("other", UUIDS[1]))
    link = sd.autostart_dir / "default.xml"
    link.symlink_to("/etc/libvirt/storage/nonexistent-for-vsfs-tests/default.xml")
    assert not link.exists() and link.is_symlink()
    flags = {s.pool.name: s.autostart for s in sd.load()}
    assert flags == {"default": True, "other": False}


def test_load_copied_libvirt_directory(tmp_path: Path) -> None:
    # The layout libvirt writes: <name>.xml without sizes, autostart/<name>.xml links.
    etc = tmp_path / "etc-libvirt-storage"
    (etc / "autostart").mkdir(parents=True)
    (etc / "default.xml").write_text("""<!--
WARNING: THIS IS AN AUTO-GENERATED FILE. CHANGES TO IT ARE LIKELY TO BE
OVERWRITTEN AND LOST. Changes to this xml configuration should be made using:
  virsh pool-edit default
or other application using the libvirt API.
-->

<pool type='dir'>
  <name>default</name>
  <uuid>4d1a8e5f-2b3c-4d5e-8f9a-0b1c2d3e4f50</uuid>
  <capacity unit='bytes'>0</capacity>
  <allocation unit='bytes'>0</allocation>
  <available unit='bytes'>0</available>
  <source>
  </source>
  <target>
    <path>/var/lib/libvirt/images</path>
  </target>
</pool>
""")
    (etc / "autostart" / "default.xml").symlink_to("/etc/libvirt/storage/default.xml")
    loaded = list(StateDir(etc).load())
    assert len(loaded) == 1
    assert loaded[0].pool.name == "default"
    assert loaded[0].pool.target_path == "/var/lib/libvirt/images"
    assert loaded[0].autostart is True


def test_autostart_link_without_a_definition_is_not_a_pool(sd: StateDir) -> None:
    (sd.autostart_dir / "ghost.xml").symlink_to("../ghost.xml")
    assert list(sd.load()) == []


# ---------------------------------------------------------------- remove


def test_remove_deletes_definition_and_link(sd: StateDir) -> None:
    sd.save(_pool("keep", UUIDS[0]))
    sd.save(_pool("gone", UUIDS[1]))
    sd.set_autostart("keep", True)
    sd.set_autostart("gone", True)
    sd.remove("gone")
    assert not (sd.path / "gone.xml").exists()
    assert not os.path.lexists(sd.autostart_dir / "gone.xml")
    assert _names(sd.path) == ["autostart", "keep.xml"]
    assert _names(sd.autostart_dir) == ["keep.xml"]
    assert [(s.pool.name, s.autostart) for s in sd.load()] == [("keep", True)]


def test_remove_without_autostart(sd: StateDir) -> None:
    sd.save(_pool())
    sd.remove("images")
    assert _names(sd.path) == ["autostart"]
    assert list(sd.load()) == []


def test_remove_a_dangling_link_too(sd: StateDir) -> None:
    sd.save(_pool())
    (sd.autostart_dir / "images.xml").symlink_to("/etc/libvirt/storage/images.xml")
    sd.remove("images")
    assert _names(sd.autostart_dir) == []
    assert _names(sd.path) == ["autostart"]


def test_remove_missing_is_harmless(sd: StateDir) -> None:
    sd.save(_pool())
    sd.remove("nosuch")
    assert [s.pool.name for s in sd.load()] == ["images"]


def test_longest_pool_name_is_stored(sd: StateDir) -> None:
    name = "n" * 251  # NAME.xml is 255 bytes, the most a file name can have
    sd.save(_pool(name=name))
    assert [p.pool.name for p in sd.load()] == [name]
    sd.set_autostart(name, True)
    assert [p.autostart for p in sd.load()] == [True]
    assert not [n for n in _names(sd.path) if n.startswith(".")]


def test_write_failures_name_the_file(sd: StateDir) -> None:
    (sd.path / "images.xml").mkdir()  # os.replace onto a directory fails
    with pytest.raises(BackendFailed, match=r"cannot write .*images\.xml: Is a directory"):
        sd.save(_pool())
    assert _names(sd.path) == ["autostart", "images.xml"]  # no temporary file left


# ---------------------------------------------------------------- after a kill


class Killed(BaseException):
    """What a kill -9 does to the code it stops: nothing after it runs."""


def _remove_killed_at(sd: StateDir, monkeypatch: pytest.MonkeyPatch, step: int) -> bool:
    """StateDir.remove, killed before its unlink or fsync number ``step``; whether it
    finished first."""
    calls = 0
    real_unlink, real_fsync = os.unlink, state_mod._fsync_dir

    def count(real: Callable[..., object], *args: object, **kwargs: object) -> object:
        nonlocal calls
        if calls == step:
            raise Killed
        calls += 1
        return real(*args, **kwargs)

    monkeypatch.setattr("vsfs.state.os.unlink", lambda *a, **k: count(real_unlink, *a, **k))
    monkeypatch.setattr(state_mod, "_fsync_dir", lambda *a: count(real_fsync, *a))
    try:
        sd.remove("p")
        return True
    except Killed:
        return False
    finally:
        monkeypatch.undo()


def test_undefine_killed_at_any_step_leaves_the_pool_whole_or_gone(
        sd: StateDir, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """rmdir of an autostart pool killed between any two of its syscalls: after the next
    start's cleanup the pool is defined with its autostart, or not defined at all."""
    outcomes = set()
    for step in range(10):
        sd.save(_pool("p", UUIDS[0]))
        sd.set_autostart("p", True)
        finished = _remove_killed_at(sd, monkeypatch, step)
        with caplog.at_level(logging.WARNING, logger="vsfs.state"):
            StateDir(sd.path).remove_litter()  # the next start
        loaded = [(s.pool.name, s.autostart) for s in StateDir(sd.path).load()]
        assert loaded in ([("p", True)], []), f"killed at step {step}: {loaded}"
        assert _names(sd.autostart_dir) == (["p.xml"] if loaded else [])
        outcomes.add(tuple(loaded))
        if finished:
            break
    assert outcomes == {(("p", True),), ()}, "both outcomes were reached"
    assert "pool p has no definition (its undefine was cut short)" in caplog.text


def test_remove_litter(sd: StateDir, caplog: pytest.LogCaptureFixture) -> None:
    sd.save(_pool("kept", UUIDS[0]))
    sd.set_autostart("kept", True)
    (sd.path / ".tmp-1a2b3c").write_text("<pool type='dir'><na")
    (sd.autostart_dir / ".tmp-0011223344556677").symlink_to("../kept.xml")
    (sd.autostart_dir / "gone.xml").symlink_to("../gone.xml")
    (sd.autostart_dir / "libvirt.xml").symlink_to("/etc/libvirt/storage/libvirt.xml")
    (sd.path / "libvirt.xml").write_text("not parsed here")
    (sd.path / ".images.xml.tmp1234").write_text("not vsfs's: left alone")
    with caplog.at_level(logging.INFO, logger="vsfs.state"):
        sd.remove_litter()
    assert _names(sd.path) == [".images.xml.tmp1234", "autostart", "kept.xml", "libvirt.xml"]
    assert _names(sd.autostart_dir) == ["kept.xml", "libvirt.xml"]
    assert "autostart link" in caplog.text and "gone.xml removed" in caplog.text
    assert ".tmp-1a2b3c, left by a write that never finished" in caplog.text


def test_remove_keeps_the_pool_undefined_when_its_link_cannot_go(
        sd: StateDir, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    sd.save(_pool())
    sd.set_autostart("images", True)
    real = os.unlink

    def unlink(path: str, *a: Any, **k: Any) -> None:
        if "autostart" in str(path):
            raise OSError(13, "Permission denied")
        return real(path, *a, **k)

    monkeypatch.setattr("vsfs.state.os.unlink", unlink)
    with caplog.at_level(logging.ERROR, logger="vsfs.state"):
        sd.remove("images")  # undefined: the link alone is not a failure
    monkeypatch.undo()
    assert "it goes at the next start" in caplog.text
    sd.remove_litter()
    assert _names(sd.autostart_dir) == []
    assert list(sd.load()) == []


# ---------------------------------------------------------------- the journal of uploads


def _journal(sd: StateDir) -> state_mod.UploadJournal:
    return state_mod.UploadJournal(sd.path / state_mod.JOURNAL_NAME)


def test_journal_records_what_is_in_flight_and_goes_at_a_clean_exit(sd: StateDir) -> None:
    j = _journal(sd)
    a = j.begin(UUIDS[0], "a")
    assert [r.name for r in state_mod.read_in_flight(j.path)] == ["a"]
    b = j.identify(j.begin(UUIDS[0], "b b", 8 << 20), "block", 2049, 0, -1, "LV-UUID")
    a = j.identify(a, "file", 64769, 12, 345, "/srv/a")
    j.end(a)
    assert [r.name for r in state_mod.read_in_flight(j.path)] == ["b b"]
    j.end(b)
    assert state_mod.read_in_flight(j.path) == []
    j.end(b)  # twice: nothing
    j.put(b)  # in flight again (changed after it was settled)
    assert [r.name for r in state_mod.read_in_flight(j.path)] == ["b b"]
    j.close()
    assert j.path.exists(), "kept while something is in flight"
    j.end(b)
    j.close()
    assert _names(sd.path) == ["autostart"]


def test_journal_recover_keeps_the_last_record_of_each(sd: StateDir) -> None:
    j = _journal(sd)
    a = j.begin(UUIDS[0], "a")
    j.identify(a, "file", 1, 2, 3, "/srv/a")
    b = j.begin(UUIDS[1], "b")
    j.end(b)
    j.begin(UUIDS[1], "c", 4096)
    with open(j.path, "ab") as f:
        f.write(b'{"id": "torn", "pool": "x", "na')  # a write cut short: skipped
    # the daemon is killed; the next one reads what it left
    k = _journal(sd)
    left = sorted(k.recover(), key=lambda r: r.name)
    assert [(r.name, r.kind, r.dev, r.ino, r.gen, r.key, r.size) for r in left] == [
        ("a", "file", 1, 2, 3, "/srv/a", -1), ("c", "", 0, 0, -1, "", 4096)]
    assert [r.name for r in k.left_in(UUIDS[1])] == ["c"]
    # rewritten with only those, and gone once both are dealt with
    assert len(j.path.read_bytes().splitlines()) == 2
    new = k.begin(UUIDS[0], "a")  # a new upload under the same name: an id of its own
    assert new.id not in {r.id for r in left}
    k.end(new)
    for rec in left:
        k.forget(rec)
    assert state_mod.read_in_flight(j.path) == []
    k.close()
    assert _names(sd.path) == ["autostart"]


def test_journal_is_compacted(sd: StateDir, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state_mod, "JOURNAL_COMPACT_AT", 4096)
    j = _journal(sd)
    for i in range(100):  # one at a time: emptied in place, the same inode
        j.end(j.identify(j.begin(UUIDS[0], f"v{i}"), "file", 1, i, 0, ""))
    ino = j.path.stat().st_ino
    assert j.path.stat().st_size <= 4096 + 512
    held = j.begin(UUIDS[0], "held open")
    for i in range(100):  # with one in flight: written anew without the others
        j.end(j.identify(j.begin(UUIDS[0], f"w{i}"), "file", 1, i, 0, ""))
    assert j.path.stat().st_size <= 4096 + 512
    assert [r.name for r in state_mod.read_in_flight(j.path)] == ["held open"]
    assert not [n for n in _names(sd.path) if n.startswith(".tmp-")]
    j.end(held)
    assert j.path.stat().st_ino != ino


def test_journal_failures_are_backend_failures(tmp_path: Path) -> None:
    j = state_mod.UploadJournal(tmp_path / "missing" / state_mod.JOURNAL_NAME)
    with pytest.raises(BackendFailed, match="cannot write the journal of uploads"):
        j.begin(UUIDS[0], "v")
