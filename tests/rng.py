"""libvirt's own RelaxNG schemas, as Debian's libvirt0 installs them."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from lxml import etree

SCHEMAS = Path("/usr/share/libvirt/schemas")


@cache
def schema(name: str) -> etree.RelaxNG:
    path = SCHEMAS / f"{name}.rng"
    if not path.exists():
        raise AssertionError(f"{path} is missing: install libvirt0 (.ci/setup does)")
    return etree.RelaxNG(etree.parse(str(path)))


def assert_valid(xml: bytes | str, name: str) -> None:
    data = xml.encode() if isinstance(xml, str) else xml
    rng = schema(name)
    doc = etree.fromstring(data)
    assert rng.validate(doc), f"not valid per {name}.rng: {rng.error_log}\n{data.decode()}"


def assert_sources_make_pools(xml: bytes, ptype: str, target: str) -> None:
    """libvirt has no schema for <sources>: each <source> in it must make a valid pool."""
    root = etree.fromstring(xml)
    assert root.tag == "sources" and len(root), xml
    for src in root:
        pool = (f"<pool type='{ptype}'><name>x</name>{etree.tostring(src).decode()}"
                f"{target}</pool>")
        assert_valid(pool, "storagepool")
