"""A LIO iSCSI target on 127.0.0.1 for the guest tests, driven through python3-rtslib-fb.

rtslib-fb is Debian's system package, so this runs under /usr/bin/python3, not the venv:

    lio_target.py create IQN FILE:MiB [FILE:MiB ...] [--chap USER:PASSWORD]
    lio_target.py add-lun IQN FILE:MiB
    lio_target.py delete IQN

LUNs are file-backed (created sparse at that size); any initiator may log in
(demo mode), with CHAP when --chap is given.
"""

from __future__ import annotations

import argparse
import os

from rtslib_fb import (  # type: ignore[import-not-found]
    LUN,
    TPG,
    FabricModule,
    FileIOStorageObject,
    NetworkPortal,
    RTSRoot,
    Target,
)


def _so_name(iqn: str, index: int) -> str:
    return f"{iqn.rsplit(':', 1)[-1]}-lun{index}"


def _add_lun(tpg: TPG, iqn: str, spec: str) -> None:
    path, _, mib = spec.rpartition(":")
    index = len(list(tpg.luns))
    # LIO gives the LUN its size but leaves the file as short as what was written
    with open(path, "ab") as f:
        f.truncate(int(mib) << 20)
    so = FileIOStorageObject(_so_name(iqn, index), path, size=int(mib) << 20)
    LUN(tpg, index, so)


def _tpg(iqn: str) -> TPG:
    for target in RTSRoot().targets:
        if target.wwn == iqn:
            return next(iter(target.tpgs))
    raise SystemExit(f"no target {iqn}")


def create(iqn: str, luns: list[str], chap: str | None) -> None:
    target = Target(FabricModule("iscsi"), iqn)
    tpg = TPG(target, 1)
    NetworkPortal(tpg, "127.0.0.1", 3260)
    for spec in luns:
        _add_lun(tpg, iqn, spec)
    tpg.set_attribute("generate_node_acls", "1")  # demo mode: any initiator
    tpg.set_attribute("cache_dynamic_acls", "1")
    tpg.set_attribute("demo_mode_write_protect", "0")
    if chap:
        user, _, password = chap.partition(":")
        tpg.set_attribute("authentication", "1")
        tpg.chap_userid = user
        tpg.chap_password = password
    else:
        tpg.set_attribute("authentication", "0")
    tpg.enable = True


def delete(iqn: str) -> None:
    root = RTSRoot()
    for target in list(root.targets):
        if target.wwn == iqn:
            target.delete()
    prefix = _so_name(iqn, 0).rsplit("-", 1)[0] + "-lun"
    for so in list(root.storage_objects):
        if so.name.startswith(prefix):
            path = so.udev_path
            so.delete()
            if path and os.path.exists(path):
                os.unlink(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create")
    c.add_argument("iqn")
    c.add_argument("luns", nargs="+")
    c.add_argument("--chap")
    a = sub.add_parser("add-lun")
    a.add_argument("iqn")
    a.add_argument("lun")
    d = sub.add_parser("delete")
    d.add_argument("iqn")
    args = ap.parse_args()
    RTSRoot()  # loads the target modules and checks configfs before anything else
    if args.cmd == "create":
        create(args.iqn, args.luns, args.chap)
    elif args.cmd == "add-lun":
        _add_lun(_tpg(args.iqn), args.iqn, args.lun)
    else:
        delete(args.iqn)


if __name__ == "__main__":
    main()
