"""Spool shipping without a broker: sealing, adoption of sealed files, idempotent queueing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from replicator.metrics import Metrics
from replicator.spool import Spool, SpoolSettings
from replicator.storage import LocalStore


async def test_sealed_file_shipped_by_adoption_is_not_shipped_twice(tmp_path: Path) -> None:
    store = LocalStore(root=tmp_path / "store")
    spool = Spool(settings=SpoolSettings(data_dir=tmp_path), store=store, metrics=Metrics())
    plog = await spool.open_partition("attendance", 3)
    plog.start_at(0)
    assert plog.builder is not None
    for off in range(50):
        plog.builder.append(off, 1000 + off, 0, b"k", b"v%d" % off, [])
    await spool.flush()
    sealed = plog.seal_sync()
    assert sealed is not None and sealed.exists()
    # the shipper finds the sealed file on disk before the sealing coroutine queues it
    await plog.ship_pending()
    assert not sealed.exists()
    plog.queue_ship(sealed)  # the late queueing of an already shipped file
    plog.queue_ship(sealed)
    await plog.ship_pending()  # must not fail, must not store anything twice
    names = [o.name for o in await store.list("segments/")]
    assert names == ["segments/attendance/000003/00000000000000000000-00000000000000000050.seg"]
    await spool.stop()


async def test_concurrent_release_of_the_same_partitions(tmp_path: Path) -> None:
    """Shutdown and a rebalance revoke releasing the same partitions at once (seen in CI)."""
    import asyncio

    store = LocalStore(root=tmp_path / "store")
    spool = Spool(settings=SpoolSettings(data_dir=tmp_path), store=store, metrics=Metrics())
    for p in range(3):
        plog = await spool.open_partition("registry", p)
        plog.start_at(0)
        assert plog.builder is not None
        for off in range(10):
            plog.builder.append(off, 1000 + off, 0, b"k", b"v", [])
    tps = list(spool.logs)
    await asyncio.gather(spool.release(tps), spool.release(list(reversed(tps))), spool.stop())
    assert spool.logs == {}
    names = [o.name for o in await store.list("segments/")]
    assert len(names) == 3 and all(n.endswith("-00000000000000000010.seg") for n in names)


def test_block_builder_extend_frames_exactly_like_append() -> None:
    """Ingest frames runs of records with ``extend``; the bytes and block metadata must equal
    one ``append`` per record (headers reused between equal consecutive header sets)."""
    import random
    from types import SimpleNamespace

    from replicator.segment.writer import BlockBuilder

    rng = random.Random(7)
    header_sets: list[Any] = [(), (("entity", b"attendance"), ("schema_version", b"1")),
                              (("entity", b"config"), ("schema_version", b"1")),
                              (("n", None),), [("list", b"headers")]]
    records = []
    offset = 100
    for _ in range(500):
        offset += rng.choice((1, 1, 1, 2, 5))  # Kafka gaps too
        records.append(SimpleNamespace(
            offset=offset, timestamp=rng.randrange(1_000, 2_000), timestamp_type=rng.randrange(2),
            key=rng.choice((None, b"", b"k%d" % offset)),
            value=rng.choice((None, b"", b"v" * rng.randrange(1, 300))),
            # fresh but equal tuples, like aiokafka delivers them
            headers=tuple(tuple(h) for h in rng.choice(header_sets)) if rng.random() < 0.9
            else list(rng.choice(header_sets)),
        ))
    one, many = BlockBuilder(100), BlockBuilder(100)
    for r in records:
        one.append(r.offset, r.timestamp, r.timestamp_type, r.key, r.value, r.headers)
    many.extend(records[:123])
    many.extend([])
    many.extend(records[123:])
    assert many.position == one.position == records[-1].offset + 1
    a, b = one.take(), many.take()
    assert a is not None and b is not None
    assert a == b and a.records == 500 and a.start == 100


def test_block_builder_extend_failure_appends_no_partial_record() -> None:
    from types import SimpleNamespace

    import pytest

    from replicator.segment.writer import BlockBuilder

    good = SimpleNamespace(offset=0, timestamp=5, timestamp_type=0, key=b"k", value=b"v",
                           headers=())
    bad = SimpleNamespace(offset=1, timestamp=6, timestamp_type=0, key="not bytes", value=b"v",
                          headers=())
    builder, reference = BlockBuilder(0), BlockBuilder(0)
    reference.append(0, 5, 0, b"k", b"v", ())
    with pytest.raises(TypeError):
        builder.extend([good, bad])
    assert builder.position == 1 and builder.pending_records == 1
    assert builder.take() == reference.take()


async def test_group_commit_fsyncs_every_file_and_fails_as_a_whole(tmp_path: Path) -> None:
    """The segment files of one group commit are fsync'd concurrently: all of them before any
    record counts as durable, and one failed fsync fails the whole commit (nothing durable)."""
    import pytest

    from replicator.segment.writer import ActiveSegment
    from replicator.spool import SpoolError

    store = LocalStore(root=tmp_path / "store")
    spool = Spool(settings=SpoolSettings(data_dir=tmp_path), store=store, metrics=Metrics())
    plogs = []
    for p in range(4):
        plog = await spool.open_partition("attendance", p)
        plog.start_at(0)
        plogs.append(plog)

    def fill(n: int) -> None:
        for plog in plogs:
            assert plog.builder is not None
            start = plog.builder.position
            for off in range(start, start + n):
                plog.builder.append(off, 1000 + off, 0, b"k", b"v", [])

    synced: list[str] = []
    orig_sync = ActiveSegment.sync

    def sync(self: ActiveSegment) -> None:
        if self._dirty:
            synced.append(self.path.name)
        orig_sync(self)

    fill(10)
    ActiveSegment.sync = sync  # type: ignore[method-assign]
    try:
        assert await spool.flush() == 40
        assert len(synced) == 4 and [p.durable for p in plogs] == [10, 10, 10, 10]

        def failing(self: ActiveSegment) -> None:
            if self.header.partition == 2:
                raise OSError(5, "injected fsync failure")
            sync(self)

        ActiveSegment.sync = failing  # type: ignore[method-assign]
        fill(5)
        with pytest.raises(SpoolError):
            await spool.flush()
        assert [p.durable for p in plogs] == [10, 10, 10, 10]  # nothing new is durable
        assert len(synced) == 7  # the other three files were still fsync'd (and waited for)
        with pytest.raises(SpoolError):
            spool.check()
    finally:
        ActiveSegment.sync = orig_sync  # type: ignore[method-assign]
        for plog in plogs:
            plog.close_sync()
        await spool.stop()


async def test_adaptive_group_commit(tmp_path: Path) -> None:
    """The committer commits as soon as it is woken (records pending, none in flight), not on
    the next tick of the interval; commits start at least ``commit_spacing_s`` apart; records
    appended while a commit is in flight go into the next commit; without a wake-up the
    interval still bounds how long records wait."""
    import asyncio
    import time

    from replicator.segment.writer import ActiveSegment

    store = LocalStore(root=tmp_path / "store")
    spacing = 0.3
    spool = Spool(
        settings=SpoolSettings(data_dir=tmp_path, flush_interval_s=1.5, commit_spacing_s=spacing),
        store=store, metrics=Metrics(),
    )
    plog = await spool.open_partition("attendance", 0)
    plog.start_at(0)
    assert plog.builder is not None
    builder = plog.builder

    def fill(n: int) -> None:
        start = builder.position
        for off in range(start, start + n):
            builder.append(off, 1000 + off, 0, b"k", b"v%d" % off, [])

    async def until(cond: Any, timeout: float) -> float:
        t0 = time.monotonic()
        while not cond():
            assert time.monotonic() - t0 < timeout, "timed out"
            await asyncio.sleep(0.002)
        return time.monotonic() - t0

    starts: list[float] = []
    orig_sync = ActiveSegment.sync
    gate = asyncio.Event()
    loop = asyncio.get_running_loop()

    def sync(self: ActiveSegment) -> None:  # worker thread: the commit is in flight here
        starts.append(time.monotonic())
        if len(starts) == 2:
            asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(timeout=10)
        orig_sync(self)

    ActiveSegment.sync = sync  # type: ignore[method-assign]
    await spool.start()
    try:
        await asyncio.sleep(spacing)  # the committer idles: nothing pending
        assert spool.flushes == 0
        fill(10)
        spool.wake()
        # woken: committed at once (the interval is 1.5 s)
        assert await until(lambda: plog.durable == 10, 1.0) < 1.0
        assert spool.flushes == 1
        # the second commit is held in its fsync; records appended meanwhile wait for it
        fill(5)
        spool.wake()
        await until(lambda: len(starts) == 2, 2.0)
        assert starts[1] - starts[0] >= spacing - 0.02
        fill(7)
        spool.wake()
        await asyncio.sleep(0.05)
        assert plog.durable == 10 and spool.flushes == 1
        gate.set()
        await until(lambda: plog.durable == 15, 2.0)
        # ... and are committed by the next commit, once spacing allows
        await until(lambda: plog.durable == 22, 2.0)
        assert spool.flushes == 3 and starts[2] - starts[1] >= spacing - 0.02
        # not woken: the interval still commits (bounded wait)
        fill(3)
        t0 = time.monotonic()
        await until(lambda: plog.durable == 25, 5.0)
        assert time.monotonic() - t0 >= 0.5  # not before the interval's tick
    finally:
        ActiveSegment.sync = orig_sync  # type: ignore[method-assign]
        await spool.stop()
    names = [o.name for o in await store.list("segments/")]
    assert names == ["segments/attendance/000000/00000000000000000000-00000000000000000025.seg"]
