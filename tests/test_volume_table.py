"""VolumeTable: a pool's volumes by name, with its indexes kept right through every change."""

from __future__ import annotations

from dataclasses import replace

from vsfs.model import BackingStore, Volume, VolumeTable, backing_key, normal_path


def vol(name: str, backing: str | None = None, path: str | None = None) -> Volume:
    path = path or f"/pool/{name}"
    return Volume(name=name, key=path, path=path, type="file", format="raw", capacity=1,
                  allocation=1, physical=1,
                  backing=BackingStore(backing, "raw") if backing else None)


def test_lookups_follow_changes() -> None:
    t = VolumeTable([vol("base"), vol("ov", backing="/pool/base")])
    assert t.with_path("/pool/base") == t["base"]
    assert t.with_key("/pool/ov") == t["ov"]
    assert t.backed_by("/pool/base") == t["ov"]
    assert t.backed_by("/pool/ov") is None

    # Replaced under the same name: the old values are forgotten.
    t["ov"] = vol("ov")
    assert t.backed_by("/pool/base") is None
    t["ov"] = replace(t["ov"], path="/elsewhere/ov", key="k")
    assert t.with_path("/pool/ov") is None
    assert t.with_path("/elsewhere/ov") == t["ov"]
    assert t.with_key("k") == t["ov"]

    # Removed in each way a mapping allows.
    t["ov2"] = vol("ov2", backing="/pool/base")
    assert t.pop("ov2").name == "ov2"
    assert t.backed_by("/pool/base") is None
    del t["ov"]
    assert t.with_key("k") is None
    assert list(t) == ["base"]
    t.clear()
    assert len(t) == 0
    assert t.with_path("/pool/base") is None


def test_shared_values_keep_both_names() -> None:
    # Two overlays of one base: removing one leaves the other found.
    t = VolumeTable([vol("base"), vol("a", backing="/pool/base"),
                     vol("b", backing="/pool/base")])
    assert t.backed_by("/pool/base") == t["a"]
    del t["a"]
    assert t.backed_by("/pool/base") == t["b"]
    del t["b"]
    assert t.backed_by("/pool/base") is None


def test_mapping_behaviour() -> None:
    t = VolumeTable()
    t.update({"x": vol("x"), "y": vol("y")})
    assert "x" in t and "z" not in t
    assert t.get("z") is None
    assert t.get("z", "none") == "none"
    assert t.get("x") is t["x"]
    assert [v.name for v in t.values()] == ["x", "y"]
    assert dict(t.items()) == {"x": t["x"], "y": t["y"]}
    assert t.keys() - {"x"} == {"y"}
    assert t.setdefault("z", vol("z")).name == "z"
    assert t.with_path("/pool/z") == t["z"]


def test_directories_and_normalised_paths_for_by_path() -> None:
    # by-path/ walks directories: each volume's parents are known, as long as it is there.
    t = VolumeTable([vol("a", path="/srv/img//a.img"), vol("b", path="/srv/img/sub/b"),
                     vol("net", path="pool/net")])
    assert t.with_normal_path("/srv/img/a.img") == t["a"]
    assert t.with_path("/srv/img/a.img") is None  # as spelled, only
    assert [t.has_below(d) for d in ("/srv", "/srv/img", "/srv/img/sub", "/srv/img/a.img",
                                     "/sr", "/srv/im")] == [True, True, True, False, False,
                                                            False]
    t["b"] = replace(t["b"], path="/srv/other/b")  # renamed: its old directory is gone
    assert not t.has_below("/srv/img/sub") and t.has_below("/srv/other")
    del t["a"]
    assert not t.has_below("/srv/img") and t.has_below("/srv")
    assert t.with_normal_path("/srv/img/a.img") is None
    t.clear()
    assert not t.has_below("/srv")


def test_paths_normalised_as_a_path_walk_takes_them() -> None:
    assert normal_path("/a//b/./c/../d/") == "/a/b/d"
    assert normal_path("//a") == "/a" and normal_path("/") == "/"
    assert normal_path("/a/../../b") == "/b"


def test_backing_stores_found_however_they_are_spelled() -> None:
    overlay = Volume("o", "/p/o", "/p/o", "file", "qcow2", 1, 1, 1,
                     backing=BackingStore("/p/./sub/../b", "raw"))
    linked = Volume("l", "/p/l", "/p/l", "file", "qcow2", 1, 1, 1,
                    backing=BackingStore("/link/c", "raw", real="/p/c"))
    table = VolumeTable([overlay, linked])
    assert table.backed_by(backing_key("/p/b")) == overlay
    assert table.backed_by("/p/c") == linked
    assert table.backed_by(backing_key("/link/c")) is None  # only where it leads counts
    assert BackingStore("/x", "raw", real="/y") == BackingStore("/x", "raw")
