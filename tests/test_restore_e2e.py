"""Restore end to end: a realistic demo history published to the real broker, ingested by the
real service until every partition is stored and its watermark caught up, then restored by the
``replicator`` command line into SQLite and PostgreSQL at ``latest``, at times taken from the
Kafka records and at offsets; compared row by row with an oracle built from what Kafka holds.

The restore maps topics to entities by name (a topic is restorable when it is named like its
entity), so this module uses the topics ``attendance``, ``participant`` and ``config`` of the
session's broker rather than unique names; the oracle is built from whatever those topics hold.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from replicator.demo import iter_events
from replicator.ingest import Ingestor
from replicator.publish import ChangePublisher
from replicator.restore.point import format_ms
from tests.helpers import (
    REPO_ROOT,
    create_topics,
    kafka_contents,
    make_config,
    wait_for,
    write_config_toml,
)
from tests.restore_history import ENTITIES, canonical_rows, layouts, pg_rows, sqlite_rows

pytestmark = pytest.mark.integration

TP = tuple[str, int]
ROUNDS = 4
PER_ROUND = 1500


@dataclass(frozen=True)
class Rec:
    offset: int
    ts_ms: int
    value: bytes
    key: str
    op: str
    data: dict[str, Any] | None


@dataclass
class World:
    config: Path
    data: Path
    records: dict[TP, list[Rec]]  # what Kafka holds, per partition in offset order
    round_ends: list[int]  # the largest record timestamp of each publishing round

    def oracle(self, entity: str, at_ms: int | None = None,
               ends: dict[TP, int] | None = None) -> dict[str, dict[str, Any]]:
        """key -> data of the live records: per partition in offset order, timestamp <= T
        (or offset < end); the last op per key wins; delete removes."""
        state: dict[str, dict[str, Any]] = {}
        for (topic, part), recs in sorted(self.records.items()):
            if topic != entity:
                continue
            for r in recs:
                if at_ms is not None and r.ts_ms > at_ms:
                    continue
                if ends is not None and r.offset >= ends[(topic, part)]:
                    break
                if r.op == "delete":
                    state.pop(r.key, None)
                else:
                    assert r.data is not None
                    state[r.key] = r.data
        return state

    @property
    def all_ts(self) -> list[int]:
        return sorted({r.ts_ms for recs in self.records.values() for r in recs})


async def kafka_records(bootstrap: str, topics: list[str]) -> dict[TP, list[Rec]]:
    """Every record of ``topics`` with its offset and Kafka timestamp."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        cluster = await consumer._client.fetch_all_metadata()
        tps = [TopicPartition(t, p) for t in topics
               for p in sorted(cluster.partitions_for_topic(t) or set())]
        assert tps, "no partitions?"
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: dict[TP, list[Rec]] = {(tp.topic, tp.partition): [] for tp in tps}
        remaining = {tp for tp in tps if ends[tp] > 0}
        deadline = time.monotonic() + 120
        while remaining and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500, max_records=10000)
            for tp, msgs in batch.items():
                for m in msgs:
                    assert m.value is not None
                    ev = orjson.loads(m.value)
                    out[(tp.topic, tp.partition)].append(
                        Rec(m.offset, m.timestamp, m.value, ev["key"], ev["op"], ev.get("data")))
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
        assert not remaining, f"could not read {remaining} to its end"
        return out
    finally:
        await consumer.stop()


async def ensure_topics(bootstrap: str, names: list[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
    finally:
        await admin.close()
    missing = [n for n in names if n not in existing]
    if missing:
        await create_topics(bootstrap, missing, partitions=3)


def store_watermarks(data: Path) -> dict[TP, dict[str, Any]]:
    out: dict[TP, dict[str, Any]] = {}
    for p in (data / "store" / "watermarks").rglob("*.json"):
        doc = orjson.loads(p.read_bytes())
        out[(doc["topic"], int(doc["partition"]))] = doc
    return out


@pytest.fixture(scope="module")
async def world(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
                ) -> AsyncIterator[World]:
    topics = list(ENTITIES)
    await ensure_topics(kafka_bootstrap, topics)
    events = iter_events(ROUNDS * PER_ROUND, seed=33)
    async with ChangePublisher(bootstrap_servers=kafka_bootstrap) as pub:
        for i in range(ROUNDS):  # rounds apart in time: distinct points to restore to
            if i:
                await asyncio.sleep(0.3)
            chunk = [e for _, e in zip(range(PER_ROUND), events, strict=False)]
            assert len(await pub.publish_many(chunk)) == PER_ROUND
    records = await kafka_records(kafka_bootstrap, topics)
    # the independent read of Kafka agrees with the helper's
    contents = await kafka_contents(kafka_bootstrap, topics)
    assert {tp: {r.offset: r.value for r in recs} for tp, recs in records.items()} == contents
    total = sum(len(v) for v in records.values())
    assert total >= ROUNDS * PER_ROUND

    root = tmp_path_factory.mktemp("restore-e2e")
    data = root / "data"
    cfg = make_config(data, kafka_bootstrap, topics, seal_age_s=1.0, watermark_interval_ms=200)
    ends = {tp: (recs[-1].offset + 1 if recs else None) for tp, recs in records.items()}
    newest = {tp: max((r.ts_ms for r in recs), default=0) for tp, recs in records.items()}

    def caught_up() -> bool:
        wms = store_watermarks(data)
        return all(tp in wms and wms[tp]["stored_end"] == ends[tp]
                   and wms[tp]["watermark_ms"] > newest[tp] for tp in records)

    async with Ingestor(config=cfg) as ing:
        task = asyncio.create_task(ing.run())
        try:
            await wait_for(lambda: caught_up() or task.done(), 120,
                           "every partition stored and its watermark caught up")
            if task.done():
                task.result()
            assert ing.stats.quarantined == 0
        finally:
            ing.request_stop()
            await task
    assert caught_up()
    write_config_toml(root / "replicator.toml", cfg)
    # each round's last timestamp, found from the published order of the history
    stamps = sorted(r.ts_ms for recs in records.values() for r in recs)
    round_ends = [stamps[min(len(stamps), (i + 1) * total // ROUNDS) - 1] for i in range(ROUNDS)]
    yield World(root / "replicator.toml", data, records, round_ends)


async def cli(w: World, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPLICATOR_")}
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "replicator", "--config", str(w.config), *args],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT, env=env,
        stdin=subprocess.DEVNULL, check=False,
    )


async def restore_json(w: World, *args: str) -> dict[str, Any]:
    res = await cli(w, "restore", *args, "--json")
    assert res.returncode == 0, res.stderr
    doc: dict[str, Any] = orjson.loads(res.stdout)
    return doc


def points(w: World) -> list[int]:
    """Times taken from the records: the oldest, each round's end, and in between."""
    ts = w.all_ts
    mid = ts[len(ts) // 2]
    return [ts[0], w.round_ends[0], mid - 1, mid, w.round_ends[2]]


def check_report(doc: dict[str, Any], w: World, at_ms: int | None,
                 want: dict[str, dict[str, dict[str, Any]]]) -> None:
    assert doc["dry_run"] is False and doc["ok"] is True
    assert doc["at"] == (format_ms(at_ms) if at_ms is not None else None)
    assert {(c["topic"], c["partition"]) for c in doc["cut"]} == set(w.records)
    assert [e["entity"] for e in doc["entities"]] == sorted(want)
    for e in doc["entities"]:
        assert e["ok"] is True and e["digest"] == e["expected_digest"]
        assert e["rows"] == len(want[e["entity"]])
    assert doc["events_replayed"] == sum(
        1 for (t, _), recs in w.records.items() if t in want for r in recs
        if at_ms is None or r.ts_ms <= at_ms)


async def test_sqlite_and_postgres_match_the_oracle(world: World, pg_dsn: str) -> None:
    w = world
    lay = layouts()
    out = w.data.parent / "restored"
    out.mkdir(exist_ok=True)
    newest_doc = orjson.loads((await cli(w, "restore", "--at", "latest", "--dry-run",
                                         "--json")).stdout)
    newest = newest_doc["plan"]["at_ms"]
    assert newest > w.all_ts[-1]  # caught up past the last record
    run = uuid.uuid4().hex[:6]
    for i, (label, at) in enumerate([("latest", None), *[(f"@{t}", t) for t in points(w)]]):
        at_ms = newest if at is None else at
        want = {e: w.oracle(e, at_ms) for e in ENTITIES}
        assert any(want.values())
        db = out / f"r{i}.db"
        doc = await restore_json(w, "--at", label, "--target", f"sqlite://{db}")
        check_report(doc, w, at_ms, want)
        assert doc["target"] == f"sqlite://{db}" and doc["schema"] is None
        schema = f"e2e_{run}_{i}"
        pg = await restore_json(w, "--at", label, "--target", f"{pg_dsn}?schema={schema}")
        check_report(pg, w, at_ms, want)
        assert pg["schema"] == schema
        for e in ENTITIES:
            expected = canonical_rows(lay[e], want[e])
            assert sqlite_rows(db, lay[e]) == expected, f"sqlite {e} at {label}"
            assert await pg_rows(pg_dsn, schema, lay[e]) == expected, f"postgres {e} at {label}"
        # the restore record kept beside the data names the point and the digests
        with sqlite3.connect(db) as conn:
            (at_txt, digests) = conn.execute(
                "SELECT at, digests FROM replicator_restores").fetchone()
        assert at_txt == format_ms(at_ms)
        assert orjson.loads(digests) == {
            x["entity"]: f"{x['rows']}:{x['digest']}" for x in doc["entities"]}
    conn = await asyncpg.connect(pg_dsn)
    try:
        # the primary key is built after the load: the table ends up as an inline
        # PRIMARY KEY makes it (same constraint name and definition, key collation "C")
        for e in ENTITIES:
            got = await conn.fetch(
                "SELECT conname, pg_get_constraintdef(c.oid) AS def FROM pg_constraint c "
                "JOIN pg_namespace n ON n.oid = c.connamespace "
                "WHERE n.nspname = $1 AND c.contype = 'p' AND c.conrelid = "
                "(SELECT oid FROM pg_class WHERE relname = $2 AND relnamespace = n.oid)",
                f"e2e_{run}_0", e)
            assert [(r["conname"], r["def"]) for r in got] == [(f"{e}_pkey",
                                                                 "PRIMARY KEY (key)")]
            coll = await conn.fetchval(
                "SELECT collation_name FROM information_schema.columns WHERE "
                "table_schema = $1 AND table_name = $2 AND column_name = 'key'",
                f"e2e_{run}_0", e)
            assert coll == "C"
        for i in range(len(points(w)) + 1):
            await conn.execute(f'DROP SCHEMA IF EXISTS "e2e_{run}_{i}" CASCADE')
    finally:
        await conn.close()


async def test_offsets_restore_and_filters(world: World, tmp_path: Path) -> None:
    w = world
    lay = layouts()
    ends = {tp: recs[len(recs) // 3].offset for tp, recs in w.records.items()
            if tp[0] == "attendance"}
    db = tmp_path / "o.db"
    doc = await restore_json(w, "--offsets", ",".join(f"{t}:{p}:{o}" for (t, p), o in
                                                      sorted(ends.items())),
                             "--target", f"sqlite://{db}")
    assert doc["at"] is None
    assert {(c["topic"], c["partition"]): c["end_offset"] for c in doc["cut"]} == ends
    want = w.oracle("attendance", ends=ends)
    assert sqlite_rows(db, lay["attendance"]) == canonical_rows(lay["attendance"], want)
    # entity and key filters
    keys = [*sorted(w.oracle("participant"))[:5], "prt_no_such_key"]
    db2 = tmp_path / "k.db"
    doc = await restore_json(w, "--at", "latest", "--entities", "participant",
                             "--keys", ",".join(keys), "--target", f"sqlite://{db2}")
    assert [e["entity"] for e in doc["entities"]] == ["participant"]
    got = sqlite_rows(db2, lay["participant"])
    full = w.oracle("participant")
    assert got == canonical_rows(lay["participant"], {k: full[k] for k in keys[:5]})
    with sqlite3.connect(db2) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert "attendance" not in tables and "config" not in tables


async def test_backups_list_json(world: World) -> None:
    w = world
    res = await cli(w, "backups", "list", "--json")
    assert res.returncode == 0, res.stderr
    doc = orjson.loads(res.stdout)
    assert doc["store"].endswith("store")
    plan = orjson.loads((await cli(w, "restore", "--at", "latest", "--dry-run", "--json")
                         ).stdout)["plan"]
    by_entity = {e["entity"]: e for e in doc["entities"]}
    assert sorted(by_entity) == sorted(ENTITIES)
    for entity, row in by_entity.items():
        recs = [r for (t, _), rs in w.records.items() if t == entity for r in rs]
        assert row["oldest_restorable"] == format_ms(min(r.ts_ms for r in recs))
        # every entity is caught up at least as far as the restore's latest (min over all)
        assert row["newest_restorable"] >= plan["window"]["newest"]
        assert row["newest_restorable"] > format_ms(max(r.ts_ms for r in recs))
        assert row["events"] == len(recs)
        assert row["partitions"] == 3 and row["segments"] >= 3 and row["bytes"] > 0
        assert row["missing_ranges"] == []
    assert min(r["newest_restorable"] for r in doc["entities"]) == plan["window"]["newest"]
    # the table form names each entity too
    table = await cli(w, "backups", "list")
    assert table.returncode == 0 and all(e in table.stdout for e in ENTITIES)


def _last_ops(recs: list[Rec]) -> dict[str, str]:
    last: dict[str, str] = {}
    for r in recs:
        last[r.key] = r.op
    return last


def _changes_of(w: World, entity: str, key: str) -> tuple[TP, list[Rec]]:
    for tp, recs in sorted(w.records.items()):
        if tp[0] == entity:
            mine = [r for r in recs if r.key == key]
            if mine:
                return tp, mine
    raise AssertionError(f"no change of {key}")


async def test_get_and_history(world: World) -> None:
    w = world
    entity = "participant"
    latest = w.oracle(entity)
    # a live key with several changes (its state changed over time)
    multi = [k for k in sorted(latest) if len(_changes_of(w, entity, k)[1]) >= 3]
    assert multi, "the demo history has no participant changed three times"
    key = multi[0]
    tp, changes = _changes_of(w, entity, key)
    res = await cli(w, "get", entity, key, "--json")
    assert res.returncode == 0, res.stderr
    doc = orjson.loads(res.stdout)
    assert doc["exists"] is True and doc["data"] == latest[key]
    last = changes[-1]
    assert doc["change"]["topic"] == tp[0] and doc["change"]["partition"] == tp[1]
    assert doc["change"]["offset"] == last.offset
    assert doc["change"]["timestamp"] == format_ms(last.ts_ms)
    # at the time of its first change: the first image
    first = changes[0]
    at_first = await cli(w, "get", entity, key, "--at", f"@{first.ts_ms}", "--json")
    assert at_first.returncode == 0, at_first.stderr
    doc1 = orjson.loads(at_first.stdout)
    assert doc1["data"] == w.oracle(entity, first.ts_ms)[key]
    assert doc1["change"]["offset"] == max(c.offset for c in changes if c.ts_ms <= first.ts_ms)
    # the plain text form
    txt = await cli(w, "get", entity, key)
    assert txt.returncode == 0 and f"{tp[0]}[{tp[1]}]@{last.offset}" in txt.stdout
    # a key whose last change is a delete, and one that never existed: exit 1
    ent_del, deleted = next((t, k) for (t, _), recs in sorted(w.records.items())
                            for k, op in _last_ops(recs).items() if op == "delete")
    gone = await cli(w, "get", ent_del, deleted, "--json")
    assert gone.returncode == 1
    assert orjson.loads(gone.stdout) | {"at": None} == {
        "entity": ent_del, "key": deleted, "at": None, "exists": False, "state": "deleted"}
    absent = await cli(w, "get", entity, "prt_never_was", "--json")
    assert absent.returncode == 1 and orjson.loads(absent.stdout)["state"] == "absent"

    # history: every change with its offset, time and op, in order
    hist = await cli(w, "history", entity, key, "--json")
    assert hist.returncode == 0, hist.stderr
    hdoc = orjson.loads(hist.stdout)
    assert [(c["topic"], c["partition"], c["offset"], c["timestamp"], c["op"])
            for c in hdoc["changes"]] == [
        (tp[0], tp[1], r.offset, format_ms(r.ts_ms), r.op) for r in changes]
    assert [c["data"] for c in hdoc["changes"]] == [r.data for r in changes]
    _, del_changes = _changes_of(w, ent_del, deleted)
    hdel = orjson.loads((await cli(w, "history", ent_del, deleted, "--json")).stdout)
    assert [c["op"] for c in hdel["changes"]] == [r.op for r in del_changes]
    assert hdel["changes"][-1]["op"] == "delete"
    text = await cli(w, "history", entity, key)
    assert text.returncode == 0 and text.stdout.strip().endswith(f"{len(changes)} changes")


async def test_export_jsonl_and_csv(world: World, tmp_path: Path) -> None:
    w = world
    ts = w.all_ts
    t1, t2 = ts[len(ts) // 4], ts[3 * len(ts) // 4]
    entity = "attendance"
    want = [r for tp, recs in sorted(w.records.items()) if tp[0] == entity
            for r in recs if t1 <= r.ts_ms <= t2]
    assert want and len(want) < sum(len(v) for (t, _), v in w.records.items() if t == entity)
    res = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "replicator", "--config", str(w.config), "export", "--entity",
         entity, "--from", format_ms(t1), "--to", f"@{t2}", "--format", "jsonl"],
        capture_output=True, timeout=300, cwd=REPO_ROOT, check=False)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == len(want)
    assert lines == [r.value for r in want]  # the original bytes, partition by partition
    # csv into a file
    out = tmp_path / "a.csv"
    res2 = await cli(w, "export", "--entity", entity, "--from", f"@{t1}", "--to", f"@{t2}",
                     "--format", "csv", "-o", str(out))
    assert res2.returncode == 0, res2.stderr
    assert f"exported {len(want):,} events to {out}" in res2.stderr
    rows = list(csv.reader(io.StringIO(out.read_text(encoding="utf-8"))))
    header, body = rows[0], rows[1:]
    lay = layouts()[entity]
    assert header == ["topic", "partition", "offset", "timestamp", "op", "key", "version", "ts",
                      *[c.name for c in lay.data_columns]]
    assert len(body) == len(want)
    text_cols = [i for i, c in enumerate(lay.data_columns) if c.kind == "text"]
    assert text_cols
    for row, r in zip(body, want, strict=True):
        assert (row[2], row[3], row[4], row[5]) == (str(r.offset), format_ms(r.ts_ms), r.op,
                                                    r.key)
        data = r.data or {}
        for i in text_cols:
            v = data.get(lay.data_columns[i].name)
            assert row[8 + i] == ("" if v is None else v)
    # the whole entity without bounds: every stored event
    everything = await cli(w, "export", "--entity", "config")
    assert everything.returncode == 0
    assert len(everything.stdout.splitlines()) == sum(
        len(v) for (t, _), v in w.records.items() if t == "config")


async def test_snapshot_chain_through_the_cli(world: World, tmp_path: Path) -> None:
    """Last in this module (it adds snapshots to the shared store): compact a full, an
    incremental and a differential at the rounds' ends through the CLI, then restores at
    those points and between them equal the oracle, and ``get --at`` agrees with it."""
    w = world
    lay = layouts()
    made = []
    for kind, at in (("full", w.round_ends[0]), ("incremental", w.round_ends[1]),
                     ("differential", w.round_ends[2])):
        res = await cli(w, "compact", "--kind", kind, "--at", f"@{at}", "--json")
        assert res.returncode == 0, res.stderr
        doc = orjson.loads(res.stdout)
        assert doc["kind"] == kind and doc["time"] == format_ms(at)
        made.append(doc)
        for f in doc["files"]:
            if kind == "full":  # a full's digest is the state digest at its point
                want = canonical_rows(lay[f["entity"]], w.oracle(f["entity"], at))
                assert f["live"] == len(want)
    assert made[1]["parent"] == made[0]["id"] and made[2]["parent"] == made[0]["id"]
    listing = orjson.loads((await cli(w, "backups", "list", "--json")).stdout)
    assert [s["id"] for s in listing["snapshots"]] == [d["id"] for d in made]
    ts = w.all_ts
    for i, at in enumerate([w.round_ends[0], w.round_ends[1], (w.round_ends[1] + ts[-1]) // 2,
                            w.round_ends[2], ts[-1]]):
        plan = orjson.loads((await cli(w, "restore", "--at", f"@{at}", "--dry-run",
                                       "--json")).stdout)["plan"]
        # whichever base reads fewer bytes: the chain (full, differential) or the segments
        assert [s["id"] for s in plan["snapshots"]] in (
            [], [made[0]["id"]], [made[0]["id"], made[1]["id"]],
            [made[0]["id"], made[2]["id"]])
        db = tmp_path / f"s{i}.db"
        doc = await restore_json(w, "--at", f"@{at}", "--target", f"sqlite://{db}")
        assert doc["ok"] is True
        for e in ENTITIES:
            assert sqlite_rows(db, lay[e]) == canonical_rows(lay[e], w.oracle(e, at)), (e, at)
    key = sorted(w.oracle("participant", w.round_ends[2]))[0]
    res = await cli(w, "get", "participant", key, "--at", f"@{w.round_ends[2]}", "--json")
    assert res.returncode == 0, res.stderr
    assert orjson.loads(res.stdout)["data"] == w.oracle("participant", w.round_ends[2])[key]
