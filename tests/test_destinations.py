"""The destination fan-out: every object the primary store receives is copied to each
further destination, in an order that keeps the copy consistent, and a destination that
was down catches up on its whole backlog.

Unit-level tests drive :class:`Fanout` with local directories (one of them switchable to
"down"); the end-to-end test runs the ingest service against the real Kafka broker with a
local primary and a real S3 server as the further destination, stops that server while
events keep arriving and checks that everything arrives byte for byte once it is back.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from dataclasses import replace
from pathlib import Path

import orjson
from aiokafka.admin import AIOKafkaAdminClient

from replicator import naming
from replicator.catalog import Catalog
from replicator.config import DestinationSettings
from replicator.destinations import Destination, Fanout, NotifyingStore, coverage
from replicator.errors import StoreError
from replicator.ingest import Ingestor
from replicator.segment.writer import ActiveSegment, BlockBuilder
from replicator.storage import LocalStore, ObjectInfo, Store
from replicator.storage.mirror import mirror, plan_mirror
from replicator.storage.s3 import S3Store
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
from tests.s3_service import S3Server

TOPIC = "attendance"
TP = (TOPIC, 0)
T0 = 1_760_000_000_000  # record timestamps (ms)


class SwitchableStore:
    """A local directory that records every put and can be switched off: while ``down``,
    every call fails the way an unreachable server does."""

    def __init__(self, root: Path) -> None:
        self.inner = LocalStore(root=root)
        self.down = False
        self.puts: list[str] = []
        self.failures = 0

    @property
    def url(self) -> str:
        return self.inner.url

    def _check(self, op: str, name: str) -> None:
        if self.down:
            self.failures += 1
            raise StoreError(f"{op} {name!r} on {self.url} failed: connection refused")

    async def put_file(self, name: str, source: Path, *, create_only: bool = True) -> None:
        self._check("put", name)
        await self.inner.put_file(name, source, create_only=create_only)
        self.puts.append(name)

    async def put_bytes(self, name: str, data: bytes, *, create_only: bool = True) -> None:
        self._check("put", name)
        await self.inner.put_bytes(name, data, create_only=create_only)
        self.puts.append(name)

    async def get_bytes(self, name: str, start: int = 0, length: int | None = None) -> bytes:
        self._check("get", name)
        return await self.inner.get_bytes(name, start, length)

    async def fetch_to(self, name: str, dest: Path) -> Path:
        self._check("get", name)
        return await self.inner.fetch_to(name, dest)

    async def list(self, prefix: str = "") -> list[ObjectInfo]:
        self._check("list", prefix)
        return await self.inner.list(prefix)

    async def delete(self, name: str) -> None:
        self._check("delete", name)
        await self.inner.delete(name)

    async def sweep(self, older_than_s: float, prefix: str = "") -> int:
        return await self.inner.sweep(older_than_s, prefix)

    async def prune(self, prefix: str) -> None:
        await self.inner.prune(prefix)

    async def close(self) -> None:
        await self.inner.close()


def sealed_segment(workdir: Path, start: int, end: int, *, partition: int = 0) -> Path:
    """A real sealed segment of ``TOPIC[partition]`` holding offsets ``[start, end)``."""
    path = workdir / f"{TOPIC}-{partition}-{start}-{end}.seg"
    seg = ActiveSegment.create(path, topic=TOPIC, partition=partition, base_offset=start)
    b = BlockBuilder(start)
    for off in range(start, end):
        b.append(off, T0 + off, 0, f"k{off}".encode(),
                 orjson.dumps({"entity": TOPIC, "op": "delete", "key": f"k{off}"}),
                 [("entity", TOPIC.encode())])
    blk = b.take()
    assert blk is not None
    seg.write(blk)
    seg.sync()
    seg.seal()
    return path


def watermark(stored_end: int, watermark_ms: int, *, partition: int = 0) -> bytes:
    return orjson.dumps({"topic": TOPIC, "partition": partition, "stored_end": stored_end,
                         "durable_end": stored_end, "watermark_ms": watermark_ms,
                         "updated_ms": watermark_ms})


def seg(start: int, end: int, partition: int = 0) -> str:
    return naming.segment_name(TOPIC, partition, start, end)


WM = naming.watermark_name(TOPIC, 0)


async def same_objects(a: Store, b: Store) -> bool:
    la, lb = await a.list(), await b.list()
    if la != lb:
        return False
    return all([await a.get_bytes(o.name) == await b.get_bytes(o.name) for o in la])


# -- the fan-out, unit level --------------------------------------------------------------------


async def test_puts_through_the_primary_reach_the_destination_in_order(tmp_path: Path) -> None:
    primary = LocalStore(root=tmp_path / "primary")
    dr = SwitchableStore(tmp_path / "dr")
    d = Destination(name="dr", store=dr, required=True)
    fan = Fanout(primary=primary, destinations=[d], reconcile_interval_s=60, retry_max_s=0.2)
    store = NotifyingStore(primary, fan.stored)
    work = tmp_path / "work"
    async with fan:
        await wait_for(lambda: d.reconciled and d.up, 10, "the first reconcile")
        assert fan.acked_end(TP, 25) == -1  # the required destination holds nothing yet

        await store.put_file(seg(0, 10), sealed_segment(work, 0, 10))
        await wait_for(lambda: d.ends.get(TP) == 10, 10, "[0, 10) on the destination")
        assert fan.acked_end(TP, 25) == 10
        assert fan.acked_end(TP, 7) == 7  # never beyond what is durable locally
        assert fan.acked_end(("other", 0), 5) == -1

        await store.put_file(seg(10, 25), sealed_segment(work, 10, 25))
        await store.put_bytes(WM, watermark(25, T0 + 60_000), create_only=False)
        await wait_for(lambda: len(dr.puts) == 3 and not d.queue
                       and d.newest_ms == T0 + 60_000, 10, "segments and watermark copied")
        # segments before the watermark that claims them
        assert dr.puts == [seg(0, 10), seg(10, 25), WM]
        assert fan.acked_end(TP, 25) == 25
        assert await same_objects(primary, dr.inner)
        sizes = sum(o.size for o in await primary.list())
        [status] = fan.status()
        assert {k: v for k, v in status.items() if k not in ("rpo_s", "last_ok_ms")} == {
            "name": "dr", "url": dr.url, "required": True, "up": True,
            "backlog_objects": 0, "backlog_bytes": 0, "behind_offsets": {},
            "newest_restorable_ms": T0 + 60_000, "copied": 3, "copied_bytes": sizes,
            "errors": 0, "last_error": None}

        # an unchanged watermark put again is compared, not copied again
        await store.put_bytes(WM, watermark(25, T0 + 60_000), create_only=False)
        await wait_for(lambda: not d.queue, 10, "the queue to drain")  # popped once compared
        assert dr.puts == [seg(0, 10), seg(10, 25), WM]


async def test_only_required_destinations_cap_the_commit(tmp_path: Path) -> None:
    primary = LocalStore(root=tmp_path / "primary")
    dr = SwitchableStore(tmp_path / "dr")
    cold = SwitchableStore(tmp_path / "cold")
    cold.down = True
    d_dr = Destination(name="dr", store=dr, required=True)
    d_cold = Destination(name="cold", store=cold, required=False)
    fan = Fanout(primary=primary, destinations=[d_dr, d_cold], reconcile_interval_s=60,
                 retry_max_s=0.2)
    store = NotifyingStore(primary, fan.stored)
    work = tmp_path / "work"
    async with fan:
        # a gap on the required destination: only the contiguous part counts
        await store.put_file(seg(0, 10), sealed_segment(work, 0, 10))
        await store.put_file(seg(20, 30), sealed_segment(work, 20, 30))
        await wait_for(lambda: not d_dr.queue and d_dr.reconciled and len(dr.puts) == 2
                       and d_dr.ends.get(TP) == 10, 10, "both segments on dr")
        assert fan.acked_end(TP, 30) == 10
        await store.put_file(seg(10, 20), sealed_segment(work, 10, 20))
        await wait_for(lambda: d_dr.ends.get(TP) == 30, 10, "the gap filled on dr")
        # the optional destination is down and holds nothing: it does not hold commits back
        assert fan.acked_end(TP, 30) == 30
        assert (d_cold.up, d_cold.ends) == (False, {})
        assert cold.puts == [] and cold.failures >= 1
        assert fan.status()[1]["up"] is False


async def test_a_destination_down_at_start_catches_up_in_plan_order(tmp_path: Path) -> None:
    """Objects stored while the destination is down are queued; when it answers again the
    whole backlog (also what the primary held before the fan-out started) arrives in the
    planner's order: data oldest first, then the watermark that claims it."""
    primary = LocalStore(root=tmp_path / "primary")
    work = tmp_path / "work"
    primary.put_file_sync(seg(0, 10), sealed_segment(work, 0, 10))
    primary.put_file_sync(seg(10, 25), sealed_segment(work, 10, 25))
    primary.put_bytes_sync(WM, watermark(25, T0 + 30_000), create_only=False)
    primary.put_file_sync(seg(0, 4, 1), sealed_segment(work, 0, 4, partition=1))

    dr = SwitchableStore(tmp_path / "dr")
    dr.down = True
    d = Destination(name="dr", store=dr, required=True)
    fan = Fanout(primary=primary, destinations=[d], reconcile_interval_s=60, retry_max_s=0.2)
    store = NotifyingStore(primary, fan.stored)
    async with fan:
        await wait_for(lambda: d.errors >= 2, 10, "failed attempts")
        assert (d.up, d.reconciled) == (False, False)
        assert d.last_error is not None and "connection refused" in d.last_error
        await store.put_file(seg(25, 40), sealed_segment(work, 25, 40))
        await store.put_bytes(WM, watermark(40, T0 + 45_000), create_only=False)
        await store.put_bytes(WM, watermark(40, T0 + 46_000), create_only=False)
        # one pending copy per mutable object however often it is rewritten meanwhile
        assert list(d.queue) == [seg(25, 40), WM]
        assert d.backlog_objects == 1  # what is known before the destination answers a listing
        assert fan.acked_end(TP, 40) == -1
        assert fan.status()[0]["up"] is False

        dr.down = False
        await wait_for(lambda: d.up and d.reconciled and not d.queue
                       and d.ends.get(TP) == 40, 20, "the backlog copied")
        assert dr.puts == [seg(0, 10), seg(10, 25), seg(25, 40), seg(0, 4, 1), WM]
        assert fan.acked_end(TP, 40) == 40
        assert fan.acked_end((TOPIC, 1), 9) == 4
        assert await same_objects(primary, dr.inner)
        assert d.newest_ms is None  # partition 1 has no watermark: nothing restorable yet
        status = fan.status()[0]
        assert (status["up"], status["backlog_objects"], status["backlog_bytes"]) == (
            True, 0, 0)
        assert status["errors"] == dr.failures  # every failed call was one failed attempt
        entries, problems = await Catalog(store=dr.inner).verify()
        assert problems == []
        assert sum(e.records for e in entries) == 44


async def test_a_conflicting_object_is_left_alone_and_the_rest_copied(tmp_path: Path) -> None:
    primary = LocalStore(root=tmp_path / "primary")
    work = tmp_path / "work"
    primary.put_file_sync(seg(0, 10), sealed_segment(work, 0, 10))
    primary.put_file_sync(seg(10, 25), sealed_segment(work, 10, 25))
    dr = SwitchableStore(tmp_path / "dr")
    # another writer's (valid, shorter) segment under the same name
    theirs = sealed_segment(tmp_path / "theirs", 0, 3).read_bytes()
    dr.inner.put_bytes_sync(seg(0, 10), theirs)
    d = Destination(name="dr", store=dr)
    fan = Fanout(primary=primary, destinations=[d], reconcile_interval_s=60, retry_max_s=0.2)
    async with fan:
        await wait_for(lambda: d.up and d.reconciled and not d.queue and bool(dr.puts), 10,
                       "the copy")
        assert dr.puts == [seg(10, 25)]
        assert d.errors == 0
        assert d.ends == {TP: 3}  # what a restore from it could read: [0, 3), then a hole
        assert fan.acked_end(TP, 25) == 25  # optional: no cap
    assert dr.inner.get_bytes_sync(seg(0, 10)) == theirs


# -- end to end: real Kafka, local primary, real S3 destination stopped for a while --------------


async def committed(bootstrap: str, group: str, topic: str) -> int:
    """The sum of the consumer group's committed offsets over ``topic``'s partitions."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
        return sum(m.offset for tp, m in offsets.items() if tp.topic == topic)
    finally:
        await admin.close()


def fan_backlog(ing: Ingestor) -> int:
    assert ing.fanout is not None
    return sum(d.backlog_objects for d in ing.fanout.destinations)


async def test_destination_outage_ingest_continues_and_backlog_drains(
    kafka_bootstrap: str, own_s3: S3Server, tmp_path: Path
) -> None:
    bucket = "dr-" + uuid.uuid4().hex[:16]
    dest_url = own_s3.url(bucket)
    s3 = S3Store.from_url(dest_url)
    await s3.ensure_bucket()
    await s3.close()

    topic = unique("attendance")
    await create_topics(kafka_bootstrap, [topic], partitions=2)
    entities = {"attendance": topic, "participant": topic, "config": topic}
    data = tmp_path / "data"
    cfg = make_config(data, kafka_bootstrap, [topic], seal_age_s=1.0,
                      watermark_interval_ms=200)
    cfg = replace(cfg, destinations=(DestinationSettings(name="dr", url=dest_url),))
    n1, n2 = 1500, 2500
    primary = LocalStore(root=data / "store")

    def total(ends: dict[tuple[str, int], int]) -> int:
        return sum(end for (t, _p), end in ends.items() if t == topic)

    assert await publish_demo(kafka_bootstrap, entities, n1, seed=21) == n1
    async with Ingestor(config=cfg) as ing:
        assert ing.fanout is not None
        [d] = ing.fanout.destinations
        task = asyncio.create_task(ing.run())
        try:
            await wait_for(lambda: ing.stats.ingested == n1, 60, f"{n1} events ingested")
            await wait_for(lambda: total(d.ends) == n1 and not d.queue, 30,
                           "the first events on the S3 destination")

            await asyncio.to_thread(own_s3.stop)  # ingest keeps running meanwhile
            assert await publish_demo(kafka_bootstrap, entities, n2, seed=22) == n2
            # ingest keeps going: durable locally and sealed into the primary store
            await wait_for(lambda: ing.stats.ingested == n1 + n2, 60, "the next events")
            await wait_for(lambda: sum(p.durable for p in ing.spool.logs.values()) == n1 + n2,
                           30, "durable offsets to advance")
            deadline = time.monotonic() + 30
            while total((await coverage(primary)).ends) != n1 + n2:
                assert time.monotonic() < deadline, "primary store did not cover the events"
                await asyncio.sleep(0.2)
            # an optional destination does not hold the Kafka commits back
            deadline = time.monotonic() + 30
            while await committed(kafka_bootstrap, cfg.kafka.group_id, topic) != n1 + n2:
                assert time.monotonic() < deadline, "offsets were not committed"
                await asyncio.sleep(0.2)
            # ... while the destination is stuck where it was, its backlog counted
            assert total(d.ends) == n1
            behind = {o.name for o in await primary.list("segments/")} - d.known
            assert len(behind) >= 1 and set(d.queue) >= behind
            assert fan_backlog(ing) == len(behind)
            assert ing.stats.quarantined == 0

            await asyncio.to_thread(own_s3.restart)
            await wait_for(lambda: total(d.ends) == n1 + n2 and not d.queue
                           and fan_backlog(ing) == 0 and d.up, 60,
                           "the destination's backlog to drain")
            [status] = ing.fanout.status()
            assert (status["up"], status["backlog_objects"], status["backlog_bytes"]) == (
                True, 0, 0)
            assert status["newest_restorable_ms"] is not None
        finally:
            ing.request_stop()
            await task

    # the primary holds every event exactly once, as Kafka has them
    expected = await kafka_contents(kafka_bootstrap, [topic])
    assert assert_exactly_once(stored_records(data, [topic]), expected) == n1 + n2

    s3 = S3Store.from_url(dest_url)
    try:
        p_segs = await primary.list("segments/")
        d_segs = await s3.list("segments/")
        assert p_segs == d_segs and len(p_segs) >= 4
        plan = plan_mirror(p_segs, d_segs)
        assert (plan.copies, plan.conflicts) == ((), ())
        # read-only here: nothing is missing, so this only hashes both sides
        result = await mirror(primary, s3, verify=True, prefix="segments/")
        assert (result.copied, result.verified, result.mismatched) == (0, len(p_segs), [])
        for o in p_segs:  # and once more, independently of the mirror module
            assert hashlib.sha256(await s3.get_bytes(o.name)).digest() == hashlib.sha256(
                await primary.get_bytes(o.name)).digest(), o.name

        entries, problems = await Catalog(store=s3).verify()
        assert problems == []
        assert sum(e.records for e in entries) == n1 + n2
        p_entries, p_problems = await Catalog(store=primary).verify()
        assert p_problems == []
        assert [(e.name, e.start, e.end, e.records) for e in entries] == [
            (e.name, e.start, e.end, e.records) for e in p_entries]
        assert (await coverage(s3)).ends == (await coverage(primary)).ends
    finally:
        await s3.close()

