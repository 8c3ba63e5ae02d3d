"""Where the backups stand right now: lag, durability, RPO, restorable window, snapshots,
quarantine, store health, and each objective as met / at risk / missed.

Gathering (:func:`collect_status`) reads the store, this host's spool, the broker and the
drill history; judging (:func:`assess`, :func:`verdict`) is pure. Every figure has a
source a reader can check by hand:

* **durable offset** — end of the newest durable segment of the partition (store + spool);
* **consumer lag** — broker high watermark minus the durable offset;
* **RPO now (local)** — age of the oldest event the broker holds that is not yet durable
  (0 when nothing is pending); fetched from the broker at the durable offset;
* **RPO per destination** — age of the newest point restorable from that destination;
* **RTO** — the latest drill's restore time extrapolated to the full data size.

A figure that cannot be obtained (broker unreachable, no drill yet) is ``None`` and its
objective is ``unknown``, never assumed met. Nothing here prints or returns a secret: store
URLs are shown as the stores render them (credentials are refused in store URLs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any

from replicator import naming
from replicator.config import Config

log = logging.getLogger(__name__)

TP = tuple[str, int]

#: a figure above this fraction of its objective is "at risk"
AT_RISK_FRACTION = 0.75

MET, AT_RISK, MISSED, UNKNOWN = "met", "at risk", "missed", "unknown"


def assess(value: float | None, objective: float) -> dict[str, Any]:
    """One objective: ``met`` up to 75 % of it, ``at risk`` up to 100 %, then ``missed``;
    ``unknown`` without a figure."""
    if value is None:
        state = UNKNOWN
    elif value <= objective * AT_RISK_FRACTION:
        state = MET
    elif value <= objective:
        state = AT_RISK
    else:
        state = MISSED
    return {"state": state, "value_s": None if value is None else round(value, 3),
            "objective_s": objective}


def verdict(doc: Mapping[str, Any]) -> int:
    """Exit code of ``status``: 0 every objective met and every store up; 10 something
    missed or down; 11 something at risk or unknown."""
    states = [o["state"] for o in doc["objectives"].values()]
    down = not doc["store"]["up"] or any(not d["up"] for d in doc["destinations"])
    if down or MISSED in states:
        return 10
    if AT_RISK in states or UNKNOWN in states:
        return 11
    return 0


async def destination_rows(cfg: Config) -> list[dict[str, Any]]:
    """Per destination (the primary first): what it holds, its backlog against the primary,
    offsets behind per partition, newest restorable time and the RPO it gives now. A
    destination that cannot be read is a row with ``up: false`` and the error."""
    from replicator.destinations import coverage, offsets_behind
    from replicator.storage.base import open_store
    from replicator.storage.mirror import plan_mirror

    named = [("primary", cfg.store_url, True)] + [
        (d.name, d.url, d.required) for d in cfg.destinations]
    primary = open_store(cfg.store_url)
    out: list[dict[str, Any]] = []
    try:
        try:
            p_objs = await primary.list()
            p_cov = await coverage(primary, p_objs)
        except Exception as exc:
            return [{"name": n, "url": u, "required": r, "up": False,
                     "error": f"primary store unreadable: {exc}" if n != "primary" else str(exc)}
                    for n, u, r in named]
        now = int(time.time() * 1000)
        for name, url, required in named:
            store = primary if name == "primary" else open_store(url)
            row: dict[str, Any] = {"name": name, "url": store.url, "required": required}
            try:
                objs = p_objs if store is primary else await store.list()
                cov = p_cov if store is primary else await coverage(store, objs)
                plan = plan_mirror(p_objs, objs)
                behind = offsets_behind(p_cov.ends, cov.ends)
                rpo = (None if cov.newest_ms is None
                       else round(max(0.0, (now - cov.newest_ms) / 1e3), 3))
                row.update(up=True, objects=cov.objects, bytes=cov.bytes,
                           backlog_objects=len(plan.missing),
                           backlog_bytes=plan.missing_bytes, behind_offsets=behind,
                           newest_restorable_ms=cov.newest_ms, rpo_s=rpo,
                           rpo_met=rpo is not None and rpo <= cfg.objectives.rpo_s,
                           conflicts=len(plan.conflicts))
            except Exception as exc:  # one destination down is a row, not a failure
                row.update(up=False, error=str(exc))
            finally:
                if store is not primary:
                    await store.close()
            out.append(row)
    finally:
        await primary.close()
    return out


async def broker_positions(cfg: Config, durable: Mapping[TP, int], *,
                           timeout_s: float = 5.0) -> dict[TP, dict[str, Any]]:
    """Per partition of the configured topics: high watermark, the group's committed
    offset, and what lies beyond the durable offset: ``pending`` is ``none`` (nothing, or
    only transaction markers), ``ts`` (``oldest_pending_ms`` = Kafka timestamp of the first
    committed event not yet durable), ``lost`` (Kafka's retention already removed offsets
    that were never made durable) or ``unknown`` (no answer within ``timeout_s``). Raises
    BrokerError when the broker does not answer at all."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.errors import KafkaError, OffsetOutOfRangeError

    from replicator.errors import BrokerError

    consumer = AIOKafkaConsumer(
        bootstrap_servers=cfg.kafka.bootstrap_servers, group_id=cfg.kafka.group_id,
        enable_auto_commit=False, isolation_level="read_committed",
        auto_offset_reset="none",  # a trimmed offset must be an error, never a silent jump
        client_id=f"{cfg.kafka.client_id}-status", request_timeout_ms=int(timeout_s * 1000),
        metadata_max_age_ms=int(timeout_s * 1000))
    try:
        await asyncio.wait_for(consumer.start(), timeout_s)
    except (KafkaError, TimeoutError, OSError) as exc:
        with contextlib.suppress(Exception):  # best-effort close of a failed client
            await asyncio.wait_for(consumer.stop(), 2)
        raise BrokerError(f"broker {cfg.kafka.bootstrap_servers} unreachable: "
                          f"{exc or type(exc).__name__}") from None
    try:
        # every topic's partitions in one metadata request (the client's public view only
        # covers subscribed topics)
        cluster = await asyncio.wait_for(consumer._client.fetch_all_metadata(), timeout_s)
        tps = [TopicPartition(topic, p) for topic in cfg.kafka.topics
               for p in sorted(cluster.partitions_for_topic(topic) or ())]
        if not tps:
            return {}
        ends = await asyncio.wait_for(consumer.end_offsets(tps), timeout_s)
        out: dict[TP, dict[str, Any]] = {}
        pending: list[TopicPartition] = []
        for tp in tps:
            committed = await asyncio.wait_for(consumer.committed(tp), timeout_s)
            d = durable.get((tp.topic, tp.partition), 0)
            out[(tp.topic, tp.partition)] = {"high_watermark": ends[tp], "committed": committed,
                                             "pending": "none", "oldest_pending_ms": None}
            if ends[tp] > d:
                pending.append(tp)
        if not pending:
            return out
        consumer.assign(pending)
        for tp in pending:
            consumer.seek(tp, durable.get((tp.topic, tp.partition), 0))
            out[(tp.topic, tp.partition)]["pending"] = "unknown"
        deadline = time.monotonic() + timeout_s
        missing = set(pending)
        while missing and time.monotonic() < deadline:
            try:
                got = await consumer.getmany(*missing, timeout_ms=300, max_records=1)
            except OffsetOutOfRangeError as exc:
                trimmed = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
                for tp in (set(trimmed) & missing) or set(missing):
                    out[(tp.topic, tp.partition)]["pending"] = "lost"
                    missing.discard(tp)
                continue
            for tp, msgs in got.items():
                if msgs and tp in missing:
                    row = out[(tp.topic, tp.partition)]
                    row["pending"], row["oldest_pending_ms"] = "ts", msgs[0].timestamp
                    missing.discard(tp)
            for tp in list(missing):
                if await consumer.position(tp) >= ends[tp]:
                    out[(tp.topic, tp.partition)]["pending"] = "none"  # markers only
                    missing.discard(tp)
        return out
    finally:
        await consumer.stop()


def quarantine_counts(cfg: Config) -> dict[str, int]:
    """Events in each topic's quarantine log (lines of the JSON-lines file)."""
    out: dict[str, int] = {}
    for topic in cfg.kafka.topics:
        path = naming.quarantine_path(cfg.ingest.data_dir, topic)
        n = 0
        try:
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    n += chunk.count(b"\n")
        except FileNotFoundError:
            pass
        out[topic] = n
    return out


async def collect_status(cfg: Config, *, broker: bool = True,
                         now_ms: int | None = None) -> dict[str, Any]:
    """The whole status document (see the module docstring for each figure's source)."""
    from replicator.catalog import Catalog
    from replicator.errors import BrokerError
    from replicator.ops.drill import load_history
    from replicator.restore.planner import describe_backups
    from replicator.restore.point import format_ms
    from replicator.restore.runner import load_catalog
    from replicator.retention import load_trimmed
    from replicator.schemas import SchemaRegistry
    from replicator.snapshot.tiers import Tiers
    from replicator.storage.base import open_store

    now = int(time.time() * 1000) if now_ms is None else now_ms
    store = open_store(cfg.store_url)
    doc: dict[str, Any] = {"time": format_ms(now), "store": {"url": store.url}}
    segs: list[Any] = []
    tiers: Any = None
    windows: list[dict[str, Any]] = []
    snapshots: dict[str, Any] = {}
    try:
        t0 = time.monotonic()
        try:
            cat = Catalog(store=store, data_dir=cfg.ingest.data_dir)
            segs, wms = await load_catalog(cat)
            reg = await asyncio.to_thread(SchemaRegistry.load, cfg.ingest.schemas_dir)
            topic_entities = {t: t for t in cfg.kafka.topics if t in reg.entities}
            tiers = Tiers.for_store(store, cfg.retention.archive_url)
            snaps = await tiers.list()
            rows = describe_backups(segs, wms, topic_entities=topic_entities, snapshots=snaps,
                                    trimmed=await load_trimmed(store))
            doc["store"].update(up=True, list_seconds=round(time.monotonic() - t0, 3))
            for r in rows:
                windows.append({
                    "entity": r.entity, "oldest_ms": r.window.oldest_ms,
                    "newest_ms": r.window.newest_ms,
                    "oldest": format_ms(r.window.oldest_ms) if r.window.oldest_ms else None,
                    "newest": format_ms(r.window.newest_ms) if r.window.newest_ms else None,
                    "segments": r.segments, "events": r.events, "bytes": r.bytes,
                    "holes": [{"topic": tp[0], "partition": tp[1], "from": a, "to": b}
                              for tp, a, b in r.holes]})
            for m in snaps:
                cur = snapshots.get(m.kind)
                if cur is None or m.time_ms > cur["time_ms"]:
                    snapshots[m.kind] = {"id": m.id, "time_ms": m.time_ms,
                                         "time": format_ms(m.time_ms),
                                         "age_s": round((now - m.time_ms) / 1e3, 1),
                                         "bytes": m.size, "tier": tiers.tier_of(m)}
        except Exception as exc:
            doc["store"].update(up=False, error=str(exc))
    finally:
        if tiers is not None:
            await tiers.close_archive()
        await store.close()
    durable: dict[TP, int] = {}
    wm_ms: dict[TP, int] = {}
    for s in segs:
        tp = (s.topic, s.partition)
        if s.end > durable.get(tp, -1):
            durable[tp] = s.end
        wm_ms[tp] = max(wm_ms.get(tp, -1), s.watermark_ms)
    positions: dict[TP, dict[str, Any]] = {}
    doc["broker"] = {"bootstrap_servers": cfg.kafka.bootstrap_servers, "up": None}
    if broker:
        try:
            positions = await broker_positions(cfg, durable)
            doc["broker"]["up"] = True
        except BrokerError as exc:
            doc["broker"].update(up=False, error=str(exc))
    partitions = []
    answered = int(time.time() * 1000) if now_ms is None else now_ms  # ages as of the answer
    local_rpo: float | None = 0.0 if doc["broker"]["up"] else None
    lost = False
    for tp in sorted(set(durable) | set(positions)):
        pos = positions.get(tp, {})
        hw = pos.get("high_watermark")
        d = durable.get(tp, 0)
        pending = pos.get("pending") if doc["broker"]["up"] else None
        rpo: float | None = None
        if pending == "none":
            rpo = 0.0
        elif pending == "ts":
            rpo = max(0.0, (answered - pos["oldest_pending_ms"]) / 1e3)
        lost = lost or pending == "lost"
        if local_rpo is not None:
            local_rpo = None if rpo is None else max(local_rpo, rpo)
        partitions.append({
            "topic": tp[0], "partition": tp[1], "durable_offset": d,
            "high_watermark": hw, "committed": pos.get("committed"),
            "lag": None if hw is None else max(0, hw - d),
            "pending": pending, "rpo_s": None if rpo is None else round(rpo, 3),
            "watermark_ms": wm_ms.get(tp)})
    doc["partitions"] = partitions
    doc["restorable"] = windows
    doc["snapshots"] = snapshots
    doc["quarantine"] = await asyncio.to_thread(quarantine_counts, cfg)
    doc["destinations"] = await destination_rows(cfg)
    history = await asyncio.to_thread(load_history, cfg.ingest.data_dir)
    last = history[-1] if history else None
    doc["last_drill"] = None if last is None else {
        k: last.get(k) for k in ("id", "time", "ok", "rto_s", "rto_extrapolated_s", "rpo_s",
                                 "error")}
    dest_rpos = [d.get("rpo_s") for d in doc["destinations"]]
    worst_dest = (None if not dest_rpos or any(r is None for r in dest_rpos)
                  else max(r for r in dest_rpos if r is not None))
    rto_value = (last.get("rto_extrapolated_s") if last is not None and last.get("ok")
                 else None)
    doc["objectives"] = {
        "rpo_local": assess(local_rpo, cfg.objectives.rpo_s),
        "rpo_destinations": assess(worst_dest, cfg.objectives.rpo_s),
        "rto": assess(rto_value, cfg.objectives.rto_s),
    }
    if last is not None and not last.get("ok"):
        doc["objectives"]["rto"]["state"] = MISSED  # the last drill failed
    if lost:  # offsets Kafka removed before they were made durable: that data is gone
        doc["objectives"]["rpo_local"]["state"] = MISSED
    if any(not d["up"] for d in doc["destinations"]):
        doc["objectives"]["rpo_destinations"]["state"] = MISSED  # a copy we cannot see
    doc["exit_code"] = verdict(doc)
    return doc


async def backups_document(cfg: Config) -> dict[str, Any]:
    """What ``backups list --json`` and ``GET /v1/backups`` show: per entity the restorable
    window and sizes, then every snapshot with its tier."""
    from replicator.catalog import Catalog
    from replicator.restore.planner import describe_backups
    from replicator.restore.point import format_ms
    from replicator.restore.runner import load_catalog
    from replicator.retention import load_trimmed
    from replicator.schemas import SchemaRegistry
    from replicator.snapshot.tiers import Tiers
    from replicator.storage.base import open_store

    store = open_store(cfg.store_url)
    tiers = Tiers.for_store(store, cfg.retention.archive_url)
    try:
        cat = Catalog(store=store, data_dir=cfg.ingest.data_dir)
        reg = await asyncio.to_thread(SchemaRegistry.load, cfg.ingest.schemas_dir)
        segs, wms = await load_catalog(cat)
        snaps = await tiers.list()
        rows = describe_backups(segs, wms, topic_entities={
            t: t for t in cfg.kafka.topics if t in reg.entities}, snapshots=snaps,
            trimmed=await load_trimmed(store))
        return {"store": store.url, "entities": [r.to_json() for r in rows],
                "snapshots": [{**m.to_json(), "tier": tiers.tier_of(m), "bytes": m.size,
                               "time": format_ms(m.time_ms)} for m in snaps]}
    finally:
        await tiers.close_archive()
        await store.close()
