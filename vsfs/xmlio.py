"""libvirt-compatible XML in and out.

Input is parsed with a hardened parser (no DTDs, no entity expansion, no
network, bounded size). Output follows libvirt's ``storagepool.rng`` and
``storagevol.rng`` so that what vsfs prints validates against them.
"""

from __future__ import annotations

import re
import uuid as uuidlib
from collections.abc import Iterable
from dataclasses import fields, replace
from typing import TYPE_CHECKING

from lxml import etree

from .errors import Invalid, Unsupported
from .model import (
    BLOCK_FORMATS,
    BackingStore,
    Permissions,
    PoolDef,
    PoolSource,
    PoolStatus,
    SourceAuth,
    SourceDevice,
    SourceHost,
    Volume,
    VolumeDef,
    check_name,
    check_pool_name,
)
from .units import parse_size, shown

MAX_XML_BYTES = 1 << 20

FS_NS = "http://libvirt.org/schemas/storagepool/fs/1.0"
RBD_NS = "http://libvirt.org/schemas/storagepool/rbd/1.0"

_HEX = "[0-9a-fA-F]"
_UUID_RE = re.compile(rf"{_HEX}{{8}}-?{_HEX}{{4}}-?{_HEX}{{4}}-?{_HEX}{{4}}-?{_HEX}{{12}}")


def safe_parser() -> etree.XMLParser:
    """A parser that cannot be made to read files, the network or expand entities."""
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_comments=True,
        remove_pis=True,
    )


# What lxml raises on input it cannot take besides XMLSyntaxError: ValueError for a
# name it cannot make a tag of (an undeclared prefix, "p:pool"), UnicodeError for text
# it cannot decode, and its other errors. Written input is refused with them, never an
# internal error.
LXML_INPUT_ERRORS = (etree.LxmlError, ValueError, UnicodeError)


def libxml2_says(e: Exception) -> str:
    """libxml2's words for a syntax error; the message of any other error."""
    return getattr(e, "msg", None) or str(e)


def malformed(e: Exception) -> Invalid:
    return Invalid(f"malformed XML: {libxml2_says(e)}")


if not TYPE_CHECKING:
    def __getattr__(name: str) -> object:
        """DocumentFeeder lives in vsfs/feeder.py (which imports this module: hence
        lazily). Kept for tests/test_xmlio.py, which imports it from here; vsfs itself
        imports it from feeder (mypy, which does not see this, holds it to that)."""
        if name == "DocumentFeeder":
            from .feeder import DocumentFeeder  # noqa: PLC0415
            return DocumentFeeder
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def parse_document(data: bytes, root: str) -> etree._Element:
    """Parse one complete document whose root element must be ``root``."""
    if len(data) > MAX_XML_BYTES:
        raise Invalid(f"XML document larger than {MAX_XML_BYTES} bytes")
    if not data.strip():
        raise Invalid("empty XML document")
    try:
        doc = etree.fromstring(data, safe_parser())
        info = doc.getroottree().docinfo
        # lxml-stubs lack DocInfo.doctype; it is the whole <!DOCTYPE ...> line.
        doctype = getattr(info, "doctype", "") or info.internalDTD is not None
    except LXML_INPUT_ERRORS as e:
        raise malformed(e) from None
    if doctype:
        raise Invalid("XML with a DOCTYPE is not accepted")
    if doc.tag != root:
        raise Invalid(f"expected a <{root}> document, got <{doc.tag}>")
    return doc


def _text(el: etree._Element | None) -> str | None:
    if el is None or el.text is None:
        return None
    return el.text.strip()


def _sized(el: etree._Element | None) -> int | None:
    if el is None:
        return None
    text = _text(el)
    if not text:
        raise Invalid(f"<{el.tag}> needs a size")
    return parse_size(text, el.get("unit"))


# (uid_t)-1 means "unchanged" to chown(2): the largest id a file can have is one less.
MAX_ID = 2**32 - 2


def _int_or_default(text: str | None, what: str, base: int = 10,
                    highest: int = MAX_ID) -> int | None:
    if text is None or text in {"", "-1"}:
        return None
    try:
        # int() refuses more than 4300 decimal digits with a ValueError too: bad as well.
        value = int(text, base)
    except ValueError:
        raise Invalid(f"bad {what} {shown(text)}") from None
    if highest == MAX_ID and value == MAX_ID + 1:
        return None  # (uid_t)-1 spelled out, as libvirt takes it
    if not 0 <= value <= highest:
        raise Invalid(f"bad {what} {shown(text)}: out of range (0 to "
                      f"{oct(highest) if base == 8 else highest})")
    return value


def _mode(text: str | None, highest: int) -> int | None:
    """Octal digits only, as libvirt's strtol base 8 takes them (no "0o", no -1)."""
    if not text:
        return None
    if not re.fullmatch(r"[0-7]+", text):
        raise Invalid(f"bad mode {shown(text)}: octal digits expected, such as 0755")
    return _int_or_default(text, "mode", 8, highest)


def parse_permissions(el: etree._Element | None, stored: bool = False) -> Permissions:
    """<permissions>; *stored*: from the state directory, where vsfs before 2026-11-22
    kept modes with the setuid, setgid and sticky bits too."""
    if el is None:
        return Permissions()
    return Permissions(
        # libvirt takes the permission bits only (no setuid, setgid or sticky bit).
        mode=_mode(_text(el.find("mode")), highest=0o7777 if stored else 0o777),
        owner=_int_or_default(_text(el.find("owner")), "owner"),
        group=_int_or_default(_text(el.find("group")), "group"),
        label=_text(el.find("label")),
    )


def _yes_no(value: str | None, what: str) -> bool | None:
    if value is None:
        return None
    if value in ("yes", "no"):
        return value == "yes"
    raise Invalid(f"{what} must be 'yes' or 'no', not {value!r}")


def normalize_uuid(text: str) -> str:
    if not _UUID_RE.fullmatch(text.strip()):
        raise Invalid(f"malformed UUID {shown(text)}")
    return str(uuidlib.UUID(text.strip()))


def _parse_auth(el: etree._Element) -> SourceAuth:
    atype = el.get("type")
    if atype not in ("chap", "ceph"):
        raise Invalid(f"<auth type> must be 'chap' or 'ceph', not {atype!r}")
    username = el.get("username")
    if not username:
        raise Invalid("<auth> needs a username")
    secret = el.find("secret")
    if secret is None or not (secret.get("uuid") or secret.get("usage")):
        raise Invalid("<auth> needs a <secret> with a uuid or usage")
    return SourceAuth(type=atype, username=username, secret_uuid=secret.get("uuid"),
                      secret_usage=None if secret.get("uuid") else secret.get("usage"))


# Which <source> parts each pool type has (libvirt's poolOptions); the rest is
# dropped, as libvirt does, so what we print validates for that type.
_VENDOR = frozenset({"vendor", "product"})
SOURCE_FIELDS: dict[str, frozenset[str]] = {
    "dir": _VENDOR,
    "fs": _VENDOR | {"devices", "format"},
    "netfs": _VENDOR | {"hosts", "dir", "format", "protocol_ver"},
    "logical": _VENDOR | {"name", "devices", "format"},
    "disk": _VENDOR | {"devices", "format"},
    "iscsi": _VENDOR | {"hosts", "devices", "initiator_iqn", "auth"},
    "iscsi-direct": frozenset({"hosts", "devices", "initiator_iqn", "auth"}),
    "scsi": _VENDOR,
    "mpath": frozenset(),
    "rbd": frozenset({"name", "hosts", "auth"}),
    "sheepdog": frozenset({"hosts", "name"}),
    "gluster": frozenset({"hosts", "name", "dir"}),
    "zfs": frozenset({"name", "devices"}),
    "vstorage": frozenset({"name"}),
}
# Pool types libvirt knows: one without a backend here is EOPNOTSUPP, any other EINVAL.
LIBVIRT_POOL_TYPES = frozenset(SOURCE_FIELDS)


def _for_type(src: PoolSource, ptype: str) -> PoolSource:
    keep = SOURCE_FIELDS.get(ptype)
    if keep is None:
        return src
    empty = PoolSource()
    return replace(src, **{f.name: getattr(empty, f.name) for f in fields(PoolSource)
                           if f.name not in keep})


def _parse_source(el: etree._Element | None) -> PoolSource:
    if el is None:
        return PoolSource()
    hosts = []
    for h in el.findall("host"):
        name = h.get("name")
        if not name:
            raise Invalid("<host> needs a name")
        port = h.get("port")
        try:
            port_no = int(port) if port is not None else None
        except ValueError:  # also more than 4300 digits
            raise Invalid(f"bad port {shown(port or '')}") from None
        if port_no is not None and not 0 < port_no < 65536:
            raise Invalid(f"bad port {shown(port or '')}")
        hosts.append(SourceHost(name, port_no))
    devices = []
    for d in el.findall("device"):
        path = d.get("path")
        if not path:
            raise Invalid("<device> needs a path")
        devices.append(SourceDevice(path, _yes_no(d.get("part_separator"), "part_separator")))
    dir_el = el.find("dir")
    fmt = el.find("format")
    vendor = el.find("vendor")
    product = el.find("product")
    auth_el = el.find("auth")
    auth = None
    if auth_el is not None:
        auth = _parse_auth(auth_el)
    iqn = el.find("initiator/iqn")
    proto = el.find("protocol")
    return PoolSource(
        hosts=tuple(hosts),
        devices=tuple(devices),
        dir=dir_el.get("path") if dir_el is not None else None,
        name=_text(el.find("name")),
        format=fmt.get("type") if fmt is not None else None,
        vendor=vendor.get("name") if vendor is not None else None,
        product=product.get("name") if product is not None else None,
        initiator_iqn=iqn.get("name") if iqn is not None else None,
        auth=auth,
        protocol_ver=proto.get("ver") if proto is not None else None,
    )


def parse_source_spec(data: bytes) -> PoolSource:
    """A ``<source>`` document, as ``virsh find-storage-pool-sources TYPE SPEC`` takes it."""
    return _parse_source(parse_document(data, "source"))


def parse_pool(data: bytes, default_uuid: str | None = None, stored: bool = False) -> PoolDef:
    """Parse a ``<pool>`` document (as ``virsh pool-dumpxml`` prints it).

    Without a ``<uuid>`` the pool gets ``default_uuid``, else a new random one.
    """
    doc = parse_document(data, "pool")
    ptype = doc.get("type")
    if not ptype:
        raise Invalid("<pool> needs a type attribute")
    name = _text(doc.find("name"))
    if not name:
        raise Invalid("<pool> needs a <name>")
    check_pool_name(name)
    uuid_el = doc.find("uuid")
    # Without <uuid> one is made (or kept, on a redefine); an empty one is a malformed
    # UUID, not "none": a redefine must not take <uuid></uuid> as "keep the old one".
    pool_uuid = (normalize_uuid(_text(uuid_el) or "") if uuid_el is not None
                 else default_uuid or str(uuidlib.uuid4()))
    target = doc.find("target")
    target_path = _text(target.find("path")) if target is not None else None
    if target_path is not None and not target_path.startswith("/"):
        raise Invalid(f"target path {target_path!r} is not absolute")
    if target_path is not None and any(ord(c) < 0x20 or c == "\x7f" for c in target_path):
        # MNT/pools/P/target prints it on one line.
        raise Invalid(f"target path {target_path!r} contains a control character")
    perms = parse_permissions(target.find("permissions") if target is not None else None,
                              stored)
    cow_el = doc.find("features/cow")
    mount_opts = tuple(
        o.get("name", "") for o in doc.findall(f"{{{FS_NS}}}mount_opts/{{{FS_NS}}}option")
    )
    config_opts = tuple(
        (o.get("name", ""), o.get("value", ""))
        for o in doc.findall(f"{{{RBD_NS}}}config_opts/{{{RBD_NS}}}option")
    )
    return PoolDef(
        type=ptype,
        name=name,
        uuid=pool_uuid,
        source=_for_type(_parse_source(doc.find("source")), ptype),
        target_path=target_path.rstrip("/") or "/" if target_path else None,
        target_perms=perms,
        cow=_yes_no(cow_el.get("state"), "cow state") if cow_el is not None else None,
        mount_opts=mount_opts,
        config_opts=config_opts,
    )


def parse_volume(data: bytes) -> VolumeDef:
    """Parse a ``<volume>`` document (as ``virsh vol-dumpxml`` prints it)."""
    doc = parse_document(data, "volume")
    name = _text(doc.find("name"))
    if not name:
        raise Invalid("<volume> needs a <name>")
    check_name(name, "volume name")
    capacity = _sized(doc.find("capacity"))
    if capacity is None:
        raise Invalid("<volume> needs a <capacity>")
    allocation = _sized(doc.find("allocation"))
    target = doc.find("target")
    if target is not None and target.find("encryption") is not None:
        # Made without it, the volume would hold plain text where encryption was asked.
        raise Unsupported("vsfs does not create encrypted volumes (<encryption>)")
    fmt = target.find("format") if target is not None else None
    perms = parse_permissions(target.find("permissions") if target is not None else None)
    backing = None
    bs = doc.find("backingStore")
    if bs is not None:
        bpath = _text(bs.find("path"))
        if not bpath:
            raise Invalid("<backingStore> needs a <path>")
        bfmt = bs.find("format")
        backing = BackingStore(bpath, bfmt.get("type") if bfmt is not None else None)
    fmt_name = fmt.get("type") if fmt is not None else None
    compat = _text(target.find("compat")) if target is not None else None
    lazy = target is not None and target.find("features/lazy_refcounts") is not None
    cluster = _sized(target.find("clusterSize")) if target is not None else None
    if compat is not None and not re.fullmatch(r"[0-9]+\.[0-9]+", compat):
        raise Invalid(f"bad <compat> {compat!r}: a version such as 1.1")
    if (compat is not None or lazy) and fmt_name != "qcow2":
        raise Invalid("<compat> and <features> are qcow2's")
    if cluster is not None and fmt_name not in ("qcow2", "qed"):
        raise Invalid("<clusterSize> is qcow2's or qed's")
    return VolumeDef(
        name=name,
        capacity=capacity,
        allocation=allocation,
        format=fmt_name,
        type=doc.get("type"),
        perms=perms,
        backing=backing,
        compat=compat,
        lazy_refcounts=lazy,
        cluster_size=cluster,
    )


# ---------------------------------------------------------------- output


def _sub(parent: etree._Element, tag: str, text: str | None = None, **attrs: str) -> etree._Element:
    el = etree.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def _size(parent: etree._Element, tag: str, value: int) -> None:
    _sub(parent, tag, str(value), unit="bytes")


def _perms(parent: etree._Element, perms: Permissions) -> None:
    if perms == Permissions():
        return
    p = _sub(parent, "permissions")
    if perms.mode is not None:
        # As libvirt prints them (st_mode & S_IRWXUGO), and so that they parse back.
        _sub(p, "mode", f"{perms.mode & 0o777:04o}")
    if perms.owner is not None:
        _sub(p, "owner", str(perms.owner))
    if perms.group is not None:
        _sub(p, "group", str(perms.group))
    if perms.label is not None:
        _sub(p, "label", perms.label)


def _source(parent: etree._Element, src: PoolSource,
            extents: tuple[tuple[int, int], ...] = ()) -> None:
    s = _sub(parent, "source")
    for h in src.hosts:
        attrs = {"name": h.name}
        if h.port is not None:
            attrs["port"] = str(h.port)
        _sub(s, "host", **attrs)
    for d in src.devices:
        attrs = {"path": d.path}
        if d.part_separator is not None:
            attrs["part_separator"] = "yes" if d.part_separator else "no"
        dev = _sub(s, "device", **attrs)
        for start, end in extents if d is src.devices[0] else ():
            # libvirt prints the end exclusive.
            _sub(dev, "freeExtent", start=str(start), end=str(end + 1))
    if src.dir is not None:
        _sub(s, "dir", path=src.dir)
    if src.name is not None:
        _sub(s, "name", src.name)
    if src.format is not None:
        _sub(s, "format", type=src.format)
    if src.protocol_ver is not None:
        _sub(s, "protocol", ver=src.protocol_ver)
    if src.initiator_iqn is not None:
        _sub(_sub(s, "initiator"), "iqn", name=src.initiator_iqn)
    if src.auth is not None:
        a = _sub(s, "auth", type=src.auth.type, username=src.auth.username)
        if src.auth.secret_uuid is not None:
            _sub(a, "secret", uuid=src.auth.secret_uuid)
        elif src.auth.secret_usage is not None:
            _sub(a, "secret", usage=src.auth.secret_usage)
    if src.vendor is not None:
        _sub(s, "vendor", name=src.vendor)
    if src.product is not None:
        _sub(s, "product", name=src.product)


def _serialize(root: etree._Element) -> bytes:
    etree.indent(root, space="  ")
    return bytes(etree.tostring(root, encoding="utf-8")) + b"\n"


def format_pool(pool: PoolDef, status: PoolStatus | None = None,
                live_perms: Permissions | None = None) -> bytes:
    """The pool's XML; with a status, its live sizes too (as pool-dumpxml).

    Without one it is the persistent definition, as libvirt keeps it on disk.
    """
    nsmap = {"fs": FS_NS} if pool.mount_opts else ({"rbd": RBD_NS} if pool.config_opts else None)
    root = etree.Element("pool", {"type": pool.type}, nsmap=nsmap)
    _sub(root, "name", pool.name)
    _sub(root, "uuid", pool.uuid)
    if status is not None:
        _size(root, "capacity", status.capacity)
        _size(root, "allocation", status.allocation)
        _size(root, "available", status.available)
    if pool.cow is not None:
        _sub(_sub(root, "features"), "cow", state="yes" if pool.cow else "no")
    _source(root, pool.source, status.extents if status is not None else ())
    if pool.target_path is not None or pool.target_perms != Permissions():
        t = _sub(root, "target")
        if pool.target_path is not None:
            _sub(t, "path", pool.target_path)
        _perms(t, replace(live_perms, label=pool.target_perms.label) if live_perms
               else pool.target_perms)
    if pool.mount_opts:
        m = _sub(root, f"{{{FS_NS}}}mount_opts")
        for opt in pool.mount_opts:
            _sub(m, f"{{{FS_NS}}}option", name=opt)
    if pool.config_opts:
        c = _sub(root, f"{{{RBD_NS}}}config_opts")
        for k, v in pool.config_opts:
            _sub(c, f"{{{RBD_NS}}}option", name=k, value=v)
    return _serialize(root)


def _timestamp(ns: int) -> str:
    return f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}"


def _stamps(vol: Volume) -> list[tuple[str, int]]:
    # libvirt's schema has no sign for times before 1970: those are left out.
    return [(tag, ns) for tag, ns in (("atime", vol.atime_ns), ("mtime", vol.mtime_ns),
                                      ("ctime", vol.ctime_ns)) if ns is not None and ns >= 0]


def format_volume(vol: Volume) -> bytes:
    root = etree.Element("volume", {"type": vol.type})
    _sub(root, "name", vol.name)
    _sub(root, "key", vol.key)
    _size(root, "capacity", vol.capacity)
    _size(root, "allocation", vol.allocation)
    _size(root, "physical", vol.physical)
    t = _sub(root, "target")
    _sub(t, "path", vol.xml_path or vol.path)
    # libvirt's schema has no name for these: its block volumes say "none".
    _sub(t, "format", type="none" if vol.format in BLOCK_FORMATS else vol.format)
    _perms(t, Permissions(vol.mode, vol.owner, vol.group))
    stamps = _stamps(vol)
    if stamps:
        ts = _sub(t, "timestamps")
        for tag, value in stamps:
            _sub(ts, tag, _timestamp(value))
    if vol.backing is not None:
        b = _sub(root, "backingStore")
        _sub(b, "path", vol.backing.path)
        _sub(b, "format", type=vol.backing.format or "raw")
    return _serialize(root)


def format_sources(sources: Iterable[PoolSource]) -> bytes:
    root = etree.Element("sources")
    for src in sources:
        _source(root, src)
    return _serialize(root)
