"""Restore into Kafka (``kafka://bootstrap/prefix``): state and events modes against the
oracle, original keys/headers/timestamps/partitions, transactional visibility, refusals."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from replicator.errors import BadRequestError, TargetError
from replicator.restore.point import AtTime, Latest
from replicator.targets.kafka import _stop
from tests.restore_history import ENTITIES, History, Oracle, build_history
from tests.test_restore_synthetic import restore


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> History:
    return build_history(tmp_path_factory.mktemp("khist"), events=1500, seed=21)


async def _consume(bootstrap: str, topic: str, partitions: int = 3,
                   expect: int | None = None) -> list[Any]:
    """Every committed record of ``topic``: each partition read to its last stable offset
    (``end_offsets`` under read_committed), one partition at a time, as the target's own
    read-back does.

    CI saw a fresh consumer that polled all partitions at once, without asking for end
    offsets first, get nothing for 60 s after a NotLeaderForPartition answer, though the
    data was committed and visible. Asking for the end offsets first makes the client look
    the leaders up. A fresh consumer's end offsets were also seen to answer 0 for a while
    (next to a NotLeaderForPartition on the restores topic). So when ``expect`` says how
    many records there must be, a short round (a stall of 15 s, or end offsets short of
    them) is retried with a new consumer, a second apart, for up to 90 s."""
    out: list[Any] = []
    deadline = asyncio.get_running_loop().time() + 90
    while True:
        out = await _consume_round(bootstrap, topic, partitions)
        if expect is None or len(out) >= expect:
            return out
        if asyncio.get_running_loop().time() > deadline:
            return out
        await asyncio.sleep(1)


async def _consume_round(bootstrap: str, topic: str, partitions: int) -> list[Any]:
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                         isolation_level="read_committed", auto_offset_reset="earliest")
    await c.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        c.assign(tps)
        ends = await c.end_offsets(tps)
        out: list[Any] = []
        loop = asyncio.get_running_loop()
        for tp in tps:
            c.seek(tp, 0)
            last = loop.time()
            while await c.position(tp) < ends[tp]:
                msgs = (await c.getmany(tp, timeout_ms=500)).get(tp, [])
                if msgs:
                    last = loop.time()
                elif loop.time() - last > 15:
                    return out  # stalled: the caller retries with a new consumer
                out.extend(m for m in msgs if m.offset < ends[tp])
        return out
    finally:
        await _stop(c)


def test_state_mode_matches_oracle(history: History, kafka_bootstrap: str) -> None:
    prefix = f"rst-{uuid.uuid4().hex[:6]}-"
    rep = restore(history, Latest(), f"kafka://{kafka_bootstrap}/{prefix}")
    assert all(r.ok for r in rep.results)
    oracle = Oracle(history)
    by_offset = {(e.topic, e.partition, e.offset): e for e in history.events}
    for entity in ENTITIES:
        msgs = asyncio.run(_consume(kafka_bootstrap, prefix + entity,
                                    expect=len(oracle.state(entity))))
        assert len(msgs) == len(oracle.state(entity))
        state = {}
        for m in msgs:
            src = by_offset[(entity, m.partition, next(
                e.offset for e in history.events
                if e.topic == entity and e.value == m.value))]
            assert m.key == src.key.encode()
            assert m.timestamp == src.ts_ms
            assert dict(m.headers) == {"entity": entity.encode()}
            assert m.partition == src.partition
            ev = orjson.loads(m.value)
            state[ev["key"]] = ev["data"]
        assert state == oracle.state(entity)
    recs = asyncio.run(_consume(kafka_bootstrap, prefix + "replicator_restores", 1, expect=1))
    assert [orjson.loads(m.value)["restore_id"] for m in recs] == [rep.restore_id]


def test_events_mode_up_to_t(history: History, kafka_bootstrap: str) -> None:
    prefix = f"rse-{uuid.uuid4().hex[:6]}-"
    t = sorted(e.ts_ms for e in history.events)[len(history.events) // 2]
    rep = restore(history, AtTime(t), f"kafka://{kafka_bootstrap}/{prefix}?mode=events")
    assert all(r.ok for r in rep.results)
    for entity in ENTITIES:
        want = [e for e in history.events if e.topic == entity and e.ts_ms <= t]
        msgs = asyncio.run(_consume(kafka_bootstrap, prefix + entity, expect=len(want)))
        got = sorted((m.partition, m.timestamp, m.value) for m in msgs)
        assert got == sorted((e.partition, e.ts_ms, e.value) for e in want)


def test_prefix_holding_data_is_refused(history: History, kafka_bootstrap: str,
                                        tmp_path: Path) -> None:
    prefix = f"rsr-{uuid.uuid4().hex[:6]}-"
    restore(history, Latest(), f"kafka://{kafka_bootstrap}/{prefix}", entities=["config"])
    with pytest.raises(TargetError, match="already hold data"):
        restore(history, Latest(), f"kafka://{kafka_bootstrap}/{prefix}", entities=["config"])
    with pytest.raises(BadRequestError, match="prefix is required"):
        restore(history, Latest(), f"kafka://{kafka_bootstrap}/")
    with pytest.raises(BadRequestError, match="not supported"):
        restore(history, Latest(), f"kafka://{kafka_bootstrap}/{prefix}x", replace=True)
