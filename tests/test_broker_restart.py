"""The broker goes away mid-stream and comes back: ingest resumes, nothing lost or doubled."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from replicator.demo import iter_events
from replicator.errors import BrokerError
from replicator.ingest import Ingestor
from replicator.publish import ChangePublisher
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
from tests.kafka_service import LocalBroker

pytestmark = pytest.mark.integration

log = logging.getLogger(__name__)


class Publisher:
    """Publishes demo events in small batches until stopped; keeps only what was acked.

    ``reconnect``: after a failed batch, replace the ChangePublisher by a new one (a new
    idempotent producer id). Needed because aiokafka's idempotent producer becomes
    permanently unusable (OutOfOrderSequenceNumber on every send) when batches expired
    while the broker was away, and ChangePublisher keeps that dead producer (reported).
    """

    def __init__(self, bootstrap: str, topic: str, seed: int, *, reconnect: bool = True,
                 batch: int = 50, pause: float = 0.05) -> None:
        self.bootstrap = bootstrap
        self.batch = batch
        self.pause = pause
        self.topics = {"attendance": topic, "participant": topic, "config": topic}
        self.seed = seed
        self.reconnect = reconnect
        self.acked: dict[tuple[str, int], dict[int, bytes]] = defaultdict(dict)
        self.failures: list[str] = []
        self.ack_times: list[float] = []
        self.stop = asyncio.Event()

    @property
    def n_acked(self) -> int:
        return sum(len(v) for v in self.acked.values())

    def acked_since(self, t0: float) -> int:
        return sum(t > t0 for t in self.ack_times)

    def _new(self) -> ChangePublisher:
        return ChangePublisher(bootstrap_servers=self.bootstrap, topic_for_entity=self.topics,
                               producer_options={"request_timeout_ms": 5000,
                                                 "retry_backoff_ms": 200})

    async def run(self) -> None:
        events = iter_events(10**9, seed=self.seed)
        pub: ChangePublisher | None = None
        try:
            while not self.stop.is_set():
                try:
                    if pub is None:
                        pub = self._new()
                        await pub.start()
                    batch = [e for _, e in zip(range(self.batch), events, strict=False)]
                    values = [pub.prepare(e)[1] for e in batch]  # ts is set: bytes are stable
                    mds = await pub.publish_many(batch)
                except BrokerError as exc:
                    self.failures.append(str(exc))
                    log.info("publish failed while the broker is away: %s", exc)
                    if self.reconnect and pub is not None:
                        with contextlib.suppress(Exception):
                            await asyncio.wait_for(pub.stop(), 30)
                        pub = None
                    await asyncio.sleep(0.5)
                    continue
                now = time.monotonic()
                for md, value in zip(mds, values, strict=True):
                    self.acked[(md.topic, md.partition)][md.offset] = value
                    self.ack_times.append(now)
                await asyncio.sleep(self.pause)
        finally:
            if pub is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pub.stop(), 30)


def _durable_reaches(ing: Ingestor, ends: dict[tuple[str, int], int]) -> bool:
    logs = ing.spool.logs
    return all(tp in logs and logs[tp].durable >= end for tp, end in ends.items())


async def _end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[tuple[str, int], int]:
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await c.start()
    try:
        ends = await c.end_offsets([TopicPartition(topic, p) for p in range(partitions)])
        return {(tp.topic, tp.partition): off for tp, off in ends.items()}
    finally:
        await c.stop()


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_ingest_resumes_after_broker_restart(own_broker: LocalBroker, tmp_path: Path,
                                                   how: str) -> None:
    bootstrap = own_broker.bootstrap
    topic = unique("attendance")
    await create_topics(bootstrap, [topic], partitions=3)
    before = await publish_demo(bootstrap, {"attendance": topic, "participant": topic,
                                            "config": topic}, 1500, seed=41)
    assert before == 1500
    data = tmp_path / "data"
    cfg = make_config(data, bootstrap, [topic], seal_bytes=256 * 1024, seal_age_s=5)
    publisher = Publisher(bootstrap, topic, seed=42)
    async with Ingestor(config=cfg) as ing:
        run = asyncio.create_task(ing.run(), name="ingest")
        pub_task = asyncio.create_task(publisher.run(), name="publisher")
        try:
            await wait_for(lambda: ing.stats.ingested >= before + 500 or run.done(), 90,
                           "ingest under way")
            assert not run.done(), run
            # -- the broker goes away mid-stream -------------------------------------------------
            acked_before_stop = publisher.n_acked
            ingested_before_stop = ing.stats.ingested
            # "stop": SIGTERM, controlled shutdown; "kill": SIGKILL, a broker crash
            await asyncio.to_thread(own_broker.stop if how == "stop" else own_broker.kill)
            assert not await asyncio.to_thread(own_broker.is_running)
            stopped_at = time.monotonic()
            await asyncio.sleep(5)
            assert not run.done(), "ingest died while the broker was away"
            await asyncio.to_thread(own_broker.start)
            restarted_at = time.monotonic()
            # -- keep publishing; ingest must pick up again ---------------------------------------
            await wait_for(lambda: publisher.acked_since(restarted_at) >= 1000
                           or pub_task.done(), 120, "publishing resumed after the restart")
            assert not pub_task.done(), pub_task
            publisher.stop.set()
            await pub_task
            assert acked_before_stop > 0 and publisher.n_acked > acked_before_stop
            acked_ends = {tp: max(offs) + 1 for tp, offs in publisher.acked.items()}
            assert set(acked_ends) == {(topic, p) for p in range(3)}
            ends = await _end_offsets(bootstrap, topic, 3)  # acked or not: all Kafka holds
            assert all(ends[tp] >= e for tp, e in acked_ends.items())
            deadline = time.monotonic() + 120
            while not _durable_reaches(ing, ends):
                assert not run.done(), run
                assert time.monotonic() < deadline, (
                    f"ingest did not resume: durable "
                    f"{ {tp: p.durable for tp, p in ing.spool.logs.items()} }, want {ends}")
                await asyncio.sleep(0.2)
            assert ing.stats.ingested > ingested_before_stop
        finally:
            publisher.stop.set()
            ing.request_stop()
            await asyncio.gather(run, pub_task, return_exceptions=True)
        assert run.exception() is None
    log.info("broker away %.1fs; %d publish failures", restarted_at - stopped_at,
             len(publisher.failures))

    # -- exactly once: everything Kafka holds (acked or not) is stored once ----------------------
    in_kafka = await kafka_contents(bootstrap, [topic])
    stored = stored_records(data, [topic])
    total = assert_exactly_once(stored, in_kafka)
    assert total == sum(len(v) for v in in_kafka.values())
    assert total >= before + publisher.n_acked
    # and every acked event is among them, with its exact bytes
    by_tp = {tp: {r.offset: r.value for r in recs} for tp, recs in stored.items()}
    for tp, offs in publisher.acked.items():
        for off, value in offs.items():
            assert by_tp[tp].get(off) == value, f"acked {tp}@{off} not stored intact"
    assert not list((data / "spool").rglob("*.active"))

