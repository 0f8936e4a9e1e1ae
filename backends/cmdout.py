"""Reading the output of outside commands: JSON and fields checked, so that output a tool
version (or a broken tool) prints differently is a clear BackendFailed, never a Python
exception from deep inside a backend. The parsers themselves live beside the backend
that runs the command; tests/test_parsers.py feeds them recorded real output."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from vsfs.errors import BackendFailed


def unexpected(what: str, detail: object) -> BackendFailed:
    text = str(detail)
    return BackendFailed(f"{what}: unexpected output ({text[:120]!r})")


def load_json(text: str, what: str) -> Any:
    """The JSON document ``text``; BackendFailed when it is none."""
    try:
        return json.loads(text)
    except ValueError:
        raise unexpected(what, text) from None


def json_object(text: str, what: str) -> dict[str, Any]:
    doc = load_json(text, what)
    if not isinstance(doc, dict):
        raise unexpected(what, text)
    return doc


def json_list(text: str, what: str) -> list[Any]:
    doc = load_json(text, what)
    if not isinstance(doc, list):
        raise unexpected(what, text)
    return doc


def objects(value: object, what: str) -> list[dict[str, Any]]:
    """``value`` as a list of JSON objects (a report's rows)."""
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise unexpected(what, value)
    return value


def integer(row: Mapping[str, Any], key: str, what: str) -> int:
    """A whole number that a row holds as a number or a decimal string."""
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise unexpected(what, f"{key}={value!r}")
    try:
        return int(value)
    except ValueError:
        raise unexpected(what, f"{key}={value!r}") from None


def string(row: Mapping[str, Any], key: str, what: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise unexpected(what, f"{key}={value!r}")
    return value
