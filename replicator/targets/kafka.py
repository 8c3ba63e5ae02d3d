"""Kafka target (``kafka://host:port[,host:port]/prefix[?mode=state|events]``).

Re-publishes into topics named ``<prefix><source topic>`` (same partition count, same
partition per record), with the original key, value bytes, headers and timestamps:

* ``mode=state`` (default): one record per live key -- the change that produced its state;
* ``mode=events``: the raw event stream up to the restore point, in partition order.

Atomicity: everything, including the ``<prefix>replicator_restores`` record, is sent in
**one Kafka transaction** (idempotent, transactional producer with the id
``replicator-restore-<prefix>``, so a rerun after a crash fences and aborts the previous
attempt). ``read_committed`` consumers see all of it or nothing. Before committing, the
records are read back (``read_uncommitted``, from the offsets the topics ended at before
this restore) and the state they describe is digested; a mismatch aborts.

Topics that already hold committed records are refused: Kafka cannot replace a topic
atomically, so choose a fresh prefix (``--replace`` is not supported here).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from replicator.errors import BadRequestError, TargetError
from replicator.naming import check_topic
from replicator.redact import redact_url
from replicator.restore.digest import DigestBuilder, StateDigest
from replicator.restore.layout import CANONICAL, TableLayout, compile_row
from replicator.restore.replay import ChangeRecord
from replicator.segment.format import decode_headers
from replicator.targets.base import RestoreRecord, RowIn

RESTORES_TOPIC = "replicator_restores"
#: the read-back digest gives up (restore aborted, nothing visible) after this long
#: without a record while records remain: a consumer that stopped fetching must not hang
#: a restore forever
READ_BACK_STALL_S = 60.0
#: the broker's default ``transaction.max.timeout.ms``: the longest a restore may take
TRANSACTION_TIMEOUT_MS = 900_000


def parse_kafka_url(url: str) -> tuple[str, str, str]:
    """-> (bootstrap servers, topic prefix, mode)."""
    parts = urlsplit(url)
    bootstrap = parts.netloc
    prefix = parts.path.lstrip("/")
    mode = dict(parse_qsl(parts.query)).get("mode", "state")
    if not bootstrap:
        raise BadRequestError(f"target {redact_url(url)!r}: expected kafka://host:port/prefix")
    if not prefix:
        raise BadRequestError(
            f"target {redact_url(url)!r}: a topic prefix is required "
            "(kafka://host:port/restored-), so the restore never writes into the live topics"
        )
    if mode not in ("state", "events"):
        raise BadRequestError(f"target {redact_url(url)!r}: mode must be 'state' or 'events'")
    return bootstrap, prefix, mode


class KafkaTarget:
    def __init__(self, url: str, restore_id: str, *, connect_timeout_s: float = 15.0) -> None:
        self.bootstrap, self.prefix, self.mode = parse_kafka_url(url)
        self.location = redact_url(f"kafka://{self.bootstrap}/{self.prefix}")
        self.restore_id = restore_id
        self._timeout = connect_timeout_s
        self._producer: AIOKafkaProducer | None = None
        self._in_tx = False
        self._start: dict[TopicPartition, int] = {}
        self._pending: list[asyncio.Future[Any]] = []

    def topic_for(self, source_topic: str) -> str:
        return check_topic(self.prefix + source_topic)

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self, *, replace: bool) -> None:
        if replace:
            raise BadRequestError(
                "--replace is not supported for a kafka:// target (a topic cannot be replaced "
                "atomically); choose a fresh prefix"
            )
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=True,
            transactional_id=f"replicator-restore-{self.prefix}",
            transaction_timeout_ms=TRANSACTION_TIMEOUT_MS, max_batch_size=1 << 20,
            linger_ms=5, max_request_size=16 << 20,
        )
        try:
            await asyncio.wait_for(producer.start(), self._timeout)
        except (KafkaError, OSError, TimeoutError) as exc:
            with contextlib.suppress(Exception):
                await producer.stop()
            raise TargetError(f"cannot reach Kafka at {self.location}: "
                              f"{exc or type(exc).__name__}") from None
        self._producer = producer

    async def prepare(self, partitions: Mapping[str, int]) -> None:
        """Create ``<prefix><topic>`` (same partition counts) plus the restores topic; refuse
        topics holding committed records; remember where each partition ends; begin."""
        wanted = {self.topic_for(t): n for t, n in partitions.items()}
        wanted[self.topic_for(RESTORES_TOPIC)] = 1
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        try:
            await admin.start()
            existing = set(await admin.list_topics())
            missing = [NewTopic(t, num_partitions=n, replication_factor=1)
                       for t, n in wanted.items() if t not in existing]
            if missing:
                await admin.create_topics(missing)
        except KafkaError as exc:
            raise TargetError(f"{self.location}: cannot create topics: {exc}") from None
        finally:
            await admin.close()
        held = await self._committed_counts(wanted)
        busy = {t: n for t, n in held.items() if n}
        if busy:
            raise TargetError(
                f"{self.location}: topic(s) already hold data ("
                + ", ".join(f"{t}: {n} records" for t, n in sorted(busy.items()))
                + "); choose another prefix"
            )
        p = self._p()
        await p.begin_transaction()
        self._in_tx = True

    async def _committed_counts(self, topics: Mapping[str, int]) -> dict[str, int]:
        """Committed records per topic (aborted attempts of earlier runs do not count); also
        records each partition's current end in ``_start``."""
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                    isolation_level="read_committed")
        await consumer.start()
        try:
            tps = [TopicPartition(t, p) for t, n in topics.items() for p in range(n)]
            consumer.assign(tps)
            ends = await consumer.end_offsets(tps)
            begins = await consumer.beginning_offsets(tps)
            self._start = dict(ends)
            counts = {t: 0 for t in topics}
            todo = {tp for tp in tps if ends[tp] > begins[tp]}
            for tp in todo:
                consumer.seek(tp, begins[tp])
            deadline = time.monotonic() + 60
            while todo and time.monotonic() < deadline:
                batches = await consumer.getmany(*todo, timeout_ms=500)
                for tp, msgs in batches.items():
                    counts[tp.topic] += sum(1 for m in msgs if m.offset < ends[tp])
                done = [tp for tp in todo if await consumer.position(tp) >= ends[tp]]
                todo.difference_update(done)
            if todo:
                raise TargetError(f"{self.location}: could not read the existing topics "
                                  "to check they are empty")
            return counts
        finally:
            await _stop(consumer)

    def _p(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise TargetError(f"{self.location}: not open")
        return self._producer

    # -- writing ---------------------------------------------------------------------------

    async def _send(self, topic: str, partition: int, key: bytes | None, value: bytes,
                    headers: list[tuple[str, bytes | None]], ts_ms: int) -> None:
        fut = await self._p().send(topic, value=value, key=key, partition=partition,
                                   timestamp_ms=ts_ms, headers=headers)
        self._pending.append(fut)
        if len(self._pending) >= 5000:
            await self._drain()

    async def _drain(self) -> None:
        pending, self._pending = self._pending, []
        try:
            await asyncio.gather(*pending)
        except KafkaError as exc:
            raise TargetError(f"{self.location}: publishing failed: {exc}") from None

    async def write(self, layout: TableLayout, rows: Iterable[RowIn]) -> int:
        """``mode=state``: one record per live key (its original record)."""
        n = 0
        for live, _event in rows:
            await self._send(self.topic_for(live.topic), live.partition,
                             live.kafka_key if live.kafka_key is not None else live.key.encode(),
                             live.value, decode_headers(live.headers_raw), live.ts_ms)
            n += 1
        await self._drain()
        return n

    async def write_events(self, records: AsyncIterator[ChangeRecord] | Iterable[ChangeRecord]
                           ) -> int:
        """``mode=events``: every change up to the point, in partition order."""
        n = 0
        if isinstance(records, AsyncIterator):
            async for r in records:
                await self._send(self.topic_for(r.topic), r.partition, r.key, r.value,
                                 list(r.headers), r.ts_ms)
                n += 1
        else:
            for r in records:
                await self._send(self.topic_for(r.topic), r.partition, r.key, r.value,
                                 list(r.headers), r.ts_ms)
                n += 1
        await self._drain()
        return n

    async def read_digest(self, layout: TableLayout) -> StateDigest:
        """Read back this restore's records (not yet committed) for one entity and digest
        the state they describe: last change per key in partition order, deletes remove."""
        await self._p().flush()
        topic_prefix = self.topic_for(layout.entity)
        tps = [tp for tp in self._start if tp.topic == topic_prefix]
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                    isolation_level="read_uncommitted")
        await consumer.start()
        state: dict[str, dict[str, Any] | None] = {}
        try:
            consumer.assign(tps)
            ends = await consumer.end_offsets(tps)
            for tp in tps:
                consumer.seek(tp, self._start[tp])
                last = time.monotonic()
                while await consumer.position(tp) < ends[tp]:
                    batch = await consumer.getmany(tp, timeout_ms=1000)
                    if batch.get(tp):
                        last = time.monotonic()
                    elif time.monotonic() - last > READ_BACK_STALL_S:
                        raise TargetError(
                            f"{self.location}: reading {tp.topic}[{tp.partition}] back "
                            f"stalled at offset {await consumer.position(tp)} of {ends[tp]} "
                            f"for {READ_BACK_STALL_S:.0f}s; nothing was committed, rerun")
                    for msg in batch.get(tp, []):
                        if msg.offset >= ends[tp]:
                            break
                        ev = orjson.loads(msg.value)
                        state[ev["key"]] = ev.get("data") if ev.get("op") != "delete" else None
        finally:
            await _stop(consumer)
        canon = compile_row(layout.data_columns, CANONICAL, source="mapping")
        d = DigestBuilder(layout.entity)
        for key, data in state.items():
            if data is not None:
                d.add(key, canon(data))
        return d.result()

    async def record(self, rec: RestoreRecord) -> None:
        await self._send(self.topic_for(RESTORES_TOPIC), 0, rec.restore_id.encode(),
                         orjson.dumps(dataclasses.asdict(rec)), [], int(time.time() * 1000))
        await self._drain()

    async def commit(self) -> None:
        p = self._p()
        try:
            await p.commit_transaction()
        except KafkaError as exc:
            await self.abort()
            raise TargetError(f"{self.location}: commit failed: {exc}") from None
        self._in_tx = False
        await p.stop()
        self._producer = None
        await self._wait_visible()

    async def _wait_visible(self, timeout_s: float = 30.0) -> None:
        """The commit returns before the broker has written the commit markers; wait until
        ``read_committed`` consumers see everything (last stable offset == high watermark)
        so that "restored" means visible."""
        tps = list(self._start)
        committed = AIOKafkaConsumer(bootstrap_servers=self.bootstrap,
                                     isolation_level="read_committed")
        raw = AIOKafkaConsumer(bootstrap_servers=self.bootstrap,
                               isolation_level="read_uncommitted")
        await committed.start()
        await raw.start()
        try:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if await committed.end_offsets(tps) == await raw.end_offsets(tps):
                    return
                await asyncio.sleep(0.05)
            raise TargetError(f"{self.location}: committed, but the records did not become "
                              f"visible to read_committed consumers within {timeout_s:.0f}s")
        finally:
            await _stop(committed)
            await _stop(raw)

    async def abort(self) -> None:
        p, self._producer = self._producer, None
        if p is None:
            return
        try:
            if self._in_tx:
                await p.abort_transaction()
        except (KafkaError, OSError):
            pass
        finally:
            self._in_tx = False
            with contextlib.suppress(Exception):
                await p.stop()


async def _stop(consumer: AIOKafkaConsumer) -> None:
    """``consumer.stop()``, tolerating aiokafka's cancelled-before-start internal task (a
    short-lived consumer without a group raises ``CancelledError`` from ``stop``); a real
    cancellation of the caller still propagates."""
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
