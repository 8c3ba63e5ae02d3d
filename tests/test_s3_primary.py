"""S3 as the primary store: ingest ships sealed segments to a real S3-compatible server, the
catalog reads their summaries with ranged gets, and a restore from the bucket equals what
Kafka holds (exactly once, digest-verified)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from replicator.catalog import Catalog
from replicator.config import StoreSettings
from replicator.ingest import Ingestor
from replicator.restore.point import Latest
from replicator.restore.runner import execute_restore, make_plan
from replicator.schemas import SchemaRegistry
from replicator.storage.base import open_store
from tests.helpers import create_topics, kafka_contents, make_config, publish_demo, wait_for
from tests.kafka_service import LocalBroker
from tests.restore_history import ENTITIES, canonical_rows, layouts, sqlite_rows

pytestmark = pytest.mark.integration


async def test_ingest_into_s3_and_restore_from_it(own_broker: LocalBroker, s3_bucket: str,
                                                  tmp_path: Path) -> None:
    # the restore maps topics to entities by name: a private broker holds the entity topics
    bootstrap = own_broker.bootstrap
    topics = list(ENTITIES)
    await create_topics(bootstrap, topics, partitions=2)
    n = 3000
    assert await publish_demo(bootstrap, {e: e for e in ENTITIES}, n, seed=31) == n
    cfg = make_config(tmp_path / "data", bootstrap, topics, seal_age_s=1.0)
    cfg = replace(cfg, store=StoreSettings(url=s3_bucket))
    async with Ingestor(config=cfg) as ing:
        task = asyncio.create_task(ing.run())
        try:
            await wait_for(lambda: ing.stats.ingested + ing.stats.quarantined >= n or task.done(),
                           120, f"{n} events durable")
            await wait_for(lambda: len(ing.partition_status()) == 6 and all(
                p["watermark_ms"] > 0 for p in ing.partition_status()), 60,
                "every partition's watermark caught up")
        finally:
            ing.request_stop()
            await task
    contents = await kafka_contents(bootstrap, topics)
    store = open_store(s3_bucket)
    out = tmp_path / "restored.db"
    try:
        names = [o.name for o in await store.list("segments/")]
        assert names and all(x.startswith("segments/") and x.endswith(".seg") for x in names)
        assert not (tmp_path / "data" / "store").exists()  # nothing went to a local store
        cat = Catalog(store=store, data_dir=None)
        entries = await cat.list(include_spool=False)
        assert all(e.location == "store" and e.sealed for e in entries)
        assert sum(e.records for e in entries) == sum(len(v) for v in contents.values()) == n
        reg = SchemaRegistry.load()
        plan = await make_plan(cat, reg, topics, Latest())
        report = await execute_restore(cat, reg, plan, f"sqlite://{out}")
        assert all(r.ok for r in report.results)
    finally:
        await store.close()
    lay = layouts()
    for entity in ENTITIES:
        state: dict[str, dict[str, Any]] = {}
        for (t, _p), recs in sorted(contents.items()):
            if t != entity:
                continue
            for off in sorted(recs):
                v = recs[off]
                assert v is not None
                ev = orjson.loads(v)
                if ev["op"] == "delete":
                    state.pop(ev["key"], None)
                else:
                    state[ev["key"]] = ev["data"]
        assert sqlite_rows(out, lay[entity]) == canonical_rows(lay[entity], state), entity
