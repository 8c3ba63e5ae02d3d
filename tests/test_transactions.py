"""Transactional producers: only committed events are stored, markers are not data loss."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from replicator import naming
from replicator.catalog import Catalog, find_gaps
from replicator.ingest import Ingestor
from replicator.publish import ChangePublisher
from replicator.storage.local import LocalStore
from tests.helpers import (
    REPO_ROOT,
    assert_exactly_once,
    create_topics,
    kafka_contents,
    make_config,
    stored_records,
    unique,
    wait_for,
    write_config_toml,
)

pytestmark = pytest.mark.integration

PARTITIONS = 2


class Boom(Exception):
    """Raised inside a transaction to make it abort."""


def _event(key: str) -> bytes:
    return orjson.dumps({"entity": "attendance", "op": "delete", "key": key,
                         "ts": "2026-01-01T00:00:00Z", "schema_version": 1})


class Traffic:
    """Sends committed, aborted and plain events, remembering which keys are which."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.committed: list[str] = []
        self.aborted: list[str] = []
        self.plain: list[str] = []
        self._n = 0
        mapping = {"attendance": topic}
        self.tx = ChangePublisher(bootstrap_servers=bootstrap, topic_for_entity=mapping,
                                  transactional_id=unique("txid"))
        self.pub = ChangePublisher(bootstrap_servers=bootstrap, topic_for_entity=mapping)
        self.raw = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=unique("rawtx"),
                                    enable_idempotence=True, acks="all")

    async def __aenter__(self) -> Traffic:
        await self.tx.start()
        await self.pub.start()
        await self.raw.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.tx.stop()
        await self.pub.stop()
        await self.raw.stop()

    def _keys(self, kind: str, n: int) -> list[str]:
        out = [f"{kind}-{self._n + i:05d}" for i in range(n)]
        self._n += n
        return out

    async def commit(self, n: int) -> None:
        keys = self._keys("commit", n)
        async with self.tx.transaction():
            for k in keys:
                await self.tx.publish("attendance", "delete", k, ts="2026-01-01T00:00:00Z")
        self.committed += keys

    async def abort_by_raising(self, n: int) -> None:
        keys = self._keys("abort", n)
        with pytest.raises(Boom):
            async with self.tx.transaction():
                for k in keys:
                    await self.tx.publish("attendance", "delete", k, ts="2026-01-01T00:00:00Z")
                raise Boom
        self.aborted += keys

    async def abort_explicitly(self, n: int) -> None:
        keys = self._keys("rawabort", n)
        await self.raw.begin_transaction()
        for k in keys:
            await self.raw.send_and_wait(self.topic, _event(k), key=k.encode())
        await self.raw.abort_transaction()
        self.aborted += keys

    async def commit_raw(self, n: int) -> None:
        keys = self._keys("rawcommit", n)
        await self.raw.begin_transaction()
        for k in keys:
            await self.raw.send_and_wait(self.topic, _event(k), key=k.encode())
        await self.raw.commit_transaction()
        self.committed += keys

    async def send_plain(self, n: int) -> None:
        keys = self._keys("plain", n)
        for k in keys:
            await self.pub.publish("attendance", "delete", k, ts="2026-01-01T00:00:00Z")
        self.plain += keys


async def _end_offsets(bootstrap: str, topic: str) -> dict[tuple[str, int], int]:
    """High watermarks (read_uncommitted: markers and open transactions included)."""
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_uncommitted")
    await c.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        ends = await c.end_offsets(tps)
        return {(tp.topic, tp.partition): off for tp, off in ends.items()}
    finally:
        await c.stop()


def _keys_of(values: dict[tuple[str, int], dict[int, bytes | None]]) -> list[str]:
    return [orjson.loads(v)["key"] for part in values.values() for v in part.values() if v]


async def _ingest_until_covered(ing: Ingestor, want_ingested: int,
                                ends: dict[tuple[str, int], int]) -> None:
    """Run until ``want_ingested`` events are in and every partition's durable coverage
    reached its end offset (which lies past the trailing transaction marker)."""
    task = asyncio.create_task(ing.run())

    def covered() -> bool:
        logs = ing.spool.logs
        return all(tp in logs and logs[tp].durable == end for tp, end in ends.items())

    try:
        await wait_for(lambda: (ing.stats.ingested >= want_ingested and covered())
                       or task.done(), 60, f"{want_ingested} ingested and coverage to {ends}")
        if task.done():
            task.result()
    finally:
        ing.request_stop()
        await task


def _store_names(data: Path) -> list[str]:
    root = data / "store"
    return sorted(str(p.relative_to(root)) for p in (root / "segments").rglob("*.seg"))


async def test_only_committed_events_are_stored_and_coverage_has_no_gaps(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = unique("attendance")
    await create_topics(kafka_bootstrap, [topic], partitions=PARTITIONS)
    data = tmp_path / "data"
    async with Traffic(kafka_bootstrap, topic) as t:
        # -- phase A: interleaved, ends with an aborted transaction --------------------------
        await t.commit(6)
        await t.send_plain(3)
        await t.abort_by_raising(5)
        await t.send_plain(2)
        await t.commit_raw(4)
        await t.abort_explicitly(4)
        await t.commit(3)
        await t.abort_by_raising(3)
        await t.abort_explicitly(2)
        ends_a = await _end_offsets(kafka_bootstrap, topic)
        want_a = len(t.committed) + len(t.plain)
        cfg = make_config(data, kafka_bootstrap, [topic])
        async with Ingestor(config=cfg) as ing:
            await _ingest_until_covered(ing, want_a, ends_a)
        assert ing.stats.ingested == want_a and ing.stats.quarantined == 0
        # every partition's stored coverage ends exactly at its end offset (after markers)
        names_a = _store_names(data)
        last_end = {}
        for n in names_a:
            seg = naming.parse_segment_name(n)
            last_end[(seg.topic, seg.partition)] = seg.end
        assert last_end == {tp: e for tp, e in ends_a.items() if e > 0}

        # -- phase B: a transaction left open while ingest is caught up -----------------------
        n_before = len(t.committed) + len(t.plain)
        await t.send_plain(4)
        open_keys = t._keys("late", 6)
        cfg_b = make_config(data, kafka_bootstrap, [topic])
        async with Ingestor(config=cfg_b) as ing_b:
            task = asyncio.create_task(ing_b.run())
            try:
                await wait_for(lambda: ing_b.stats.ingested >= 4 or task.done(), 60, "plain B")
                await t.tx._require_started().begin_transaction()
                for k in open_keys:
                    await t.tx.publish("attendance", "delete", k, ts="2026-01-01T00:00:00Z")
                await asyncio.sleep(3.0)  # several watermark rounds while the txn is open
                assert ing_b.stats.ingested == 4, "records of an open transaction were read"
                positions = {tp: p.builder.position for tp, p in ing_b.spool.logs.items()
                             if p.builder is not None}
                ends_open = await _end_offsets(kafka_bootstrap, topic)
                # coverage stops at the last stable offset, before the open transaction
                assert any(positions[tp] < ends_open[tp] for tp in ends_open), (
                    positions, ends_open)
                await t.tx._require_started().commit_transaction()
                t.committed += open_keys
                await t.abort_by_raising(3)  # an abort arriving while ingest is live
                ends_b = await _end_offsets(kafka_bootstrap, topic)
                await wait_for(
                    lambda: (ing_b.stats.ingested == 4 + len(open_keys) and all(
                        ing_b.spool.logs[tp].durable == e for tp, e in ends_b.items()))
                    or task.done(), 60, "committed late transaction ingested and covered")
            finally:
                ing_b.request_stop()
                await task
            assert ing_b.stats.ingested == 4 + len(open_keys)

        # -- phase C: more interleaving, ends with an aborted transaction again -----------------
        await t.abort_by_raising(4)
        await t.commit(2)
        await t.send_plain(1)
        await t.abort_explicitly(3)
        ends_c = await _end_offsets(kafka_bootstrap, topic)
        want_c = len(t.committed) + len(t.plain) - n_before - 4 - len(open_keys)
        async with Ingestor(config=make_config(data, kafka_bootstrap, [topic])) as ing_c:
            await _ingest_until_covered(ing_c, want_c, ends_c)
        assert ing_c.stats.ingested == want_c

    # -- what is stored == committed + plain, never aborted ------------------------------------
    stored = stored_records(data, [topic])
    stored_keys = sorted(r.key.decode() for recs in stored.values() for r in recs if r.key)
    assert stored_keys == sorted(t.committed + t.plain)
    assert not set(stored_keys) & set(t.aborted)
    committed_view = await kafka_contents(kafka_bootstrap, [topic])
    assert sorted(_keys_of(committed_view)) == stored_keys
    assert assert_exactly_once(stored, committed_view) == len(stored_keys)
    # the aborted records really are in the log (read_uncommitted sees them): the test
    # would notice if ingest read uncommitted data
    everything = await kafka_contents(kafka_bootstrap, [topic], read_committed=False)
    assert set(t.aborted) <= set(_keys_of(everything))

    # -- coverage: contiguous, ends at the partition end, verify reports nothing ------------------
    names = _store_names(data)
    assert find_gaps(names) == []
    last_end = {}
    first_start = {}
    for n in names:
        seg = naming.parse_segment_name(n)
        first_start.setdefault((seg.topic, seg.partition), seg.start)
        last_end[(seg.topic, seg.partition)] = seg.end
    assert last_end == ends_c
    assert set(first_start.values()) == {0}
    assert len(names) >= 3 * PARTITIONS  # one segment per partition per ingest run
    entries, problems = await Catalog(store=LocalStore(root=data / "store")).verify(topic)
    assert problems == []
    assert sum(e.records for e in entries) == len(stored_keys)
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPLICATOR_")}
    conf = write_config_toml(tmp_path / "r.toml", cfg)
    proc = subprocess.run(
        [sys.executable, "-m", "replicator", "--config", str(conf), "segments", "verify",
         "--json"], capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120,
        check=False)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    doc = orjson.loads(proc.stdout)
    assert doc["problems"] == [] and doc["records"] == len(stored_keys)
