"""``plan_mirror`` scenario by scenario, the ``mirror`` executor against a local directory
and a real S3 server, and ``replicator mirror`` on the command line.

The executor does not parse what it copies, so the objects here are plain bytes under the
names the replicator uses; what matters is the name (ordering, mutability) and the size.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from replicator import naming
from replicator.storage import LocalStore, ObjectInfo, Store, open_store
from replicator.storage.mirror import (
    Copy,
    MirrorResult,
    is_manifest,
    is_mutable,
    mirror,
    plan_mirror,
)
from replicator.storage.s3 import S3Store
from tests.helpers import REPO_ROOT
from tests.s3_service import S3Server

SID = naming.snapshot_id(1_700_000_000_000, "full", "abc123")
ASID = naming.snapshot_id(1_600_000_000_000, "archive", "def456")
SEG_A0 = naming.segment_name("att", 0, 0, 10)
SEG_A1 = naming.segment_name("att", 0, 10, 100)
SEG_A2 = naming.segment_name("att", 0, 100, 1000)
SEG_B0 = naming.segment_name("att", 1, 0, 7)
SNAP = naming.snapshot_file_name(SID, "att")
MANIFEST = naming.snapshot_manifest_name(SID)
ARCH_SNAP = naming.snapshot_file_name(ASID, "att", naming.ARCHIVE_ROOT)
ARCH_MANIFEST = naming.snapshot_manifest_name(ASID, naming.ARCHIVE_ROOT)
WM_A = naming.watermark_name("att", 0)
WM_B = naming.watermark_name("att", 1)
RETENTION = naming.RETENTION_STATE


# -- the planner (pure) ------------------------------------------------------------------------


def test_names_are_classified() -> None:
    assert [is_mutable(n) for n in (WM_A, RETENTION, SEG_A0, SNAP, MANIFEST)] == [
        True, True, False, False, False]
    assert [is_manifest(n) for n in (MANIFEST, ARCH_MANIFEST, SNAP, SEG_A0, WM_A)] == [
        True, True, False, False, False]
    # only the store's top-level retention.json is rewritten in place
    assert is_mutable("archive/retention.json") is False


def test_plan_orders_data_then_manifests_then_mutable_objects() -> None:
    # a listing in no particular order, with a leftover of an interrupted put
    source = [
        ObjectInfo(WM_A, 90),
        ObjectInfo(RETENTION, 40),
        ObjectInfo(MANIFEST, 300),
        ObjectInfo(SNAP, 5000),
        ObjectInfo(SEG_A2, 3000),
        ObjectInfo(SEG_A1, 2000),
        ObjectInfo(SEG_B0, 700),
        ObjectInfo(ARCH_MANIFEST, 200),
        ObjectInfo(ARCH_SNAP, 4000),
        ObjectInfo(SEG_A0, 1000),
        ObjectInfo("segments/att/000000/.tmp-ab12cd34-00000000000000001000-x.seg", 5),
        ObjectInfo(WM_B, 91),
    ]
    plan = plan_mirror(source, [])
    assert plan.copies == (
        Copy(ARCH_SNAP, 4000, False),
        Copy(SEG_A0, 1000, False),   # offsets in numeric order: 0, 10, 100
        Copy(SEG_A1, 2000, False),
        Copy(SEG_A2, 3000, False),
        Copy(SEG_B0, 700, False),
        Copy(SNAP, 5000, False),
        Copy(ARCH_MANIFEST, 200, False),  # manifests only after every data file
        Copy(MANIFEST, 300, False),
        Copy(RETENTION, 40, True),        # what claims coverage comes last
        Copy(WM_A, 90, True),
        Copy(WM_B, 91, True),
    )
    assert plan.conflicts == ()
    assert plan.present == ()
    assert [c.name for c in plan.missing] == [
        ARCH_SNAP, SEG_A0, SEG_A1, SEG_A2, SEG_B0, SNAP, ARCH_MANIFEST, MANIFEST]
    assert plan.missing_bytes == 4000 + 1000 + 2000 + 3000 + 700 + 5000 + 200 + 300


def test_plan_against_a_partial_destination() -> None:
    source = [
        ObjectInfo(SEG_A0, 1000),
        ObjectInfo(SEG_A1, 2000),
        ObjectInfo(SEG_B0, 700),
        ObjectInfo(SNAP, 5000),
        ObjectInfo(MANIFEST, 300),
        ObjectInfo(WM_A, 90),
        ObjectInfo(WM_B, 91),
    ]
    dest = [
        ObjectInfo(SEG_A0, 1000),      # present, same size
        ObjectInfo(SEG_A1, 1999),      # same name, other size: a conflict
        ObjectInfo(SNAP, 5000),        # present
        ObjectInfo(WM_A, 90),          # mutable: the executor compares bytes, so copied
        ObjectInfo(WM_B, 12),
        ObjectInfo(naming.segment_name("att", 2, 0, 5), 55),  # only on the destination
    ]
    plan = plan_mirror(source, dest)
    assert plan.copies == (
        Copy(SEG_B0, 700, False),
        Copy(MANIFEST, 300, False),
        Copy(WM_A, 90, True),
        Copy(WM_B, 91, True),
    )
    assert plan.conflicts == ((SEG_A1, 2000, 1999),)
    assert plan.present == (ObjectInfo(SEG_A0, 1000), ObjectInfo(SNAP, 5000))
    assert plan.missing == (Copy(SEG_B0, 700, False), Copy(MANIFEST, 300, False))
    assert plan.missing_bytes == 1000


def test_plan_between_equal_listings_only_rechecks_mutable_objects() -> None:
    listing = [ObjectInfo(SEG_A0, 1000), ObjectInfo(MANIFEST, 300), ObjectInfo(SNAP, 5000),
               ObjectInfo(RETENTION, 40), ObjectInfo(WM_A, 90)]
    plan = plan_mirror(listing, listing)
    assert plan.copies == (Copy(RETENTION, 40, True), Copy(WM_A, 90, True))
    assert plan.conflicts == ()
    assert plan.present == (ObjectInfo(SEG_A0, 1000), ObjectInfo(MANIFEST, 300),
                            ObjectInfo(SNAP, 5000))
    assert plan.missing == () and plan.missing_bytes == 0


def test_plan_of_an_empty_source_copies_nothing() -> None:
    plan = plan_mirror([], [ObjectInfo(SEG_A0, 1000), ObjectInfo(WM_A, 90)])
    assert (plan.copies, plan.conflicts, plan.present) == ((), (), ())


# -- the executor ------------------------------------------------------------------------------

#: the source store's objects: three segments, a snapshot (file + manifest), two mutable ones
IMMUTABLE = {
    SEG_A0: os.urandom(1000),
    SEG_A1: os.urandom(2345),
    SEG_B0: os.urandom(700),
    SNAP: os.urandom(5000),
    MANIFEST: orjson.dumps({"id": SID, "files": ["att.snap"]}),
}
MUTABLE = {
    WM_A: orjson.dumps({"topic": "att", "partition": 0, "stored_end": 100,
                        "watermark_ms": 1_700_000_000_000}),
    RETENTION: orjson.dumps({"trimmed": {}, "updated_ms": 1_700_000_000_000}),
}
ORDER = [SEG_A0, SEG_A1, SEG_B0, SNAP, MANIFEST, RETENTION, WM_A]


def fill_source(root: Path) -> LocalStore:
    store = LocalStore(root=root)
    for name, data in {**IMMUTABLE, **MUTABLE}.items():
        store.put_bytes_sync(name, data, create_only=not is_mutable(name))
    return store


async def contents(store: Store) -> dict[str, bytes]:
    return {o.name: await store.get_bytes(o.name) for o in await store.list()}


@pytest.fixture(params=["local", "s3"])
async def dest(request: pytest.FixtureRequest, tmp_path: Path,
               s3_bucket: str) -> AsyncIterator[Store]:
    """The destination: another local directory, or a fresh bucket on the real S3 server."""
    store = LocalStore(root=tmp_path / "dest") if request.param == "local" else open_store(
        s3_bucket)
    try:
        yield store
    finally:
        await store.close()


async def test_mirror_copies_everything_in_plan_order_then_nothing(tmp_path: Path,
                                                                   dest: Store) -> None:
    source = fill_source(tmp_path / "source")
    seen: list[tuple[str, int]] = []
    result = await mirror(source, dest, progress=lambda name, n: seen.append((name, n)))
    sizes = {n: len(d) for n, d in {**IMMUTABLE, **MUTABLE}.items()}
    assert seen == [(name, sizes[name]) for name in ORDER]
    assert result.to_json() == {
        "copied": 5, "copied_bytes": sum(sizes.values()), "updated": 2, "verified": 0,
        "conflicts": [], "mismatched": [], "ok": True}
    assert await contents(dest) == {**IMMUTABLE, **MUTABLE}
    assert await dest.list() == await source.list()

    seen.clear()
    again = await mirror(source, dest, progress=lambda name, n: seen.append((name, n)))
    assert (again.copied, again.copied_bytes, again.updated, again.ok) == (0, 0, 0, True)
    assert seen == [(RETENTION, 0), (WM_A, 0)]  # mutable objects compared, found equal
    assert await contents(dest) == {**IMMUTABLE, **MUTABLE}


async def test_conflicting_object_is_reported_and_never_overwritten(tmp_path: Path,
                                                                    dest: Store) -> None:
    source = fill_source(tmp_path / "source")
    theirs = b"something else entirely"
    await dest.put_bytes(SEG_A1, theirs)
    result = await mirror(source, dest, verify=True)
    assert result.conflicts == [(SEG_A1, len(IMMUTABLE[SEG_A1]), len(theirs))]
    assert result.ok is False
    assert (result.copied, result.updated) == (4, 2)
    assert result.verified == 4 and result.mismatched == []  # the conflict is not re-reported
    assert result.to_json()["conflicts"] == [
        {"name": SEG_A1, "source_size": len(IMMUTABLE[SEG_A1]), "dest_size": len(theirs)}]
    assert await dest.get_bytes(SEG_A1) == theirs
    assert await contents(dest) == {**IMMUTABLE, **MUTABLE, SEG_A1: theirs}
    # reported again on every run, still untouched
    again = await mirror(source, dest)
    assert again.conflicts == result.conflicts and again.copied == 0
    assert await dest.get_bytes(SEG_A1) == theirs


async def test_mutable_objects_follow_the_source_bytes(tmp_path: Path, dest: Store) -> None:
    source = fill_source(tmp_path / "source")
    assert (await mirror(source, dest)).updated == 2
    # same size, other bytes: compared by content, not by size
    newer = MUTABLE[WM_A].replace(b"1700000000000", b"1700000009999")
    assert len(newer) == len(MUTABLE[WM_A]) and newer != MUTABLE[WM_A]
    await source.put_bytes(WM_A, newer, create_only=False)
    result = await mirror(source, dest)
    assert (result.copied, result.updated, result.copied_bytes) == (0, 1, len(newer))
    assert await dest.get_bytes(WM_A) == newer
    assert await dest.get_bytes(RETENTION) == MUTABLE[RETENTION]
    # a destination that was changed behind our back is brought back to the source's bytes
    await dest.put_bytes(RETENTION, b"{}", create_only=False)
    result = await mirror(source, dest)
    assert (result.copied, result.updated) == (0, 1)
    assert await dest.get_bytes(RETENTION) == MUTABLE[RETENTION]
    assert (await mirror(source, dest)).updated == 0


async def test_verify_counts_and_detects_a_tampered_object(tmp_path: Path,
                                                           dest: Store) -> None:
    source = fill_source(tmp_path / "source")
    result = await mirror(source, dest, verify=True)
    assert (result.copied, result.verified, result.mismatched, result.ok) == (5, 5, [], True)
    # same size, one flipped byte: listings agree, only the hash tells them apart.
    # (replaced through the store, so a hard-linked local copy does not change the source)
    bad = bytearray(IMMUTABLE[SEG_B0])
    bad[350] ^= 0xFF
    await dest.put_bytes(SEG_B0, bytes(bad), create_only=False)
    checked: list[tuple[str, int]] = []
    result = await mirror(source, dest, verify=True,
                          progress=lambda name, n: checked.append((name, n)))
    assert result.to_json() == {
        "copied": 0, "copied_bytes": 0, "updated": 0, "verified": 4, "conflicts": [],
        "mismatched": [SEG_B0], "ok": False}
    # the two mutable re-checks, then every immutable object hashed on both sides
    assert checked == [(RETENTION, 0), (WM_A, 0)] + [
        (n, 0) for n in sorted(IMMUTABLE)]
    assert await dest.get_bytes(SEG_B0) == bytes(bad)  # reported, never overwritten
    assert await source.get_bytes(SEG_B0) == IMMUTABLE[SEG_B0]


async def test_mirror_of_a_prefix_copies_only_that_prefix(tmp_path: Path,
                                                          dest: Store) -> None:
    source = fill_source(tmp_path / "source")
    result = await mirror(source, dest, prefix="segments/att/000000/", verify=True)
    assert (result.copied, result.updated, result.verified) == (2, 0, 2)
    assert [o.name for o in await dest.list()] == [SEG_A0, SEG_A1]


async def test_mirror_from_s3_back_to_a_directory(tmp_path: Path, s3_bucket: str) -> None:
    """S3 as the source: objects are fetched to scratch files and copied byte for byte."""
    local = fill_source(tmp_path / "source")
    s3 = open_store(s3_bucket)
    try:
        assert (await mirror(local, s3)).copied == 5
        back = LocalStore(root=tmp_path / "back")
        result = await mirror(s3, back, verify=True)
        assert (result.copied, result.updated, result.verified, result.ok) == (5, 2, 5, True)
        assert await contents(back) == {**IMMUTABLE, **MUTABLE}
    finally:
        await s3.close()


# -- the command line ---------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ)  # the S3 fixtures put the local server's credentials here
    env.pop("REPLICATOR_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "replicator", *args], capture_output=True,
                          cwd=REPO_ROOT, env=env, timeout=120, check=False)


def run_cli(*args: str) -> tuple[int, dict[str, Any], str]:
    """``replicator ARGS`` (with ``--json``): exit code, the JSON document, stderr."""
    proc = _cli(*args)
    doc = orjson.loads(proc.stdout) if proc.stdout.strip() else {}
    return proc.returncode, doc, proc.stderr.decode()


def run_cli_text(*args: str) -> tuple[int, str]:
    """``replicator ARGS`` in human-readable form: exit code, stdout + stderr."""
    proc = _cli(*args)
    return proc.returncode, proc.stdout.decode() + proc.stderr.decode()


def test_cli_mirror_to_s3_json_counts(tmp_path: Path, s3_bucket: str) -> None:
    fill_source(tmp_path / "source")
    src = str(tmp_path / "source")
    code, doc, err = run_cli("mirror", "--from", src, "--to", s3_bucket, "--verify", "--json")
    assert code == 0, err
    sizes = sum(len(d) for d in {**IMMUTABLE, **MUTABLE}.values())
    assert {k: doc[k] for k in ("copied", "copied_bytes", "updated", "verified", "conflicts",
                                "mismatched", "ok")} == {
        "copied": 5, "copied_bytes": sizes, "updated": 2, "verified": 5, "conflicts": [],
        "mismatched": [], "ok": True}
    assert doc["from"] == f"file://{(tmp_path / 'source').resolve()}"
    assert doc["to"] == S3Store.from_url(s3_bucket).url

    code, doc, err = run_cli("mirror", "--from", src, "--to", s3_bucket, "--json")
    assert code == 0, err
    assert (doc["copied"], doc["copied_bytes"], doc["updated"], doc["verified"], doc["ok"]) == (
        0, 0, 0, 0, True)

    async def listing() -> list[ObjectInfo]:
        s3 = open_store(s3_bucket)
        try:
            return await s3.list()
        finally:
            await s3.close()

    assert asyncio.run(listing()) == LocalStore(root=tmp_path / "source").list_sync()


def test_cli_mirror_conflict_exits_4(tmp_path: Path) -> None:
    fill_source(tmp_path / "source")
    dst = LocalStore(root=tmp_path / "dest")
    dst.put_bytes_sync(SEG_A0, b"short")
    code, doc, err = run_cli("mirror", "--from", f"file://{tmp_path / 'source'}",
                             "--to", str(tmp_path / "dest"), "--json")
    assert code == 4, err
    assert doc["ok"] is False and doc["copied"] == 4 and doc["updated"] == 2
    assert doc["conflicts"] == [
        {"name": SEG_A0, "source_size": len(IMMUTABLE[SEG_A0]), "dest_size": 5}]
    assert dst.get_bytes_sync(SEG_A0) == b"short"
    # the human-readable form names the conflict on stderr and fails the same way
    code, err = run_cli_text("mirror", "--from", str(tmp_path / "source"),
                             "--to", str(tmp_path / "dest"))
    assert code == 4
    assert (f"CONFLICT {SEG_A0}: source {len(IMMUTABLE[SEG_A0])} bytes, destination 5 bytes"
            in err)


def test_cli_mirror_tampered_object_exits_4(tmp_path: Path) -> None:
    fill_source(tmp_path / "source")
    src, dst = str(tmp_path / "source"), str(tmp_path / "dest")
    assert run_cli("mirror", "--from", src, "--to", dst, "--json")[0] == 0
    bad = bytearray(IMMUTABLE[SNAP])
    bad[0] ^= 1
    LocalStore(root=tmp_path / "dest").put_bytes_sync(SNAP, bytes(bad), create_only=False)
    code, doc, err = run_cli("mirror", "--from", src, "--to", dst, "--verify", "--json")
    assert code == 4, err
    assert (doc["copied"], doc["verified"], doc["mismatched"], doc["ok"]) == (
        0, 4, [SNAP], False)


def test_cli_mirror_create_bucket(tmp_path: Path, s3_server: S3Server) -> None:
    fill_source(tmp_path / "source")
    url = s3_server.url("new-" + uuid.uuid4().hex[:16])
    code, _doc, err = run_cli("mirror", "--from", str(tmp_path / "source"), "--to", url,
                              "--json")
    assert code == 5, err  # a store error: the bucket does not exist
    assert "does not exist" in err
    code, doc, err = run_cli("mirror", "--from", str(tmp_path / "source"), "--to", url,
                             "--create-bucket", "--json")
    assert code == 0, err
    assert (doc["copied"], doc["updated"], doc["ok"]) == (5, 2, True)


def test_mirror_result_json_shape() -> None:
    r = MirrorResult(copied=1, copied_bytes=10, conflicts=[("a", 1, 2)], mismatched=["b"])
    assert r.ok is False
    assert r.to_json() == {"copied": 1, "copied_bytes": 10, "updated": 0, "verified": 0,
                           "conflicts": [{"name": "a", "source_size": 1, "dest_size": 2}],
                           "mismatched": ["b"], "ok": False}
