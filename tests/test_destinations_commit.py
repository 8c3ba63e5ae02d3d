"""The Kafka commit rule with a *required* S3 destination: offsets are committed only up to
what that destination holds. With the S3 server down, ingest goes on (durable offsets and
the primary advance) but nothing is committed beyond the destination; once it is back, the
backlog drains, and the commits catch up to the durable offsets."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from replicator.config import DestinationSettings
from replicator.ingest import Ingestor
from replicator.storage.s3 import S3Store
from tests.helpers import create_topics, make_config, publish_demo, unique, wait_for
from tests.s3_service import S3Server

pytestmark = pytest.mark.integration


async def committed(bootstrap: str, group: str, tps: list[TopicPartition]) -> dict[TopicPartition,
                                                                                    int]:
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await c.start()
    try:
        return {tp: (await c.committed(tp)) or 0 for tp in tps}
    finally:
        await c.stop()


async def test_commits_wait_for_a_required_destination(kafka_bootstrap: str, own_s3: S3Server,
                                                       tmp_path: Path) -> None:
    names = {e: unique(e) for e in ("attendance", "participant", "config")}
    await create_topics(kafka_bootstrap, list(names.values()), partitions=2)
    bucket = unique("dr").lower().replace("_", "-")[:40]
    dest = S3Store.from_url(own_s3.url(bucket))
    await dest.ensure_bucket()
    await dest.close()
    group = unique("grp")
    cfg = make_config(tmp_path / "data", kafka_bootstrap, list(names.values()), group=group,
                      seal_age_s=1.0, commit_interval_ms=200)
    cfg = replace(cfg, destinations=(
        DestinationSettings(name="dr", url=own_s3.url(bucket), required=True),))
    tps = [TopicPartition(t, p) for t in names.values() for p in range(2)]

    own_s3.stop()  # the required destination is down from the start
    assert await publish_demo(kafka_bootstrap, names, 3000, seed=21) == 3000
    async with Ingestor(config=cfg) as ing:
        assert ing.fanout is not None
        ing.fanout.reconcile_interval_s = 1.0
        ing.fanout.retry_max_s = 1.0
        task = asyncio.create_task(ing.run())
        try:
            await wait_for(lambda: ing.stats.ingested >= 3000, 120, "3000 events durable")
            primary = Path(tmp_path / "data" / "store")
            await wait_for(lambda: len(list(primary.rglob("*.seg"))) >= 6, 60,
                           "segments sealed into the primary")
            await asyncio.sleep(2.5)  # several commit rounds while the destination is down
            durable = {TopicPartition(*tp): p.durable for tp, p in ing.spool.logs.items()}
            assert sum(durable.values()) >= 3000
            down = await committed(kafka_bootstrap, group, tps)
            assert all(v == 0 for v in down.values()), f"committed beyond the destination: {down}"
            st = {d["name"]: d for d in ing.fanout.status()}["dr"]
            assert st["up"] is False and st["last_ok_ms"] is None

            own_s3.restart()
            await wait_for(lambda: {d["name"]: d for d in ing.fanout.status()}["dr"]["up"]
                           and not ing.fanout.destinations[0].queue, 60, "backlog drained")
            ends = ing.fanout.destinations[0].ends
            await wait_for(lambda: all(ends.get((tp.topic, tp.partition), -1) >= durable[tp]
                                       for tp in tps if durable[tp] > 0), 60,
                           "destination holds every durable offset")
            await asyncio.sleep(1.0)
            up = await committed(kafka_bootstrap, group, tps)
            for tp in tps:
                assert up[tp] <= ends.get((tp.topic, tp.partition), 0)
            assert sum(up.values()) >= 3000, up
        finally:
            ing.request_stop()
            await task
