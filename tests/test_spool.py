"""Spool shipping without a broker: sealing, adoption of sealed files, idempotent queueing."""

from __future__ import annotations

from pathlib import Path

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
