"""Several destinations: every sealed segment and snapshot leaves for each of them.

The spool ships to the *primary* store (``[store] url``); this module copies what the
primary holds to every further destination (``[[destinations]]``), each through its own
queue and worker, so a slow or unreachable destination never delays local durability, the
primary, or another destination.

Per destination the worker
- takes names the spool just stored (:meth:`Fanout.stored`, in the order they were stored:
  segments before the watermark that covers them) and copies them (create-only);
- reconciles on start, after an error, right after the compactor wrote a snapshot
  (:meth:`Fanout.reconcile_soon`) and every ``reconcile_interval_s`` with the pure
  :func:`plan_mirror` of both listings: a destination that was down catches up on its whole
  backlog, and snapshots written by the compactor child process arrive too;
- keeps what the restore planner would say about that destination: the contiguous stored
  end per partition (for the Kafka commit rule) and the newest restorable time (its RPO).

Invariants:
- Copies are create-only; nothing is ever deleted from a destination here.
- A destination's acknowledged end only counts contiguous segments from the lowest one it
  holds, exactly as a restore from it would read them.
- Errors back off exponentially (capped) and never end the worker.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from replicator import naming
from replicator.catalog import Catalog, SegmentEntry, remote_entry
from replicator.errors import (
    ObjectExistsError,
    ObjectNotFoundError,
    SegmentError,
)
from replicator.metrics import Metrics
from replicator.restore.planner import WatermarkInfo, segment_chains, window_of
from replicator.storage.base import ObjectInfo, Store
from replicator.storage.mirror import copy_object, is_mutable, plan_mirror

log = logging.getLogger(__name__)

TP = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Coverage:
    """What a store holds, as a restore would see it."""

    #: per partition, the end of the contiguous segment chain (offset, exclusive)
    ends: dict[TP, int]
    #: newest point every partition is restorable at (ms), None when nothing is
    newest_ms: int | None
    objects: int
    bytes: int


async def coverage(store: Store, objs: list[ObjectInfo] | None = None) -> Coverage:
    """Read a store's coverage: segment summaries (cached ranged reads; ``objs`` is the
    store's listing when the caller has it) and watermark objects."""
    if objs is None:
        objs = await store.list()
    segs: list[SegmentEntry] = []
    for o in objs:
        if naming.is_segment_name(o.name):
            try:
                segs.append(await remote_entry(store, o))
            except SegmentError as exc:
                # left out of the chain (the coverage ends before it); `verify` names it
                log.error("unreadable segment left out of the coverage",
                          extra={"store": store.url, "segment": o.name, "error": str(exc)})
    # unreadable watermark objects are left out (the catalog's reader; `verify` names them)
    wms = [WatermarkInfo(d["topic"], d["partition"], d["stored_end"], d["watermark_ms"])
           for d in await Catalog(store=store).watermarks()]
    topics = {s.topic for s in segs} | {w.topic for w in wms}
    chains = segment_chains(segs, wms, topics)
    window = window_of(chains.values())
    return Coverage(ends={tp: c.end for tp, c in chains.items()}, newest_ms=window.newest_ms,
                    objects=len(objs), bytes=sum(o.size for o in objs))


def offsets_behind(primary: dict[TP, int], ends: dict[TP, int]) -> dict[str, int]:
    """Per partition (``topic[partition]``) how many offsets ``ends`` lacks of ``primary``."""
    return {f"{t}[{p}]": end - ends.get((t, p), 0) for (t, p), end in primary.items()
            if end > ends.get((t, p), 0)}


@dataclass(eq=False)
class Destination:
    """One further destination and its live state."""

    name: str
    store: Store
    required: bool = False
    queue: collections.deque[str] = field(default_factory=collections.deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    #: immutable names known to be on the destination
    known: set[str] = field(default_factory=set)
    ends: dict[TP, int] = field(default_factory=dict)
    newest_ms: int | None = None
    backlog_objects: int = 0
    backlog_bytes: int = 0
    copied: int = 0
    copied_bytes: int = 0
    errors: int = 0
    last_error: str | None = None
    last_ok_ms: int | None = None
    reconciled: bool = False
    swept: bool = False
    up: bool = False

    def status(self, now_ms: int, primary: Coverage | None) -> dict[str, Any]:
        behind = offsets_behind(primary.ends, self.ends) if primary is not None else {}
        return {
            "name": self.name, "url": self.store.url, "required": self.required,
            "up": self.up, "backlog_objects": self.backlog_objects,
            "backlog_bytes": self.backlog_bytes, "behind_offsets": behind,
            "newest_restorable_ms": self.newest_ms,
            "rpo_s": None if self.newest_ms is None else max(0.0, (now_ms - self.newest_ms) / 1e3),
            "copied": self.copied, "copied_bytes": self.copied_bytes, "errors": self.errors,
            "last_error": self.last_error, "last_ok_ms": self.last_ok_ms,
        }


class Fanout:
    """Copies everything the primary store receives to each further destination."""

    def __init__(
        self, *, primary: Store, destinations: list[Destination],
        metrics: Metrics | None = None, reconcile_interval_s: float = 30.0,
        retry_max_s: float = 30.0,
    ) -> None:
        self.primary = primary
        self.destinations = destinations
        self.metrics = metrics
        self.reconcile_interval_s = reconcile_interval_s
        self.retry_max_s = retry_max_s
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._scratch = tempfile.TemporaryDirectory(prefix="replicator-fanout-")
        self.primary_coverage: Coverage | None = None

    async def start(self) -> None:
        for d in self.destinations:
            d.wake = asyncio.Event()
            self._tasks.append(asyncio.create_task(self._worker(d), name=f"fanout-{d.name}"))

    async def stop(self, *, drain_s: float = 10.0) -> None:
        """Give queued copies up to ``drain_s`` to finish, then stop the workers."""
        deadline = time.monotonic() + drain_s
        while any(d.queue and d.up for d in self.destinations) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        for d in self.destinations:
            with contextlib.suppress(Exception):
                await d.store.close()
        self._scratch.cleanup()

    async def __aenter__(self) -> Fanout:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- what the spool and ingest call ------------------------------------------------------

    def stored(self, name: str) -> None:
        """The primary store now holds ``name``: queue it for every destination."""
        mutable = is_mutable(name)
        for d in self.destinations:
            if name in d.known or (not mutable and name in d.queue):
                continue  # on the destination, or queued by a reconcile meanwhile
            if mutable:
                # one pending copy per mutable object, behind everything stored before its
                # latest put (index 0 may be the copy in flight: left alone)
                with contextlib.suppress(ValueError):
                    del d.queue[d.queue.index(name, 1)]
            d.queue.append(name)
            d.backlog_objects += 0 if mutable else 1
            d.wake.set()

    def reconcile_soon(self) -> None:
        """Something wrote to the primary behind the spool's back (a snapshot from the
        compactor process): every destination reconciles now instead of at its next
        interval."""
        for d in self.destinations:
            d.reconciled = False
            d.wake.set()

    def acked_end(self, tp: TP, durable: int) -> int:
        """How far the Kafka commit may go for ``tp``: ``durable`` capped by what every
        *required* destination holds contiguously."""
        end = durable
        for d in self.destinations:
            if d.required:
                end = min(end, d.ends.get(tp, -1))
        return end

    def status(self) -> list[dict[str, Any]]:
        now = int(time.time() * 1000)
        return [d.status(now, self.primary_coverage) for d in self.destinations]

    # -- the worker ------------------------------------------------------------------------

    async def _reconcile(self, d: Destination) -> None:
        if not d.swept:
            n = await d.store.sweep(older_than_s=600)  # interrupted uploads of a past run
            d.swept = True
            if n:
                log.info("removed leftovers of interrupted puts",
                         extra={"destination": d.name, "count": n})
        src = await self.primary.list()
        dst = await d.store.list()
        plan = plan_mirror(src, dst)
        d.known = {o.name for o in dst if not is_mutable(o.name)}
        # the whole queue in the planner's order (names stored before this reconcile may be
        # queued already, ahead of an older backlog), then what was stored after the listing,
        # mutable objects last: data arrives before what claims it
        planned = [c.name for c in plan.copies]
        in_plan = set(planned)
        later = [n for n in dict.fromkeys(d.queue) if n not in in_plan]
        later_data = [n for n in later if not is_mutable(n) and n not in d.known]
        d.queue = collections.deque(
            [n for n in planned if not is_mutable(n)] + later_data
            + [n for n in planned if is_mutable(n)] + [n for n in later if is_mutable(n)])
        d.backlog_objects = len(plan.missing) + len(later_data)
        d.backlog_bytes = plan.missing_bytes
        for name, a, b in plan.conflicts:
            log.error("object differs between primary and destination; not overwritten",
                      extra={"destination": d.name, "object": name, "primary_size": a,
                             "destination_size": b})
        cov = await coverage(d.store, dst)
        d.ends, d.newest_ms = dict(cov.ends), cov.newest_ms
        self.primary_coverage = await coverage(self.primary, src)
        d.reconciled = True

    def _advance(self, d: Destination, name: str, size: int) -> None:
        if is_mutable(name):
            return
        d.known.add(name)
        d.backlog_objects = max(0, d.backlog_objects - 1)
        d.backlog_bytes = max(0, d.backlog_bytes - size)
        if naming.is_segment_name(name):
            s = naming.parse_segment_name(name)
            tp = (s.topic, s.partition)
            if tp not in d.ends or d.ends[tp] == s.start:
                d.ends[tp] = s.end

    async def _refresh_newest(self, d: Destination) -> None:
        cov = await coverage(d.store)
        d.ends, d.newest_ms = dict(cov.ends), cov.newest_ms

    async def _worker(self, d: Destination) -> None:
        delay = 0.5
        last_reconcile = 0.0
        scratch = Path(self._scratch.name)
        while not self._stopping:
            try:
                stale = time.monotonic() - last_reconcile > self.reconcile_interval_s
                if not d.reconciled or stale:
                    await self._reconcile(d)
                    last_reconcile = time.monotonic()
                d.wake.clear()  # before draining: a name stored from now on wakes us again
                copied_any = False
                while d.queue:
                    name = d.queue[0]
                    if name in d.known:
                        d.queue.popleft()
                        continue
                    try:
                        n = await copy_object(self.primary, d.store, name,
                                              mutable=is_mutable(name), scratch=scratch)
                    except ObjectNotFoundError:
                        d.queue.popleft()  # gone from the primary (retention): nothing to copy
                        continue
                    d.queue.popleft()
                    self._advance(d, name, n)
                    d.copied += 1 if n else 0
                    d.copied_bytes += n
                    copied_any = True
                if copied_any:
                    await self._refresh_newest(d)
                d.up, d.last_ok_ms, delay = True, int(time.time() * 1000), 0.5
                self._export(d)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(d.wake.wait(), timeout=self.reconcile_interval_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # whatever failed, the worker lives on and retries
                d.up, d.errors, d.last_error = False, d.errors + 1, str(exc)
                d.reconciled = False  # catch up from listings once it answers again
                if self.metrics is not None:
                    self.metrics.destination_errors.labels(d.name).inc()
                self._export(d)
                log.warning("destination unavailable; will retry",
                            extra={"destination": d.name, "error": str(exc), "retry_s": delay})
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)

    def _export(self, d: Destination) -> None:
        if self.metrics is None:
            return
        self.metrics.destination_backlog.labels(d.name).set(d.backlog_objects)
        self.metrics.destination_up.labels(d.name).set(1 if d.up else 0)
        if d.newest_ms is not None:
            self.metrics.destination_rpo.labels(d.name).set(
                max(0.0, time.time() - d.newest_ms / 1e3))


class NotifyingStore:
    """The primary store, telling the fan-out about every completed put (a Store)."""

    def __init__(self, inner: Store, on_stored: Any) -> None:
        self.inner = inner
        self._on_stored = on_stored

    @property
    def url(self) -> str:
        return self.inner.url

    async def put_file(self, name: str, source: Path, *, create_only: bool = True) -> None:
        try:
            await self.inner.put_file(name, source, create_only=create_only)
        except ObjectExistsError:
            self._on_stored(name)  # stored before a crash: the destinations may lack it
            raise
        self._on_stored(name)

    async def put_bytes(self, name: str, data: bytes, *, create_only: bool = True) -> None:
        await self.inner.put_bytes(name, data, create_only=create_only)
        self._on_stored(name)

    async def get_bytes(self, name: str, start: int = 0, length: int | None = None) -> bytes:
        return await self.inner.get_bytes(name, start, length)

    async def fetch_to(self, name: str, dest: Path) -> Path:
        return await self.inner.fetch_to(name, dest)

    async def list(self, prefix: str = "") -> list[ObjectInfo]:
        return await self.inner.list(prefix)

    async def delete(self, name: str) -> None:
        await self.inner.delete(name)

    async def sweep(self, older_than_s: float, prefix: str = "") -> int:
        return await self.inner.sweep(older_than_s, prefix)

    async def prune(self, prefix: str) -> None:
        await self.inner.prune(prefix)

    async def close(self) -> None:
        await self.inner.close()


def build_fanout(destinations: Any, *, primary: Store, metrics: Metrics | None,
                 reconcile_interval_s: float = 30.0) -> Fanout:
    """A fan-out over ``[[destinations]]`` settings (see :class:`config.DestinationSettings`)."""
    from replicator.storage.base import open_store

    return Fanout(
        primary=primary,
        destinations=[Destination(name=d.name, store=open_store(d.url), required=d.required)
                      for d in destinations],
        metrics=metrics, reconcile_interval_s=reconcile_interval_s,
    )
