"""The load and the checks of the crash tests (tests/test_crash.py on the host,
tests/guest/test_crash_logical.py in the QEMU guest).

A writer is a process of its own, ``python tests/crash_load.py CONFIG``, that acts
through a vsfs mount until the mount dies: it creates volumes (``truncate``, ``cp``,
``clone``), deletes them (``rm``), defines and undefines pools of its own (``rmdir``) and
flips their autostart. It logs each action before it starts it ("try") and then its
outcome: an action whose command returned 0 is acknowledged and must be there after the
daemon is killed and mounted again; an action that failed while the mount lived changed
nothing; the one in flight when the daemon died may have happened or not, but never in
part. Each writer has names of its own, so the actions of one writer are in order and
never race another's. Only the standard library is used: in the guest every import costs.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MiB = 1 << 20


@dataclass
class Vol:
    """What a volume must be: its size, and the digest of its bytes where they are not
    left to the backend (cp, and clones of those)."""

    size: int
    digest: str | None = None


@dataclass
class Model:
    """What must be there: volumes of the pools under load, and the writers' own pools
    (name -> autostart)."""

    volumes: dict[str, dict[str, Vol]]
    pools: dict[str, bool] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"volumes": {p: {n: [v.size, v.digest] for n, v in vols.items()}
                            for p, vols in self.volumes.items()},
                "pools": self.pools}

    @staticmethod
    def from_json(d: dict[str, Any]) -> Model:
        return Model({p: {n: Vol(s, g) for n, (s, g) in vols.items()}
                      for p, vols in d["volumes"].items()}, dict(d["pools"]))


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def pool_xml(name: str, target: str) -> str:
    return f"<pool type='dir'><name>{name}</name><target><path>{target}</path></target></pool>"


# ---------------------------------------------------------------- the writer


def _run(argv: list[str]) -> str | None:
    """None when the command succeeded, else why not."""
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    except subprocess.TimeoutExpired:
        return "timed out"
    return None if res.returncode == 0 else (res.stderr.strip() or f"exit {res.returncode}")


def _write(path: Path, text: str) -> str | None:
    """What `echo TEXT > PATH` does, without a process: open, write, close."""
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as e:
        return f"{path}: {e.strerror}"
    return None


def _alive(mnt: Path) -> bool:
    """Whether the daemon answers: a listing always asks it (a stat may be answered from
    the kernel's caches after it died)."""
    try:
        os.listdir(mnt / "pools")
    except OSError:
        return False  # ECONNABORTED, ENOTCONN while the dead mount is there
    return True


def _choose(rnd: random.Random, cfg: dict[str, Any], model: Model,
            serial: int) -> dict[str, Any]:
    me = cfg["writer"]
    roll = rnd.random()
    if roll < cfg["pool_ops"]:
        mine = sorted(model.pools)
        kind = rnd.choice(["define", "undefine", "autostart", "autostart"])
        if kind == "define" or not mine:
            if len(mine) >= cfg["max_pools"]:
                return {"op": "undefine", "name": rnd.choice(mine)}
            return {"op": "define", "name": f"w{me}p{serial}"}
        name = rnd.choice(mine)
        if kind == "undefine":
            return {"op": "undefine", "name": name}
        return {"op": "autostart", "name": name, "on": not model.pools[name]}
    pool = rnd.choice(sorted(cfg["pools"]))
    spec = cfg["pools"][pool]
    vols = model.volumes[pool]
    ops = list(spec["ops"])
    if not vols:
        ops = [o for o in ops if o not in ("rm", "clone")]
    if len(vols) >= cfg["max_vols"]:
        ops = ["rm"]
    kind = rnd.choice(ops)
    name = f"w{me}-{serial}"
    if kind == "truncate":
        return {"op": "truncate", "pool": pool, "name": name, "size": rnd.choice(spec["sizes"])}
    if kind == "cp":
        return {"op": "cp", "pool": pool, "name": name}
    if kind == "clone":
        return {"op": "clone", "pool": pool, "name": name, "of": rnd.choice(sorted(vols))}
    return {"op": "rm", "pool": pool, "name": rnd.choice(sorted(vols))}


def _act(op: dict[str, Any], cfg: dict[str, Any]) -> str | None:
    mnt = Path(cfg["mnt"])
    kind = op["op"]
    if kind in ("truncate", "cp", "clone", "rm"):
        pool = mnt / "pools" / op["pool"]
        path = pool / "volumes" / op["name"]
        if kind == "truncate":
            return _run(["truncate", "-s", str(op["size"]), str(path)])
        if kind == "cp":
            return _run(["cp", cfg["src"], str(path)])
        if kind == "clone":
            return _write(pool / "volinfo" / op["of"] / "ctl", f"clone {op['name']}\n")
        return _run(["rm", str(path)])
    if kind == "define":
        return _write(mnt / "pools" / "define",
                      pool_xml(op["name"], f"{cfg['nowhere']}/{op['name']}"))
    if kind == "undefine":
        try:
            os.rmdir(mnt / "pools" / op["name"])
        except OSError as e:
            return e.strerror
        return None
    return _write(mnt / "pools" / op["name"] / "autostart", "yes\n" if op["on"] else "no\n")


def apply(model: Model, op: dict[str, Any], src: Vol) -> None:
    """What an action does once it is done."""
    kind = op["op"]
    if kind == "truncate":
        model.volumes[op["pool"]][op["name"]] = Vol(op["size"])
    elif kind == "cp":
        model.volumes[op["pool"]][op["name"]] = Vol(src.size, src.digest)
    elif kind == "clone":
        of = model.volumes[op["pool"]][op["of"]]
        model.volumes[op["pool"]][op["name"]] = Vol(of.size, of.digest)
    elif kind == "rm":
        model.volumes[op["pool"]].pop(op["name"], None)
    elif kind == "define":
        model.pools[op["name"]] = False
    elif kind == "undefine":
        model.pools.pop(op["name"], None)
    else:
        model.pools[op["name"]] = op["on"]


def writer_main(config: str) -> int:
    cfg = json.loads(Path(config).read_text())
    rnd = random.Random(cfg["seed"])
    model = Model.from_json(cfg["model"])
    src = Vol(cfg["src_size"], cfg["src_digest"])
    serial = cfg["serial"]
    deadline = time.monotonic() + cfg["seconds"]
    with open(cfg["log"], "a", buffering=1) as log:
        def record(**kw: Any) -> None:
            log.write(json.dumps(kw) + "\n")
        record(t="ready")
        while time.monotonic() < deadline:
            op = _choose(rnd, cfg, model, serial)
            record(t="try", serial=serial, **op)
            serial += 1
            err = _act(op, cfg)
            if err is None:
                record(t="ack")
                apply(model, op, src)
                continue
            dead = not _alive(Path(cfg["mnt"]))
            record(t="fail", err=err[-300:], dead=dead)
            if dead:
                return 0
    return 0


# ---------------------------------------------------------------- the test's side


@dataclass
class Replayed:
    """What a writer's log says after one kill."""

    acked: int = 0
    failed: int = 0
    # Actions whose outcome the kill hid: each happened wholly or not at all.
    in_doubt: list[dict[str, Any]] = field(default_factory=list)
    last_serial: int = 0


def replay(model: Model, log: Path, src: Vol) -> Replayed:
    """Apply a writer's acknowledged actions to ``model``, in their order."""
    out = Replayed()
    pending: dict[str, Any] | None = None
    for line in log.read_text().splitlines():
        rec = json.loads(line)
        t = rec.pop("t")
        if t == "try":
            out.last_serial = max(out.last_serial, rec.pop("serial"))
            pending = rec
        elif t == "ack":
            assert pending is not None
            apply(model, pending, src)
            out.acked += 1
            pending = None
        elif t == "fail":
            assert pending is not None
            if rec["dead"]:
                out.in_doubt.append(pending)
            else:
                out.failed += 1
            pending = None
    if pending is not None:
        out.in_doubt.append(pending)  # the writer was stopped while it waited
    return out


def resolve(model: Model, op: dict[str, Any], src: Vol,
            volume_seen: dict[str, dict[str, Vol]], pools_seen: dict[str, bool]) -> str:
    """Bring ``model`` in line with an action in doubt, as the mount shows it: done
    wholly, or not at all. Says which; fails on anything in between."""
    before = Model({p: dict(v) for p, v in model.volumes.items()}, dict(model.pools))
    after = Model({p: dict(v) for p, v in model.volumes.items()}, dict(model.pools))
    apply(after, op, src)
    if "pool" in op:
        seen = volume_seen[op["pool"]].get(op["name"])
        want_before = before.volumes[op["pool"]].get(op["name"])
        want_after = after.volumes[op["pool"]].get(op["name"])
    else:
        seen = pools_seen.get(op["name"])  # type: ignore[assignment]
        want_before = before.pools.get(op["name"])  # type: ignore[assignment]
        want_after = after.pools.get(op["name"])  # type: ignore[assignment]
    if seen == want_after:
        apply(model, op, src)
        return "done"
    if seen == want_before:
        return "not done"
    raise AssertionError(f"{op} was cut short by the kill and left {seen}, neither "
                         f"{want_before} (not done) nor {want_after} (done)")


if __name__ == "__main__":
    sys.exit(writer_main(sys.argv[1]))
