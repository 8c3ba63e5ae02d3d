"""The running service takes snapshots on the backup schedule (as child processes, beside
ingest), and a restore from its snapshot chain equals a replay of its segments."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from replicator.catalog import Catalog
from replicator.demo import iter_events
from replicator.publish import ChangePublisher
from replicator.restore.point import Latest
from replicator.restore.runner import execute_restore, make_plan
from replicator.schemas import SchemaRegistry
from replicator.storage.local import LocalStore
from tests.helpers import ServiceProcess, make_config, wait_for, write_config_toml
from tests.restore_history import ENTITIES, layouts, sqlite_rows
from tests.test_restore_e2e import ensure_topics

pytestmark = pytest.mark.integration


def manifests(store: Path) -> list[Path]:
    return sorted((store / "snapshots").glob("*/manifest.json"))


async def test_service_snapshots_on_schedule(kafka_bootstrap: str, tmp_path: Path) -> None:
    topics = list(ENTITIES)
    await ensure_topics(kafka_bootstrap, topics)
    events = iter_events(2000, seed=77)
    async with ChangePublisher(bootstrap_servers=kafka_bootstrap) as pub:
        await pub.publish_many([e for _, e in zip(range(1000), events, strict=False)])
    data = tmp_path / "data"
    cfg = make_config(data, kafka_bootstrap, topics, seal_age_s=1.0)
    path = write_config_toml(tmp_path / "r.toml", cfg)
    path.write_text(path.read_text().replace("[server]", "watermark_interval_ms = 200\n\n[server]")
                    + "\n[compaction]\ncheck_interval_s = 1\nincremental_s = 2\n")
    store = data / "store"
    svc = ServiceProcess(path, tmp_path / "service.log")
    svc.start()
    try:
        await wait_for(lambda: len(manifests(store)) >= 1 or not svc.alive(), 120,
                       "a first (full) snapshot")
        assert svc.alive(), (tmp_path / "service.log").read_text()[-3000:]
        # ingest goes on while the schedule compacts: publish more, wait for incrementals
        async with ChangePublisher(bootstrap_servers=kafka_bootstrap) as pub:
            await pub.publish_many(list(events))
        await wait_for(lambda: len(manifests(store)) >= 3 or not svc.alive(), 120,
                       "incremental snapshots on top of it")
    finally:
        assert svc.terminate() == 0, (tmp_path / "service.log").read_text()[-3000:]
    names = [m.parent.name for m in manifests(store)]
    # a full, then incrementals on a chain; the schedule's archive (a full on the archive
    # tier) may carry an earlier time than the full when the first full attempt found no
    # segments yet, so the order of the names is not asserted
    assert any("-full-" in n for n in names) and any("-incremental-" in n for n in names)
    log = (tmp_path / "service.log").read_text()
    assert "Traceback" not in log

    reg = SchemaRegistry.load()
    cat = Catalog(store=LocalStore(root=store), data_dir=None)
    lay = layouts()

    async def restore(use: bool, db: Path) -> dict[str, dict[str, tuple[object, ...]]]:
        plan = await make_plan(cat, reg, topics, Latest(), use_snapshots=use)
        assert bool(plan.snapshots) == use
        rep = await execute_restore(cat, reg, plan, f"sqlite://{db}")
        assert all(r.ok for r in rep.results)
        return {e: sqlite_rows(db, lay[e]) for e in ENTITIES}

    chain = await restore(True, tmp_path / "chain.db")
    plain = await restore(False, tmp_path / "plain.db")
    assert chain == plain and sum(len(v) for v in chain.values()) > 100
    await asyncio.sleep(0)
