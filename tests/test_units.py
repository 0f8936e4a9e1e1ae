"""units.parse_size and model.check_name: the small parsers users hit first."""

from __future__ import annotations

import errno

import pytest

from vsfs.errors import Invalid
from vsfs.model import NAME_MAX, check_name, check_pool_name
from vsfs.units import MAX_SIZE, parse_size

KiB = 1024
MiB = 1024**2
GiB = 1024**3
TiB = 1024**4

# ---------------------------------------------------------------- parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("1", 1),
        ("1000000", 1_000_000),
        ("  4096  ", 4096),
        ("20G\n", 20 * GiB),  # what `echo 20G > capacity` writes
        (str(MAX_SIZE), MAX_SIZE),
    ],
)
def test_parse_size_plain_bytes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("suffix", "factor"),
    [
        ("K", KiB), ("KiB", KiB),
        ("M", MiB), ("MiB", MiB),
        ("G", GiB), ("GiB", GiB),
        ("T", TiB), ("TiB", TiB),
        ("KB", 1000), ("MB", 1000**2), ("GB", 1000**3), ("TB", 1000**4),
        ("b", 1), ("bytes", 1),
    ],
)
@pytest.mark.parametrize("space", ["", " "])
def test_parse_size_units(suffix: str, factor: int, space: str) -> None:
    assert parse_size(f"10{space}{suffix}") == 10 * factor


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10g", 10 * GiB),
        ("10gib", 10 * GiB),
        ("10GIB", 10 * GiB),
        ("10Gib", 10 * GiB),
        ("3gb", 3 * 1000**3),
        ("3Gb", 3 * 1000**3),
        ("7k", 7 * KiB),
        ("7kB", 7000),
        ("1 tib", TiB),
    ],
)
def test_parse_size_unit_case_does_not_matter(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("number", "unit", "expected"),
    [
        ("10", "G", 10 * GiB),
        ("10", "GiB", 10 * GiB),
        ("10", "GB", 10 * 1000**3),
        ("5", "bytes", 5),
        ("5", "b", 5),
        ("2", "KiB", 2 * KiB),
        ("2", "kb", 2000),
        ("3", "T", 3 * TiB),
        ("1", "M", MiB),
        ("42", None, 42),
    ],
)
def test_parse_size_unit_attribute(number: str, unit: str, expected: int) -> None:
    # <capacity unit='G'>10</capacity>
    assert parse_size(number, unit) == expected


def test_parse_size_boundary_of_64_bits() -> None:
    assert parse_size("15", "EiB") == 15 * 1024**6
    with pytest.raises(Invalid):
        parse_size("16", "EiB")  # exactly 2**64
    with pytest.raises(Invalid):
        parse_size(str(MAX_SIZE + 1))
    with pytest.raises(Invalid):
        parse_size("17179869184G")  # 2**34 GiB == 2**64


@pytest.mark.parametrize("unit", [None, "G"])
def test_parse_size_numbers_beyond_int_parsing(unit: str | None) -> None:
    # More than 4300 digits: int() would raise a ValueError of its own (an internal
    # error, EIO with a traceback); these are sizes too large, EINVAL, said briefly.
    for text in ("9" * 5000, "1" * 4301, "1" * 100_000 + "\n"):
        with pytest.raises(Invalid, match="too large") as info:
            parse_size(text, unit)
        assert len(info.value.message) < 200
    # Leading zeros do not make a number larger.
    assert parse_size("0" * 5000 + "42", unit) == 42 * (GiB if unit else 1)
    assert parse_size("0" * 5000, unit) == 0


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "\n",
        "-1",
        "-10G",
        "+10",
        "abc",
        "G",
        "1.5G",
        "1,000",
        "0x10",
        "10 G B",
        "10G 5",
        "ten",
        "10Q",
        "10 GiBs",
        "10 kilobytes",
        "10 iB",
        "\u0661\u0660",  # Arabic-Indic "10": not ASCII digits
    ],
)
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(Invalid):
        parse_size(text)


@pytest.mark.parametrize(("text", "unit"), [("10G", "G"), ("10 KiB", "bytes"), ("1b", "b")])
def test_parse_size_unit_given_twice(text: str, unit: str) -> None:
    with pytest.raises(Invalid, match="twice"):
        parse_size(text, unit)


@pytest.mark.parametrize("unit", ["Q", "gigs", "KK", "1"])
def test_parse_size_unknown_unit_attribute(unit: str) -> None:
    with pytest.raises(Invalid):
        parse_size("10", unit)


def test_parse_size_error_is_einval() -> None:
    with pytest.raises(Invalid) as info:
        parse_size("lots")
    assert info.value.errno == errno.EINVAL


# ---------------------------------------------------------------- check_name


@pytest.mark.parametrize(
    "name",
    [
        "default",
        "vm-disk_01.qcow2",
        "disk image with spaces",
        "a",
        "a.",
        "a..b",
        "données",
        "データ",
        "💾disk",
        "x" * NAME_MAX,
        "é" * (NAME_MAX // 2),  # 254 bytes in UTF-8
        "a-b+c=d@e:f",
    ],
)
def test_check_name_accepts(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "/",
        "a/b",
        "pool/",
        "/abs",
        ".",
        "..",
        ".hidden",
        "a\0b",
        "\0",
        "x" * (NAME_MAX + 1),
        "é" * (NAME_MAX // 2 + 1),  # 256 bytes in UTF-8, only 128 characters
        "💾" * 64,  # 256 bytes, 64 characters
        "a\nb",
        "a\tb",
        "a\rb",
        "bell\x07",
        "\x1b[31mred",
        "del\x7f",
        "\x01",
        "\x1f",
    ],
)
def test_check_name_rejects(name: str) -> None:
    with pytest.raises(Invalid):
        check_name(name)


def test_check_name_names_what_it_checks() -> None:
    with pytest.raises(Invalid, match="volume name"):
        check_name("a/b", "volume name")


def test_pool_names_fit_their_state_file() -> None:
    assert check_pool_name("a" * 251) == "a" * 251
    with pytest.raises(Invalid, match="longer than 251 bytes"):
        check_pool_name("a" * 252)
    with pytest.raises(Invalid, match="longer than 251 bytes"):
        check_pool_name("é" * 126)  # 252 bytes in UTF-8
    with pytest.raises(Invalid, match="reserved"):
        check_pool_name("define")
    with pytest.raises(Invalid, match="starts with"):
        check_pool_name(".hidden")
