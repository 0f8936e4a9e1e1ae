"""xmlio: libvirt pool and volume XML in and out, and the hardened parser.

Output is checked against libvirt's own RelaxNG schemas as Debian's libvirt0
installs them; they are read from the system, never copied here.
"""

from __future__ import annotations

import errno
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from lxml import etree
from rng import assert_valid

from vsfs.errors import Invalid
from vsfs.feeder import DocumentFeeder
from vsfs.model import (
    BackingStore,
    Permissions,
    PoolDef,
    PoolSource,
    PoolStatus,
    SourceAuth,
    SourceDevice,
    SourceHost,
    Volume,
)
from vsfs.tree import source_query, source_spec
from vsfs.xmlio import (
    FS_NS,
    MAX_XML_BYTES,
    RBD_NS,
    format_pool,
    format_volume,
    parse_document,
    parse_pool,
    parse_volume,
    safe_parser,
)


def found(el: etree._Element, path: str) -> etree._Element:
    """``el.find(path)``, which must be there."""
    child = el.find(path)
    assert child is not None, f"no {path} in {etree.tostring(el).decode()}"
    return child


# ---------------------------------------------------------------- documents
# As `virsh pool-dumpxml` prints them (libvirt 9), with its quoting and layout.

DIR_POOL = b"""<pool type='dir'>
  <name>default</name>
  <uuid>4d1a8e5f-2b3c-4d5e-8f9a-0b1c2d3e4f50</uuid>
  <capacity unit='bytes'>105089261568</capacity>
  <allocation unit='bytes'>42316701696</allocation>
  <available unit='bytes'>62772559872</available>
  <source>
  </source>
  <target>
    <path>/var/lib/libvirt/images</path>
    <permissions>
      <mode>0711</mode>
      <owner>0</owner>
      <group>0</group>
    </permissions>
  </target>
</pool>
"""

DIR_POOL_COW = b"""<pool type='dir'>
  <name>btrfs-images</name>
  <uuid>0f9e8d7c-6b5a-4938-8271-605f4e3d2c1b</uuid>
  <capacity unit='bytes'>0</capacity>
  <allocation unit='bytes'>0</allocation>
  <available unit='bytes'>0</available>
  <features>
    <cow state='no'/>
  </features>
  <source>
  </source>
  <target>
    <path>/srv/images</path>
    <permissions>
      <mode>0755</mode>
      <owner>107</owner>
      <group>107</group>
      <label>system_u:object_r:virt_image_t:s0</label>
    </permissions>
  </target>
</pool>
"""

FS_POOL = b"""<pool type='fs'>
  <name>data</name>
  <uuid>6e0b5c1a-8f7d-4e2b-9c3a-1d4f5e6a7b8c</uuid>
  <capacity unit='bytes'>0</capacity>
  <allocation unit='bytes'>0</allocation>
  <available unit='bytes'>0</available>
  <source>
    <device path='/dev/sdb1'/>
    <format type='ext4'/>
  </source>
  <target>
    <path>/srv/data</path>
    <permissions>
      <mode>0755</mode>
      <owner>-1</owner>
      <group>-1</group>
    </permissions>
  </target>
</pool>
"""

NETFS_POOL = b"""<pool type='netfs'>
  <name>nfs-images</name>
  <uuid>3c2b1a09-8765-4321-a0b9-c8d7e6f5a4b3</uuid>
  <capacity unit='bytes'>527295578112</capacity>
  <allocation unit='bytes'>104857600</allocation>
  <available unit='bytes'>527190720512</available>
  <source>
    <host name='nfs.example.com'/>
    <dir path='/export/images'/>
    <format type='nfs'/>
    <protocol ver='4'/>
  </source>
  <target>
    <path>/var/lib/libvirt/nfs</path>
    <permissions>
      <mode>0755</mode>
      <owner>0</owner>
      <group>0</group>
    </permissions>
  </target>
</pool>
"""

NETFS_POOL_MOUNT_OPTS = b"""<pool type='netfs' xmlns:fs='http://libvirt.org/schemas/storagepool/fs/1.0'>
  <name>nfs-opts</name>
  <uuid>9a8b7c6d-5e4f-4a3b-2c1d-0e9f8a7b6c5d</uuid>
  <capacity unit='bytes'>0</capacity>
  <allocation unit='bytes'>0</allocation>
  <available unit='bytes'>0</available>
  <source>
    <host name='192.168.122.1' port='2049'/>
    <dir path='/export/vm'/>
    <format type='nfs'/>
  </source>
  <target>
    <path>/mnt/vm</path>
    <permissions>
      <mode>0755</mode>
      <owner>0</owner>
      <group>0</group>
    </permissions>
  </target>
  <fs:mount_opts>
    <fs:option name='sync'/>
    <fs:option name='lazytime'/>
  </fs:mount_opts>
</pool>
"""

LOGICAL_POOL = b"""<pool type='logical'>
  <name>vg0</name>
  <uuid>b1c2d3e4-f5a6-4b7c-8d9e-0f1a2b3c4d5e</uuid>
  <capacity unit='bytes'>499826819072</capacity>
  <allocation unit='bytes'>107374182400</allocation>
  <available unit='bytes'>392452636672</available>
  <source>
    <device path='/dev/sdc1'/>
    <device path='/dev/sdd1'/>
    <name>vg0</name>
    <format type='lvm2'/>
  </source>
  <target>
    <path>/dev/vg0</path>
  </target>
</pool>
"""

DISK_POOL = b"""<pool type='disk'>
  <name>sdb</name>
  <uuid>c0ffee00-1234-4abc-9def-0123456789ab</uuid>
  <capacity unit='bytes'>0</capacity>
  <allocation unit='bytes'>0</allocation>
  <available unit='bytes'>0</available>
  <source>
    <device path='/dev/sdb' part_separator='no'/>
    <format type='gpt'/>
  </source>
  <target>
    <path>/dev</path>
  </target>
</pool>
"""

ISCSI_POOL = b"""<pool type='iscsi'>
  <name>iscsi-san</name>
  <uuid>8f3e0c4a-1b2d-4e5f-9a6b-7c8d9e0f1a2b</uuid>
  <capacity unit='bytes'>0</capacity>
  <allocation unit='bytes'>0</allocation>
  <available unit='bytes'>0</available>
  <source>
    <host name='san.example.com' port='3260'/>
    <device path='iqn.2013-06.com.example:iscsi-pool'/>
    <initiator>
      <iqn name='iqn.2013-06.com.example:host1'/>
    </initiator>
    <auth type='chap' username='myuser'>
      <secret usage='libvirtiscsi'/>
    </auth>
  </source>
  <target>
    <path>/dev/disk/by-path</path>
    <permissions>
      <mode>0755</mode>
      <owner>0</owner>
      <group>0</group>
    </permissions>
  </target>
</pool>
"""

RBD_POOL = b"""<pool type='rbd' xmlns:rbd='http://libvirt.org/schemas/storagepool/rbd/1.0'>
  <name>ceph</name>
  <uuid>1a2b3c4d-5e6f-4a0b-8c1d-2e3f4a5b6c7d</uuid>
  <capacity unit='bytes'>3218866585600</capacity>
  <allocation unit='bytes'>21474836480</allocation>
  <available unit='bytes'>3110616399872</available>
  <source>
    <host name='mon1.example.com' port='6789'/>
    <host name='mon2.example.com' port='6789'/>
    <host name='mon3.example.com'/>
    <name>libvirt-pool</name>
    <auth type='ceph' username='libvirt'>
      <secret uuid='2ec115d7-3a88-3ceb-bc12-0ac909a6fd87'/>
    </auth>
  </source>
  <rbd:config_opts>
    <rbd:option name='client_mount_timeout' value='45'/>
    <rbd:option name='rados_mon_op_timeout' value='20'/>
  </rbd:config_opts>
</pool>
"""

CIFS_POOL = b"""<pool type='netfs'>
  <name>smb-share</name>
  <uuid>d4c3b2a1-0f9e-4d8c-b7a6-958473625140</uuid>
  <capacity unit='bytes'>0</capacity>
  <allocation unit='bytes'>0</allocation>
  <available unit='bytes'>0</available>
  <source>
    <host name='fileserver.example.com'/>
    <dir path='vmshare'/>
    <format type='cifs'/>
  </source>
  <target>
    <path>/mnt/vmshare</path>
  </target>
</pool>
"""

ZFS_POOL = b"""<pool type='zfs'>
  <name>tank</name>
  <uuid>e5f6a7b8-c9d0-4e1f-a2b3-c4d5e6f7a8b9</uuid>
  <capacity unit='bytes'>1992864825344</capacity>
  <allocation unit='bytes'>110729625600</allocation>
  <available unit='bytes'>1882135199744</available>
  <source>
    <name>tank</name>
    <device path='/dev/sdb'/>
  </source>
  <target>
    <path>/dev/zvol/tank</path>
  </target>
</pool>
"""

ISCSI_DIRECT_POOL = b"""<pool type='iscsi-direct'>
  <name>iscsi-direct</name>
  <uuid>f1e2d3c4-b5a6-4978-8695-a4b3c2d1e0f9</uuid>
  <capacity unit='bytes'>0</capacity>
  <allocation unit='bytes'>0</allocation>
  <available unit='bytes'>0</available>
  <source>
    <host name='192.168.122.1'/>
    <device path='iqn.2014-10.com.example:target0'/>
    <initiator>
      <iqn name='iqn.2013-06.com.example:iscsi-initiator'/>
    </initiator>
  </source>
</pool>
"""

ALL_POOLS = {
    "dir": DIR_POOL,
    "dir-cow": DIR_POOL_COW,
    "fs": FS_POOL,
    "netfs": NETFS_POOL,
    "netfs-mount-opts": NETFS_POOL_MOUNT_OPTS,
    "logical": LOGICAL_POOL,
    "disk": DISK_POOL,
    "iscsi": ISCSI_POOL,
    "rbd": RBD_POOL,
    "netfs-cifs": CIFS_POOL,
    "zfs": ZFS_POOL,
    "iscsi-direct": ISCSI_DIRECT_POOL,
}

pools = pytest.mark.parametrize("doc", list(ALL_POOLS.values()), ids=list(ALL_POOLS))


def test_sample_documents_are_valid_libvirt_xml() -> None:
    # The fixtures themselves must be what libvirt accepts, or the tests below prove nothing.
    for doc in ALL_POOLS.values():
        assert_valid(doc, "storagepool")


# ---------------------------------------------------------------- parse_pool


def test_parse_dir_pool() -> None:
    p = parse_pool(DIR_POOL)
    assert p.type == "dir"
    assert p.name == "default"
    assert p.uuid == "4d1a8e5f-2b3c-4d5e-8f9a-0b1c2d3e4f50"
    assert p.target_path == "/var/lib/libvirt/images"
    assert p.target_perms == Permissions(mode=0o711, owner=0, group=0)
    assert p.source.hosts == ()
    assert p.source.devices == ()
    assert p.source.dir is None
    assert p.cow is None
    assert p.mount_opts == ()
    assert p.config_opts == ()


def test_parse_dir_pool_cow_and_label() -> None:
    p = parse_pool(DIR_POOL_COW)
    assert p.cow is False
    assert p.target_perms == Permissions(
        mode=0o755, owner=107, group=107, label="system_u:object_r:virt_image_t:s0")


def test_parse_fs_pool() -> None:
    p = parse_pool(FS_POOL)
    assert p.type == "fs"
    assert p.source.devices == (SourceDevice("/dev/sdb1"),)
    assert p.source.format == "ext4"
    assert p.target_path == "/srv/data"
    # -1 is libvirt's "not given"
    assert p.target_perms == Permissions(mode=0o755, owner=None, group=None)


def test_parse_netfs_pool() -> None:
    p = parse_pool(NETFS_POOL)
    assert p.type == "netfs"
    assert p.source.hosts == (SourceHost("nfs.example.com", None),)
    assert p.source.dir == "/export/images"
    assert p.source.format == "nfs"
    assert p.source.protocol_ver == "4"
    assert p.target_path == "/var/lib/libvirt/nfs"
    assert p.mount_opts == ()


def test_parse_netfs_pool_mount_opts() -> None:
    p = parse_pool(NETFS_POOL_MOUNT_OPTS)
    assert p.source.hosts == (SourceHost("192.168.122.1", 2049),)
    assert p.source.dir == "/export/vm"
    assert p.mount_opts == ("sync", "lazytime")
    assert p.config_opts == ()


def test_parse_logical_pool() -> None:
    p = parse_pool(LOGICAL_POOL)
    assert p.type == "logical"
    assert p.source.devices == (SourceDevice("/dev/sdc1"), SourceDevice("/dev/sdd1"))
    assert p.source.name == "vg0"
    assert p.source.format == "lvm2"
    assert p.target_path == "/dev/vg0"
    assert p.target_perms == Permissions()


def test_parse_disk_pool() -> None:
    p = parse_pool(DISK_POOL)
    assert p.source.devices == (SourceDevice("/dev/sdb", part_separator=False),)
    assert p.source.format == "gpt"


def test_parse_iscsi_pool() -> None:
    p = parse_pool(ISCSI_POOL)
    assert p.type == "iscsi"
    assert p.source.hosts == (SourceHost("san.example.com", 3260),)
    assert p.source.devices == (SourceDevice("iqn.2013-06.com.example:iscsi-pool"),)
    assert p.source.initiator_iqn == "iqn.2013-06.com.example:host1"
    assert p.source.auth == SourceAuth(
        type="chap", username="myuser", secret_uuid=None, secret_usage="libvirtiscsi")
    assert p.target_path == "/dev/disk/by-path"


def test_parse_rbd_pool() -> None:
    p = parse_pool(RBD_POOL)
    assert p.type == "rbd"
    assert p.source.hosts == (
        SourceHost("mon1.example.com", 6789),
        SourceHost("mon2.example.com", 6789),
        SourceHost("mon3.example.com", None),
    )
    assert p.source.name == "libvirt-pool"
    assert p.source.auth == SourceAuth(
        type="ceph", username="libvirt",
        secret_uuid="2ec115d7-3a88-3ceb-bc12-0ac909a6fd87", secret_usage=None)
    assert p.config_opts == (("client_mount_timeout", "45"), ("rados_mon_op_timeout", "20"))
    assert p.mount_opts == ()
    assert p.target_path is None


def test_parse_pool_namespace_prefix_is_irrelevant() -> None:
    # What counts is the namespace URI, not the prefix a writer chose.
    doc = RBD_POOL.replace(b"xmlns:rbd=", b"xmlns:ceph=").replace(b"rbd:", b"ceph:")
    assert parse_pool(doc).config_opts == parse_pool(RBD_POOL).config_opts


def test_parse_pool_ignores_options_in_a_foreign_namespace() -> None:
    doc = NETFS_POOL_MOUNT_OPTS.replace(
        b"http://libvirt.org/schemas/storagepool/fs/1.0", b"http://example.com/not-libvirt")
    assert parse_pool(doc).mount_opts == ()


def test_parse_pool_without_uuid_generates_one() -> None:
    doc = b"<pool type='dir'><name>p</name><target><path>/srv/p</path></target></pool>"
    a = parse_pool(doc)
    b = parse_pool(doc)
    assert str(uuidlib.UUID(a.uuid)) == a.uuid  # canonical form
    assert a.uuid != b.uuid


@pytest.mark.parametrize(
    "text",
    [
        "4D1A8E5F-2B3C-4D5E-8F9A-0B1C2D3E4F50",
        "4d1a8e5f2b3c4d5e8f9a0b1c2d3e4f50",
        "4D1A8E5F2B3C4D5E8F9A0B1C2D3E4F50",
        "  4d1a8e5f-2b3c-4d5e-8f9a-0b1c2d3e4f50\n  ",
    ],
)
def test_parse_pool_normalizes_uuid(text: str) -> None:
    doc = DIR_POOL.replace(b"4d1a8e5f-2b3c-4d5e-8f9a-0b1c2d3e4f50", text.encode())
    assert parse_pool(doc).uuid == "4d1a8e5f-2b3c-4d5e-8f9a-0b1c2d3e4f50"


@pytest.mark.parametrize(
    "text",
    [
        "not-a-uuid",
        "4d1a8e5f-2b3c-4d5e-8f9a-0b1c2d3e4f5",  # one digit short
        "4d1a8e5f-2b3c-4d5e-8f9a-0b1c2d3e4f500",  # one digit long
        "4d1a8e5f-2b3c-4d5e-8f9a-0b1c2d3e4fzz",
        "{4d1a8e5f-2b3c-4d5e-8f9a-0b1c2d3e4f50}",
        "urn:uuid:4d1a8e5f-2b3c-4d5e-8f9a-0b1c2d3e4f50",
    ],
)
def test_parse_pool_bad_uuid(text: str) -> None:
    doc = DIR_POOL.replace(b"4d1a8e5f-2b3c-4d5e-8f9a-0b1c2d3e4f50", text.encode())
    with pytest.raises(Invalid, match="UUID"):
        parse_pool(doc)


@pytest.mark.parametrize(
    "doc",
    [
        b"<pool type='dir'><target><path>/srv/p</path></target></pool>",
        b"<pool type='dir'><name></name><target><path>/srv/p</path></target></pool>",
        b"<pool type='dir'><name>  </name><target><path>/srv/p</path></target></pool>",
    ],
    ids=["missing", "empty", "blank"],
)
def test_parse_pool_needs_name(doc: bytes) -> None:
    with pytest.raises(Invalid, match="name"):
        parse_pool(doc)


@pytest.mark.parametrize(
    "doc",
    [
        b"<pool><name>p</name><target><path>/srv/p</path></target></pool>",
        b"<pool type=''><name>p</name><target><path>/srv/p</path></target></pool>",
    ],
    ids=["missing", "empty"],
)
def test_parse_pool_needs_type(doc: bytes) -> None:
    with pytest.raises(Invalid, match="type"):
        parse_pool(doc)


@pytest.mark.parametrize("name", ["a/b", ".hidden", "..", "x" * 256])
def test_parse_pool_checks_name(name: str) -> None:
    doc = f"<pool type='dir'><name>{name}</name></pool>".encode()
    with pytest.raises(Invalid):
        parse_pool(doc)


@pytest.mark.parametrize("path", ["images", "./images", "var/lib/libvirt/images", "~/images"])
def test_parse_pool_relative_target_path(path: str) -> None:
    doc = DIR_POOL.replace(b"/var/lib/libvirt/images", path.encode())
    with pytest.raises(Invalid, match="absolute"):
        parse_pool(doc)


@pytest.mark.parametrize(
    ("path", "expected"),
    [("/srv/images/", "/srv/images"), ("/srv/images//", "/srv/images"), ("/", "/")],
)
def test_parse_pool_target_path_trailing_slash(path: str, expected: str) -> None:
    doc = DIR_POOL.replace(b"/var/lib/libvirt/images", path.encode())
    assert parse_pool(doc).target_path == expected


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"<mode>0711</mode>", b"<mode>0999</mode>"),
        (b"<mode>0711</mode>", b"<mode>rwx</mode>"),
        (b"<mode>0711</mode>", b"<mode>17777</mode>"),
        (b"<mode>0711</mode>", b"<mode>1777</mode>"),
        (b"<mode>0711</mode>", b"<mode>4755</mode>"),
        (b"<mode>0711</mode>", b"<mode>0o755</mode>"),
        (b"<mode>0711</mode>", b"<mode>-1</mode>"),
        (b"<owner>0</owner>", b"<owner>99999999999</owner>"),
        (b"<group>0</group>", b"<group>4294967296</group>"),
        (b"<owner>0</owner>", b"<owner>-5</owner>"),
        (b"<owner>0</owner>", b"<owner>root</owner>"),
        (b"<group>0</group>", b"<group>1.5</group>"),
    ],
)
def test_parse_pool_bad_permissions(old: bytes, new: bytes) -> None:
    with pytest.raises(Invalid):
        parse_pool(DIR_POOL.replace(old, new))


def test_target_paths_are_one_line() -> None:
    with pytest.raises(Invalid, match="control character"):
        parse_pool(b"<pool type='dir'><name>p</name><target><path>/srv/a&#10;b</path>"
                   b"</target></pool>")


def test_permission_ids_at_the_limits() -> None:
    perms = parse_pool(DIR_POOL.replace(b"<owner>0</owner>", b"<owner>4294967294</owner>")
                       .replace(b"<group>0</group>", b"<group>4294967295</group>")).target_perms
    assert (perms.owner, perms.group) == (4294967294, None)
    assert parse_pool(DIR_POOL.replace(b"<mode>0711</mode>", b"<mode>777</mode>")) \
        .target_perms.mode == 0o777


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"port='3260'", b"port='0'"),
        (b"port='3260'", b"port='65536'"),
        (b"port='3260'", b"port='iscsi'"),
        (b"<host name='san.example.com' port='3260'/>", b"<host port='3260'/>"),
        (b"<device path='iqn.2013-06.com.example:iscsi-pool'/>", b"<device/>"),
    ],
)
def test_parse_pool_bad_source(old: bytes, new: bytes) -> None:
    doc = ISCSI_POOL.replace(old, new)
    assert doc != ISCSI_POOL
    with pytest.raises(Invalid):
        parse_pool(doc)


@pytest.mark.parametrize("value", [b"maybe", b"YES", b"1"])
def test_parse_pool_yes_no_values(value: bytes) -> None:
    with pytest.raises(Invalid):
        parse_pool(DISK_POOL.replace(b"part_separator='no'", b"part_separator='" + value + b"'"))
    with pytest.raises(Invalid):
        parse_pool(DIR_POOL_COW.replace(b"state='no'", b"state='" + value + b"'"))


# ---------------------------------------------------------------- format_pool


@pools
def test_pool_round_trip(doc: bytes) -> None:
    first = parse_pool(doc)
    again = parse_pool(format_pool(first))
    assert again == first


@pools
def test_pool_round_trip_with_status(doc: bytes) -> None:
    first = parse_pool(doc)
    out = format_pool(first, PoolStatus(capacity=10, allocation=4, available=6))
    assert parse_pool(out) == first


@pools
def test_format_pool_definition_validates(doc: bytes) -> None:
    assert_valid(format_pool(parse_pool(doc)), "storagepool")


@pools
def test_format_pool_with_status_validates(doc: bytes) -> None:
    out = format_pool(parse_pool(doc), PoolStatus(capacity=2**40, allocation=2**30,
                                                  available=2**40 - 2**30))
    assert_valid(out, "storagepool")


@pytest.mark.parametrize(
    "source",
    [
        b"<source><device path='/dev/sdb'/></source>",
        b"<source><name>images</name></source>",
        b"<source><host name='nfs.example.com'/><dir path='/export'/></source>",
        b"<source><format type='ext4'/></source>",
    ],
    ids=["device", "name", "host-dir", "format"],
)
def test_dir_pool_with_stray_source_elements(source: bytes) -> None:
    # virsh pool-define takes these (libvirt parses <source> generically) and
    # pool-dumpxml drops what a dir pool has no use for: vsfs accepts them, keeps
    # nothing of them, and prints a pool storagepool.rng accepts (its dir pools
    # have an empty <source/>).
    doc = (b"<pool type='dir'><name>p</name>" + source
           + b"<target><path>/srv/p</path></target></pool>")
    pool = parse_pool(doc)
    assert pool.source == PoolSource()
    for out in (format_pool(pool), format_pool(pool, PoolStatus())):
        assert_valid(out, "storagepool")
        src = etree.fromstring(out).find("source")
        assert src is not None and len(src) == 0 and not src.attrib


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (b"<auth type='chap' username='myuser'>", b"<auth username='myuser'>",
         "<auth type> must be 'chap' or 'ceph', not None"),
        (b"<auth type='chap' username='myuser'>", b"<auth type='kerberos' username='myuser'>",
         "<auth type> must be 'chap' or 'ceph', not 'kerberos'"),
        (b"<secret usage='libvirtiscsi'/>", b"",
         "<auth> needs a <secret> with a uuid or usage"),
        (b"<secret usage='libvirtiscsi'/>", b"<secret/>",
         "<auth> needs a <secret> with a uuid or usage"),
    ],
    ids=["no-type", "unknown-type", "no-secret", "empty-secret"],
)
def test_iscsi_pool_with_incomplete_auth(old: bytes, new: bytes, message: str) -> None:
    # libvirt refuses these ("missing auth type", "unknown auth type",
    # "Missing <secret> element in auth"), and so does vsfs: EINVAL with the reason.
    doc = ISCSI_POOL.replace(old, new)
    assert doc != ISCSI_POOL
    with pytest.raises(Invalid) as exc:
        parse_pool(doc)
    assert exc.value.errno == errno.EINVAL
    assert str(exc.value) == message


def test_format_pool_status_values() -> None:
    out = format_pool(parse_pool(DIR_POOL),
                      PoolStatus(capacity=1000, allocation=300, available=700))
    root = etree.fromstring(out)
    assert root.findtext("capacity") == "1000"
    assert root.findtext("allocation") == "300"
    assert root.findtext("available") == "700"
    assert found(root, "capacity").get("unit") == "bytes"


def test_format_pool_without_status_has_no_sizes() -> None:
    root = etree.fromstring(format_pool(parse_pool(DIR_POOL)))
    for tag in ("capacity", "allocation", "available"):
        assert root.find(tag) is None


def test_format_pool_live_permissions_win() -> None:
    pool = parse_pool(DIR_POOL)
    out = format_pool(pool, PoolStatus(), live_perms=Permissions(0o2770, 1000, 100))
    assert_valid(out, "storagepool")
    perms = found(etree.fromstring(out), "target/permissions")
    # The permission bits only, as libvirt prints them (a setgid directory is 0770).
    assert perms.findtext("mode") == "0770"
    assert perms.findtext("owner") == "1000"
    assert perms.findtext("group") == "100"
    # ... and they are what a re-parse sees
    assert parse_pool(out).target_perms == Permissions(0o770, 1000, 100)


def test_stored_pools_keep_their_special_mode_bits() -> None:
    doc = DIR_POOL.replace(b"<mode>0711</mode>", b"<mode>2775</mode>")
    with pytest.raises(Invalid):
        parse_pool(doc)
    assert parse_pool(doc, stored=True).target_perms.mode == 0o2775


def test_format_pool_namespaces() -> None:
    rbd = etree.fromstring(format_pool(parse_pool(RBD_POOL)))
    opts = rbd.findall(f"{{{RBD_NS}}}config_opts/{{{RBD_NS}}}option")
    assert [(o.get("name"), o.get("value")) for o in opts] == [
        ("client_mount_timeout", "45"), ("rados_mon_op_timeout", "20")]
    netfs = etree.fromstring(format_pool(parse_pool(NETFS_POOL_MOUNT_OPTS)))
    opts = netfs.findall(f"{{{FS_NS}}}mount_opts/{{{FS_NS}}}option")
    assert [o.get("name") for o in opts] == ["sync", "lazytime"]


def test_format_pool_fs_with_mount_opts_validates() -> None:
    # fs (not netfs) pools take fs:mount_opts too, after the rest.
    pool = replace(parse_pool(FS_POOL), mount_opts=("noatime", "discard"))
    out = format_pool(pool, PoolStatus())
    assert_valid(out, "storagepool")
    assert parse_pool(out) == pool


def test_format_pool_from_model() -> None:
    # A definition built in code (as the shell verbs do), not parsed.
    pool = PoolDef(type="dir", name="built", uuid=str(uuidlib.uuid4()),
                   target_path="/srv/built",
                   target_perms=Permissions(mode=0o750, owner=0, group=0))
    out = format_pool(pool)
    assert_valid(out, "storagepool")
    assert parse_pool(out) == pool


def test_format_pool_escapes_text() -> None:
    pool = replace(parse_pool(DIR_POOL), name="a&b<c>'\"", target_path="/srv/a&b<c>")
    out = format_pool(pool)
    assert parse_pool(out) == pool


# ---------------------------------------------------------------- volumes

QCOW2_VOLUME = b"""<volume type='file'>
  <name>web.qcow2</name>
  <key>/var/lib/libvirt/images/web.qcow2</key>
  <capacity unit='bytes'>21474836480</capacity>
  <allocation unit='bytes'>1442082816</allocation>
  <physical unit='bytes'>1441988608</physical>
  <target>
    <path>/var/lib/libvirt/images/web.qcow2</path>
    <format type='qcow2'/>
    <permissions>
      <mode>0600</mode>
      <owner>64055</owner>
      <group>64055</group>
      <label>system_u:object_r:svirt_image_t:s0:c100,c200</label>
    </permissions>
    <timestamps>
      <atime>1700000000.123456789</atime>
      <mtime>1700000001.5</mtime>
      <ctime>1700000002.000000001</ctime>
    </timestamps>
    <compat>1.1</compat>
    <clusterSize unit='B'>65536</clusterSize>
    <features/>
  </target>
  <backingStore>
    <path>/var/lib/libvirt/images/base.qcow2</path>
    <format type='qcow2'/>
    <permissions>
      <mode>0644</mode>
      <owner>0</owner>
      <group>0</group>
    </permissions>
  </backingStore>
</volume>
"""


def test_sample_volume_is_valid_libvirt_xml() -> None:
    assert_valid(QCOW2_VOLUME, "storagevol")


def test_parse_volume_as_vol_dumpxml_prints_it() -> None:
    v = parse_volume(QCOW2_VOLUME)
    assert v.name == "web.qcow2"
    assert v.type == "file"
    assert v.capacity == 21474836480
    assert v.allocation == 1442082816
    assert v.format == "qcow2"
    assert v.perms == Permissions(0o600, 64055, 64055,
                                  "system_u:object_r:svirt_image_t:s0:c100,c200")
    assert v.backing == BackingStore("/var/lib/libvirt/images/base.qcow2", "qcow2")


@pytest.mark.parametrize(
    ("capacity", "expected"),
    [
        (b"<capacity unit='G'>10</capacity>", 10 * 1024**3),
        (b"<capacity unit='GB'>10</capacity>", 10 * 1000**3),
        (b"<capacity unit='MiB'>512</capacity>", 512 * 1024**2),
        (b"<capacity unit='bytes'>4096</capacity>", 4096),
        (b"<capacity>4096</capacity>", 4096),
        (b"<capacity>10G</capacity>", 10 * 1024**3),
        (b"<capacity> 1 T </capacity>", 1024**4),
    ],
)
def test_parse_volume_capacity(capacity: bytes, expected: int) -> None:
    doc = b"<volume><name>v</name>" + capacity + b"</volume>"
    v = parse_volume(doc)
    assert v.capacity == expected
    assert v.allocation is None
    assert v.format is None
    assert v.type is None
    assert v.backing is None
    assert v.perms == Permissions()


def test_parse_volume_minimal_create_request() -> None:
    doc = b"""<volume>
  <name>new.img</name>
  <allocation unit='M'>0</allocation>
  <capacity unit='G'>2</capacity>
  <target>
    <format type='raw'/>
    <permissions>
      <mode>0640</mode>
      <owner>-1</owner>
      <group>107</group>
    </permissions>
  </target>
</volume>"""
    v = parse_volume(doc)
    assert v.capacity == 2 * 1024**3
    assert v.allocation == 0
    assert v.format == "raw"
    assert v.perms == Permissions(0o640, None, 107)


def test_parse_volume_backing_store_without_format() -> None:
    doc = (b"<volume><name>o</name><capacity>1</capacity>"
           b"<backingStore><path>/srv/base.img</path></backingStore></volume>")
    assert parse_volume(doc).backing == BackingStore("/srv/base.img", None)


@pytest.mark.parametrize(
    "doc",
    [
        b"<volume><name>v</name></volume>",
        b"<volume><name>v</name><allocation>0</allocation></volume>",
        b"<volume><name>v</name><capacity></capacity></volume>",
        b"<volume><name>v</name><capacity unit='G'/></volume>",
    ],
    ids=["missing", "only-allocation", "empty", "unit-only"],
)
def test_parse_volume_needs_capacity(doc: bytes) -> None:
    with pytest.raises(Invalid):
        parse_volume(doc)


@pytest.mark.parametrize(
    "doc",
    [
        b"<volume><capacity>1</capacity></volume>",
        b"<volume><name/><capacity>1</capacity></volume>",
        b"<volume><name>a/b</name><capacity>1</capacity></volume>",
        b"<volume><name>.v</name><capacity>1</capacity></volume>",
    ],
    ids=["missing", "empty", "slash", "dot"],
)
def test_parse_volume_needs_a_good_name(doc: bytes) -> None:
    with pytest.raises(Invalid):
        parse_volume(doc)


@pytest.mark.parametrize(
    "doc",
    [
        b"<volume><name>v</name><capacity>-1</capacity></volume>",
        b"<volume><name>v</name><capacity>lots</capacity></volume>",
        b"<volume><name>v</name><capacity unit='Q'>1</capacity></volume>",
        b"<volume><name>v</name><capacity unit='G'>1G</capacity></volume>",
        b"<volume><name>v</name><capacity unit='E'>16</capacity></volume>",
        b"<volume><name>v</name><capacity>1</capacity><allocation>x</allocation></volume>",
        b"<volume><name>v</name><capacity>1</capacity>"
        b"<backingStore><format type='raw'/></backingStore></volume>",
        b"<volume><name>v</name><capacity>1</capacity>"
        b"<target><permissions><mode>8</mode></permissions></target></volume>",
        b"<volume><name>v</name><capacity>1</capacity>"
        b"<target><permissions><mode>07777</mode></permissions></target></volume>",
        b"<volume><name>v</name><capacity>1</capacity>"
        b"<target><permissions><owner>99999999999</owner></permissions></target></volume>",
    ],
)
def test_parse_volume_rejects(doc: bytes) -> None:
    with pytest.raises(Invalid):
        parse_volume(doc)


NS = 1_000_000_000


def _vol(**kw: Any) -> Volume:
    base: dict[str, Any] = dict(
        name="disk.img", key="/srv/images/disk.img", path="/srv/images/disk.img",
        type="file", format="raw", capacity=10 * 1024**3, allocation=4096,
        physical=10 * 1024**3,
    )
    base.update(kw)
    return Volume(**base)


VOLUMES = {
    "raw-file": _vol(),
    "raw-file-perms-times": _vol(
        mode=0o644, owner=0, group=0,
        atime_ns=1_700_000_000 * NS + 123_456_789, mtime_ns=1_700_000_000 * NS,
        ctime_ns=1_700_000_001 * NS + 1),
    "raw-file-epoch": _vol(mode=0, owner=0, group=0, atime_ns=0, mtime_ns=0, ctime_ns=0),
    "dir": _vol(name="isos", key="/srv/images/isos", path="/srv/images/isos", type="dir",
                format="dir", capacity=4096, allocation=4096, physical=4096,
                mode=0o2775, owner=1000, group=1000, mtime_ns=1_600_000_000 * NS),
    "qcow2-backing": _vol(
        name="web.qcow2", key="/srv/images/web.qcow2", path="/srv/images/web.qcow2",
        format="qcow2", allocation=200704, physical=196624, mode=0o600, owner=107,
        group=107, atime_ns=1_700_000_000 * NS, mtime_ns=1_700_000_000 * NS,
        ctime_ns=1_700_000_000 * NS,
        backing=BackingStore("/srv/images/base.qcow2", "qcow2")),
    "qcow2-backing-no-format": _vol(
        name="o.qcow2", key="/srv/images/o.qcow2", path="/srv/images/o.qcow2",
        format="qcow2", backing=BackingStore("/srv/images/base.img", None)),
    "only-mtime": _vol(mtime_ns=5 * NS + 7),
    "unicode-name": _vol(name="データ.img", key="/srv/images/データ.img",
                         path="/srv/images/データ.img"),
}

vols = pytest.mark.parametrize("vol", list(VOLUMES.values()), ids=list(VOLUMES))


@vols
def test_format_volume_validates(vol: Volume) -> None:
    assert_valid(format_volume(vol), "storagevol")


@vols
def test_format_volume_parses_back(vol: Volume) -> None:
    v = parse_volume(format_volume(vol))
    assert v.name == vol.name
    assert v.type == vol.type
    assert v.capacity == vol.capacity
    assert v.allocation == vol.allocation
    assert v.format == vol.format
    # The permission bits only, as libvirt prints them (a setgid directory is 0775).
    mode = None if vol.mode is None else vol.mode & 0o777
    assert v.perms == Permissions(mode, vol.owner, vol.group)
    if vol.backing is None:
        assert v.backing is None
    else:
        assert v.backing == BackingStore(vol.backing.path, vol.backing.format or "raw")


def test_format_volume_fields() -> None:
    vol = VOLUMES["qcow2-backing"]
    root = etree.fromstring(format_volume(vol))
    assert root.get("type") == "file"
    assert root.findtext("key") == "/srv/images/web.qcow2"
    assert root.findtext("target/path") == "/srv/images/web.qcow2"
    assert found(root, "target/format").get("type") == "qcow2"
    assert root.findtext("physical") == "196624"
    assert root.findtext("target/permissions/mode") == "0600"
    assert root.findtext("target/timestamps/atime") == "1700000000.000000000"
    assert root.findtext("backingStore/path") == "/srv/images/base.qcow2"


def test_format_volume_timestamps() -> None:
    root = etree.fromstring(format_volume(VOLUMES["raw-file-perms-times"]))
    ts = found(root, "target/timestamps")
    assert ts.findtext("atime") == "1700000000.123456789"
    assert ts.findtext("mtime") == "1700000000.000000000"
    assert ts.findtext("ctime") == "1700000001.000000001"
    only = found(etree.fromstring(format_volume(VOLUMES["only-mtime"])), "target/timestamps")
    assert [c.tag for c in only] == ["mtime"]
    assert only.findtext("mtime") == "5.000000007"


def test_format_volume_without_perms_or_times_omits_them() -> None:
    root = etree.fromstring(format_volume(VOLUMES["raw-file"]))
    assert root.find("target/permissions") is None
    assert root.find("target/timestamps") is None


@pytest.mark.parametrize("mtime_ns", [-14_182_940 * NS, -1], ids=["1969-07-20", "-1ns"])
def test_format_volume_pre_epoch_timestamp_validates(mtime_ns: int) -> None:
    # A file whose mtime is before 1970 (`touch -d 1969-07-20 f`) is a legal file;
    # its volume XML must still validate against storagevol.rng, whose timestamp
    # pattern is [0-9]+(\.[0-9]{0,9})?.
    assert_valid(format_volume(_vol(mtime_ns=mtime_ns)), "storagevol")


# ---------------------------------------------------------------- hardening

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE pool [
  <!ENTITY lol "lol">
  <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
  <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
  <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
  <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
  <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
  <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
  <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
  <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
  <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<pool type='dir'>
  <name>&lol9;</name>
  <target><path>/srv/lol</path></target>
</pool>
"""

SMALL_LAUGHS = b"""<!DOCTYPE pool [
  <!ENTITY lol "lol">
  <!ENTITY lol1 "&lol;&lol;&lol;">
]>
<pool type='dir'><name>&lol1;</name><target><path>/srv/lol</path></target></pool>
"""

XXE = b"""<?xml version="1.0"?>
<!DOCTYPE pool [
  <!ENTITY xxe SYSTEM "file:///etc/passwd">
]>
<pool type='dir'>
  <name>&xxe;</name>
  <target><path>/srv/x</path></target>
</pool>
"""

XXE_VOLUME = b"""<!DOCTYPE volume [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<volume><name>v</name><capacity>1</capacity><key>&xxe;</key></volume>
"""

EXTERNAL_DTD = b"""<?xml version="1.0"?>
<!DOCTYPE pool SYSTEM "file:///etc/passwd">
<pool type='dir'><name>p</name><target><path>/srv/p</path></target></pool>
"""

PLAIN_DOCTYPE = b"""<!DOCTYPE pool>
<pool type='dir'><name>p</name><target><path>/srv/p</path></target></pool>
"""


@pytest.mark.parametrize(
    "doc",
    [BILLION_LAUGHS, SMALL_LAUGHS, XXE, EXTERNAL_DTD, PLAIN_DOCTYPE],
    ids=["billion-laughs", "small-laughs", "xxe", "external-dtd", "plain-doctype"],
)
def test_doctype_is_refused(doc: bytes) -> None:
    start = time.monotonic()
    with pytest.raises(Invalid) as info:
        parse_pool(doc)
    assert time.monotonic() - start < 2.0
    # Refused for its DOCTYPE, or earlier by libxml2's own amplification guard.
    assert "DOCTYPE" in info.value.message or "amplification" in info.value.message
    assert "root:" not in info.value.message
    assert "lol" not in info.value.message


def test_doctype_is_refused_for_volumes_too() -> None:
    with pytest.raises(Invalid, match="DOCTYPE"):
        parse_volume(XXE_VOLUME)


def test_safe_parser_does_not_expand_internal_entities() -> None:
    root = etree.fromstring(SMALL_LAUGHS, safe_parser())
    name = found(root, "name")
    # The reference is kept as a reference, not replaced by its text.
    assert name.text is None
    assert root.findtext("name") == ""
    assert [type(c) for c in name] == [etree._Entity]
    assert "".join(map(str, name.itertext())) == "&lol1;"


def test_safe_parser_does_not_read_files() -> None:
    root = etree.fromstring(XXE, safe_parser())
    assert "root:" not in "".join(map(str, root.itertext()))
    assert "root:" not in etree.tostring(root, method="text", encoding="unicode")


def test_document_at_the_size_limit_is_accepted() -> None:
    head = b"<pool type='dir'><name>big</name><target><path>/srv/big</path></target>"
    tail = b"</pool>"
    doc = head + b" " * (MAX_XML_BYTES - len(head) - len(tail)) + tail
    assert len(doc) == MAX_XML_BYTES
    assert parse_pool(doc).name == "big"


def test_document_over_one_mib_is_refused() -> None:
    head = b"<pool type='dir'><name>big</name><target><path>/srv/big</path></target>"
    tail = b"</pool>"
    doc = head + b" " * (MAX_XML_BYTES - len(head) - len(tail) + 1) + tail
    assert len(doc) == MAX_XML_BYTES + 1
    with pytest.raises(Invalid, match="larger"):
        parse_pool(doc)


def test_big_name_is_refused_by_size_before_anything_else() -> None:
    doc = b"<pool type='dir'><name>" + b"x" * (2 * MAX_XML_BYTES) + b"</name></pool>"
    with pytest.raises(Invalid, match="larger"):
        parse_pool(doc)


@pytest.mark.parametrize(
    "doc",
    [
        b"",
        b"   \n",
        b"<pool type='dir'><name>p</name>",
        b"<pool type='dir'><name>p</pool>",
        b"<pool type='dir'><name>a & b</name></pool>",
        b"<pool type='dir'><name>&nbsp;</name></pool>",
        b"<pool type=dir><name>p</name></pool>",
        b"<pool type='dir'><name>p</name></pool><pool type='dir'/>",
        b"<pool type='dir'><name>p</name></pool>trailing",
        b"<pool type='dir'><name>p\xff</name></pool>",
        b"not xml at all",
        b'{"pool": "json"}',
    ],
)
def test_malformed_xml_is_invalid(doc: bytes) -> None:
    with pytest.raises(Invalid):
        parse_pool(doc)


@pytest.mark.parametrize(
    ("func", "doc"),
    [
        (parse_pool, b"<volume><name>v</name><capacity>1</capacity></volume>"),
        (parse_pool, b"<domain type='kvm'><name>vm</name></domain>"),
        (parse_pool, b"<pools><pool type='dir'><name>p</name></pool></pools>"),
        (parse_pool, b"<x:pool xmlns:x='urn:x' type='dir'><name>p</name></x:pool>"),
        (parse_volume, DIR_POOL),
        (parse_volume, b"<vol><name>v</name><capacity>1</capacity></vol>"),
    ],
)
def test_wrong_root_element_is_invalid(func: Callable[[bytes], object], doc: bytes) -> None:
    with pytest.raises(Invalid, match="expected"):
        func(doc)


def test_parse_document_drops_comments_and_pis() -> None:
    doc = parse_document(
        b"<?xml version='1.0'?><!-- c --><pool><?pi x?><name>p<!-- y --></name></pool>",
        "pool")
    assert doc.findtext("name") == "p"
    assert len(doc) == 1


# ---------------------------------------------------------------- DocumentFeeder


def _feed_all(feeder: DocumentFeeder, data: bytes, size: int) -> list[bool]:
    results: list[bool] = []
    for i in range(0, len(data), size):
        results.append(feeder.feed(data[i:i + size]))
    return results


def test_feeder_byte_by_byte_completes_on_the_last_byte_of_the_root() -> None:
    doc = DIR_POOL.rstrip()
    feeder = DocumentFeeder()
    results = _feed_all(feeder, doc, 1)
    assert results[-1] is True
    assert not any(results[:-1])
    assert feeder.complete
    assert bytes(feeder.data) == doc
    assert feeder.feed(b"\n") is True  # the newline `cat` or `echo` adds


@pytest.mark.parametrize("size", [2, 3, 7, 64, 4096])
def test_feeder_in_chunks(size: int) -> None:
    feeder = DocumentFeeder()
    results = _feed_all(feeder, RBD_POOL, size)
    assert results[-1] is True
    assert feeder.complete
    # White space fed after the end is accepted but not kept.
    assert bytes(feeder.data).rstrip() == RBD_POOL.rstrip()
    assert parse_pool(bytes(feeder.data)) == parse_pool(RBD_POOL)


def test_feeder_not_complete_before_root_closes() -> None:
    feeder = DocumentFeeder()
    assert feeder.feed(b"<?xml version='1.0'?>\n") is False
    assert feeder.feed(b"<pool type='dir'>") is False
    assert feeder.feed(b"<name>p</name>") is False  # an inner element closing is not the end
    assert feeder.feed(b"<target><path>/srv/p</path></target>") is False
    assert feeder.feed(b"</pool") is False
    assert not feeder.complete
    assert feeder.feed(b">") is True
    assert feeder.complete


def test_feeder_self_closing_root() -> None:
    feeder = DocumentFeeder()
    assert feeder.feed(b"<pool/>") is True


def test_feeder_nested_element_with_root_name() -> None:
    feeder = DocumentFeeder()
    assert feeder.feed(b"<pool><pool></pool>") is False
    assert feeder.feed(b"</pool>") is True


@pytest.mark.parametrize("trailer", [b"\n", b"   ", b"\r\n\t", b""])
def test_feeder_trailing_whitespace(trailer: bytes) -> None:
    feeder = DocumentFeeder()
    assert feeder.feed(b"<pool type='dir'><name>p</name></pool>") is True
    assert feeder.feed(trailer) is True
    assert feeder.feed(trailer) is True
    assert feeder.complete


@pytest.mark.parametrize(
    "after",
    [b"<pool/>", b"x", b"\n<pool type='dir'/>", b"  junk  "],
)
def test_feeder_data_after_the_end_in_a_later_chunk(after: bytes) -> None:
    feeder = DocumentFeeder()
    assert feeder.feed(b"<pool><name>p</name></pool>\n") is True
    with pytest.raises(Invalid, match="after the end"):
        feeder.feed(after)


@pytest.mark.parametrize(
    "after",
    [b"<!-- a -- b -->", b"<!-- x --->", b"<?xml version='1.0'?>", b"<??>", b"<?xml ?>",
     b"<!-- ok -->\n<? ?>"],
)
def test_feeder_a_malformed_comment_or_pi_in_a_later_chunk_is_refused(after: bytes) -> None:
    # What XML allows after the document, written later: whole comments and processing
    # instructions as XML has them, not whatever lies between their delimiters.
    feeder = DocumentFeeder()
    assert feeder.feed(b"<pool><name>p</name></pool>\n") is True
    with pytest.raises(Invalid, match="malformed"):
        feeder.feed(after)
    split = DocumentFeeder()
    assert split.feed(b"<pool><name>p</name></pool>\n" + after[:3]) is True
    assert not split.settled()
    with pytest.raises(Invalid, match="malformed"):
        split.feed(after[3:])


@pytest.mark.parametrize("after", [b"<!---->", b"<!-- a - b -->", b"<?pi x?>",
                                   b"<?xml-stylesheet href='a'?>\n<!-- c -->\n"])
def test_feeder_good_comments_and_pis_in_a_later_chunk(after: bytes) -> None:
    feeder = DocumentFeeder()
    assert feeder.feed(b"<pool><name>p</name></pool>\n") is True
    assert feeder.feed(after) is True
    assert feeder.settled()


@pytest.mark.parametrize("after", [b"<pool/>", b"x", b"\n<other/>"])
def test_feeder_data_after_the_end_in_the_same_chunk(after: bytes) -> None:
    feeder = DocumentFeeder()
    with pytest.raises(Invalid):
        feeder.feed(b"<pool><name>p</name></pool>" + after)


@pytest.mark.parametrize(
    ("good", "bad"),
    [
        (b"<pool type='dir'><name>p", b"</nmae>"),
        (b"<pool type='dir'>", b"<name>p</name></volume>"),
        (b"<pool type='dir'>", b"<<name>"),
        (b"<pool ", b"type=dir>"),
        (b"", b"this is not xml"),
        (b"", b'{"json": 1}'),
    ],
)
def test_feeder_syntax_error_is_raised_when_fed(good: bytes, bad: bytes) -> None:
    feeder = DocumentFeeder()
    if good:
        assert feeder.feed(good) is False
    with pytest.raises(Invalid, match="malformed"):
        feeder.feed(bad)


def test_feeder_bad_entity_reference_is_reported_by_the_time_the_root_closes() -> None:
    # A bare '&' is a well-formedness error the bytes show at once. The writer
    # must hear about it from feed(), not be left with an "incomplete" document
    # that never completes however many bytes follow.
    feeder = DocumentFeeder()
    with pytest.raises(Invalid, match="malformed"):
        feeder.feed(b"<pool type='dir'><name>a & b</name>")
        feeder.feed(b"<target><path>/srv/p</path></target>")
        feeder.feed(b"</pool>\n")


def test_feeder_at_the_size_limit_is_still_fed() -> None:
    feeder = DocumentFeeder()
    head = b"<pool type='dir'>"
    assert feeder.feed(head) is False
    pad = b" " * (MAX_XML_BYTES - len(head))
    for i in range(0, len(pad), 65536):
        assert feeder.feed(pad[i:i + 65536]) is False
    assert len(feeder.data) == MAX_XML_BYTES


def test_feeder_over_size_is_invalid() -> None:
    feeder = DocumentFeeder()
    feeder.feed(b"<pool type='dir'>")
    chunk = b" " * 65536
    with pytest.raises(Invalid, match="larger"):
        for _ in range(MAX_XML_BYTES // len(chunk) + 1):
            feeder.feed(chunk)
    assert len(feeder.data) > MAX_XML_BYTES


def test_feeder_over_size_in_one_chunk() -> None:
    feeder = DocumentFeeder()
    with pytest.raises(Invalid, match="larger"):
        feeder.feed(b"<pool>" + b" " * MAX_XML_BYTES)


def test_feeder_complete_doctype_document_is_still_refused_by_the_parser() -> None:
    # The feeder only says "complete" (it refuses nothing but size); the hardened parser
    # then refuses it.
    feeder = DocumentFeeder()
    done = [feeder.feed(XXE[i:i + 16]) for i in range(0, len(XXE), 16)]
    assert done[-1] and not any(done[:-1])
    with pytest.raises(Invalid, match="DOCTYPE"):
        parse_pool(bytes(feeder.data))


def test_source_queries_and_specs() -> None:
    q = source_query("host=10.0.0.5&port=3261&initiator=iqn.2024-01.org.example:h")
    assert q.hosts[0].name == "10.0.0.5" and q.hosts[0].port == 3261
    assert q.initiator_iqn == "iqn.2024-01.org.example:h"
    assert source_query("host=[fe80::1]:3260").hosts[0].name == "fe80::1"
    assert source_query("host=nfs.example").hosts[0].port is None
    for bad in ("", "host=", "hots=a", "port=1", "host=a&x=1", "host=a:99999", "host=a b"):
        with pytest.raises(Invalid):
            source_query(bad)
    assert source_spec(b"nas:2049\n").hosts[0].port == 2049
    assert source_spec(b"\n").hosts == ()
    spec = source_spec(b"<source><host name='h'/><initiator><iqn name='iqn.2024-01.x:y'/>"
                       b"</initiator></source>")
    assert spec.hosts[0].name == "h" and spec.initiator_iqn == "iqn.2024-01.x:y"
    with pytest.raises(Invalid):
        source_spec(b"<pool/>")


def test_comments_may_follow_the_document_in_later_writes() -> None:
    doc = DIR_POOL + b"\n<!-- made by hand -->\n<?note x?>\n"
    end = DIR_POOL.rindex(b">") + 1
    f = DocumentFeeder()
    assert f.feed(doc[:end])
    assert f.feed(doc[end:end + 10]) and f.feed(doc[end + 10:])
    for junk in (b"<second/>", b"text"):
        f = DocumentFeeder()
        f.feed(DIR_POOL)
        with pytest.raises(Invalid, match="after the end"):
            f.feed(junk)


def test_a_document_cut_anywhere_is_read_the_same() -> None:
    # Comments, a processing instruction and CDATA with ">" and the root's own end tag
    # inside, before and after the root element's end; every cut into three writes.
    doc = (b"<volume><!-- </volume> --><?note a>b?><name>v</name>"
           b"<capacity><![CDATA[1]]></capacity></volume>\n<!-- </volume> -->\n<?pi x?>\n")
    capacity: dict[bytes, int] = {}  # each distinct document parsed once
    for a in range(1, len(doc)):
        for b in range(a, len(doc) + 1):
            f = DocumentFeeder()
            done = [f.feed(doc[:a]), f.feed(doc[a:b]), f.feed(doc[b:])]
            f.finish()
            assert done[-1]
            data = bytes(f.data)
            if data not in capacity:
                capacity[data] = parse_volume(data).capacity
            assert capacity[data] == 1
    f = DocumentFeeder()
    f.feed(doc)
    f.feed(b"<!-- never closed")
    with pytest.raises(Invalid, match="not closed"):
        f.finish()


@pytest.mark.parametrize(("after", "closing"), [
    (b"<", b"!-- c -->"), (b"<!-- x", b" -->"), (b"<?pi", b" x?>"), (b"<!", b"---->"),
    (b"<!-- a --><", b"?b?>"), (b"<!-", b"- c -->\n"),
])
def test_a_document_is_settled_only_once_what_follows_it_is_closed(after: bytes,
                                                                   closing: bytes) -> None:
    # In the same write as the document, bytes that may still become a comment leave it
    # complete but not to be acted on: they may turn out invalid, and a refused write
    # must have done nothing.
    f = DocumentFeeder()
    assert f.feed(DIR_POOL + after)
    assert not f.settled()
    with pytest.raises(Invalid, match="not closed \\(nothing was done\\)"):
        f.finish()
    f = DocumentFeeder()
    f.feed(DIR_POOL + after)
    with pytest.raises(Invalid, match="after the end of the XML document \\(nothing was done"):
        f.feed(b" -->?>junk")  # whichever is open closes, and junk follows
    f = DocumentFeeder()
    f.feed(DIR_POOL + after)
    assert f.feed(closing) and f.settled()
    f.finish()
    assert parse_pool(bytes(f.data)).name == "default"


def test_a_refusal_after_the_document_says_whether_it_was_acted_on() -> None:
    for acted, outcome in ((False, "nothing was done"), (True, "acted on already")):
        f = DocumentFeeder()
        assert f.feed(DIR_POOL + b"<!-- c -->") and f.settled()
        f.acted = acted
        f.feed(b"<!-- open")
        with pytest.raises(Invalid, match=outcome):
            f.finish()
        with pytest.raises(Invalid, match=outcome):
            f.feed(b"--><junk/>")


@pytest.mark.parametrize("doc", [
    b"<p:pool type='dir'><name>x</name></p:pool>", b"<p:pool/>", b"<p:pool >\n</p:pool >",
    b"<pool><p:name>x</p:name></pool>", b"<pool p:type='dir'/>",
])
@pytest.mark.parametrize("size", [1, 5, 4096])
def test_undeclared_prefixes_are_invalid_not_internal_errors(doc: bytes, size: int) -> None:
    # lxml keeps "p:pool" as the tag, which etree.QName refuses with a ValueError: that
    # was an internal error (EIO with a traceback) instead of EINVAL.
    with pytest.raises(Invalid, match="malformed XML: Namespace prefix p"):
        # Refused as it is fed (a whole parse at a ">"), or when it is parsed whole.
        f = DocumentFeeder()
        _feed_all(f, doc, size)
        f.finish()
        parse_pool(bytes(f.data))


@pytest.mark.parametrize("empty", ["<uuid></uuid>", "<uuid/>", "<uuid> \n</uuid>"])
def test_an_empty_uuid_is_malformed_not_absent(empty: str) -> None:
    xml = f"<pool type='dir'><name>p</name>{empty}<target><path>/srv/p</path></target></pool>"
    with pytest.raises(Invalid, match="malformed UUID"):
        parse_pool(xml.encode())
    # A redefine must not take it as "keep the UUID the pool has".
    with pytest.raises(Invalid, match="malformed UUID"):
        parse_pool(xml.encode(), default_uuid="4d1a8e5f-2b3c-4d5e-8f9a-0b1c2d3e4f50")


def test_numbers_beyond_int_parsing_are_invalid_and_said_briefly() -> None:
    huge = "9" * 5000
    vol = "<volume><name>v</name><capacity{}>{}</capacity>{}</volume>"
    cases = [
        (vol.format("", huge, ""), "too large"),
        (vol.format(" unit='G'", huge, ""), "too large"),
        (vol.format("", 1, f"<allocation>{huge}</allocation>"), "too large"),
        (vol.format("", 1, f"<target><format type='qcow2'/><clusterSize>{huge}</clusterSize>"
                    "</target>"), "too large"),
        (vol.format("", 1, f"<target><permissions><owner>{huge}</owner></permissions>"
                    "</target>"), "bad owner"),
        (vol.format("", 1, f"<target><permissions><group>{huge}</group></permissions>"
                    "</target>"), "bad group"),
        (vol.format("", 1, f"<target><permissions><mode>{'7' * 5000}</mode></permissions>"
                    "</target>"), "out of range"),
    ]
    for xml, why in cases:
        with pytest.raises(Invalid, match=why) as info:
            parse_volume(xml.encode())
        assert len(info.value.message) < 200
    pool = (f"<pool type='iscsi'><name>p</name><source><host name='h' port='{huge}'/>"
            "</source><target><path>/dev/disk/by-path</path></target></pool>")
    with pytest.raises(Invalid, match="bad port") as info:
        parse_pool(pool.encode())
    assert len(info.value.message) < 200


def test_live_permissions_keep_the_defined_label() -> None:
    pool = parse_pool(DIR_POOL.replace(b"<group>0</group>",
                                       b"<group>0</group><label>virt_image_t</label>"))
    out = format_pool(pool, PoolStatus(), live_perms=Permissions(0o755, 0, 0))
    assert_valid(out, "storagepool")
    assert etree.fromstring(out).findtext("target/permissions/label") == "virt_image_t"
