"""Ingest: consume the change topics and make every event durable exactly once.

Loop: ``getmany`` -> per record: size check, ``orjson.loads``, schema validation -> valid
records are framed with their *original bytes* into the partition's block builder,
invalid ones go to the quarantine log with their reason -> the spool's group commit
fsyncs -> the durable offsets are committed to Kafka.

Invariants:
- Kafka offsets are committed only up to ``PartitionLog.durable`` (fsync'd).
- Where each partition resumes comes from the store and spool, never from Kafka's
  committed offset. If Kafka no longer has the resume offset (retention), coverage starts
  at Kafka's log start and the hole is logged: data Kafka deleted before we saw it.
- Revoked partitions are flushed, sealed and shipped before the rebalance completes.
- ``isolation_level=read_committed``: records of aborted transactions are never seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaError, RecordTooLargeError

from replicator import crypto
from replicator.config import Config
from replicator.destinations import Fanout, NotifyingStore, build_fanout
from replicator.errors import BrokerError, ConfigError, ReplicatorError
from replicator.fastcheck import FastAccept
from replicator.gcdefer import young_gc_deferred
from replicator.metrics import Metrics
from replicator.schemas import SchemaRegistry
from replicator.spool import Spool, SpoolSettings
from replicator.storage.base import Store, open_store

log = logging.getLogger(__name__)

#: Young-generation GC threshold while ingest runs: at least this, and 10x max_poll_records.
GC_YOUNG_THRESHOLD = 50_000


@dataclass(slots=True)
class IngestStats:
    """Counters for progress displays (the Prometheus metrics carry the same facts)."""

    ingested: int = 0
    quarantined: int = 0
    started: float = field(default_factory=time.monotonic)
    sealed: int = 0


class EventValidator:
    """Decides, per raw Kafka value, whether it is a valid change event (hot path).

    Valid events are accepted by :class:`FastAccept` (one msgspec decode and one short
    post-decode check); anything it does not accept takes the precise path (orjson +
    :meth:`SchemaRegistry.validate`), which either accepts it or names the reason.
    """

    def __init__(self, *, registry: SchemaRegistry, max_event_bytes: int) -> None:
        self.registry = registry
        self.max_event_bytes = max_event_bytes
        #: ``FastAccept.entity_of``: the entity if the raw bytes are certainly a valid event
        #: (ingest calls it inline for the common case, then :meth:`check` for the rest)
        self.fast = FastAccept(registry).entity_of

    def check(self, topic_entity: str | None, value: bytes | None) -> str | None:
        """``None`` if valid, else a short reason naming what is wrong."""
        if value is None:
            return "null value (tombstone) is not a change event"
        if len(value) > self.max_event_bytes:
            return f"oversized: {len(value)} bytes > limit {self.max_event_bytes}"
        entity = self.fast(value)
        if entity is not None and (topic_entity is None or entity == topic_entity):
            return None
        try:
            event = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            return f"malformed JSON: {exc}"
        reason: str | None = self.registry.validate(event)
        if reason is None and topic_entity is not None and event["entity"] != topic_entity:
            reason = f"entity {event['entity']!r} does not belong on this topic ({topic_entity!r})"
        return reason


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, ingestor: Ingestor) -> None:
        self.ingestor = ingestor

    # aiokafka only logs what a listener raises and carries on: a partition whose log could
    # not be opened would then stay assigned to us and be skipped silently, forever. Record
    # the failure instead; ``run`` raises it.

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        try:
            await self.ingestor._on_revoked(revoked)
        except Exception as exc:
            self.ingestor._rebalance_failed("revoke", exc)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        try:
            await self.ingestor._on_assigned(assigned)
        except Exception as exc:
            self.ingestor._rebalance_failed("assign", exc)


class Ingestor:
    """The ingest service. ``async with Ingestor(config=...) as ing: await ing.run()``."""

    def __init__(
        self,
        *,
        config: Config,
        store: Store | None = None,
        metrics: Metrics | None = None,
        registry: SchemaRegistry | None = None,
        on_progress: Callable[[Ingestor], None] | None = None,
    ) -> None:
        self.config = config
        if config.encryption.enabled and crypto.sealing() is None:
            # the CLI installs the keyring when it loads the config; an embedding program
            # (or a test) that did not must not silently write plaintext
            crypto.configure(config)
        self.metrics = metrics or Metrics()
        self.store = store or open_store(config.store_url)
        self.primary = self.store
        #: copies to the further destinations; None when only the primary is configured
        self.fanout: Fanout | None = None
        if config.destinations:
            self.fanout = build_fanout(config.destinations, primary=self.primary,
                                       metrics=self.metrics)
            self.store = NotifyingStore(self.primary, self.fanout.stored)
        self.registry = registry or SchemaRegistry.load(config.ingest.schemas_dir)
        self.validator = EventValidator(
            registry=self.registry, max_event_bytes=config.ingest.max_event_bytes
        )
        i = config.ingest
        self.spool = Spool(
            settings=SpoolSettings(
                data_dir=i.data_dir,
                flush_interval_s=i.flush_interval_ms / 1000,
                commit_spacing_s=i.commit_spacing_ms / 1000,
                seal_bytes=i.seal_bytes,
                seal_age_s=i.seal_age_s,
                block_bytes=i.block_bytes,
                watermark_interval_s=i.watermark_interval_ms / 1000,
                max_pending_bytes=i.max_pending_bytes,
            ),
            store=self.store,
            metrics=self.metrics,
        )
        self.stats = IngestStats()
        self.on_progress = on_progress
        self._consumer: AIOKafkaConsumer | None = None
        self._stop = asyncio.Event()
        self._topic_entity = {
            t: (t if t in self.registry.entities else None) for t in config.kafka.topics
        }
        self._last_commit = 0.0
        self._committed: dict[TopicPartition, int] = {}
        self._wm_candidates: dict[tuple[str, int], tuple[int, int]] = {}
        self._failure: BaseException | None = None
        #: ``/readyz``: a member of the group with its assignment in hand (possibly empty: a
        #: standby when there are more instances than partitions). False before the first
        #: assignment, from a revocation until the next assignment, and after stop.
        self.ready = False

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Ingestor:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Connect to the broker (clear error if unreachable) and check the topics exist."""
        k = self.config.kafka
        self.config.ingest.data_dir.mkdir(parents=True, exist_ok=True)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=k.bootstrap_servers,
            group_id=k.group_id,
            client_id=k.client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            session_timeout_ms=k.session_timeout_ms,
            heartbeat_interval_ms=k.heartbeat_interval_ms,
            max_partition_fetch_bytes=16 * 1024 * 1024,
            fetch_max_bytes=64 * 1024 * 1024,
            fetch_min_bytes=k.fetch_min_bytes,
            fetch_max_wait_ms=k.fetch_max_wait_ms,
            request_timeout_ms=max(40000, k.session_timeout_ms + 5000),
        )
        try:
            await asyncio.wait_for(consumer.start(), timeout=k.connect_timeout_s)
        except (KafkaConnectionError, TimeoutError, OSError) as exc:
            with contextlib.suppress(Exception):
                await consumer.stop()
            raise BrokerError(
                f"cannot reach Kafka at kafka.bootstrap_servers={k.bootstrap_servers!r}: "
                f"{exc or type(exc).__name__}"
            ) from None
        try:
            existing = await consumer.topics()
        except KafkaError as exc:
            await consumer.stop()
            raise BrokerError(f"cannot list topics: {exc}") from None
        missing = [t for t in k.topics if t not in existing]
        if missing:
            await consumer.stop()
            raise ConfigError(
                "kafka.topics",
                f"topic(s) {', '.join(missing)} do not exist on {k.bootstrap_servers} "
                "(create them, or fix the list)",
            )
        self._consumer = consumer
        swept = await self.store.sweep(older_than_s=600)
        if swept:
            log.info("removed %d temp files of interrupted store writes", swept)
        await self.spool.start()
        if self.fanout is not None:
            await self.fanout.start()
        consumer.subscribe(topics=list(k.topics), listener=_Rebalance(self))
        log.info("ingest started", extra={"topics": k.topics, "group": k.group_id})

    def request_stop(self) -> None:
        self._stop.set()

    async def stop(self) -> None:
        """Seal and ship everything, commit durable offsets, leave the group."""
        self._stop.set()
        consumer = self._consumer
        self._consumer = None
        self.ready = False
        try:
            await self.spool.stop()
        finally:
            if self.fanout is not None:
                with contextlib.suppress(Exception):
                    await self.fanout.stop(drain_s=10.0)
            if consumer is not None:
                with contextlib.suppress(Exception):
                    await self._commit(consumer, force=True, logs=None)
                with contextlib.suppress(Exception):
                    await consumer.stop()
            with contextlib.suppress(Exception):
                await self.primary.close()

    # -- rebalance -------------------------------------------------------------------------

    async def _on_revoked(self, revoked: list[TopicPartition]) -> None:
        tps = [(tp.topic, tp.partition) for tp in revoked]
        log.info("partitions revoked", extra={"partitions": tps})
        self.ready = False  # a rebalance is under way: until the next assignment
        await self.spool.flush()
        consumer = self._consumer
        if consumer is not None:
            with contextlib.suppress(KafkaError):
                await self._commit(consumer, force=True, logs=None)
        await self.spool.release(tps)

    @property
    def healthy(self) -> bool:
        """``/healthz``: neither local durability nor a rebalance has failed."""
        return self.spool.failure is None and self._failure is None

    @property
    def serving(self) -> bool:
        """``/readyz``: :attr:`ready` (assignment in hand) and :attr:`healthy`."""
        return self.ready and self.healthy

    def owns(self, topic: str, partition: int) -> bool:
        """Is ``topic[partition]`` assigned to this instance right now?"""
        consumer = self._consumer
        return consumer is not None and TopicPartition(topic, partition) in consumer.assignment()

    async def _on_assigned(self, assigned: list[TopicPartition]) -> None:
        consumer = self._consumer
        if consumer is None:
            return  # stopping: stop() cleared the consumer while a rebalance completed
        log.info("partitions assigned", extra={"partitions": [tuple(tp) for tp in assigned]})
        if not assigned:
            self.ready = True  # a standby member: nothing to resume
            return
        starts = await consumer.beginning_offsets(assigned)
        for tp in assigned:
            plog = await self.spool.open_partition(tp.topic, tp.partition)
            resume = plog.store_end
            log_start = starts[tp]
            if resume is None:
                resume = log_start
            elif resume < log_start:
                log.error(
                    "Kafka deleted offsets before they were backed up",
                    extra={
                        "topic": tp.topic,
                        "partition": tp.partition,
                        "stored_end": resume,
                        "kafka_log_start": log_start,
                    },
                )
                resume = log_start
            plog.start_at(resume)
            consumer.seek(tp, resume)
            self._committed.pop(tp, None)
            self._wm_candidates.pop((tp.topic, tp.partition), None)
        self.ready = True
        removed = await self.spool.prune_foreign_leftovers()
        if removed:
            log.info("pruned %d spool leftovers of partitions owned elsewhere", removed)

    def _rebalance_failed(self, what: str, exc: BaseException) -> None:
        # our own errors carry their context in the message; anything else is a bug
        trace = None if isinstance(exc, ReplicatorError) else exc
        log.error("partition %s failed; ingest stops: %s", what, exc, exc_info=trace)
        if self._failure is None:
            self._failure = exc

    # -- the loop --------------------------------------------------------------------------

    async def run(self) -> None:
        """Consume until :meth:`request_stop`; raises on unrecoverable errors."""
        young = max(GC_YOUNG_THRESHOLD, 10 * self.config.kafka.max_poll_records)
        with young_gc_deferred(young):
            await self._run()

    async def _run(self) -> None:
        consumer = self._consumer
        if consumer is None:
            raise RuntimeError("Ingestor.start() was not called")
        # offset commits and watermark observations are broker round trips (tens of ms on a
        # busy machine): in their own task they never hold up getmany (ack -> fetched)
        side = asyncio.create_task(self._side_loop(consumer), name="ingest-side")
        try:
            await self._fetch_loop(consumer, side)
        finally:
            side.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await side

    async def _fetch_loop(self, consumer: AIOKafkaConsumer, side: asyncio.Task[None]) -> None:
        spool = self.spool
        max_records = self.config.kafka.max_poll_records
        max_pending = self.config.ingest.max_pending_bytes
        while not self._stop.is_set():
            spool.check()
            if self._failure is not None:
                raise self._failure
            if side.done():
                side.result()  # raises what ended it
            try:
                batches = await consumer.getmany(timeout_ms=50, max_records=max_records)
            except RecordTooLargeError as exc:
                log.error("record larger than the fetch size skipped by the client: %s", exc)
                continue
            except KafkaError as exc:
                log.warning("fetch failed, retrying: %s", exc)
                await asyncio.sleep(0.5)
                continue
            if batches:
                for tp, msgs in batches.items():
                    self._process(tp, msgs)
                spool.wake()  # adaptive group commit: commit now unless one is in flight
            if spool.pending_bytes >= max_pending:
                await spool.flush()
            if self.on_progress is not None:
                self.on_progress(self)
            # getmany returns without suspending while prefetched records remain, so without
            # this the fetcher's next request, the group commit and heartbeats would all
            # wait until the prefetched data is drained (no overlap with processing).
            await asyncio.sleep(0)

    async def _side_loop(self, consumer: AIOKafkaConsumer) -> None:
        """Periodic broker round trips beside the fetch loop: watermark candidates (every
        half watermark interval) and offset commits of durable records."""
        commit_every = self.config.ingest.commit_interval_ms / 1000
        watermark_every = self.config.ingest.watermark_interval_ms / 2000
        tick = min(commit_every, watermark_every, 0.05)
        last_wm = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now - last_wm >= watermark_every:
                last_wm = now
                await self._observe_caught_up(consumer)
            if time.monotonic() - self._last_commit >= commit_every:
                await self._commit(consumer, force=False, logs=None)
            await asyncio.sleep(tick)

    def _process(self, tp: TopicPartition, msgs: list[Any]) -> None:
        plog = self.spool.logs.get(tp)
        if plog is None or plog.builder is None:
            return  # revoked while the fetch was in flight
        builder = plog.builder
        validator = self.validator
        fast = validator.fast
        max_bytes = validator.max_event_bytes
        entity = self._topic_entity.get(tp.topic)
        position = builder.position
        # valid records are collected and framed in runs (one BlockBuilder.extend call per
        # run); a run ends at an invalid record, which is quarantined in offset order
        run: list[Any] = []
        keep = run.append
        good = 0
        for m in msgs:
            off = m.offset
            if off < position:
                continue  # already covered (a re-fetch after seek); never store twice
            position = off + 1
            value = m.value
            # inline fast accept, the common case; check() decides the rest and names why
            if (
                value is not None
                and len(value) <= max_bytes
                and (accepted := fast(value)) is not None
                and (entity is None or accepted == entity)
            ):
                keep(m)
                continue
            reason = validator.check(entity, value)
            if reason is None:
                keep(m)
                continue
            if run:
                builder.extend(run)
                good += len(run)
                run.clear()
            builder.skip_to(off + 1)
            self._quarantine(tp, m, reason)
        if run:
            builder.extend(run)
            good += len(run)
        if good:
            self.stats.ingested += good
            self.metrics.events_ingested.labels(tp.topic).inc(good)

    def _quarantine(self, tp: TopicPartition, m: Any, reason: str) -> None:
        self.spool.quarantine_for(tp.topic).add(
            partition=tp.partition,
            offset=m.offset,
            timestamp=m.timestamp,
            reason=reason,
            key=m.key,
            value=m.value,
            headers=list(m.headers),
        )
        self.stats.quarantined += 1
        kind = reason.split(":", 1)[0].split(" (", 1)[0][:40]
        self.metrics.events_quarantined.labels(tp.topic, kind).inc()
        log.info(
            "event quarantined",
            extra={
                "topic": tp.topic,
                "partition": tp.partition,
                "offset": m.offset,
                "reason": reason,
            },
        )

    async def _observe_caught_up(self, consumer: AIOKafkaConsumer) -> None:
        """Advance watermarks: a partition is complete up to time T once it consumed Kafka's
        end offset (the last stable offset, with read_committed) as it was at T.

        A candidate ``(T, end)`` is taken with a fresh ListOffsets request; it is satisfied
        once the consumer's position reaches ``end``, and only then is the next one taken, so
        a busy partition's watermark trails by its consumer lag, never runs ahead of it.
        Records whose producer timestamp is older than their append time by more than the
        distance between two candidates can land behind a watermark (CreateTime semantics).
        """
        logs = self.spool.logs
        candidates = self._wm_candidates
        for tp, (t_ms, end) in list(candidates.items()):
            plog = logs.get(tp)
            if plog is None or plog.builder is None:
                del candidates[tp]
                continue
            builder = plog.builder
            if builder.position < end:
                tpk = TopicPartition(*tp)
                try:
                    pos = await consumer.position(tpk)
                except (KafkaError, AssertionError, ValueError):
                    continue
                if pos < end or plog.builder is not builder:
                    continue
                builder.skip_to(end)  # transaction markers / aborted records at the tail
            plog.caught_up_ms = max(plog.caught_up_ms, t_ms)
            del candidates[tp]
        wanted = [TopicPartition(*tp) for tp in logs if tp not in candidates]
        if not wanted:
            return
        t_ms = int(time.time() * 1000)
        try:
            ends = await consumer.end_offsets(wanted)
        except (KafkaError, AssertionError, ValueError) as exc:
            log.debug("end offsets unavailable: %s", exc)
            return
        for tpk, end in ends.items():
            tp = (tpk.topic, tpk.partition)
            plog = logs.get(tp)
            if plog is None:
                continue
            candidates[tp] = (t_ms, end)
            self.metrics.consumer_lag.labels(tpk.topic, str(tpk.partition)).set(
                max(0, end - plog.durable)
            )

    async def _commit(
        self, consumer: AIOKafkaConsumer, *, force: bool, logs: list[TopicPartition] | None
    ) -> None:
        """Commit durable offsets to the consumer group: never beyond fsync'd records, nor
        beyond what a *required* further destination holds."""
        self._last_commit = time.monotonic()
        offsets: dict[TopicPartition, int] = {}
        for tp, plog in self.spool.logs.items():
            end = plog.durable
            if self.fanout is not None:
                end = self.fanout.acked_end(tp, end)
            if end < 0:
                continue
            tpk = TopicPartition(*tp)
            if self._committed.get(tpk) != end:
                offsets[tpk] = end
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
            self._committed.update(offsets)
        except KafkaError as exc:
            # Not the source of truth for resuming: a failed commit only delays lag metrics.
            log.warning("offset commit failed: %s", exc)
            if force:
                raise

    def tail(self, topic: str, partition: int, start: int
             ) -> tuple[int, list[tuple[int, bytes]], int | None] | None:
        """Live followers: (durable end, durable blocks holding offsets ``>= start``, oldest
        buffered offset) of a partition this instance owns; None if it does not own it."""
        plog = self.spool.logs.get((topic, partition))
        if plog is None:
            return None
        blocks, oldest = plog.tail(start)
        return plog.durable, blocks, oldest

    # -- status for progress displays -------------------------------------------------------

    def partition_status(self) -> list[dict[str, Any]]:
        out = []
        for (topic, partition), plog in sorted(self.spool.logs.items()):
            out.append(
                {
                    "topic": topic,
                    "partition": partition,
                    "durable": plog.durable,
                    "position": plog.builder.position if plog.builder else None,
                    "sealed": plog.sealed_segments,
                    "watermark_ms": plog.durable_watermark_ms,
                }
            )
        return out
