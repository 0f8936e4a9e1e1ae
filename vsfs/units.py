"""Sizes as libvirt writes them: plain bytes or a number with a unit."""

from __future__ import annotations

import re

from .errors import Invalid

# libvirt's virScaleInteger: single letters and the *iB forms are powers of
# 1024, the two-letter *B forms powers of 1000; "b"/"bytes" is 1.
_UNITS: dict[str, int] = {"": 1, "b": 1, "byte": 1, "bytes": 1}
for _i, _letter in enumerate("kmgtpe", start=1):
    _UNITS[_letter] = 1024**_i
    _UNITS[_letter + "ib"] = 1024**_i
    _UNITS[_letter + "b"] = 1000**_i

_SIZE_RE = re.compile(r"\s*([0-9]+)\s*([A-Za-z]*)\s*")

# Sizes are kept as unsigned 64-bit numbers, as in libvirt.
MAX_SIZE = 2**64 - 1


def parse_size(text: str, unit: str | None = None) -> int:
    """Parse ``"10G"``, ``"10 GiB"``, ``"1000000"`` or a number plus a unit attribute."""
    m = _SIZE_RE.fullmatch(text)
    if m is None:
        raise Invalid(f"bad size {text.strip()!r}: expected a number with an optional unit")
    number, suffix = m.group(1), m.group(2)
    if suffix and unit:
        raise Invalid(f"bad size {text.strip()!r}: unit given twice")
    key = (suffix or unit or "").lower()
    if key not in _UNITS:
        raise Invalid(f"bad size unit {suffix or unit!r}: use K, M, G, T (1024) or KB, MB, GB, TB")
    value = int(number) * _UNITS[key]
    if value > MAX_SIZE:
        raise Invalid(f"size {text.strip()!r} is too large")
    return value
