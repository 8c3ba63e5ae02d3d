"""Crash loop: SIGKILL the service at random moments while a publisher keeps producing.

``python -m replicator run`` runs as a child process (``seal_bytes`` 256 KiB, ``seal_age_s``
1 s, so kills land while appending, group-committing, sealing, shipping and while
recovering the previous crash's leftovers); most kills come 0.2-2 s after the restarted
service's first new durable write, a fifth of them 0.2-2 s after the process started
(imports, connecting, joining the group). The publisher also slips in invalid events,
which must be quarantined, never stored. After every kill, with nothing running, the
files on disk are checked against the consumer group:

- Kafka's committed offset of every partition is covered, without a hole from offset 0,
  by what is on disk (store segments + spool leftovers): offsets are committed only for
  fsync'd records;
- the store's segments of every partition are contiguous from offset 0 (no gap, no
  overlap).

At the end the service runs once more until the store covers Kafka's end offsets, is
stopped with SIGTERM, and every acknowledged event must be in the store exactly once with
identical bytes, every invalid one in the quarantine (once after de-duplication), nothing
left in the spool, and ``replicator segments verify`` clean.

The seed is printed (``-s`` shows it); replay with ``REPLICATOR_CRASH_SEED=<seed>``.
``REPLICATOR_CRASH_CYCLES`` changes the number of kills (default 20).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import re
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from replicator import naming
from replicator.catalog import find_gaps
from replicator.demo import iter_events
from replicator.errors import ReplicatorError
from replicator.publish import ChangePublisher
from replicator.quarantine import QuarantineLog, read_quarantine
from replicator.segment.reader import SegmentReader
from tests.helpers import (
    REPO_ROOT,
    ServiceProcess,
    assert_exactly_once,
    create_topics,
    kafka_contents,
    make_config,
    stored_records,
    unique,
    wait_for,
    write_config_toml,
)

CYCLES = int(os.environ.get("REPLICATOR_CRASH_CYCLES", "20"))
PARTITIONS = 3
#: events/s the publisher aims for (about 0.5 MB/s of demo events)
RATE = 1000
#: share of the kills that land during process start (imports, connect, group join)
EARLY_KILL_SHARE = 0.2

TP = tuple[str, int]
#: invalid events the publisher slips in: each must be quarantined (once, after the
#: reader's de-duplication), never stored
BAD_EVENTS = (
    b'{"entity": "attendance", "op": "upsert", "key": ',
    b'{"entity": "attendance", "op": "merge", "key": "a-1", "ts": "2026-01-01T00:00:00Z",'
    b' "schema_version": 1}',
)
_ASSIGNED = re.compile(r"partitions assigned partitions=\[(.*)\]")


# -- the publisher (in the test process) ------------------------------------------------------


@dataclass
class Publisher:
    """Publishes demo events at ``rate``/s until stopped; records every acknowledged offset."""

    bootstrap: str
    topic_for_entity: dict[str, str]
    seed: int
    rate: float = RATE
    batch: int = 250
    #: also publish one invalid event (to the attendance topic) every this many batches
    bad_every: int = 0
    acked: dict[TP, set[int]] = field(default_factory=lambda: defaultdict(set))
    #: the invalid events: ``{(topic, partition): {offset: value}}``
    bad: dict[TP, dict[int, bytes]] = field(default_factory=lambda: defaultdict(dict))
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    @property
    def count(self) -> int:
        """Valid events acknowledged."""
        return sum(len(v) for v in self.acked.values())

    @property
    def bad_count(self) -> int:
        return sum(len(v) for v in self.bad.values())

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="publisher")

    async def stop(self) -> int:
        self._stop.set()
        assert self._task is not None
        await self._task  # re-raises a publishing failure
        return self.count

    def check(self) -> None:
        if self._task is not None and self._task.done():
            self._task.result()
            raise AssertionError("publisher stopped on its own")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        events = iter_events(10**9, seed=self.seed)
        async with ChangePublisher(
            bootstrap_servers=self.bootstrap,
            topic_for_entity=self.topic_for_entity,
            producer_options={"linger_ms": 5},
        ) as pub:
            t0, sent, batches = loop.time(), 0, 0
            bad_topic = self.topic_for_entity["attendance"]
            while not self._stop.is_set():
                chunk = list(itertools.islice(events, self.batch))
                for md in await pub.publish_many(chunk):
                    self.acked[(md.topic, md.partition)].add(md.offset)
                sent += len(chunk)
                batches += 1
                if self.bad_every and batches % self.bad_every == 0:
                    value = BAD_EVENTS[batches // self.bad_every % len(BAD_EVENTS)]
                    md = await pub.publish_raw(bad_topic, value, f"bad-{batches}".encode())
                    self.bad[(md.topic, md.partition)][md.offset] = value
                ahead = sent / self.rate - (loop.time() - t0)
                if ahead > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), timeout=ahead)


# -- looking at the disk while nothing runs ---------------------------------------------------


def store_segments(store_root: Path, topics: list[str]) -> list[naming.SegmentName]:
    """Sealed segments in a local store, parsed from their names (temp files skipped)."""
    root = store_root / naming.SEGMENTS_ROOT
    out = []
    if root.is_dir():
        for p in root.rglob("*.seg"):
            if naming.is_temp(p.name):
                continue
            seg = naming.parse_segment_name(p.relative_to(store_root).as_posix())
            if seg.topic in topics:
                out.append(seg)
    return sorted(out)


def store_ends(store_root: Path, topics: list[str]) -> dict[TP, int]:
    ends: dict[TP, int] = {}
    for seg in store_segments(store_root, topics):
        ends[(seg.topic, seg.partition)] = max(ends.get((seg.topic, seg.partition), 0), seg.end)
    return ends


def spool_ranges(data_dir: Path, topics: list[str]) -> dict[TP, list[tuple[int, int, str]]]:
    """Offset ranges of the segments left in a spool: ``(start, end, file name)``.

    An ``.active`` leftover counts up to its last valid block (what recovery will keep); one
    without a readable header (a kill right after it was created) covers nothing.
    """
    out: dict[TP, list[tuple[int, int, str]]] = defaultdict(list)
    root = data_dir / "spool"
    if not root.is_dir():
        return out
    for p in sorted(root.glob("*/*/*")):
        if naming.is_temp(p.name) or p.parts[-3] not in topics:
            continue
        if p.name.endswith(naming.SEALED_SUFFIX):
            with SegmentReader(p, expect_sealed=True) as r:  # must be intact
                out[(r.header.topic, r.header.partition)].append(
                    (r.summary.start, r.summary.end, p.name)
                )
        elif p.name.endswith(naming.ACTIVE_SUFFIX):
            try:
                r = SegmentReader(p)
            except ReplicatorError:
                continue
            with r:
                out[(r.header.topic, r.header.partition)].append(
                    (r.summary.start, r.summary.end, p.name)
                )
    return out


def disk_coverage(data_dir: Path, topics: list[str]) -> int:
    """Offsets on disk (store + spool) summed over partitions, tolerating a running writer."""
    total = 0
    ranges: dict[TP, list[tuple[int, int]]] = defaultdict(list)
    for seg in store_segments(data_dir / "store", topics):
        ranges[(seg.topic, seg.partition)].append((seg.start, seg.end))
    root = data_dir / "spool"
    for p in sorted(root.glob("*/*/*")) if root.is_dir() else []:
        if naming.is_temp(p.name) or not p.name.endswith((".active", ".sealed")):
            continue
        try:
            with SegmentReader(p) as r:
                ranges[(r.header.topic, r.header.partition)].append(
                    (r.summary.start, r.summary.end))
        except (OSError, ReplicatorError, ValueError):
            continue  # renamed, shipped or being created right now
    for rs in ranges.values():
        total += covered_prefix(rs)
    return total


def covered_prefix(ranges: list[tuple[int, int]]) -> int:
    """End of the contiguous coverage that starts at offset 0."""
    end = 0
    for start, stop in sorted(ranges):
        if start > end:
            break
        end = max(end, stop)
    return end


def non_null(contents: dict[TP, dict[int, bytes | None]]) -> dict[TP, dict[int, bytes]]:
    """Kafka contents with every value checked to be bytes (the publisher sends no nulls)."""
    out: dict[TP, dict[int, bytes]] = {}
    for tp, values in contents.items():
        out[tp] = {}
        for off, v in values.items():
            assert v is not None, f"{tp}@{off}: unexpected null value"
            out[tp][off] = v
    return out


def covered_total(
    segs: list[naming.SegmentName], spool: dict[TP, list[tuple[int, int, str]]]
) -> int:
    ranges: dict[TP, list[tuple[int, int]]] = defaultdict(list)
    for seg in segs:
        ranges[(seg.topic, seg.partition)].append((seg.start, seg.end))
    for tp, rs in spool.items():
        ranges[tp].extend((a, b) for a, b, _ in rs)
    return sum(covered_prefix(r) for r in ranges.values())


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(f"{naming.TEMP_PREFIX}*")] if root.is_dir() else []


async def committed_offsets(admin: AIOKafkaAdminClient, group: str) -> dict[TP, int]:
    got = await admin.list_consumer_group_offsets(group)
    return {(tp.topic, tp.partition): om.offset for tp, om in got.items() if om.offset >= 0}


async def end_offsets(
    bootstrap: str, topics: list[str], partitions: int = PARTITIONS
) -> dict[TP, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed")
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in topics for p in range(partitions)]
        ends = await consumer.end_offsets(tps)
        return {(tp.topic, tp.partition): off for tp, off in ends.items()}
    finally:
        await consumer.stop()


def assigned_in(log_path: Path) -> bool:
    """True once the service logged a non-empty partition assignment."""
    try:
        text = log_path.read_text(errors="replace")
    except FileNotFoundError:
        return False
    return any(m.group(1).strip() for m in _ASSIGNED.finditer(text))


async def wait_assigned(svc: ServiceProcess, log_path: Path, what: str) -> None:
    """Wait until the service owns partitions (group joined); fail if it dies meanwhile."""
    await wait_for(lambda: assigned_in(log_path) or not svc.alive(), 90,
                   f"{what}: partitions assigned")
    assert svc.alive(), f"{what}: service died:\n{log_tail(log_path)}"


async def wait_progress(
    svc: ServiceProcess, data_dir: Path, topics: list[str], baseline: int, what: str
) -> None:
    """Wait until more offsets are on disk than ``baseline`` (the service made progress)."""
    await wait_for(lambda: not svc.alive() or disk_coverage(data_dir, topics) > baseline, 60,
                   f"{what}: first durable write", interval=0.1)


def log_tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return "(no log)"


def run_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "replicator", "--config", str(config), *args],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120, check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("REPLICATOR_")},
    )


#: log messages that show which recovery path a restart took
RECOVERY_EVENTS = {
    "torn tail truncated": "torn tails cut",
    "spool segment already covered by the store": "spool leftovers already in the store",
    "segment already in the store (shipped before a crash)": "re-puts of shipped segments",
    "trimmed spool segment": "leftovers trimmed",
    "removing active segment without a valid header": "header-less actives removed",
}


# -- the test -----------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
async def test_sigkill_loop_loses_and_duplicates_nothing(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    seed = int(os.environ.get("REPLICATOR_CRASH_SEED", str(random.randrange(2**31))))
    print(f"\ncrash loop seed: {seed} (replay with REPLICATOR_CRASH_SEED={seed})")
    rng = random.Random(seed)
    t_start = time.monotonic()

    att, other = unique("attendance"), unique("registry")
    topics = [att, other]
    await create_topics(kafka_bootstrap, topics, partitions=PARTITIONS)
    data_dir = tmp_path / "data"
    group = unique("crash-grp")
    cfg = make_config(data_dir, kafka_bootstrap, topics, group=group,
                      seal_bytes=256 * 1024, seal_age_s=1.0)
    cfg_path = write_config_toml(tmp_path / "replicator.toml", cfg)
    store_root = data_dir / "store"

    publisher = Publisher(
        kafka_bootstrap, {"attendance": att, "participant": other, "config": other}, seed=seed,
        bad_every=4,
    )
    publisher.start()
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    leftovers = {"active": 0, "sealed": 0, "spool_tmp": 0}
    kill_log: list[str] = []
    svc: ServiceProcess | None = None
    on_disk = 0
    progress: list[int] = []
    try:
        for cycle in range(CYCLES):
            log_path = tmp_path / f"service-{cycle:02d}.log"
            svc = ServiceProcess(cfg_path, log_path)
            svc.start()
            started = time.monotonic()
            early = rng.random() < EARLY_KILL_SHARE
            if not early:
                # kill while it works: after its first new durable write (catch-up, sealing,
                # shipping, group commits of the backlog that piled up while it was down)
                await wait_assigned(svc, log_path, f"cycle {cycle}")
                await wait_progress(svc, data_dir, topics, on_disk, f"cycle {cycle}")
            delay = rng.uniform(0.2, 2.0)
            await asyncio.sleep(delay)
            publisher.check()
            assert svc.alive(), f"cycle {cycle}: service died on its own:\n{log_tail(log_path)}"
            svc.kill()
            kill_log.append(f"{cycle}:{'start' if early else 'run'}+{delay:.2f}s"
                            f"@{time.monotonic() - started:.1f}s")

            # nothing runs now: check the disk against the consumer group
            spool = spool_ranges(data_dir, topics)
            for p in (data_dir / "spool").glob("*/*/*"):
                if naming.is_temp(p.name):
                    leftovers["spool_tmp"] += 1
                elif p.name.endswith(naming.ACTIVE_SUFFIX):
                    leftovers["active"] += 1
                elif p.name.endswith(naming.SEALED_SUFFIX):
                    leftovers["sealed"] += 1
            segs = store_segments(store_root, topics)
            problems = find_gaps(s.name for s in segs)
            assert not problems, f"cycle {cycle}: store not contiguous: {problems}"
            firsts: dict[TP, int] = {}
            for s in segs:
                firsts.setdefault((s.topic, s.partition), s.start)
            assert all(v == 0 for v in firsts.values()), f"cycle {cycle}: {firsts}"
            committed = await committed_offsets(admin, group)
            for tp, off in committed.items():
                ranges = [(s.start, s.end) for s in segs if (s.topic, s.partition) == tp]
                ranges += [(a, b) for a, b, _ in spool.get(tp, [])]
                durable = covered_prefix(ranges)
                assert off <= durable, (
                    f"cycle {cycle}: {tp} committed offset {off} but only [0, {durable}) is on "
                    f"disk (store {ranges}, spool {spool.get(tp)})\n{log_tail(log_path)}"
                )
            now_on_disk = covered_total(store_segments(store_root, topics), spool)
            progress.append(now_on_disk - on_disk)
            on_disk = now_on_disk
        print(f"kills (cycle:phase+delay@since start): {' '.join(kill_log)}")
        print(f"offsets made durable per cycle: {progress}")

        published = await publisher.stop()
        ends = await end_offsets(kafka_bootstrap, topics)
        assert sum(ends.values()) == published + publisher.bad_count, (ends, published)

        # the last run: until the store covers everything Kafka holds, then SIGTERM
        log_path = tmp_path / "service-final.log"
        svc = ServiceProcess(cfg_path, log_path)
        svc.start()
        await wait_assigned(svc, log_path, "final run")

        def covered() -> bool:
            assert svc is not None and svc.alive(), f"final run died:\n{log_tail(log_path)}"
            have = store_ends(store_root, topics)
            return all(have.get(tp, 0) >= end for tp, end in ends.items())

        await wait_for(covered, 120, "the store to cover Kafka's end offsets", interval=0.5)
        rc = await asyncio.to_thread(svc.terminate, 60)
        assert rc == 0, f"SIGTERM exit code {rc}:\n{log_tail(log_path)}"
    finally:
        if svc is not None:
            svc.kill()
        await admin.close()
        if not publisher._stop.is_set():
            with contextlib.suppress(Exception):
                await publisher.stop()

    # every acknowledged event stored exactly once, with the bytes Kafka holds
    expected = await kafka_contents(kafka_bootstrap, topics)
    for tp, offsets in publisher.acked.items():
        assert offsets <= set(expected[tp]), f"{tp}: acked offsets missing from Kafka"
    for tp, bad in publisher.bad.items():
        for off, value in bad.items():
            assert expected[tp].pop(off) == value
    assert sum(len(v) for v in expected.values()) == published
    stored = stored_records(data_dir, topics)
    assert assert_exactly_once(stored, non_null(expected)) == published
    # a clean stop leaves nothing behind in the spool: all of it is in the store
    spool_files = [p for p in (data_dir / "spool").rglob("*")
                   if p.is_file() and p.name.endswith((".active", ".sealed"))]
    assert not spool_files, f"left in the spool after SIGTERM: {spool_files}"
    segs = store_segments(store_root, topics)
    assert {(s.topic, s.partition) for s in segs} == set(ends)
    for tp, end in ends.items():
        mine = [s for s in segs if (s.topic, s.partition) == tp]
        assert mine[0].start == 0 and mine[-1].end == end, (tp, mine[0], mine[-1], end)

    res = run_cli(cfg_path, "segments", "verify", "--json")
    assert res.returncode == 0, f"verify exited {res.returncode}:\n{res.stdout}\n{res.stderr}"
    report = json.loads(res.stdout)
    assert report["problems"] == []
    assert report["records"] == published
    assert report["segments"] == len(segs)

    # every invalid event quarantined (at least once; once after the reader's de-duplication)
    # with its original bytes, none of them stored
    quarantined: dict[TP, dict[int, bytes | None]] = defaultdict(dict)
    lines = 0
    for topic in topics:
        path = naming.quarantine_path(data_dir, topic)
        lines += path.read_bytes().count(b"\n") if path.exists() else 0
        for q in read_quarantine(path):
            quarantined[(q.topic, q.partition)][q.offset] = q.value
    missing = {tp: sorted(set(b) - set(quarantined.get(tp, {})))
               for tp, b in publisher.bad.items()}
    assert dict(quarantined) == dict(publisher.bad), f"quarantine differs; missing {missing}"

    logs = "".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob("service-*.log")))
    assert "Traceback" not in logs, "a service run logged a traceback"
    recovery = {label: logs.count(msg) for msg, label in RECOVERY_EVENTS.items()}
    store_tmp = temp_files(store_root)
    print(
        f"crash loop: {CYCLES} kills, seed {seed}, {published:,} events, {len(segs)} segments, "
        f"{publisher.bad_count} invalid events quarantined ({lines} lines), "
        f"{time.monotonic() - t_start:.0f}s; leftovers seen after kills {leftovers}; "
        f"recovery {recovery}; temp files left in the store: {[p.name for p in store_tmp]}"
    )
    # the kills must have hit a service with unshipped data, or the test proved nothing
    assert leftovers["active"] + leftovers["sealed"] > 0


def test_torn_quarantine_line_does_not_swallow_the_next_entry(tmp_path: Path) -> None:
    """A crash mid-write leaves a quarantine line without its newline; the event's block
    was not durable, so the next process quarantines it again and appends. The torn
    fragment must be cut first, or the reader drops the new line glued onto it and the
    event ends up neither stored nor quarantined."""

    def add(q: QuarantineLog, offset: int) -> None:
        q.add(partition=0, offset=offset, timestamp=1, reason="malformed JSON: x",
              key=b"k", value=b"{bad %d" % offset, headers=[("h", b"v")])

    q = QuarantineLog(data_dir=tmp_path, topic="t")
    add(q, 1)
    add(q, 5)
    q.sync()
    q.close()
    path = naming.quarantine_path(tmp_path, "t")
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"\n") + 40])  # the crash: line of offset 5 torn
    assert [e.offset for e in read_quarantine(path)] == [1]

    q2 = QuarantineLog(data_dir=tmp_path, topic="t")  # the next process
    add(q2, 5)
    add(q2, 9)
    q2.sync()
    q2.close()
    got = list(read_quarantine(path))
    assert [e.offset for e in got] == [1, 5, 9]
    assert [e.value for e in got] == [b"{bad 1", b"{bad 5", b"{bad 9"]
    assert path.read_bytes().count(b"\n") == 3  # the fragment is gone, not just skipped

    # a file that is nothing but a torn line is emptied
    path.write_bytes(b'{"topic": "t", "part')
    q3 = QuarantineLog(data_dir=tmp_path, topic="t")
    add(q3, 11)
    q3.sync()
    q3.close()
    assert [e.offset for e in read_quarantine(path)] == [11]
