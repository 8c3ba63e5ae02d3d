"""A small SDK for services that publish change events.

:class:`ChangePublisher` builds the envelope of ``schemas/envelope.json``, validates it with
the same :class:`~replicator.schemas.SchemaRegistry` the replicator uses at ingest (so an
invalid event is refused at the source, never sent), serialises it with orjson and sends it
with an idempotent producer (``acks='all'``, ``enable_idempotence=True``), keyed by the
record key so every change of one record lands in one partition, in order.

Example::

    async with ChangePublisher(bootstrap_servers="127.0.0.1:9092") as pub:
        await pub.publish("participant", "upsert", "p-000001", data={...})
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Final, Literal

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.structs import RecordMetadata

from replicator.errors import BrokerError, ConfigError, ReplicatorError, ValidationError
from replicator.schemas import SchemaRegistry

__all__ = [
    "DEFAULT_MAX_REQUEST_SIZE",
    "ChangeEvent",
    "ChangePublisher",
    "Op",
    "RecordMetadata",
    "format_ts",
    "now_ts",
]

log = logging.getLogger(__name__)

Op = Literal["upsert", "delete"]

Headers = Sequence[tuple[str, bytes]]

DEFAULT_MAX_REQUEST_SIZE: Final[int] = 16 * 1024 * 1024
"""Client-side size limit of one message. Deliberately above Kafka's 1 MiB broker default:
the broker's ``message.max.bytes`` is the limit that matters, and :meth:`publish_raw` must be
able to send oversized messages for tests of the replicator's own size limit."""

_FIXED_PRODUCER_OPTIONS: Final = frozenset(
    {"bootstrap_servers", "client_id", "acks", "enable_idempotence", "transactional_id"}
)


def format_ts(moment: datetime) -> str:
    """RFC 3339 in UTC with millisecond precision and a ``Z`` suffix.

    ``moment`` must be timezone-aware (a naive datetime has no defined commit time and raises
    :class:`~replicator.errors.ValidationError`).
    """
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValidationError(f"bad ts {moment.isoformat()!r}: naive datetime (no UTC offset)")
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def now_ts() -> str:
    """The current time as :func:`format_ts` renders it."""
    return format_ts(datetime.now(UTC))


@dataclass(frozen=True, kw_only=True)
class ChangeEvent:
    """One change of one record, before it is wrapped in an envelope.

    ``data`` is the full row image for an upsert and ``None`` for a delete. ``ts`` is the
    RFC 3339 source commit time; ``None`` means "now" at publish time. ``version`` is the
    optional per-key monotonic version. The dataclass is frozen but ``data`` is the caller's
    mapping, not a copy: do not mutate it after building the event. ``data`` is left out of
    the hash.
    """

    entity: str
    op: Op
    key: str
    data: Mapping[str, Any] | None = field(default=None, hash=False)
    ts: str | None = None
    version: int | None = None

    def envelope(self, *, schema_version: int, ts: str | None = None) -> dict[str, Any]:
        """The envelope dict for this event (``ts`` overrides a ``None`` :attr:`ts`).

        Field order is fixed (entity, op, key, ts, version, schema_version, data); ``version``
        is omitted when ``None`` and ``data`` when ``None``.
        """
        env: dict[str, Any] = {
            "entity": self.entity,
            "op": self.op,
            "key": self.key,
            "ts": self.ts if self.ts is not None else (ts if ts is not None else now_ts()),
        }
        if self.version is not None:
            env["version"] = self.version
        env["schema_version"] = schema_version
        if self.data is not None:
            env["data"] = self.data if isinstance(self.data, dict) else dict(self.data)
        return env


@dataclass(frozen=True, slots=True)
class _Prepared:
    topic: str
    value: bytes
    key: bytes
    headers: list[tuple[str, bytes]]


class ChangePublisher:
    """Validating, idempotent publisher of change events.

    Invariants:

    * Nothing reaches Kafka from :meth:`publish` / :meth:`publish_many` unless
      :meth:`SchemaRegistry.validate` accepted it; a rejected event raises
      :class:`~replicator.errors.ValidationError` carrying the reason, and
      :meth:`publish_many` validates the whole batch before sending any of it.
    * Messages are keyed by the UTF-8 record key and carry the headers ``entity`` and
      ``schema_version``; sends are acknowledged by all in-sync replicas (``acks='all'``) and
      idempotent, so a retried send is not duplicated and per-key order is kept.
    * With ``transactional_id`` set, every send must happen inside :meth:`transaction`.

    Broker failures (unreachable at :meth:`start`, send errors) raise
    :class:`~replicator.errors.BrokerError` with the original aiokafka error as ``__cause__``.
    """

    def __init__(
        self,
        *,
        bootstrap_servers: str | Sequence[str],
        topic_for_entity: Mapping[str, str] | None = None,
        client_id: str = "replicator-publisher",
        registry: SchemaRegistry | None = None,
        transactional_id: str | None = None,
        producer_options: Mapping[str, Any] | None = None,
    ) -> None:
        """Configure the publisher; nothing connects until :meth:`start`.

        ``topic_for_entity`` overrides topic names per entity (default: the topic is named
        after the entity: ``attendance``, ``participant``, ``config``). ``registry`` defaults
        to :meth:`SchemaRegistry.load` of the repository's ``schemas/``.
        ``producer_options`` are passed to :class:`aiokafka.AIOKafkaProducer` (e.g.
        ``linger_ms``, ``max_request_size`` (default :data:`DEFAULT_MAX_REQUEST_SIZE`),
        ``compression_type``); the delivery guarantees (acks, idempotence, transactional id)
        cannot be overridden there.
        """
        self._registry = registry if registry is not None else SchemaRegistry.load()
        topics = {entity: entity for entity in self._registry.entities}
        for entity, topic in (topic_for_entity or {}).items():
            if entity not in topics:
                raise ConfigError(
                    "topic_for_entity",
                    f"unknown entity {entity!r} (known: {', '.join(self._registry.entities)})",
                )
            if not topic:
                raise ConfigError("topic_for_entity", f"empty topic name for {entity!r}")
            topics[entity] = topic
        options: dict[str, Any] = {"max_request_size": DEFAULT_MAX_REQUEST_SIZE}
        options.update(producer_options or {})
        fixed = _FIXED_PRODUCER_OPTIONS.intersection(options)
        if fixed:
            raise ConfigError(
                "producer_options", f"cannot override {', '.join(sorted(fixed))} here"
            )
        self._topics: dict[str, str] = topics
        self._bootstrap = bootstrap_servers
        self._client_id = client_id
        self._transactional_id = transactional_id
        self._options = options
        self._producer: AIOKafkaProducer | None = None
        self._headers: dict[str, list[tuple[str, bytes]]] = {
            entity: [
                ("entity", entity.encode()),
                ("schema_version", str(self._registry.schema_version(entity)).encode()),
            ]
            for entity in self._registry.entities
        }

    @property
    def registry(self) -> SchemaRegistry:
        """The registry events are validated against."""
        return self._registry

    @property
    def topics(self) -> Mapping[str, str]:
        """Topic per entity."""
        return dict(self._topics)

    async def start(self) -> None:
        """Connect to the cluster. Idempotent. Raises BrokerError if it is unreachable."""
        if self._producer is not None:
            return
        producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            client_id=self._client_id,
            acks="all",
            enable_idempotence=True,
            transactional_id=self._transactional_id,
            **self._options,
        )
        try:
            await producer.start()
        except KafkaError as exc:
            await producer.stop()
            raise BrokerError(
                f"cannot connect to Kafka at {self._bootstrap_text()}: {exc}"
            ) from exc
        self._producer = producer
        log.debug(
            "change publisher started",
            extra={"bootstrap_servers": self._bootstrap_text(), "client_id": self._client_id},
        )

    async def stop(self) -> None:
        """Flush pending sends and disconnect. Idempotent."""
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    async def __aenter__(self) -> ChangePublisher:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """Kafka transaction: commits on normal exit, aborts if the block raises.

        Only available with ``transactional_id``; every send of a transactional publisher
        must happen inside this block.
        """
        if self._transactional_id is None:
            raise ConfigError("transactional_id", "transactions need a transactional_id")
        producer = self._require_started()
        async with producer.transaction():
            yield

    def prepare(self, event: ChangeEvent) -> tuple[str, bytes]:
        """Build, validate and serialise ``event``: its topic and envelope bytes.

        Raises ValidationError with the registry's reason; sends nothing.
        """
        p = self._prepare(event)
        return p.topic, p.value

    async def publish(
        self,
        entity: str,
        op: Op,
        key: str,
        data: Mapping[str, Any] | None = None,
        ts: str | datetime | None = None,
        version: int | None = None,
    ) -> RecordMetadata:
        """Validate, send and await the acknowledgement of one change event.

        ``ts`` defaults to now (UTC, milliseconds); a datetime must be timezone-aware.
        Raises ValidationError (nothing sent) or BrokerError.
        """
        if isinstance(ts, datetime):
            ts = format_ts(ts)
        prepared = self._prepare(
            ChangeEvent(entity=entity, op=op, key=key, data=data, ts=ts, version=version)
        )
        producer = self._require_started()
        try:
            fut = await producer.send(
                prepared.topic, prepared.value, key=prepared.key, headers=prepared.headers
            )
            metadata: RecordMetadata = await fut
        except KafkaError as exc:
            raise BrokerError(
                f"publishing {entity} {key!r} to topic {prepared.topic!r} failed: {exc}"
            ) from exc
        return metadata

    async def publish_many(self, events: Iterable[ChangeEvent]) -> list[RecordMetadata]:
        """Validate all ``events``, then send them pipelined and await every acknowledgement.

        All events are validated first: one invalid event raises ValidationError (with its
        position) and nothing is sent. Sends are enqueued in iteration order (so per-key order
        holds) without waiting for each ack; the acks are awaited together. Returns the
        metadata in input order. If any send fails, every send is still awaited and the first
        failure is raised as BrokerError.
        """
        batch_ts = now_ts()
        prepared: list[_Prepared] = []
        for index, event in enumerate(events):
            try:
                prepared.append(self._prepare(event, batch_ts))
            except ValidationError as exc:
                raise ValidationError(f"event {index} ({event.key!r}): {exc.reason}") from exc
        producer = self._require_started()
        futures: list[asyncio.Future[RecordMetadata]] = []
        try:
            for p in prepared:
                futures.append(await producer.send(p.topic, p.value, key=p.key, headers=p.headers))
        except KafkaError as exc:
            await asyncio.gather(*futures, return_exceptions=True)
            raise BrokerError(
                f"publishing a batch of {len(prepared)} events failed: {exc}"
            ) from exc
        results = await asyncio.gather(*futures, return_exceptions=True)
        out: list[RecordMetadata] = []
        for p, result in zip(prepared, results, strict=True):
            if isinstance(result, BaseException):
                raise BrokerError(
                    f"publishing to topic {p.topic!r} (key {p.key.decode()!r}) failed: {result}"
                ) from result
            out.append(result)
        return out

    async def publish_raw(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None,
        headers: Headers | None = None,
        *,
        partition: int | None = None,
        timestamp_ms: int | None = None,
    ) -> RecordMetadata:
        """Send bytes as they are, with no envelope and no validation; await the ack.

        For tests and tools that need malformed or hand-made messages (``value=None`` is a
        tombstone). Raises BrokerError on failure.
        """
        producer = self._require_started()
        try:
            fut = await producer.send(
                topic,
                value,
                key=key,
                partition=partition,
                timestamp_ms=timestamp_ms,
                headers=list(headers) if headers is not None else None,
            )
            metadata: RecordMetadata = await fut
        except KafkaError as exc:
            raise BrokerError(f"publishing raw message to topic {topic!r} failed: {exc}") from exc
        return metadata

    async def flush(self) -> None:
        """Wait until every pending send is delivered."""
        await self._require_started().flush()

    def _prepare(self, event: ChangeEvent, default_ts: str | None = None) -> _Prepared:
        entity = event.entity
        # An unknown entity has no schema_version; the registry reports it precisely.
        schema_version = self._registry.schema_versions.get(entity, 1)
        envelope = event.envelope(schema_version=schema_version, ts=default_ts)
        reason = self._registry.validate(envelope)
        if reason is not None:
            raise ValidationError(reason)
        try:
            value = orjson.dumps(envelope)
            key = event.key.encode()
        except (orjson.JSONEncodeError, UnicodeEncodeError) as exc:
            raise ValidationError(f"not serialisable as JSON: {exc}") from exc
        return _Prepared(
            topic=self._topics[entity], value=value, key=key, headers=self._headers[entity]
        )

    def _require_started(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise ReplicatorError("ChangePublisher is not started (use start() or async with)")
        return self._producer

    def _bootstrap_text(self) -> str:
        if isinstance(self._bootstrap, str):
            return self._bootstrap
        return ",".join(self._bootstrap)
