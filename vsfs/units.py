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
# Its decimal digits: a longer number (leading zeros aside) is too large before int()
# reads it, which refuses more than 4300 digits with a ValueError of its own.
_MAX_DIGITS = len(str(MAX_SIZE))


def shown(text: str, limit: int = 40) -> str:
    """User input quoted for a message, cut short: a refused 1 MiB value is not repeated
    whole in MNT/error and the log."""
    text = text.strip()
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def parse_size(text: str, unit: str | None = None) -> int:
    """Parse ``"10G"``, ``"10 GiB"``, ``"1000000"`` or a number plus a unit attribute."""
    m = _SIZE_RE.fullmatch(text)
    if m is None:
        raise Invalid(f"bad size {shown(text)}: expected a number with an optional unit")
    number, suffix = m.group(1).lstrip("0") or "0", m.group(2)
    if suffix and unit:
        raise Invalid(f"bad size {shown(text)}: unit given twice")
    key = (suffix or unit or "").lower()
    if key not in _UNITS:
        raise Invalid(f"bad size unit {shown(suffix or unit or '')}: use K, M, G, T (1024) "
                      "or KB, MB, GB, TB")
    if len(number) > _MAX_DIGITS or int(number) * _UNITS[key] > MAX_SIZE:
        raise Invalid(f"size {shown(text)} is too large")
    return int(number) * _UNITS[key]
