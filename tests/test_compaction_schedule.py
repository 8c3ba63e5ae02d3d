"""The backup schedule (which kind is due) and the compaction planner's refusals."""

from __future__ import annotations

import time

from replicator.compaction.schedule import due_kind
from replicator.config import CompactionSettings
from replicator.snapshot.manifest import Manifest

H = 3_600_000
S = CompactionSettings()


def snap(kind: str, created_ms: int) -> Manifest:
    return Manifest(id=f"{created_ms:020d}-{kind}-abcdef", kind=kind, time_ms=created_ms,
                    created_ms=created_ms, parent=None, cut={}, start={}, files=())


def test_first_snapshot_is_a_full() -> None:
    assert due_kind(10 * H, [], S) == "full"
    assert due_kind(10 * H, [snap("incremental", 9 * H)], S) == "full"


def test_precedence_and_intervals() -> None:
    now = 1000 * H
    base = [snap("archive", now - 24 * H)]
    assert due_kind(now, base, S) == "differential"  # a day since the last full-kind
    fresh = [snap("archive", now - 2 * H), snap("differential", now - 90 * 60_000)]
    assert due_kind(now, fresh, S) == "incremental"  # 90 minutes since any snapshot
    assert due_kind(now, [*fresh, snap("incremental", now - 10 * 60_000)], S) is None
    old_full = [snap("archive", now - 20 * 24 * H), snap("full", now - 8 * 24 * H),
                snap("incremental", now - 60_000)]
    assert due_kind(now, old_full, S) == "full"  # weekly
    old_archive = [snap("archive", now - 31 * 24 * H), snap("full", now - H)]
    assert due_kind(now, old_archive, S) == "archive"  # monthly, before anything else


async def test_a_store_error_does_not_end_the_schedule() -> None:
    """A manifest that vanishes mid-listing (another process's retention) is logged and
    retried at the next check; the schedule task keeps running."""
    import asyncio
    from dataclasses import replace

    from replicator.compaction.schedule import Scheduler
    from replicator.config import RetentionSettings
    from replicator.errors import ObjectNotFoundError

    calls = 0

    async def flaky() -> list[Manifest]:
        nonlocal calls
        calls += 1
        raise ObjectNotFoundError("snapshots/x/manifest.json")

    sched = Scheduler(compaction=replace(S, check_interval_s=0.05),
                      retention=RetentionSettings(enabled=False), list_snapshots=flaky,
                      config_path=None)
    stop = asyncio.Event()
    task = asyncio.create_task(sched.run(stop))
    await asyncio.sleep(0.3)
    assert not task.done() and calls >= 3
    assert sched.last_error is not None and "manifest.json" in sched.last_error
    stop.set()
    await asyncio.wait_for(task, 2)


async def test_only_the_leader_compacts() -> None:
    from replicator.compaction.schedule import Scheduler
    from replicator.config import RetentionSettings

    listed = 0

    async def snaps() -> list[Manifest]:
        nonlocal listed
        listed += 1
        now = int(time.time() * 1000)
        return [snap("full", now), snap("archive", now)]

    follower = Scheduler(compaction=S, retention=RetentionSettings(enabled=False),
                         list_snapshots=snaps, config_path=None, is_leader=lambda: False)
    assert await follower.check() is None and listed == 0
    leader = Scheduler(compaction=S, retention=RetentionSettings(enabled=False),
                       list_snapshots=snaps, config_path=None, is_leader=lambda: True)
    assert await leader.check() is None and listed == 1  # nothing due: fresh full+archive
