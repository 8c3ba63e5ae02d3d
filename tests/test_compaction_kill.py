"""SIGKILL during compaction and during retention, then a rerun.

Each iteration runs ``compact`` (or ``plan_retention`` + ``apply_retention``) in a
subprocess and SIGKILLs it -- after a random delay within the time an uninterrupted run
takes, or exactly at a chosen instant (the child kills itself there: between a store put's
temp file and its final name, just before a manifest, between an archive copy's manifest and
the removal of the hot copy, half-way through the segment deletions). Afterwards:

* every listed snapshot is complete (its files have the manifest's sizes and verify);
* a restore at points of the window equals the independent oracle;
* the next compaction (retention: the next run, then a compaction) succeeds, sweeps the
  interrupted run's leftovers -- no object and no directory without a manifest remains under
  ``snapshots/`` or ``archive/`` -- and retention ends in the state an uninterrupted run
  reaches.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from replicator import naming
from replicator.errors import PointNotRestorableError
from replicator.restore.point import AtTime, Latest
from replicator.restore.runner import make_plan
from replicator.retention import DAY_MS, Policy
from replicator.snapshot.file import SnapshotFileReader
from replicator.snapshot.manifest import Manifest
from replicator.snapshot.tiers import Tiers
from tests.helpers import REPO_ROOT
from tests.restore_history import ENTITIES, History, Oracle, build_history, canonical_rows, layouts
from tests.test_compaction import REG, _cat, restore_rows, run_compact

KILLS = 6
BUDGET = 200  # entries per sorted run: a compaction spills and merges many runs
LAY = layouts()

CHILD = r"""
import asyncio, json, os, signal, sys
from pathlib import Path

from replicator import retention
from replicator.catalog import Catalog
from replicator.compaction.runner import compact
from replicator.restore.runner import load_catalog
from replicator.schemas import SchemaRegistry
from replicator.snapshot.tiers import Tiers
from replicator.storage.local import LocalStore

a = json.loads(sys.argv[1])
kill_at = a.get("kill_at")


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def patch(owner, attr, when):
    orig = getattr(owner, attr)
    calls = [0]

    def wrapper(*args, **kw):
        calls[0] += 1
        if when(calls[0], args, kw):
            die()
        return orig(*args, **kw)

    setattr(owner, attr, wrapper)


if kill_at == "mid-put":  # a data file's temp name is written and fsync'd, not yet linked
    patch(LocalStore, "_publish", lambda n, args, kw: str(args[2]).endswith(".snap"))
elif kill_at == "before-manifest":  # every data file is stored, the manifest is not
    patch(LocalStore, "put_bytes_sync",
          lambda n, args, kw: args[1].endswith("/manifest.json"))
elif kill_at == "archive-moved":  # the archive copy's manifest exists, the hot one too
    patch(retention, "_delete_snapshot", lambda n, args, kw: n == 1)
elif kill_at == "segments-half":  # retention.json written, half the segments deleted
    deleted = []
    patch(LocalStore, "delete_sync", lambda n, args, kw: args[1].startswith("segments/") and (
        deleted.append(args[1]) or len(deleted) > a["segments_half"]))


async def main():
    cat = Catalog(store=LocalStore(root=Path(a["store"])), data_dir=None)
    tiers = Tiers.for_store(cat.store)
    if a["op"] == "compact":
        reg = SchemaRegistry.load()
        print("go", flush=True)
        await compact(cat, tiers, reg, a["topics"], a["kind"], work_dir=Path(a["work"]),
                      at_ms=a["at_ms"], budget=a["budget"])
    else:
        segs, _ = await load_catalog(cat)
        plan = retention.plan_retention(
            segs, await tiers.list(), topics=a["topics"],
            policy=retention.Policy(*a["policy"]), now_ms=a["now_ms"],
            trimmed=await retention.load_trimmed(cat.store))
        print("go", flush=True)
        await retention.apply_retention(tiers, plan)
    print("done", flush=True)


asyncio.run(main())
"""


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> History:
    return build_history(tmp_path_factory.mktemp("ckill"), events=6_000, seed=13,
                         per_segment=60)


def copy_history(h: History, root: Path) -> History:
    shutil.copytree(h.store_root, root / "store")
    return dataclasses.replace(h, store_root=root / "store")


def quantile(h: History, q: float) -> int:
    ts = sorted(e.ts_ms for e in h.events)
    return ts[min(len(ts) - 1, int(len(ts) * q))]


def start_child(args: dict[str, Any]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, cwd=REPO_ROOT)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the work starts right after "go"
    if line != b"go\n":
        _, err = proc.communicate(timeout=60)
        raise AssertionError(f"child did not start: {line!r} {err.decode(errors='replace')}")
    return proc


def timed_child(args: dict[str, Any]) -> float:
    """An uninterrupted run; seconds from "go" to its end."""
    proc = start_child(args)
    t0 = time.monotonic()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and out == b"done\n", err.decode(errors="replace")
    return time.monotonic() - t0


def kill_child(args: dict[str, Any], delay: float | None) -> bool:
    """Run the child and SIGKILL it after ``delay`` seconds (``None``: it kills itself at
    its ``kill_at`` point). True when it died by SIGKILL before finishing."""
    proc = start_child(args)
    if delay is not None:
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    if proc.returncode == 0:
        assert out == b"done\n"
        return False
    assert proc.returncode == -signal.SIGKILL, err.decode(errors="replace")
    return True


def listed(h: History) -> list[Manifest]:
    return asyncio.run(Tiers.for_store(_cat(h).store).list())


def orphan_objects(h: History) -> list[str]:
    return [name for _, name in asyncio.run(Tiers.for_store(_cat(h).store).orphans())]


def assert_no_leftovers(leftovers: dict[str, str]) -> None:
    """Nothing of an interrupted run may survive the next successful compaction: first
    no file (temp files included), then not even an empty snapshot directory."""
    lines = [f"{d}   [first seen after: {w}]" for d, w in leftovers.items()]
    held = [x for x in lines if "(empty directory)" not in x]
    assert not held, "files without a manifest survive a successful compaction:\n" + \
        "\n".join(held)
    assert not lines, ("snapshot directories without a manifest survive a successful "
                       "compaction:\n" + "\n".join(lines))


def leftover_dirs(h: History) -> list[str]:
    """Snapshot directories (either tier) without a manifest, with what they hold (temp
    files included: the store's listing hides them)."""
    out = []
    for root in (naming.SNAPSHOTS_ROOT, naming.ARCHIVE_ROOT):
        base = h.store_root / root
        if not base.is_dir():
            continue
        for d in sorted(base.iterdir()):
            if d.is_dir() and not (d / naming.MANIFEST_NAME).exists():
                held = sorted(p.name for p in d.iterdir())
                out.append(f"{root}/{d.name}: {held or '(empty directory)'}")
    return out


def check_snapshots(h: History) -> list[Manifest]:
    """Every listed snapshot is complete: each file has the manifest's size and verifies."""
    snaps = listed(h)
    for m in snaps:
        d = h.store_root / m.root / m.id
        for f in m.files:
            path = d / f.name
            assert path.stat().st_size == f.bytes, (m.id, f.name)
            with SnapshotFileReader(path) as r:
                n, _ = r.verify()
            assert n == f.entries, (m.id, f.name)
    return snaps


def check_restores(h: History, oracle: Oracle, points: list[int], out: Path) -> None:
    for i, t in enumerate(points):
        plan, got = restore_rows(h, AtTime(t), out / f"r{time.monotonic_ns()}-{i}.db")
        assert plan.at_ms == t
        assert got == {e: canonical_rows(LAY[e], oracle.state(e, t)) for e in ENTITIES}, (
            t, [m.id for m in plan.snapshots])


def window(h: History) -> tuple[int, int]:
    w = asyncio.run(make_plan(_cat(h), REG, ENTITIES, Latest())).window
    assert w.oldest_ms is not None and w.newest_ms is not None
    return w.oldest_ms, w.newest_ms


# -- compaction -------------------------------------------------------------------------------


def compaction_args(h: History, work: Path, kind: str, at_ms: int, **kw: Any) -> dict[str, Any]:
    return {"op": "compact", "store": str(h.store_root), "work": str(work),
            "topics": list(ENTITIES), "kind": kind, "at_ms": at_ms, "budget": BUDGET, **kw}


def recover_compaction(h: History, work: Path, kind: str, at: int, oracle: Oracle,
                       rng: random.Random, out: Path) -> list[str]:
    """After a kill: the snapshots listed are complete and restore exactly; the next run
    succeeds and sweeps every leftover. Returns the leftover directories it did not remove."""
    check_snapshots(h)
    oldest, newest = window(h)
    check_restores(h, oracle, [rng.randrange(oldest, newest + 1)], out)  # before the rerun
    orphans = orphan_objects(h)
    if any(m.kind == kind and m.time_ms == at for m in listed(h)):
        at += 1  # the kill came after the manifest: the snapshot is complete
    rep = run_compact(h, kind, work, at_ms=at, budget=BUDGET)
    assert rep.swept >= len(orphans), (rep.swept, orphans)  # plus temp files of a cut put
    assert (rep.manifest.kind, rep.manifest.time_ms) == (kind, at)
    assert orphan_objects(h) == []
    assert sorted(p.name for p in work.iterdir()) == [".lock"]  # local leftovers swept too
    snaps = check_snapshots(h)
    assert rep.manifest.id in {m.id for m in snaps}
    check_restores(h, oracle, [rng.choice([at, rng.randrange(at, newest + 1)])], out)
    return leftover_dirs(h)


def test_sigkill_during_compaction_random_moments(big: History, tmp_path: Path) -> None:
    h = copy_history(big, tmp_path / "h")
    work = tmp_path / "work"
    oracle = Oracle(h)
    rng = random.Random(4711)
    kinds = ["full", "incremental", "differential", "archive", "incremental", "full"][:KILLS]
    times = [quantile(h, 0.3 + 0.1 * i) for i in range(len(kinds))]
    # how long each run takes (on a scratch copy, uninterrupted): kills land within that
    scratch = copy_history(big, tmp_path / "scratch")
    run_compact(scratch, "full", tmp_path / "sw", at_ms=quantile(h, 0.2))
    seconds = [run_compact(scratch, kind, tmp_path / "sw", at_ms=at, budget=BUDGET).seconds
               for kind, at in zip(kinds, times, strict=True)]
    shutil.rmtree(scratch.store_root)
    run_compact(h, "full", work, at_ms=quantile(h, 0.2))  # a parent for the others
    leftovers: dict[str, str] = {}  # directory -> the kill after which it was first seen
    mid_way = 0
    for i, (kind, at) in enumerate(zip(kinds, times, strict=True)):
        delay = rng.uniform(0.003, seconds[i])
        killed = kill_child(compaction_args(h, work, kind, at), delay)
        mid_way += killed and not any(m.time_ms == at for m in listed(h))
        for d in recover_compaction(h, work, kind, at, oracle, rng, tmp_path):
            leftovers.setdefault(d, f"kill {i} ({kind} after {delay:.3f}s of "
                                    f"~{seconds[i]:.3f}s)")
    assert mid_way >= KILLS // 2, f"only {mid_way} of {KILLS} kills landed mid-way"
    assert_no_leftovers(leftovers)


@pytest.mark.parametrize("kill_at", ["mid-put", "before-manifest"])
def test_sigkill_during_compaction_at_publish(big: History, tmp_path: Path, kill_at: str) -> None:
    h = copy_history(big, tmp_path)
    work = tmp_path / "work"
    oracle = Oracle(h)
    rng = random.Random(kill_at)
    run_compact(h, "full", work, at_ms=quantile(h, 0.2))
    before = {m.id for m in listed(h)}
    assert kill_child(compaction_args(h, work, "incremental", quantile(h, 0.5),
                                      kill_at=kill_at), None)
    assert {m.id for m in listed(h)} == before  # no manifest: the snapshot does not exist
    left = (h.store_root / naming.SNAPSHOTS_ROOT).iterdir()
    assert [d.name for d in left if d.name not in before], "the killed run left nothing"
    assert_no_leftovers({d: kill_at for d in recover_compaction(
        h, work, "incremental", quantile(h, 0.5), oracle, rng, tmp_path)})


# -- retention --------------------------------------------------------------------------------


@dataclasses.dataclass
class Retained:
    template: History  # snapshots of every kind, one archive already in the archive tier
    args: dict[str, Any]  # the retention run that is killed
    anchor: Manifest
    expected: list[tuple[str, str]]  # (root, id) listed after it
    segments: set[str]  # stored segments after it
    seconds: float  # an uninterrupted run's duration


def segment_names(h: History) -> set[str]:
    return {str(p.relative_to(h.store_root)) for p in (h.store_root / "segments").rglob("*.seg")}


def retention_args(h: History, horizon: int, move_before: int, delete_before: int,
                   **kw: Any) -> dict[str, Any]:
    seg_days = 1.0
    now = horizon + int(seg_days * DAY_MS)
    policy = [seg_days, (now - move_before) / DAY_MS, (now - delete_before) / DAY_MS]
    return {"op": "retain", "store": str(h.store_root), "topics": list(ENTITIES),
            "policy": policy, "now_ms": now, **kw}


def run_retention(h: History, args: dict[str, Any]) -> None:
    from replicator.restore.runner import load_catalog
    from replicator.retention import apply_retention, load_trimmed, plan_retention

    cat = _cat(h)
    tiers = Tiers.for_store(cat.store)

    async def go() -> None:
        segs, _ = await load_catalog(cat)
        plan = plan_retention(segs, await tiers.list(), topics=args["topics"],
                              policy=Policy(*args["policy"]), now_ms=args["now_ms"],
                              trimmed=await load_trimmed(cat.store))
        await apply_retention(tiers, plan)

    asyncio.run(go())


@pytest.fixture(scope="module")
def retained(big: History, tmp_path_factory: pytest.TempPathFactory) -> Retained:
    root = tmp_path_factory.mktemp("retained")
    h = copy_history(big, root / "t")
    work = root / "work"
    made: dict[str, Manifest] = {}
    for name, kind, q in [("a1", "archive", 0.05), ("f1", "full", 0.12),
                          ("i1", "incremental", 0.18), ("a2", "archive", 0.25),
                          ("f2", "full", 0.32), ("d2", "differential", 0.4),
                          ("i2", "incremental", 0.45), ("f3", "full", 0.55),
                          ("a3", "archive", 0.6), ("i3", "incremental", 0.68)]:
        made[name] = run_compact(h, kind, work, at_ms=quantile(h, q)).manifest
    # a first retention: anchor f1, a1 moves to the archive tier
    run_retention(h, retention_args(h, made["f1"].time_ms, made["a1"].time_ms + 1,
                                    h.oldest_ms - 1))
    assert (listed(h)[0].root, listed(h)[0].id) == ("archive", made["a1"].id)
    # the one killed: anchor f3; a2 moves, a1 is deleted, f1 i1 f2 d2 i2 are removed,
    # so are the segments before f3's cut
    args = retention_args(h, made["f3"].time_ms, made["a2"].time_ms + 1,
                          made["a1"].time_ms + 1)
    ref = copy_history(h, root / "ref")
    seconds = timed_child({**args, "store": str(ref.store_root)})
    expected = [(m.root, m.id) for m in listed(ref)]
    assert sorted(expected) == sorted([("archive", made["a2"].id)] + [
        ("snapshots", made[n].id) for n in ("f3", "a3", "i3")])
    segs = segment_names(ref)
    f3 = made["f3"]
    assert segs == {n for n in segment_names(h) if (s := naming.parse_segment_name(n)).end
                    > f3.cut[(s.topic, s.partition)]}  # those wholly before f3's cut are gone
    assert len(segment_names(h)) - len(segs) >= 30
    return Retained(h, args, made["f3"], expected, segs, seconds)


def recover_retention(r: Retained, h: History, oracle: Oracle, rng: random.Random,
                      out: Path) -> list[str]:
    """After a kill: snapshots complete, the window from the anchor restores exactly; the
    rerun reaches the uninterrupted run's state; the next compaction sweeps the rest."""
    snaps = check_snapshots(h)
    # nothing the window needs is gone, whatever the moment of the kill
    assert {m.id for m in snaps} >= {sid for _, sid in r.expected}
    anchor, newest = r.anchor.time_ms, window(h)[1]
    check_restores(h, oracle, [rng.randrange(anchor, newest + 1)], out)  # before the rerun
    run_retention(h, {**r.args, "store": str(h.store_root)})
    assert [(m.root, m.id) for m in listed(h)] == r.expected
    assert segment_names(h) == r.segments
    assert window(h)[0] == anchor
    with pytest.raises(PointNotRestorableError, match="restorable window"):
        asyncio.run(make_plan(_cat(h), REG, ENTITIES, AtTime(anchor - 1)))
    rep = run_compact(h, "incremental", out / "work", at_ms=quantile(h, 0.8), budget=BUDGET)
    assert rep.manifest.parent == r.expected[-1][1]
    assert orphan_objects(h) == []
    check_snapshots(h)
    check_restores(h, oracle, [rng.choice([anchor, rng.randrange(anchor, newest + 1)])], out)
    return leftover_dirs(h)


def test_sigkill_during_retention_random_moments(retained: Retained, tmp_path: Path) -> None:
    oracle = Oracle(retained.template)
    rng = random.Random(815)
    leftovers: dict[str, str] = {}
    mid_way = 0
    for i in range(KILLS):
        it = tmp_path / f"i{i}"
        h = copy_history(retained.template, it)
        before = segment_names(h)
        delay = rng.uniform(0.002, retained.seconds)
        killed = kill_child({**retained.args, "store": str(h.store_root)}, delay)
        mid_way += killed and segment_names(h) != retained.segments
        gone = len(before - segment_names(h))
        for d in recover_retention(retained, h, oracle, rng, it):
            leftovers.setdefault(d.replace(str(h.store_root), ""), (
                f"kill {i} (after {delay:.3f}s of ~{retained.seconds:.3f}s, {gone} segments "
                "gone)"))
        shutil.rmtree(it)
    assert mid_way >= KILLS // 2, f"only {mid_way} of {KILLS} kills landed mid-way"
    assert_no_leftovers(leftovers)


@pytest.mark.parametrize("kill_at", ["archive-moved", "segments-half"])
def test_sigkill_during_retention_at_a_step(retained: Retained, tmp_path: Path,
                                            kill_at: str) -> None:
    h = copy_history(retained.template, tmp_path)
    oracle = Oracle(h)
    half = len(segment_names(h) - retained.segments) // 2
    assert kill_child({**retained.args, "store": str(h.store_root), "kill_at": kill_at,
                       "segments_half": half}, None)
    if kill_at == "segments-half":
        assert len(segment_names(h)) == len(segment_names(retained.template)) - half
    assert_no_leftovers({d: kill_at for d in recover_retention(
        retained, h, oracle, random.Random(kill_at), tmp_path)})
