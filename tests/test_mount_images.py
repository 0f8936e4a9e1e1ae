"""Image volumes of dir pools made from XML, wiped and resized, as qemu-img sees them."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from rng import assert_valid
from support import Mount, sh

pytestmark = pytest.mark.fuse


def info(path: Path) -> dict[str, object]:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)],
                         capture_output=True, text=True, check=True).stdout
    result: dict[str, object] = json.loads(out)
    return result


def qcow2_data(path: Path) -> dict[str, object]:
    specific = info(path)["format-specific"]
    assert isinstance(specific, dict)
    data: dict[str, object] = specific["data"]
    return data


def base_and_top(vsfs: Mount, base_size: str, top_size: str, top_backing_format: str) -> Path:
    """A qcow2 "base" and a qcow2 "top" backed by it, made from XML; the pool's target."""
    target = vsfs.dir_pool()
    vsfs.define(f"<volume><name>base</name><capacity>{base_size}</capacity><target>"
                "<format type='qcow2'/></target></volume>", "p")
    vsfs.define(f"<volume><name>top</name><capacity>{top_size}</capacity><target>"
                f"<format type='qcow2'/></target><backingStore><path>{target}/base</path>"
                f"{top_backing_format}</backingStore></volume>", "p")
    return target


def test_backing_format_is_probed_when_not_given(vsfs: Mount) -> None:
    target = base_and_top(vsfs, "16M", "16M", "")
    assert info(target / "top")["backing-filename-format"] == "qcow2"
    vsfs.assert_clean_log()


def test_qcow2_options_from_xml_and_kept_by_wipe(vsfs: Mount) -> None:
    target = vsfs.dir_pool()
    p = vsfs.path / "pools" / "p"
    vsfs.define("<volume><name>q</name><capacity>16M</capacity><target>"
                "<format type='qcow2'/><compat>1.1</compat><clusterSize unit='KiB'>1024"
                "</clusterSize><features><lazy_refcounts/></features></target></volume>", "p")
    for _ in range(2):  # as made, then as wiped
        assert info(target / "q")["cluster-size"] == 1 << 20
        assert qcow2_data(target / "q")["compat"] == "1.1"
        assert qcow2_data(target / "q")["lazy-refcounts"] is True
        sh(f"echo wipe > {p}/volinfo/q/ctl", check=True)
    vsfs.define("<volume><name>old</name><capacity>16M</capacity><target>"
                "<format type='qcow2'/><compat>0.10</compat></target></volume>", "p")
    assert qcow2_data(target / "old")["compat"] == "0.10"
    res = sh(f"cat > {p}/define", input="<volume><name>r</name><capacity>1M</capacity>"
             "<target><format type='raw'/><compat>1.1</compat></target></volume>")
    assert "Invalid argument" in res.stderr and "qcow2's" in vsfs.error()
    vsfs.assert_clean_log()


def test_encryption_is_refused_and_never_dropped(vsfs: Mount) -> None:
    target = vsfs.dir_pool()
    p = vsfs.path / "pools" / "p"
    for xml in ("<volume><name>e</name><capacity>16M</capacity><target>"
                "<format type='qcow2'/><encryption format='luks'><secret type='passphrase' "
                "uuid='11111111-2222-4333-8444-555555555555'/></encryption></target></volume>",
                "<volume><name>e</name><capacity>16M</capacity><target>"
                "<format type='luks'/></target></volume>"):
        res = sh(f"cat > {p}/define", input=xml)
        assert "Operation not supported" in res.stderr, res.stderr
        assert "encrypted" in vsfs.error()
    assert os.listdir(target) == []
    # qemu-img times its key derivation by CPU usage, which a VM sometimes reports as
    # none ("Unable to get accurate CPU usage"): a few tries.
    for _ in range(5):
        made = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "--object",
                               "secret,id=s0,data=abc", "-o",
                               "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=100",
                               str(target / "enc"), "16M"], check=False, capture_output=True,
                              text=True)
        if made.returncode == 0 or "accurate CPU usage" not in made.stderr:
            break
    assert made.returncode == 0, made.stderr
    sh(f"echo refresh > {p}/ctl", check=True)
    res = sh(f"echo wipe > {p}/volinfo/enc/ctl")
    assert "Operation not supported" in res.stderr
    assert info(target / "enc").get("encrypted") is True
    vsfs.assert_clean_log()


def test_formats_libvirt_has_no_name_for(vsfs: Mount) -> None:
    target = vsfs.dir_pool()
    p = vsfs.path / "pools" / "p"
    res = sh(f"cat > {p}/define", input="<volume><name>x</name><capacity>16M</capacity>"
             "<target><format type='vhdx'/></target></volume>")
    assert "Operation not supported" in res.stderr
    subprocess.run(["qemu-img", "create", "-q", "-f", "vhdx", str(target / "h"), "16M"],
                   check=True)
    sh(f"echo refresh > {p}/ctl", check=True)
    assert (p / "volinfo" / "h" / "format").read_text() == "raw\n"  # as libvirt probes it
    assert_valid((p / "volinfo" / "h" / "xml").read_bytes(), "storagevol")
    vsfs.assert_clean_log()


def test_directory_volume_from_type_alone(vsfs: Mount) -> None:
    target = vsfs.dir_pool()
    vsfs.define("<volume type='dir'><name>d</name><capacity>0</capacity></volume>", "p")
    assert os.stat(target / "d").st_mode & 0o7777 == 0o755
    vsfs.assert_clean_log()


def test_image_resizes(vsfs: Mount) -> None:
    target = vsfs.dir_pool()
    p = vsfs.path / "pools" / "p"
    vsfs.define("<volume><name>q</name><capacity>16M</capacity><target>"
                "<format type='qcow2'/></target></volume>", "p")
    sh(f"echo 20000001 > {p}/volinfo/q/capacity", check=True)
    assert info(target / "q")["virtual-size"] == 20000256  # rounded up to 512 bytes
    vsfs.define("<volume><name>v</name><capacity>16M</capacity><target>"
                "<format type='vdi'/></target></volume>", "p")
    res = sh(f"echo 32M > {p}/volinfo/v/capacity")
    assert "Operation not supported" in res.stderr, res.stderr
    assert "cannot be resized" in vsfs.error()
    vsfs.assert_clean_log()


def test_overlay_without_capacity_takes_its_backing_size(vsfs: Mount) -> None:
    target = base_and_top(vsfs, "24M", "0", "<format type='qcow2'/>")
    assert info(target / "top")["virtual-size"] == 24 << 20
    vsfs.assert_clean_log()
