"""Follow mode against the running service: a real broker, ``replicator run`` with its HTTP
port, events published continuously, and a follower process SIGKILLed in a loop.

Checked after every kill: the replica never holds a change beyond the positions stored with
it (a batch and its positions commit together, so nothing can be applied twice). At the
end, a follower converges to the oracle built from what Kafka holds -- row by row, with each
row's offset the offset of that key's last change -- while the service is still running;
its lag samples show the newest changes came through the live tail.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from replicator.auth import client_token
from replicator.follow import Follower, follower_status, open_replica
from replicator.schemas import SchemaRegistry
from replicator.storage.local import LocalStore
from tests.helpers import REPO_ROOT, ServiceProcess, create_topics, kafka_contents, publish_demo
from tests.kafka_service import LocalBroker
from tests.restore_history import ENTITIES, canonical_rows, layouts, sqlite_rows

pytestmark = pytest.mark.integration

TP = tuple[str, int]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(path: Path, bootstrap: str, data_dir: Path, port: int) -> Path:
    path.write_text(f"""[kafka]
bootstrap_servers = "{bootstrap}"
group_id = "follow-live"
topics = ["attendance", "participant", "config"]
session_timeout_ms = 6000
heartbeat_interval_ms = 1000

[ingest]
data_dir = "{data_dir}"
seal_age_s = 4

[server]
port = {port}

[compaction]
enabled = false

[retention]
enabled = false
""")
    return path


def check_positions_cover_rows(db: Path) -> int:
    """Every row's offset is below its partition's stored position; returns rows seen."""
    if not db.exists():
        return 0
    with contextlib.closing(sqlite3.connect(db)) as c:
        tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "replicator_positions" not in tables:
            return 0
        pos = {(t, p): n for t, p, n in c.execute(
            "SELECT topic, partition, next_offset FROM replicator_positions")}
        n = 0
        for e in ENTITIES:
            if e not in tables:
                continue
            for key, topic, part, off in c.execute(
                    f'SELECT key, _topic, _partition, _offset FROM "{e}"'):
                n += 1
                assert off < pos[(topic, part)], (
                    f"{e}/{key} holds offset {off} of {topic}[{part}] but the replica's "
                    f"position is {pos[(topic, part)]}: applied without its position")
        return n


def oracle(contents: dict[TP, dict[int, bytes | None]]
           ) -> tuple[dict[str, dict[str, dict[str, Any]]], dict[str, dict[str, int]]]:
    state: dict[str, dict[str, dict[str, Any]]] = {e: {} for e in ENTITIES}
    last: dict[str, dict[str, int]] = {e: {} for e in ENTITIES}
    for (topic, _part), recs in sorted(contents.items()):
        for off in sorted(recs):
            v = recs[off]
            if v is None:
                continue
            ev = orjson.loads(v)
            if ev["op"] == "delete":
                state[topic].pop(ev["key"], None)
                last[topic].pop(ev["key"], None)
            else:
                state[topic][ev["key"]] = ev["data"]
                last[topic][ev["key"]] = off
    return state, last


async def test_follower_tails_live_and_survives_sigkill_loop(
        own_broker: LocalBroker, tmp_path: Path) -> None:
    bootstrap = own_broker.bootstrap
    await create_topics(bootstrap, list(ENTITIES), partitions=3)
    port = free_port()
    data_dir = tmp_path / "data"
    cfg_path = write_config(tmp_path / "replicator.toml", bootstrap, data_dir, port)
    topics = {e: e for e in ENTITIES}
    await publish_demo(bootstrap, topics, 1500, seed=3)  # something to bootstrap from

    service = ServiceProcess(cfg_path, tmp_path / "service.log")
    service.start()
    db = tmp_path / "standby.db"
    follower_log = (tmp_path / "follower.log").open("ab")
    live = f"http://127.0.0.1:{port}"
    try:
        store = LocalStore(root=data_dir / "store")
        publisher = asyncio.create_task(publish_demo(bootstrap, topics, 6000, seed=4,
                                                     batch=200))
        kills = 0
        seen = 0
        while not publisher.done() or kills < 6:
            proc = subprocess.Popen(
                [sys.executable, "-m", "replicator", "--config", str(cfg_path), "follow",
                 "--target", f"sqlite://{db}", "--live", live, "--poll-s", "0.2"],
                stdout=follower_log, stderr=follower_log, cwd=REPO_ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})
            await asyncio.sleep(1.5 + 0.4 * (kills % 3))
            proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(proc.wait, 30)
            kills += 1
            seen = max(seen, check_positions_cover_rows(db))
            if kills > 40:
                raise AssertionError("publisher did not finish")
        await publisher
        assert service.alive(), (tmp_path / "service.log").read_text()[-3000:]

        reg = SchemaRegistry.load()
        # the endpoint listed twice: two answers for one partition (as in a rebalance
        # overlap) must not apply a change twice nor move a position back
        # the service made its admin token at start; the CLI follower found it through the
        # config, this one is handed it
        token = client_token(None, data_dir, env={})
        assert token is not None
        f = Follower(store=store, replica=open_replica(f"sqlite://{db}"), registry=reg,
                     topics=ENTITIES, live=[live, live], poll_s=0.2, token=token)
        async with f:
            task = asyncio.create_task(f.run())
            try:
                # changes published while this follower runs reach it through the live tail
                await publish_demo(bootstrap, topics, 1000, seed=5, batch=100)
                contents = await kafka_contents(bootstrap, list(ENTITIES))
                ends = {tp: (max(r) + 1 if r else 0) for tp, r in contents.items()}
                for _ in range(1200):
                    if task.done():
                        task.result()
                    if all(f.positions.get(tp) is not None
                           and f.positions[tp].next_offset >= e for tp, e in ends.items()
                           if e > 0):
                        break
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError(f"follower stuck at {f.positions}; ends {ends}")
            finally:
                f.request_stop()
                await task
        assert f.stats.lag_ms, "the newest changes must come from the live tail"
        check_positions_cover_rows(db)
        st = await follower_status(LocalStore(root=data_dir / "store"),
                                   open_replica(f"sqlite://{db}", read_only=True),
                                   list(ENTITIES), [live], token=token)
        assert st["bootstrapped"] and st["lag_events"] == 0, st
        assert {(r["topic"], r["partition"]): r["durable_end"] for r in st["partitions"]} == {
            tp: e for tp, e in ends.items()}, st  # the service's durable ends, from the tail

        state, last = oracle(contents)
        lay = layouts()
        for e in ENTITIES:
            assert sqlite_rows(db, lay[e]) == canonical_rows(lay[e], state[e]), e
            with contextlib.closing(sqlite3.connect(db)) as c:
                offsets = {k: o for k, o in c.execute(f'SELECT key, _offset FROM "{e}"')}
            assert offsets == last[e], e
        assert kills >= 4 and seen > 0
    finally:
        follower_log.close()
        if service.alive():
            service.terminate()
