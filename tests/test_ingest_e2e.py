"""End to end against the real broker: events in Kafka == records in segments, exactly once."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson
import pytest

from replicator.catalog import Catalog
from replicator.ingest import Ingestor
from replicator.publish import ChangePublisher
from replicator.quarantine import read_quarantine
from replicator.storage import LocalStore
from tests.helpers import (
    assert_exactly_once,
    create_topics,
    kafka_contents,
    make_config,
    publish_demo,
    stored_records,
    unique,
    wait_for,
)

pytestmark = pytest.mark.integration


async def _ingest_until(ing: Ingestor, expected_total: int, timeout: float = 180) -> None:
    task = asyncio.create_task(ing.run())
    try:
        await wait_for(lambda: ing.stats.ingested + ing.stats.quarantined >= expected_total
                       or task.done(), timeout, f"{expected_total} events ingested")
        if task.done():
            task.result()
    finally:
        ing.request_stop()
        await task


async def test_100k_events_three_topics_stored_exactly_once(kafka_bootstrap: str,
                                                            tmp_path: Path) -> None:
    names = {e: unique(e) for e in ("attendance", "participant", "config")}
    await create_topics(kafka_bootstrap, list(names.values()), partitions=3)
    n = 100_000
    assert await publish_demo(kafka_bootstrap, names, n) == n
    cfg = make_config(tmp_path / "data", kafka_bootstrap, list(names.values()),
                      seal_bytes=2 * 1024 * 1024)
    async with Ingestor(config=cfg) as ing:
        await _ingest_until(ing, n)
    expected = await kafka_contents(kafka_bootstrap, list(names.values()))
    assert sum(len(v) for v in expected.values()) == n
    stored = stored_records(tmp_path / "data", list(names.values()))
    assert assert_exactly_once(stored, expected) == n
    # all sealed into the store on stop; nothing left in the spool
    assert not list((tmp_path / "data" / "spool").rglob("*.active"))
    assert len(list((tmp_path / "data" / "store").rglob("*.seg"))) >= 9
    # headers and keys survive byte for byte
    any_rec = next(iter(stored.values()))[0]
    assert any_rec.key is not None and dict(any_rec.headers)["entity"] in (
        b"attendance", b"participant", b"config")


async def test_restart_resumes_from_store_without_duplicates(kafka_bootstrap: str,
                                                             tmp_path: Path) -> None:
    topic = unique("attendance")
    await create_topics(kafka_bootstrap, [topic], partitions=2)
    topics = {"attendance": topic, "participant": topic, "config": topic}
    await publish_demo(kafka_bootstrap, topics, 3000, seed=2)
    cfg = make_config(tmp_path / "data", kafka_bootstrap, [topic])
    async with Ingestor(config=cfg) as ing:
        await _ingest_until(ing, 3000)
    await publish_demo(kafka_bootstrap, topics, 2000, seed=3)
    # new group id: Kafka's committed offsets are NOT what decides where to resume
    cfg2 = make_config(tmp_path / "data", kafka_bootstrap, [topic])
    async with Ingestor(config=cfg2) as ing:
        await _ingest_until(ing, 2000)
        assert ing.stats.ingested == 2000
    expected = await kafka_contents(kafka_bootstrap, [topic])
    assert assert_exactly_once(stored_records(tmp_path / "data"), expected) == 5000


async def test_bad_events_are_quarantined_and_good_ones_stored(kafka_bootstrap: str,
                                                               tmp_path: Path) -> None:
    topic = unique("attendance")
    await create_topics(kafka_bootstrap, [topic], partitions=1)
    good = {
        "entity": "attendance", "op": "delete", "key": "a-1", "ts": "2026-01-01T00:00:00Z",
        "schema_version": 1,
    }
    bad: list[tuple[bytes | None, str]] = [
        (b"{not json", "malformed JSON"),
        (b'{"entity": "attendance", "key": "\xff\xfe"}', "malformed JSON"),  # bad UTF-8
        (orjson.dumps({**good, "key": None}), "key"),
        (orjson.dumps({k: v for k, v in good.items() if k != "key"}), "key"),
        (orjson.dumps({**good, "op": "merge"}), "op"),
        (orjson.dumps({**good, "op": "upsert", "data": {"status": "teleported"}}), "schema"),
        (orjson.dumps({**good, "entity": "spaceship"}), "entity"),
        (b'{"pad": "' + b"x" * 20_000 + b'"}', "oversized"),
        (None, "null value"),
    ]
    async with ChangePublisher(bootstrap_servers=kafka_bootstrap,
                               topic_for_entity={"attendance": topic}) as pub:
        sent_good = []
        for i, (value, _) in enumerate(bad):
            md = await pub.publish_raw(topic, orjson.dumps({**good, "key": f"g-{i}"}), b"g")
            sent_good.append(md.offset)
            await pub.publish_raw(topic, value, b"b")
        md = await pub.publish_raw(topic, orjson.dumps({**good, "key": "last"}), b"g")
        sent_good.append(md.offset)
    cfg = make_config(tmp_path / "data", kafka_bootstrap, [topic], max_event_bytes=8192)
    async with Ingestor(config=cfg) as ing:
        await _ingest_until(ing, len(bad) + len(sent_good))
        assert ing.stats.quarantined == len(bad)
        assert ing.stats.ingested == len(sent_good)
    stored = stored_records(tmp_path / "data")
    assert [r.offset for r in stored[(topic, 0)]] == sent_good
    quarantined = list(read_quarantine(tmp_path / "data" / "quarantine" / f"{topic}.jsonl"))
    assert [q.offset for q in quarantined] == [o + 1 for o in sent_good[:-1]]
    for q, (value, expect) in zip(quarantined, bad, strict=True):
        assert expect.split()[0] in q.reason, (q.reason, expect)
        assert q.value == value  # original bytes kept
    # the coverage is continuous: quarantined offsets are inside the stored ranges
    segs = sorted((tmp_path / "data" / "store").rglob("*.seg"))
    assert segs[0].name.startswith("0" * 20) and segs[-1].name.endswith(
        f"{sent_good[-1] + 1:020d}.seg")


async def test_idle_partitions_keep_recording_watermarks(kafka_bootstrap: str,
                                                         tmp_path: Path) -> None:
    """An idle partition still records that it was caught up, locally and in the store."""
    topic = unique("config")
    await create_topics(kafka_bootstrap, [topic], partitions=3)
    good = {"entity": "config", "op": "delete", "ts": "2026-01-01T00:00:00Z",
            "schema_version": 1}
    async with ChangePublisher(bootstrap_servers=kafka_bootstrap) as pub:
        for i in range(20):  # partition 0 only: 1 and 2 stay empty
            await pub.publish_raw(topic, orjson.dumps({**good, "key": f"k{i}"}), b"k",
                                  partition=0)
    data = tmp_path / "data"
    cfg = make_config(data, kafka_bootstrap, [topic], seal_age_s=1.0,
                      watermark_interval_ms=200)
    async with Ingestor(config=cfg) as ing:
        task = asyncio.create_task(ing.run())
        await wait_for(lambda: ing.stats.ingested == 20, 60, "20 events")
        mark_ms = time.time() * 1000
        await asyncio.sleep(4)
        for p in range(3):
            assert ing.spool.logs[(topic, p)].durable_watermark_ms >= mark_ms
            doc = orjson.loads((data / "store" / "watermarks" / topic / f"{p:06d}.json")
                               .read_bytes())
            assert doc["watermark_ms"] >= mark_ms, (p, doc)
            assert doc["stored_end"] == (20 if p == 0 else None)
        # idle seal intervals do not pile up empty segments
        assert len(list((data / "store" / "segments").rglob("*.seg"))) == 1
        ing.request_stop()
        await task
    entries, problems = await Catalog(store=LocalStore(root=data / "store")).verify()
    assert problems == [] and sum(e.records for e in entries) == 20


async def test_readiness_follows_the_assignment_and_a_standby_is_ready(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """/readyz's source: false before the first assignment, true for the owner of the only
    partition and for the standby that got nothing, false after stop."""
    topic = unique("attendance")
    await create_topics(kafka_bootstrap, [topic], partitions=1)
    group = unique("grp")
    a = Ingestor(config=make_config(tmp_path / "a", kafka_bootstrap, [topic], group=group))
    b = Ingestor(config=make_config(tmp_path / "b", kafka_bootstrap, [topic], group=group))
    assert not a.ready and not a.serving
    await a.start()
    run_a = asyncio.create_task(a.run())
    try:
        await wait_for(lambda: a.serving, 60, "first instance ready")
        assert a.healthy
        await b.start()
        run_b = asyncio.create_task(b.run())
        try:
            def settled() -> bool:
                owners = [i for i in (a, b) if i.owns(topic, 0)]
                return len(owners) == 1 and a.serving and b.serving
            await wait_for(settled, 60, "one owner and one ready standby")
            standby = b if a.owns(topic, 0) else a
            assert standby.ready and not standby.spool.logs
        finally:
            b.request_stop()
            await run_b
            await b.stop()
        assert not b.ready and not b.serving
        await wait_for(lambda: a.owns(topic, 0) and a.serving, 60, "survivor owns the partition")
    finally:
        a.request_stop()
        await run_a
        await a.stop()
    assert not a.serving
