"""Restore against synthetic backups (real segment files in a local store) and an
independent oracle: SQLite, JSONL and PostgreSQL targets, random points, filters, edges,
corruption, refusals."""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import time
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from replicator.catalog import Catalog
from replicator.errors import (
    BackupIncompleteError,
    BadRequestError,
    CorruptSegmentError,
    PointNotRestorableError,
    TargetError,
)
from replicator.restore.point import AtOffsets, AtTime, Latest, Point
from replicator.restore.runner import RestoreReport, execute_restore, make_plan
from replicator.schemas import SchemaRegistry
from replicator.storage.local import LocalStore
from replicator.targets import scratch
from tests.restore_history import (
    ENTITIES,
    History,
    Oracle,
    build_history,
    canonical_rows,
    layouts,
    pg_rows,
    sqlite_rows,
)

TOPICS = ENTITIES


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> History:
    return build_history(tmp_path_factory.mktemp("hist"), events=3000, seed=11)


def _catalog(h: History) -> Catalog:
    return Catalog(store=LocalStore(root=h.store_root), data_dir=None)


def restore(h: History, point: Point, url: str, **kw: Any) -> RestoreReport:
    reg = SchemaRegistry.load()
    entities = kw.pop("entities", None)

    async def go() -> RestoreReport:
        cat = _catalog(h)
        plan = await make_plan(cat, reg, TOPICS, point, entities)
        return await execute_restore(cat, reg, plan, url, **kw)

    return asyncio.run(go())


def random_times(h: History, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    ts = sorted({e.ts_ms for e in h.events})
    picks = [rng.choice(ts) for _ in range(n // 2)]  # exactly on a record's timestamp
    picks += [rng.randint(h.oldest_ms, h.newest_ms) for _ in range(n - len(picks))]
    return picks


def test_sqlite_matches_oracle_at_random_times(history: History, tmp_path: Path) -> None:
    oracle = Oracle(history)
    lay = layouts()
    for i, t in enumerate(random_times(history, 50, seed=1)):
        db = tmp_path / f"r{i}.db"
        rep = restore(history, AtTime(t), f"sqlite://{db}")
        assert all(r.ok for r in rep.results)
        for entity in ENTITIES:
            want = canonical_rows(lay[entity], oracle.state(entity, t))
            got = sqlite_rows(db, lay[entity])
            assert got == want, f"{entity} at {t}"
            assert {r.entity: r.rows for r in rep.results}[entity] == len(want)


def test_postgres_matches_oracle_at_random_times(history: History, pg_dsn: str) -> None:
    oracle = Oracle(history)
    lay = layouts()

    for i, t in enumerate(random_times(history, 50, seed=2)):
        schema = f"oracle_{i}"
        rep = restore(history, AtTime(t), f"{pg_dsn}?schema={schema}")
        assert rep.schema == schema and all(r.ok for r in rep.results)
        for entity in ENTITIES:
            want = canonical_rows(lay[entity], oracle.state(entity, t))
            assert asyncio.run(pg_rows(pg_dsn, schema, lay[entity])) == want, f"{entity} at {t}"


def test_jsonl_latest_and_record(history: History, tmp_path: Path) -> None:
    out = tmp_path / "out"
    rep = restore(history, Latest(), f"jsonl://{out}")
    assert rep.plan.at_ms == history.newest_ms
    oracle = Oracle(history)
    for entity in ENTITIES:
        lines = (out / f"{entity}.jsonl").read_bytes().splitlines()
        keys = [orjson.loads(x)["key"] for x in lines]
        assert keys == sorted(keys)
        state = {orjson.loads(x)["key"]: orjson.loads(x)["data"] for x in lines}
        assert state == oracle.state(entity)
    rec = orjson.loads((out / "replicator_restores.json").read_bytes())
    assert rec["counts"] == {r.entity: r.rows for r in rep.results}


def test_offsets_restore_matches_oracle(history: History, tmp_path: Path) -> None:
    rng = random.Random(5)
    parts = history.by_partition()
    lay = layouts()
    for i in range(5):
        ends = {tp: rng.randint(0, evs[-1].offset + 1) for tp, evs in parts.items()
                if tp[0] == "attendance"}
        db = tmp_path / f"o{i}.db"
        restore(history, AtOffsets(ends), f"sqlite://{db}")
        want = canonical_rows(lay["attendance"], Oracle(history).state("attendance", ends=ends))
        assert sqlite_rows(db, lay["attendance"]) == want


def test_entity_and_key_filters(history: History, tmp_path: Path) -> None:
    db = tmp_path / "f.db"
    keys = [*sorted(Oracle(history).state("participant"))[:3], "no-such-key"]
    rep = restore(history, Latest(), f"sqlite://{db}", entities=["participant"], keys=keys)
    assert [r.entity for r in rep.results] == ["participant"]
    got = sqlite_rows(db, layouts()["participant"])
    assert sorted(got) == keys[:3]
    with sqlite3.connect(db) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"participant", "replicator_restores"}


def test_window_edges(history: History, tmp_path: Path) -> None:
    oldest, newest = history.oldest_ms, history.newest_ms
    restore(history, AtTime(oldest), f"sqlite://{tmp_path / 'a.db'}")
    restore(history, AtTime(newest), f"sqlite://{tmp_path / 'b.db'}")
    with pytest.raises(PointNotRestorableError, match="before the oldest") as e1:
        restore(history, AtTime(oldest - 1), f"sqlite://{tmp_path / 'c.db'}")
    assert e1.value.oldest_ms == oldest and e1.value.newest_ms == newest
    with pytest.raises(PointNotRestorableError, match="after the newest restorable") as e2:
        restore(history, AtTime(newest + 1), f"sqlite://{tmp_path / 'd.db'}")
    assert e2.value.newest_ms == newest
    assert not (tmp_path / "c.db").exists() and not (tmp_path / "d.db").exists()


def test_bad_requests(history: History, tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'x.db'}"
    with pytest.raises(BadRequestError, match="unknown entity"):
        restore(history, Latest(), url, entities=["nope"])
    with pytest.raises(BadRequestError, match="unknown topic"):
        restore(history, AtOffsets({("nope", 0): 1}), url)
    with pytest.raises(BadRequestError, match="must name every partition"):
        restore(history, AtOffsets({("config", 0): 1}), url)
    with pytest.raises(BadRequestError, match="beyond what is stored"):
        restore(history, AtOffsets({("config", p): 10**9 for p in range(3)}), url)
    assert not list(tmp_path.iterdir())


def test_target_holding_data_is_refused_then_replaced(history: History, tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    restore(history, Latest(), f"sqlite://{db}")
    before = db.read_bytes()
    with pytest.raises(TargetError, match="already holds data"):
        restore(history, Latest(), f"sqlite://{db}")
    assert db.read_bytes() == before
    restore(history, AtTime(history.oldest_ms + 5000), f"sqlite://{db}", replace=True)
    assert db.read_bytes() != before
    assert [p.name for p in tmp_path.iterdir()] == ["t.db"]  # no temp files left


def test_no_backup_at_all(tmp_path: Path) -> None:
    empty = History(store_root=tmp_path / "store")
    (tmp_path / "store").mkdir()
    with pytest.raises(PointNotRestorableError, match="no backups at all"):
        restore(empty, Latest(), f"sqlite://{tmp_path / 'x.db'}")


def test_corrupt_segment_stops_the_restore(tmp_path: Path) -> None:
    h = build_history(tmp_path / "h", events=600, seed=3)
    seg = sorted((h.store_root / "segments" / "attendance").rglob("*.seg"))[1]
    data = bytearray(seg.read_bytes())
    data[200] ^= 0xFF  # inside the first block's payload
    seg.write_bytes(bytes(data))
    db = tmp_path / "c.db"
    with pytest.raises(CorruptSegmentError) as e:
        restore(h, Latest(), f"sqlite://{db}")
    assert seg.name in str(e.value) and "byte" in str(e.value)
    assert not db.exists()


def test_missing_segment_is_reported(tmp_path: Path) -> None:
    h = build_history(tmp_path / "h", events=900, seed=4, per_segment=60)
    segs = sorted((h.store_root / "segments" / "attendance" / "000000").glob("*.seg"))
    assert len(segs) >= 3
    segs[1].unlink()
    with pytest.raises(BackupIncompleteError, match="missing"):
        restore(h, Latest(), f"sqlite://{tmp_path / 'm.db'}")
    # a point before the hole is still restorable
    first_end = int(segs[0].name.split("-")[1].split(".")[0])
    rep = restore(h, AtOffsets({("attendance", p): (first_end if p == 0 else 0)
                                for p in range(3)}), f"sqlite://{tmp_path / 'ok.db'}")
    assert all(r.ok for r in rep.results)


def test_postgres_refuses_non_empty_schema_and_swaps(history: History, pg_dsn: str) -> None:
    restore(history, Latest(), f"{pg_dsn}?schema=swap_src")
    with pytest.raises(TargetError, match="already holds"):
        restore(history, Latest(), f"{pg_dsn}?schema=swap_src")
    rep1 = restore(history, AtTime(history.oldest_ms + 10_000), f"{pg_dsn}?schema=staging_1",
                   swap_into="live_app")
    assert rep1.schema == "live_app" and rep1.replaced_schema is None
    rep2 = restore(history, Latest(), f"{pg_dsn}?schema=staging_2", swap_into="live_app")
    assert rep2.replaced_schema is not None

    async def check() -> None:
        conn = await asyncpg.connect(pg_dsn)
        try:
            names = {r[0] for r in await conn.fetch("SELECT nspname FROM pg_namespace")}
            assert "live_app" in names and rep2.replaced_schema in names
            assert "staging_1" not in names and "staging_2" not in names
            n = await conn.fetchval('SELECT count(*) FROM live_app."attendance"')
            assert n == len(Oracle(history).state("attendance"))
            row = await conn.fetchrow("SELECT * FROM live_app.replicator_restores")
            assert row["restore_id"] == rep2.restore_id
        finally:
            await conn.close()

    asyncio.run(check())


def test_postgres_unreachable_is_a_target_error(history: History) -> None:
    with pytest.raises(TargetError, match="cannot connect"):
        restore(history, Latest(), "postgresql://nobody@127.0.0.1:1/postgres")


def test_scratch_of_a_live_restore_is_not_swept(history: History, tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    live = tmp_path / ".s.db.tmp-restore-live"
    created = scratch.new_name(live)
    created.write_bytes(b"")
    fd = scratch.claim(created, live)  # a restore running right now
    dead = tmp_path / ".s.db.tmp-restore-dead"
    dead.write_bytes(b"x")
    old = time.time() - 3600
    os.utime(live, (old, old))
    os.utime(dead, (old, old))
    try:
        restore(history, Latest(), f"sqlite://{db}")
        assert live.exists() and not dead.exists()
    finally:
        scratch.release(fd)


def test_a_restore_that_finished_first_is_not_overwritten(history: History,
                                                          tmp_path: Path) -> None:
    from replicator.targets.sqlite import SqliteTarget

    db = tmp_path / "race.db"

    async def go() -> None:
        t = SqliteTarget(db, "race1")
        await t.open(replace=False)
        db.write_bytes(b"another restore's result")  # lands between open and commit
        with pytest.raises(TargetError, match="written by another restore"):
            await t.commit()
        await t.abort()

    asyncio.run(go())
    assert db.read_bytes() == b"another restore's result"
    assert [p.name for p in tmp_path.iterdir()] == ["race.db"]
