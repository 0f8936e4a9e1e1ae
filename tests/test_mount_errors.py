"""Every errno of the contract, reached through the mount, with nothing changed."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from support import Mount, MountFactory, free_port, sh

from vsfs.watchdog import mount_device

pytestmark = pytest.mark.fuse


def state_files(m: Mount) -> list[str]:
    return sorted(p.name for p in m.state.iterdir())


def state_bytes(state: Path) -> dict[str, bytes]:
    """Every entry of the state directory with its bytes (a symlink: its target)."""
    out = {}
    for dirpath, dirs, files in os.walk(state):
        for name in dirs + files:
            p = Path(dirpath, name)
            out[str(p.relative_to(state))] = (os.readlink(p).encode() if p.is_symlink()
                                              else p.read_bytes() if p.is_file()
                                              else b"<dir>")
    return out


def test_einval(vsfs: Mount) -> None:
    target = vsfs.dir_pool()
    m, p = vsfs.path, vsfs.path / "pools" / "p"
    before = state_files(vsfs)
    cases = [
        (f"echo '<pool type=\"dir\"><name>x</nam></pool>' > {m}/pools/define",
         "malformed XML"),
        (f"echo '<volume><name>v</name></volume>' > {p}/define", "needs a <capacity>"),
        (f"echo '<pool><name>x</name></pool>' > {m}/pools/define", "needs a type"),
        (f"echo \"<pool type='dir'><name>.x</name><target><path>/tmp/x</path></target>"
         f"</pool>\" > {m}/pools/define", "starts with '.'"),
        (f"echo \"<pool type='dir'><name>a/b</name><target><path>/tmp/x</path></target>"
         f"</pool>\" > {m}/pools/define", "contains '/'"),
        (f"echo \"<pool type='nosuch'><name>n</name></pool>\" > {m}/pools/define",
         "unknown pool type"),
        (f"echo \"<pool type='dir'><name>n</name></pool>\" > {m}/pools/define",
         "needs <target><path>"),
        (f"echo frobnicate > {p}/ctl", "unknown command"),
        (f"echo 'build --force' > {p}/ctl", "unknown build option"),
        (f"truncate -s 1M {p}/volumes/.hidden", "starts with '.'"),
        (f"echo '<volume><name>v</name><capacity unit=\"parsec\">1</capacity></volume>'"
         f" > {p}/define", "bad size unit"),
        (f"echo '<pool type=\"dir\"><name>x</name></pool><pool/>' > {m}/pools/define",
         "malformed XML"),
    ]
    for cmd, why in cases:
        res = sh(cmd)
        assert res.returncode != 0, cmd
        assert "Invalid argument" in res.stderr, (cmd, res.stderr)
        assert why in vsfs.error(), (cmd, vsfs.error())
    assert state_files(vsfs) == before
    assert sorted(os.listdir(m / "pools")) == ["define", "p"]
    assert os.listdir(target) == []
    assert os.listdir(p / "volumes") == []


def test_entities_are_not_expanded(vsfs: Mount) -> None:
    doc = ('<?xml version="1.0"?><!DOCTYPE pool [<!ENTITY a "aaaaaaaaaa">'
           '<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>'
           "<pool type='dir'><name>&b;</name><target><path>/tmp/e</path></target></pool>")
    (vsfs.base / "bomb.xml").write_text(doc)
    res = sh(f"cat {vsfs.base}/bomb.xml > {vsfs.path}/pools/define")
    assert "Invalid argument" in res.stderr
    assert "DOCTYPE" in vsfs.error()
    (vsfs.base / "ext.xml").write_text(
        '<!DOCTYPE pool SYSTEM "file:///etc/passwd"><pool type="dir"><name>e</name>'
        "<target><path>/tmp/e</path></target></pool>")
    res = sh(f"cat {vsfs.base}/ext.xml > {vsfs.path}/pools/define")
    assert "Invalid argument" in res.stderr
    (vsfs.base / "big.xml").write_text("<pool type='dir'><name>b</name><!--"
                                       + "x" * (2 << 20) + "--></pool>")
    res = sh(f"cat {vsfs.base}/big.xml > {vsfs.path}/pools/define")
    assert "Invalid argument" in res.stderr
    assert "larger than" in vsfs.error()
    assert os.listdir(vsfs.path / "pools") == ["define"]


def test_incomplete_xml_reported_at_close(vsfs: Mount) -> None:
    (vsfs.base / "half.xml").write_text('<pool type="dir"><name>half</name>')
    # cat reports the error of close(); bash's builtin echo would not.
    res = sh(f"cat {vsfs.base}/half.xml > {vsfs.path}/pools/define")
    assert res.returncode != 0 and "Invalid argument" in res.stderr
    assert "incomplete XML document" in vsfs.error()
    sh(f"echo '<pool type=\"dir\"><name>half</name' > {vsfs.path}/pools/define")
    assert "incomplete XML document" in vsfs.error()
    assert os.listdir(vsfs.path / "pools") == ["define"]
    assert state_files(vsfs) == ["autostart"]


def test_xml_written_in_pieces(vsfs: Mount) -> None:
    target = vsfs.base / "pieces"
    xml = vsfs.pool_xml("pieces", target).replace("'", '"')
    cmd = "; ".join(f"printf '%s' '{xml[i:i + 7]}'" for i in range(0, len(xml), 7))
    sh(f"({cmd}) > {vsfs.path}/pools/define", check=True)
    assert (vsfs.path / "pools/pieces/state").read_text() == "inactive\n"


def test_eexist(vsfs: Mount) -> None:
    vsfs.dir_pool()
    m, p = vsfs.path, vsfs.path / "pools" / "p"
    uuid = (p / "uuid").read_text().strip()
    (vsfs.base / "dup.xml").write_text(vsfs.pool_xml("p", vsfs.base / "other"))
    assert "File exists" in sh(f"cat {vsfs.base}/dup.xml > {m}/pools/define").stderr
    (vsfs.base / "dupuuid.xml").write_text(
        vsfs.pool_xml("p2", vsfs.base / "other", f"<uuid>{uuid}</uuid>"))
    assert "File exists" in sh(f"cat {vsfs.base}/dupuuid.xml > {m}/pools/define").stderr
    assert "UUID" in vsfs.error()
    (vsfs.base / "duptarget.xml").write_text(vsfs.pool_xml("p3", vsfs.base / "images-p"))
    assert "File exists" in sh(f"cat {vsfs.base}/duptarget.xml > {m}/pools/define").stderr
    sh(f"truncate -s 1M {p}/volumes/v", check=True)
    sh(f"mkdir {p}/volumes/d", check=True)
    assert "File exists" in sh(f"mkdir {p}/volumes/v").stderr
    assert "File exists" in sh(f"echo 'clone d' > {p}/volinfo/v/ctl").stderr
    assert "File exists" in sh(f"echo 'snapshot d' > {p}/volinfo/v/ctl").stderr
    assert "File exists" in sh(f"mv -T {p}/volumes/v {p}/volumes/d").stderr
    assert os.path.isdir(vsfs.base / "images-p" / "d")
    assert sorted(os.listdir(m / "pools")) == ["define", "p"]


def test_enoent(vsfs: Mount) -> None:
    vsfs.dir_pool()
    p = vsfs.path / "pools" / "p"
    assert "No such file" in sh(f"cat {vsfs.path}/pools/nope/xml").stderr
    assert "No such file" in sh(f"echo wipe > {p}/volinfo/nope/ctl").stderr
    assert "No such file" in sh(f"rm {p}/volumes/nope").stderr
    assert "No such file" in sh(f"readlink -e {vsfs.path}/by-uuid/"
                                "00000000-0000-0000-0000-000000000000").stderr or True
    assert not (vsfs.path / "by-uuid/00000000-0000-0000-0000-000000000000").exists()
    sh(f"truncate -s 1M {p}/volumes/v", check=True)
    res = sh(f"echo 'clone c nopool' > {p}/volinfo/v/ctl")
    assert "No such file" in res.stderr
    assert "no pool named 'nopool'" in vsfs.error()


def test_ebusy_and_enotempty(vsfs: Mount) -> None:
    target = vsfs.dir_pool()
    p = vsfs.path / "pools" / "p"
    sh(f"truncate -s 1M {p}/volumes/v", check=True)
    assert "Device or resource busy" in sh(f"echo start > {p}/ctl").stderr
    assert "already active" in vsfs.error()
    assert "Device or resource busy" in sh(f"echo build > {p}/ctl").stderr
    sh(f"echo stop > {p}/ctl", check=True)
    res = sh(f"echo delete > {p}/ctl")
    assert "Directory not empty" in res.stderr
    assert "still holds volumes" in vsfs.error()
    assert (target / "v").exists()
    os.unlink(target / "v")
    sh(f"echo delete > {p}/ctl", check=True)
    assert not target.exists()


def test_enospc_leaves_nothing(vsfs: Mount) -> None:
    target = vsfs.dir_pool()
    p = vsfs.path / "pools" / "p"
    free = int((p / "free").read_text())
    too_big = free + (1 << 30)
    res = sh(f"truncate -s {too_big} {p}/volumes/huge")
    assert "No space left on device" in res.stderr
    assert "free" in vsfs.error()
    assert os.listdir(target) == [] and os.listdir(p / "volumes") == []
    (vsfs.base / "huge.xml").write_text(
        f"<volume><name>huge</name><capacity>{too_big}</capacity></volume>")
    assert "No space left" in sh(f"cat {vsfs.base}/huge.xml > {p}/define").stderr
    assert os.listdir(target) == []
    sh(f"truncate -s 1M {p}/volumes/small", check=True)
    assert "No space left" in sh(f"echo {too_big} > {p}/volinfo/small/capacity").stderr
    assert os.stat(target / "small").st_size == 1 << 20
    res = sh(f"echo 'clone c' > {p}/volinfo/small/ctl")
    assert res.returncode == 0
    assert sorted(os.listdir(target)) == ["c", "small"]


def test_eopnotsupp_and_exdev(vsfs: Mount) -> None:
    vsfs.dir_pool()
    vsfs.dir_pool("q")
    p = vsfs.path / "pools" / "p"
    (vsfs.base / "zfs.xml").write_text(
        "<pool type='zfs'><name>t</name><source><name>tank</name></source></pool>")
    res = sh(f"cat {vsfs.base}/zfs.xml > {vsfs.path}/pools/define")
    assert "Operation not supported" in res.stderr
    assert "not supported yet" in vsfs.error()
    sh(f"mkdir {p}/volumes/d", check=True)
    assert "Operation not supported" in sh(f"echo wipe > {p}/volinfo/d/ctl").stderr
    assert "Operation not supported" in sh(f"echo 'snapshot s' > {p}/volinfo/d/ctl").stderr
    assert "Operation not supported" in sh(f"mkdir {vsfs.path}/pools/newpool").stderr
    sh(f"truncate -s 1M {p}/volumes/v", check=True)
    assert "Operation not supported" in sh(f"echo 'shrink 1K' > {p}/volinfo/v/ctl").stderr
    assert os.stat(vsfs.base / "images-p" / "v").st_size == 1 << 20
    res = sh(f"mv {p}/volumes/v {vsfs.path}/pools/q/volumes/v")
    # mv falls back to copying the symlink after EXDEV; that is refused as well
    assert res.returncode != 0
    assert (vsfs.base / "images-p" / "v").exists()
    assert not (vsfs.base / "images-q" / "v").exists()
    res = sh(f"python3 -c \"import os; os.rename('{p}/volumes/v', "
             f"'{vsfs.path}/pools/q/volumes/v')\"")
    assert "Invalid cross-device link" in res.stderr


def test_eio_from_backend(vsfs: Mount) -> None:
    vsfs.dir_pool()
    p = vsfs.path / "pools" / "p"
    sh(f"echo '<volume><name>bad</name><capacity>1048576</capacity><target>"
       f"<format type=\"qcow2\"/></target><backingStore><path>/nonexistent/base</path>"
       f"<format type=\"qcow2\"/></backingStore></volume>' > {p}/define")
    assert "qemu-img" in vsfs.error()
    assert not (vsfs.base / "images-p" / "bad").exists()
    assert os.listdir(p / "volumes") == []


@pytest.mark.root
def test_access_for_other_users(mount_factory: MountFactory) -> None:
    vsfs = mount_factory(["--allow-other"])
    target = vsfs.dir_pool()
    p = vsfs.path / "pools" / "p"
    sh(f"truncate -s 1M {p}/volumes/v", check=True)
    nobody = "65534"
    # browse and read
    res = sh(f"ls -l {p}/volumes && cat {p}/xml {p}/free {p}/volinfo/v/capacity", user=nobody)
    assert res.returncode == 0, res.stderr
    # change nothing
    for cmd in [f"echo stop > {p}/ctl", f"echo yes > {p}/autostart",
                f"cat {p}/xml > {vsfs.path}/pools/define",
                f"truncate -s 1M {p}/volumes/w", f"mkdir {p}/volumes/d", f"rm -f {p}/volumes/v",
                f"echo wipe > {p}/volinfo/v/ctl", f"echo 2M > {p}/volinfo/v/capacity",
                f"rmdir {p}", f"mv {p}/volumes/v {p}/volumes/x"]:
        res = sh(cmd, user=nobody)
        assert res.returncode != 0, cmd
        assert "Permission denied" in res.stderr, (cmd, res.stderr)
    assert (p / "state").read_text() == "running\n"
    assert os.listdir(target) == ["v"]
    assert os.stat(target / "v").st_size == 1 << 20
    # each user reads their own last error
    assert sh(f"cat {vsfs.path}/error", user=nobody).stdout == ""


@pytest.mark.root
def test_volume_ownership_from_pool_permissions(vsfs: Mount) -> None:
    target = vsfs.base / "owned"
    o = vsfs.define(
        f"<pool type='dir'><name>o</name><target><path>{target}</path><permissions>"
        "<mode>0750</mode><owner>65534</owner><group>65534</group></permissions></target>"
        "</pool>")
    sh(f"echo build > {o}/ctl; echo start > {o}/ctl", check=True)
    st = os.stat(target)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (65534, 65534, 0o750)
    sh(f"truncate -s 1M {o}/volumes/a", check=True)
    st = os.stat(target / "a")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (65534, 65534, 0o600)
    (vsfs.base / "v.xml").write_text(
        "<volume><name>b</name><capacity>1024</capacity><target><permissions>"
        "<mode>0644</mode><owner>0</owner><group>0</group></permissions></target></volume>")
    sh(f"cat {vsfs.base}/v.xml > {o}/define", check=True)
    st = os.stat(target / "b")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, 0, 0o644)
    # Wider than the daemon's umask lets open() make: set afterwards.
    (vsfs.base / "w.xml").write_text(
        "<volume><name>w</name><capacity>0</capacity><target><permissions>"
        "<mode>0666</mode></permissions></target></volume>")
    sh(f"cat {vsfs.base}/w.xml > {o}/define", check=True)
    st = os.stat(target / "w")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777, st.st_size) == (65534, 65534, 0o666, 0)
    xml = (o / "xml").read_text()
    assert "<mode>0750</mode>" in xml and "<owner>65534</owner>" in xml


def test_pool_dir_owner_used_without_permissions(vsfs: Mount) -> None:
    target = vsfs.dir_pool()
    if os.geteuid() == 0:
        os.chown(target, 65534, 65534)
    sh(f"truncate -s 1M {vsfs.path}/pools/p/volumes/a", check=True)
    st = os.stat(target / "a")
    tst = os.stat(target)
    assert (st.st_uid, st.st_gid) == (tst.st_uid, tst.st_gid)




def test_daemon_survives_garbage(vsfs: Mount) -> None:
    target = vsfs.dir_pool()
    p = vsfs.path / "pools" / "p"
    sh(f"truncate -s 1M {p}/volumes/v", check=True)
    writable = [vsfs.path / "pools/define", p / "xml", p / "define", p / "ctl",
                p / "autostart", p / "volinfo/v/capacity", p / "volinfo/v/ctl"]
    payloads = [os.urandom(4096), b"\0" * 100, b"start\nstop\n", "\u2603\n".encode(),
                b"x" * (200 << 10), b"<", b"<?xml version='1.0'?>", b"-1\n", b"\n", b"",
                b"18446744073709551616\n", b"clone ../../etc/passwd\n", b"clone a b c d\n"]
    for f in writable:
        for data in payloads:
            try:
                with open(f, "wb") as fh:
                    fh.write(data)
            except OSError:
                pass
    assert sorted(os.listdir(vsfs.path / "pools")) == ["define", "p"]
    assert (p / "state").read_text() == "running\n"
    assert os.listdir(target) == ["v"]
    assert os.stat(target / "v").st_size == 1 << 20
    assert (p / "autostart").read_text() == "no\n"
    assert vsfs.error() != ""


def test_a_document_with_bytes_after_it_is_done_only_when_they_are_valid(vsfs: Mount) -> None:
    target = vsfs.dir_pool()
    m, p = vsfs.path, vsfs.path / "pools" / "p"
    before = state_files(vsfs)
    pool = vsfs.pool_xml("q", vsfs.base / "q")
    vol = "<volume><name>v</name><capacity>1M</capacity></volume>"
    for doc, f in ((pool, m / "pools/define"), (vol, p / "define")):
        for after in ("\n<", "\n<!-- x", "\n<?pi", "\n<!", "<!-- a --><"):
            # In one write (cat's): what follows the document cannot be known good
            # before close, and it is not: nothing is done.
            res = sh(f"cat > {f}", input=doc + after)
            assert "Invalid argument" in res.stderr, (doc, after, res.stderr)
            assert "nothing was done" in vsfs.error(), vsfs.error()
            assert state_files(vsfs) == before
            assert os.listdir(target) == [] and os.listdir(p / "volumes") == []
    # A trailer closed by a later write of the same open: the document is done then.
    sh(f"(printf '%s' {shlex.quote(vol + '<!-- made')}; printf ' by hand -->\\n')"
       f" > {p}/define", check=True)
    assert os.listdir(target) == ["v"]
    # Comments and white space in the same write: done from that write, as before.
    res = sh(f"echo {shlex.quote(pool + '<!-- c --> <?pi x?>')} > {m}/pools/define")
    assert res.returncode == 0, res.stderr
    assert (m / "pools" / "q" / "state").read_text() == "inactive\n"
    vsfs.assert_clean_log()


def test_one_value_per_open_and_a_refused_write_applies_no_line(vsfs: Mount) -> None:
    target = vsfs.dir_pool()
    p = vsfs.path / "pools" / "p"
    sh(f"truncate -s 1M {p}/volumes/v", check=True)
    # In one write (cat's): checked whole, nothing applied.
    for data, f in (("stop\nstart\n", p / "ctl"), ("stop\nrefresh", p / "ctl"),
                    ("clone x\ny\n", p / "volinfo/v/ctl"),
                    ("clone x\n\nclone y\n", p / "volinfo/v/ctl"),
                    ("2M\n3M\n", p / "volinfo/v/capacity"), ("yes\nno\n", p / "autostart")):
        res = sh(f"cat > {f}", input=data)
        assert "Invalid argument" in res.stderr, (data, res.stderr)
        assert "one value or command per open" in vsfs.error()
        assert "nothing was done" in vsfs.error()
        assert (p / "state").read_text() == "running\n"
        assert os.listdir(target) == ["v"] and os.stat(target / "v").st_size == 1 << 20
        assert (p / "autostart").read_text() == "no\n"
    # bash's printf writes each line on its own: the first is applied, the second is
    # refused (and changes nothing), saying so.
    res = sh(f"printf 'clone x\\nclone y\\n' > {p}/volinfo/v/ctl")
    assert "Invalid argument" in res.stderr
    assert "'clone x' was applied already" in vsfs.error(), vsfs.error()
    assert sorted(os.listdir(target)) == ["v", "x"]
    # Blank lines around a value are ignored, in one write or byte by byte.
    sh(f"cat > {p}/volinfo/v/capacity", input="\n2M\n\n", check=True)
    assert os.stat(target / "v").st_size == 2 << 20
    sh(f"printf 'refresh\\n\\n \\n' | dd of={p}/ctl bs=1 status=none", check=True)
    sh(f"printf 'stop\\n\\n' > {p}/ctl", check=True)
    assert (p / "state").read_text() == "inactive\n"
    # A newline alone is an empty value, refused from write() as before.
    res = sh(f"echo > {p}/ctl")
    assert "Invalid argument" in res.stderr and "empty command" in vsfs.error()
    vsfs.assert_clean_log()


def test_numbers_beyond_int_parsing_are_einval(vsfs: Mount) -> None:
    target = vsfs.dir_pool()
    p = vsfs.path / "pools" / "p"
    sh(f"truncate -s 1M {p}/volumes/v", check=True)
    huge = "9" * 5000
    cases = [
        (f"echo {huge} > {p}/volinfo/v/capacity", "too large"),
        (f"echo 'shrink {huge}' > {p}/volinfo/v/ctl", "too large"),
        (f"echo '<volume><name>w</name><capacity>{huge}</capacity></volume>' > {p}/define",
         "too large"),
        (f"echo '<volume><name>w</name><capacity>1</capacity><target><permissions>"
         f"<owner>{huge}</owner></permissions></target></volume>' > {p}/define",
         "bad owner"),
    ]
    for cmd, why in cases:
        res = sh(cmd)
        assert "Invalid argument" in res.stderr, (cmd[:80], res.stderr)
        assert why in vsfs.error() and len(vsfs.error()) < 200, vsfs.error()[:300]
    assert os.listdir(target) == ["v"] and os.stat(target / "v").st_size == 1 << 20
    vsfs.assert_clean_log()


def test_inactive_pools_and_empty_uuids_are_refused(vsfs: Mount) -> None:
    target = vsfs.dir_pool(start=False)
    m, p = vsfs.path, vsfs.path / "pools" / "p"
    uuid = (p / "uuid").read_text().strip()
    before = state_bytes(vsfs.state)
    vol = vsfs.base / "vol.xml"
    vol.write_text("<volume><name>v</name><capacity>1M</capacity></volume>\n")
    for cmd in (f"cat {vol} > {p}/define", f"dd if={vol} of={p}/define bs=1 status=none",
                f"cat {vol} {vol} > {p}/define"):
        res = sh(cmd)
        assert "Invalid argument" in res.stderr, (cmd, res.stderr)
    for empty in ("<uuid></uuid>", "<uuid/>", "<uuid> </uuid>"):
        xml = vsfs.pool_xml("p", target, empty)
        res = sh(f"cat > {p}/xml", input=xml)
        assert "Invalid argument" in res.stderr, (empty, res.stderr)
        assert "malformed UUID" in vsfs.error()
        res = sh(f"cat > {m}/pools/define", input=vsfs.pool_xml("q", vsfs.base / "q", empty))
        assert "Invalid argument" in res.stderr, (empty, res.stderr)
    assert (p / "uuid").read_text().strip() == uuid
    assert state_bytes(vsfs.state) == before
    assert sorted(os.listdir(m / "pools")) == ["define", "p"]
    assert os.listdir(target) == []
    vsfs.assert_clean_log()


def test_undeclared_prefixes_are_einval(vsfs: Mount) -> None:
    target = vsfs.dir_pool()
    m, p = vsfs.path, vsfs.path / "pools" / "p"
    before = state_files(vsfs)
    for cmd in (f"echo \"<p:pool type='dir'><name>x</name><target><path>/tmp/x</path>"
                f"</target></p:pool>\" > {m}/pools/define",
                f"echo \"<pool type='dir'><p:name>x</p:name></pool>\" > {m}/pools/define",
                f"echo \"<pool type='dir' a:b='c'><name>x</name></pool>\" > {m}/pools/define",
                f"echo '<v:volume><name>v</name><capacity>1</capacity></v:volume>'"
                f" > {p}/define",
                f"echo \"<p:pool type='dir'><name>p</name></p:pool>\" > {p}/xml"):
        res = sh(cmd)
        assert "Invalid argument" in res.stderr, (cmd, res.stderr)
        assert "malformed XML" in vsfs.error(), vsfs.error()
    assert state_files(vsfs) == before
    assert sorted(os.listdir(m / "pools")) == ["define", "p"] and os.listdir(target) == []
    vsfs.assert_clean_log()


def test_eperm_for_what_vsfs_files_cannot_do(vsfs: Mount) -> None:
    vsfs.dir_pool()
    p = vsfs.path / "pools" / "p"
    for cmd in [f"chmod 666 {p}/ctl", f"chown 1 {p}/xml", f"ln -s /etc {p}/volumes/x",
                f"ln {p}/xml {p}/volumes/y"]:
        res = sh(cmd)
        assert res.returncode != 0, cmd
        assert "Operation not permitted" in res.stderr, (cmd, res.stderr)
    assert os.listdir(p / "volumes") == []


def test_sources_need_a_host(vsfs: Mount) -> None:
    src = vsfs.path / "sources"
    assert sorted(os.listdir(src)) == ["iscsi", "iscsi-direct", "logical", "netfs"]
    for stype, reason in (("iscsi", "name the portal"), ("netfs", "name the server"),
                          ("iscsi-direct", "and an initiator")):
        assert "Invalid argument" in sh(f"cat {src}/{stype}").stderr
        assert reason in vsfs.error()
        assert "Invalid argument" in sh(f"echo 'two hosts' > {src}/{stype}").stderr
        assert "Invalid argument" in sh(f"cat '{src}/{stype}?port=3260'").stderr
        assert "names no host" in vsfs.error()
    assert not (src / "zfs?host=a").exists()


def test_a_source_document_on_several_lines_is_taken(vsfs: Mount) -> None:
    """sources/TYPE takes a <source> document as virsh find-storage-pool-sources does,
    on as many lines as it comes, in one write (cat) or several; a line that is not one
    is still a single value."""
    src = vsfs.path / "sources" / "iscsi-direct"
    port = free_port()
    doc = (f"<source>\n  <host name='127.0.0.1' port='{port}'/>\n  <initiator>\n"
           "    <iqn name='iqn.2024-01.org.example:test'/>\n  </initiator>\n</source>\n")
    for cmd in (f"cat > {src}", f"dd of={src} bs=7 status=none"):
        sh(f"echo > {src}", check=True)  # forget what was written before
        res = sh(cmd, input=doc)
        assert res.returncode == 0, (cmd, res.stderr)
        res = sh(f"cat {src}")
        assert res.returncode != 0 and "and an initiator" not in vsfs.error(), vsfs.error()
        assert f"127.0.0.1:{port}" in vsfs.error(), vsfs.error()
    res = sh(f"cat > {src}", input=doc.replace("</source>", "</source><x/>"))
    assert "Invalid argument" in res.stderr and "malformed XML" in vsfs.error(), vsfs.error()
    assert "Invalid argument" in sh(f"printf 'a\nb\n' > {src}").stderr
    vsfs.assert_clean_log()


def test_ids_and_modes_out_of_range_change_nothing(vsfs: Mount) -> None:
    target = vsfs.dir_pool()
    p = vsfs.path / "pools" / "p"
    for fmt in ("", "<format type='dir'/>"):
        for perms in ("<owner>99999999999</owner>", "<group>4294967296</group>",
                      "<mode>07777</mode>"):
            xml = (f"<volume><name>v</name><capacity>1M</capacity><target>{fmt}"
                   f"<permissions>{perms}</permissions></target></volume>")
            res = sh(f"cat > {p}/define", input=xml)
            assert "Invalid argument" in res.stderr, (xml, res.stderr)
            assert "out of range" in vsfs.error()
            assert os.listdir(target) == [] and os.listdir(p / "volumes") == []
    before = state_files(vsfs)
    xml = vsfs.pool_xml("q", vsfs.base / "q").replace(
        "</path>", "</path><permissions><owner>99999999999</owner></permissions>")
    assert "Invalid argument" in sh(f"cat > {vsfs.path}/pools/define", input=xml).stderr
    assert state_files(vsfs) == before
    vsfs.assert_clean_log()


def test_pool_names_vsfs_cannot_hold(vsfs: Mount) -> None:
    before = state_files(vsfs)
    for name, why in [("define", "reserved"), ("n" * 252, "longer than 251 bytes")]:
        xml = vsfs.pool_xml(name, vsfs.base / "t")
        res = sh(f"cat > {vsfs.path}/pools/define", input=xml)
        assert "Invalid argument" in res.stderr, (name, res.stderr)
        assert why in vsfs.error()
    assert state_files(vsfs) == before
    assert sorted(os.listdir(vsfs.path / "pools")) == ["define"]
    sh(f"cat > {vsfs.path}/pools/define", input=vsfs.pool_xml("n" * 251, vsfs.base / "t"),
       check=True)
    assert (vsfs.path / "pools" / ("n" * 251) / "state").read_text() == "inactive\n"
    vsfs.assert_clean_log()


def test_every_refusal_says_why(vsfs: Mount) -> None:
    vsfs.dir_pool()
    sh(f"truncate -s 1M {vsfs.path}/pools/p/volumes/a", check=True)
    m, p = vsfs.path, vsfs.path / "pools" / "p"
    cases = [
        (f"mkdir {p}/volinfo/x", "directories cannot be made in MNT/pools/p/volinfo"),
        (f"mkdir {m}/by-key/x", "directories cannot be made in MNT/by-key"),
        (f"rm -f {p}/xml", "MNT/pools/p/xml cannot be removed"),
        (f"rm -f {m}/README", "MNT/README cannot be removed"),
        (f"mv {m}/README {m}/R2", "MNT/README cannot be renamed"),
        (f"mv {p} {m}/pools/p2", "MNT/pools/p cannot be renamed (pools keep their names)"),
        (f"mv {p}/volinfo/a {p}/volinfo/b", "MNT/pools/p/volinfo/a cannot be renamed"),
        (f"chmod 777 {p}/ctl", "MNT/pools/p/ctl: vsfs's files keep their modes"),
        (f"chown -h 1 {p}/volumes/a", "MNT/pools/p/volumes/a: vsfs's files keep their modes"),
        (f"truncate -s 5 {p}/capacity", "MNT/pools/p/capacity is read-only"),
        (f"truncate -s 5 {p}/ctl", "MNT/pools/p/ctl cannot be resized"),
        (f"cat {m}/pools/define", "MNT/pools/define is write-only"),
    ]
    for cmd, why in cases:
        sh(f"echo x > {m}/pools/nosuch/ctl")  # an older reason, to be replaced
        res = sh(cmd)
        assert res.returncode != 0, cmd
        assert vsfs.error() == why or vsfs.error().startswith(why), (cmd, vsfs.error())
    vsfs.assert_clean_log()


def test_backing_stores_are_not_wiped_or_shrunk(vsfs: Mount) -> None:
    target = vsfs.dir_pool()
    p = vsfs.path / "pools" / "p"
    sh(f"truncate -s 4M {p}/volumes/base", check=True)
    sh(f"echo 'snapshot top' > {p}/volinfo/base/ctl", check=True)
    for cmd in [f"echo wipe > {p}/volinfo/base/ctl", f"echo 1M > {p}/volinfo/base/capacity"]:
        res = sh(cmd)
        assert "Device or resource busy" in res.stderr, (cmd, res.stderr)
        assert "backing store of p/top" in vsfs.error()
    assert os.stat(target / "base").st_size == 4 << 20
    sh(f"echo 8M > {p}/volinfo/base/capacity", check=True)  # growing harms no overlay
    sh(f"echo delete > {p}/volinfo/top/ctl", check=True)
    sh(f"echo 1M > {p}/volinfo/base/capacity", check=True)
    sh(f"echo wipe > {p}/volinfo/base/ctl", check=True)
    vsfs.assert_clean_log()


def test_ctl_words_are_quoted_as_in_a_shell(vsfs: Mount) -> None:
    vsfs.dir_pool()
    other = vsfs.base / "other pool"
    sh(f"cat > {vsfs.path}/pools/define", input=vsfs.pool_xml("other pool", other),
       check=True)
    sh(f"echo build > '{vsfs.path}/pools/other pool/ctl'", check=True)
    sh(f"echo start > '{vsfs.path}/pools/other pool/ctl'", check=True)
    p = vsfs.path / "pools" / "p"
    sh(f"truncate -s 1M {p}/volumes/a", check=True)
    sh(f"""echo "clone 'my copy' 'other pool'" > {p}/volinfo/a/ctl""", check=True)
    assert os.path.exists(other / "my copy")
    sh(f"""echo 'snapshot "a top"' > {p}/volinfo/a/ctl""", check=True)
    assert os.path.islink(p / "volumes" / "a top")
    res = sh(f"""echo "clone 'unbalanced" > {p}/volinfo/a/ctl""")
    assert "Invalid argument" in res.stderr
    assert "cannot split" in vsfs.error()
    vsfs.assert_clean_log()


def test_pool_directory_removed_behind_our_back(vsfs: Mount) -> None:
    target = vsfs.dir_pool()
    p = vsfs.path / "pools" / "p"
    target.rmdir()
    res = sh(f"truncate -s 1M {p}/volumes/v")
    assert "Input/output error" in res.stderr
    assert vsfs.error() == f"pool directory {target}: No such file or directory"
    target.mkdir()
    sh(f"truncate -s 1M {p}/volumes/v", check=True)
    vsfs.assert_clean_log()


def test_backing_stores_named_another_way_are_in_use(vsfs: Mount) -> None:
    target = vsfs.dir_pool()
    p = vsfs.path / "pools" / "p"
    (vsfs.base / "poollink").symlink_to(target)
    sh(f"truncate -s 4M {p}/volumes/b1 {p}/volumes/b2", check=True)
    xml = (f"<volume><name>o1</name><capacity>4M</capacity><target><format type='qcow2'/>"
           f"</target><backingStore><path>{target}/./b1</path><format type='raw'/>"
           f"</backingStore></volume>")
    sh(f"cat > {p}/define", input=xml, check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                    f"{vsfs.base}/poollink/b2", str(target / "o2")], check=True)
    sh(f"echo refresh > {p}/ctl", check=True)
    for base, top in (("b1", "o1"), ("b2", "o2")):
        for cmd in (f"echo wipe > {p}/volinfo/{base}/ctl",
                    f"echo 1M > {p}/volinfo/{base}/capacity", f"rm {p}/volumes/{base}"):
            res = sh(cmd)
            assert "Device or resource busy" in res.stderr, (cmd, res.stderr)
            assert f"backing store of p/{top}" in vsfs.error()
    assert sorted(os.listdir(target)) == ["b1", "b2", "o1", "o2"]
    vsfs.assert_clean_log()


@pytest.mark.root
def test_unprivileged_daemon_is_denied_not_failed() -> None:
    """A daemon run by a user who may not make the pool's directory: `build` is EACCES
    (the caller may not do this), not EIO, and the reason is in MNT/error."""
    base = Path(tempfile.mkdtemp(prefix="vsfs-user-"))
    nobody = "65534"
    proc = None
    try:
        os.chown(base, 65534, 65534)
        mnt = base / "mnt"
        mnt.mkdir()
        os.chown(mnt, 65534, 65534)
        # Started as that user; root cannot look into a mount of another user without
        # allow_other, so the mount table says when it is there.
        proc = subprocess.Popen(["setpriv", f"--reuid={nobody}", f"--regid={nobody}",
                                 "--clear-groups", sys.executable, "-m", "vsfs", "mount",
                                 str(mnt), "--foreground", "--state-dir", str(base / "state"),
                                 "--log-file", str(base / "vsfs.log")])
        deadline = time.monotonic() + 20
        while mount_device(str(mnt)) is None:
            assert proc.poll() is None and time.monotonic() < deadline, "vsfs did not mount"
            time.sleep(0.02)
        xml = base / "p.xml"
        xml.write_text("<pool type='dir'><name>p</name><target><path>/root/vsfs-denied/"
                       "images</path></target></pool>")
        sh(f"cat {xml} > {mnt}/pools/define", check=True, user=nobody)
        res = sh(f"echo build > {mnt}/pools/p/ctl", user=nobody)
        assert res.returncode != 0 and "Permission denied" in res.stderr, res.stderr
        error = sh(f"cat {mnt}/error", user=nobody).stdout
        assert "mkdir /root/vsfs-denied/images: Permission denied" in error
        assert not os.path.exists("/root/vsfs-denied")
    finally:
        if proc is not None:
            subprocess.run(["fusermount3", "-u", str(base / "mnt")], check=False)
            assert proc.wait(timeout=30) == 0
        log = (base / "vsfs.log").read_text() if (base / "vsfs.log").exists() else ""
        shutil.rmtree(base, ignore_errors=True)
    assert "Traceback" not in log, log
