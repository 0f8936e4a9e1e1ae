"""Secrets for <auth>: where they are found, what is refused, and that they never leak."""

from __future__ import annotations

import base64
import logging
import os
from pathlib import Path

import pytest

from vsfs.backends.base import Services
from vsfs.backends.rbd import RbdBackend
from vsfs.errors import BackendFailed, Denied, Invalid, NotFound
from vsfs.model import SourceAuth
from vsfs.proc import run
from vsfs.secrets import SecretStore
from vsfs.xmlio import parse_pool

UUID = "0b6b2c4e-2f0e-4c57-9d9e-6d1c8f4a7b21"
VALUE = "pa55-w0rd-xyz"


def private(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def store(tmp_path: Path) -> SecretStore:
    d = tmp_path / "secrets"
    d.mkdir(mode=0o700)
    (d / f"{UUID}.xml").write_text(
        f"<secret ephemeral='no' private='yes'><uuid>{UUID}</uuid>"
        "<usage type='iscsi'><target>san-chap</target></usage></secret>")
    private(d / f"{UUID}.base64", base64.b64encode(VALUE.encode()) + b"\n")
    return SecretStore(d)


def chap(**secret: str) -> SourceAuth:
    return SourceAuth("chap", "u", secret.get("uuid"), secret.get("usage"))


def test_libvirt_layout_by_uuid_and_usage(tmp_path: Path) -> None:
    s = store(tmp_path)
    assert s.value(chap(uuid=UUID)) == VALUE
    assert s.value(chap(usage="san-chap")) == VALUE
    # a ceph secret is matched by its <name>, and only for ceph auth
    with pytest.raises(NotFound):
        s.value(SourceAuth("ceph", "admin", None, "san-chap"))
    with pytest.raises(NotFound, match="no-such"):
        s.value(chap(usage="no-such"))
    with pytest.raises(NotFound):
        s.value(chap(uuid="6a5f0f5e-0000-4000-8000-000000000000"))


def test_password_file_named_by_usage(tmp_path: Path) -> None:
    f = private(tmp_path / "pw", f"{VALUE}\n".encode())
    s = SecretStore(tmp_path / "none")
    assert s.value(chap(usage=str(f))) == VALUE
    f.chmod(0o640)
    with pytest.raises(Denied, match="chmod 600") as e:
        s.value(chap(usage=str(f)))
    assert VALUE not in str(e.value)
    f.chmod(0o600)
    link = tmp_path / "link"
    link.symlink_to(f)
    with pytest.raises(Denied):
        s.value(chap(usage=str(link)))
    empty = private(tmp_path / "empty", b"\n")
    with pytest.raises(Invalid, match="empty"):
        s.value(chap(usage=str(empty)))
    with pytest.raises(NotFound):
        s.value(chap(usage=str(tmp_path / "missing")))


def test_stored_value_must_be_private_and_base64(tmp_path: Path) -> None:
    s = store(tmp_path)
    value_file = s.dir / f"{UUID}.base64"
    os.chmod(value_file, 0o644)
    with pytest.raises(Denied):
        s.value(chap(uuid=UUID))
    private(value_file, b"not base64 !!")
    with pytest.raises(Invalid, match="base64"):
        s.value(chap(uuid=UUID))
    with pytest.raises(Invalid):
        s.value(chap(uuid="../etc/passwd"))


async def test_commands_mask_the_secret(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="vsfs.proc"):
        with pytest.raises(BackendFailed) as e:
            await run(["sh", "-c", 'echo "bad password $0" >&2; exit 24', VALUE],
                      secret=VALUE)
        assert e.value.returncode == 24
        assert VALUE not in e.value.message and VALUE not in e.value.stderr
        assert "bad password ********" in e.value.message
    assert caplog.records, "the command was logged"
    assert all(VALUE not in r.getMessage() for r in caplog.records)


def test_ceph_keys_from_files_keyrings_and_libvirt(tmp_path: Path) -> None:
    key = "AQBxN0VlAAAAABAAvRcuQj5Q0k1UOZ6dXw8rWA=="
    f = private(tmp_path / "key", f"{key}\n".encode())
    ring = private(tmp_path / "ring", f"[client.libvirt]\n\tkey = {key}\n".encode())
    s = SecretStore(tmp_path / "secrets")
    for path in (f, ring):
        assert s.ceph_key(SourceAuth("ceph", "libvirt", None, str(path))) == key
    bad = private(tmp_path / "bad", b"[client.x]\ncaps mon = allow r\n")
    with pytest.raises(Invalid, match="no Ceph key"):
        s.ceph_key(SourceAuth("ceph", "libvirt", None, str(bad)))
    # libvirt keeps the raw key; its .base64 file is the key as Ceph prints it
    s.dir.mkdir(mode=0o700)
    (s.dir / f"{UUID}.xml").write_text(
        f"<secret><uuid>{UUID}</uuid><usage type='ceph'><name>client.libvirt secret</name>"
        "</usage></secret>")
    private(s.dir / f"{UUID}.base64", key.encode())
    assert s.ceph_key(SourceAuth("ceph", "libvirt", None, "client.libvirt secret")) == key


def test_rbd_configuration_keeps_the_key_private(tmp_path: Path) -> None:
    """What an rbd pool hands Ceph and QEMU: the key only in a 0600 file, never in argv."""
    key = "AQBxN0VlAAAAABAAvRcuQj5Q0k1UOZ6dXw8rWA=="
    f = private(tmp_path / "key", key.encode())
    pool = parse_pool(
        "<pool type='rbd'><name>c</name><source><name>rbd</name>"
        "<host name='10.0.0.1' port='3300'/><host name='10.0.0.2' port='6789'/>"
        f"<host name='ceph3'/><auth type='ceph' username='libvirt'><secret usage='{f}'/></auth>"
        "</source><rbd:config_opts xmlns:rbd='http://libvirt.org/schemas/storagepool/rbd/1.0'>"
        "<rbd:option name='rbd_cache' value='false'/></rbd:config_opts></pool>".encode())
    b = RbdBackend(pool, Services(SecretStore(tmp_path / "secrets"), tmp_path / "run"))
    b._write_config()
    conf = (b.run_dir() / "ceph.conf").read_text()
    assert "mon_host = v2:10.0.0.1:3300,v1:10.0.0.2:6789,ceph3" in conf
    assert "rbd_cache = false" in conf and "auth_client_required" not in conf
    assert key not in conf
    keyfile = b.run_dir() / "key"
    assert keyfile.read_text().strip() == key and (keyfile.stat().st_mode & 0o777) == 0o600
    argv = b._cli()
    assert key not in " ".join(argv) and argv[-2:] == ["--keyfile", str(keyfile)]
    assert "--id" in argv and "libvirt" in argv
    assert b.blockdev("img")["key-secret"] == "cephkey" and key not in str(b.blockdev("img"))
    assert key not in " ".join(b.qsd_objects())
