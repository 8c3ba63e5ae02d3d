"""Two replicator instances in one consumer group, one shared store, separate spools.

Each instance runs ``python -m replicator run`` as a child process with its own
``ingest.data_dir`` (spool) and the same ``store.url``. While a publisher produces
continuously, partitions move between them:

- by a crash: SIGKILL one instance mid-stream, restart it a few seconds later (the other
  instance takes its partitions once the dead member's session expires, re-consumes what
  the dead one had only in its spool, and hands them back on the restart);
- by a clean rebalance: A runs, B joins, A stops with SIGTERM.

Every acknowledged event must end up in the shared store exactly once with identical
bytes, and ``replicator segments verify`` must find no gap and no overlap.

The instances use the client ids ``replicator-a`` / ``replicator-b``: the group's member
ids start with them, and the round-robin assignor hands partitions out in member-id order,
so a restart with the same client id gets the same partitions back, while a restart with
an id that sorts first swaps the assignment (leaving the crash leftovers on a host that no
longer owns their partitions).
"""

from __future__ import annotations

import ast
import asyncio
import json
import re
import time
from collections import defaultdict
from pathlib import Path

import pytest

from replicator import naming
from replicator.errors import SegmentError
from replicator.segment.format import Record
from replicator.segment.reader import SegmentReader
from tests.helpers import (
    ServiceProcess,
    assert_exactly_once,
    create_topics,
    kafka_contents,
    unique,
    wait_for,
)
from tests.test_crash_loop import (
    TP,
    Publisher,
    end_offsets,
    log_tail,
    non_null,
    run_cli,
    store_ends,
    store_segments,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PARTITIONS = 6
RATE = 1000
_ASSIGNED = re.compile(r"partitions assigned partitions=(\[.*\])")


# -- configuration and instances ------------------------------------------------------------


def write_instance_config(
    path: Path, *, bootstrap: str, group: str, topics: list[str], client_id: str,
    data_dir: Path, store_dir: Path,
) -> Path:
    quoted = ", ".join(f'"{t}"' for t in topics)
    path.write_text(
        f"""[kafka]
bootstrap_servers = "{bootstrap}"
group_id = "{group}"
client_id = "{client_id}"
topics = [{quoted}]
session_timeout_ms = 6000
heartbeat_interval_ms = 1000
connect_timeout_s = 20

[store]
url = "file://{store_dir}"

[ingest]
data_dir = "{data_dir}"
seal_bytes = 262144
seal_age_s = 1.5

[server]
port = 0
"""
    )
    return path


class Instance:
    """One replicator instance: its config, its spool and its successive processes."""

    def __init__(self, root: Path, name: str, *, bootstrap: str, group: str,
                 topics: list[str], store_dir: Path) -> None:
        self.name = name
        self.root = root
        self.data_dir = root / f"data-{name}"
        self.bootstrap, self.group, self.topics, self.store_dir = (
            bootstrap, group, topics, store_dir)
        self.runs = 0
        self.proc: ServiceProcess | None = None
        self.log_path = root / f"{name}-0.log"

    def config(self, client_id: str) -> Path:
        return write_instance_config(
            self.root / f"{self.name}-{client_id}.toml", bootstrap=self.bootstrap,
            group=self.group, topics=self.topics, client_id=client_id,
            data_dir=self.data_dir, store_dir=self.store_dir,
        )

    def start(self, client_id: str | None = None) -> None:
        self.log_path = self.root / f"{self.name}-{self.runs}.log"
        self.runs += 1
        self.proc = ServiceProcess(self.config(client_id or f"replicator-{self.name}"),
                                   self.log_path)
        self.proc.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()

    async def terminate(self) -> int:
        assert self.proc is not None
        return await asyncio.to_thread(self.proc.terminate, 60)

    def assignments(self) -> list[set[TP]]:
        """Every assignment the current process logged, oldest first."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return [set(ast.literal_eval(m.group(1))) for m in _ASSIGNED.finditer(text)]

    def owned(self) -> set[TP]:
        got = self.assignments()
        return got[-1] if got else set()

    def tail(self) -> str:
        return f"--- {self.log_path.name}\n{log_tail(self.log_path)}"

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace")
                       for p in sorted(self.root.glob(f"{self.name}-*.log")))


async def wait_owned(inst: Instance, what: str, want: set[TP] | None = None,
                     timeout: float = 90) -> None:
    """Wait until ``inst`` owns partitions (exactly ``want`` if given)."""

    def ok() -> bool:
        assert inst.alive(), f"{inst.name} died:\n{inst.tail()}"
        owned = inst.owned()
        return owned == want if want is not None else bool(owned)

    await wait_for(ok, timeout, f"{what} ({inst.name} owns {want or 'partitions'})")


async def wait_store_covers(store_dir: Path, ends: dict[TP, int], *running: Instance) -> None:
    def covered() -> bool:
        for inst in running:
            assert inst.alive(), f"{inst.name} died:\n{inst.tail()}"
        have = store_ends(store_dir, sorted({t for t, _ in ends}))
        return all(have.get(tp, 0) >= end for tp, end in ends.items())

    await wait_for(covered, 120, "the shared store to cover Kafka's end offsets", interval=0.5)


# -- reading back -----------------------------------------------------------------------------


def store_records(store_dir: Path, topics: list[str]) -> dict[TP, list[Record]]:
    """Records of every sealed segment in the shared store (checked block by block)."""
    out: dict[TP, list[Record]] = defaultdict(list)
    for seg in store_segments(store_dir, topics):
        with SegmentReader(store_dir / seg.name, name=seg.name, expect_sealed=True) as r:
            r.verify()
            assert (r.header.topic, r.header.partition, r.summary.start, r.summary.end) == (
                seg.topic, seg.partition, seg.start, seg.end), f"{seg.name}: contents differ"
            out[(seg.topic, seg.partition)].extend(r.iter_records())
    for recs in out.values():
        recs.sort(key=lambda r: r.offset)
    return dict(out)


def spool_records(data_dir: Path, topics: list[str]) -> dict[TP, list[Record]]:
    """Records in the segments left in one instance's spool (``.active`` and ``.sealed``)."""
    out: dict[TP, list[Record]] = defaultdict(list)
    root = data_dir / "spool"
    for p in sorted(root.glob("*/*/*")) if root.is_dir() else []:
        if naming.is_temp(p.name) or p.parts[-3] not in topics:
            continue
        if p.name.endswith((naming.ACTIVE_SUFFIX, naming.SEALED_SUFFIX)):
            with SegmentReader(p, expect_sealed=p.name.endswith(naming.SEALED_SUFFIX)) as r:
                r.verify()
                out[(r.header.topic, r.header.partition)].extend(r.iter_records())
    return dict(out)


def has_spooled(data_dir: Path, topics: list[str], parts: set[TP]) -> bool:
    """True if the spool holds records of one of ``parts`` (a kill now leaves leftovers)."""
    try:
        return bool(set(spool_records(data_dir, topics)) & parts)
    except (OSError, SegmentError):
        return False  # a file sealed or shipped while it was being read


def check_leftovers_redundant(
    leftovers: dict[TP, list[Record]], stored: dict[TP, list[Record]], owner: str
) -> int:
    """Spool leftovers must hold nothing the store lacks, byte for byte; return their count."""
    n = 0
    for tp, recs in leftovers.items():
        in_store = {r.offset: r for r in stored.get(tp, [])}
        for rec in recs:
            twin = in_store.get(rec.offset)
            assert twin is not None, f"{owner} spool holds {tp}@{rec.offset}, the store does not"
            assert (twin.value, twin.key, twin.timestamp, list(twin.headers)) == (
                rec.value, rec.key, rec.timestamp, list(rec.headers)
            ), f"{owner} spool copy of {tp}@{rec.offset} differs from the stored one"
            n += 1
    return n


def verify_shared_store(config: Path, total: int, segments: int) -> None:
    res = run_cli(config, "segments", "verify", "--json")
    assert res.returncode == 0, f"verify exited {res.returncode}:\n{res.stdout}\n{res.stderr}"
    report = json.loads(res.stdout)
    assert report["problems"] == []
    assert (report["records"], report["segments"]) == (total, segments)


async def setup_group(kafka_bootstrap: str, tmp_path: Path) -> tuple[list[str], Instance,
                                                                      Instance, Publisher]:
    topics = [unique("attendance"), unique("registry")]
    await create_topics(kafka_bootstrap, topics, partitions=PARTITIONS)
    store_dir = tmp_path / "shared-store"
    group = unique("failover-grp")
    a, b = (Instance(tmp_path, n, bootstrap=kafka_bootstrap, group=group, topics=topics,
                     store_dir=store_dir) for n in ("a", "b"))
    publisher = Publisher(
        kafka_bootstrap,
        {"attendance": topics[0], "participant": topics[1], "config": topics[1]},
        seed=7, rate=RATE,
    )
    return topics, a, b, publisher


async def check_exactly_once(kafka_bootstrap: str, topics: list[str], publisher: Publisher,
                             store_dir: Path) -> tuple[int, dict[TP, list[Record]]]:
    expected = await kafka_contents(kafka_bootstrap, topics)
    total = sum(len(v) for v in expected.values())
    assert total == publisher.count
    for tp, offsets in publisher.acked.items():
        assert offsets <= set(expected[tp]), f"{tp}: acked offsets missing from Kafka"
    stored = store_records(store_dir, topics)
    assert assert_exactly_once(stored, non_null(expected)) == total
    return total, stored


# -- the tests --------------------------------------------------------------------------------


async def test_sigkill_failover_and_restart_store_exactly_once(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    t0 = time.monotonic()
    topics, a, b, publisher = await setup_group(kafka_bootstrap, tmp_path)
    every = {(t, p) for t in topics for p in range(PARTITIONS)}
    store_dir = a.store_dir
    publisher.start()
    try:
        a.start()
        b.start()
        await wait_owned(a, "both joined")
        await wait_owned(b, "both joined")
        await wait_for(lambda: a.owned() | b.owned() == every and not a.owned() & b.owned(),
                       60, "a stable split of the partitions")
        a_parts, b_parts = a.owned(), b.owned()
        await asyncio.sleep(4)
        await wait_for(lambda: has_spooled(a.data_dir, topics, a_parts), 60,
                       "records in A's spool")

        # 1. SIGKILL A mid-stream: B takes A's partitions after A's session expires, resumes
        #    them from the shared store and re-consumes what A had only in its spool
        a.kill()
        killed_a = spool_records(a.data_dir, topics)
        assert set(killed_a) & a_parts, "A was killed with nothing in its spool"
        await wait_owned(b, "B takes over", every, timeout=60)
        await asyncio.sleep(3)
        # 2. A comes back with the same client id and gets its partitions back: its crash
        #    leftovers now overlap what B stored meanwhile and must be dropped or trimmed
        a.start()
        await wait_owned(a, "A back", a_parts)
        await wait_owned(b, "A back", b_parts)
        await asyncio.sleep(4)
        await wait_for(lambda: has_spooled(b.data_dir, topics, b_parts), 60,
                       "records in B's spool")

        # 3. SIGKILL B, restart it after 3 s (before its old member's session expires) with
        #    a client id that sorts first: the assignment swaps, B's leftovers stay behind on
        #    a host that no longer owns their partitions
        b.kill()
        killed_b = spool_records(b.data_dir, topics)
        assert set(killed_b) & b_parts, "B was killed with nothing in its spool"
        await asyncio.sleep(3)
        b.start(client_id="replicator-0")
        await wait_owned(b, "B back, swapped", a_parts)
        await wait_owned(a, "B back, swapped", b_parts)
        await asyncio.sleep(4)

        published = await publisher.stop()
        ends = await end_offsets(kafka_bootstrap, topics, PARTITIONS)
        assert sum(ends.values()) == published
        await wait_store_covers(store_dir, ends, a, b)
        rcs = list(await asyncio.gather(a.terminate(), b.terminate()))
        assert rcs == [0, 0], f"exit codes {rcs}\n{a.tail()}\n{b.tail()}"
    finally:
        a.kill()
        b.kill()
        if not publisher._stop.is_set():
            await publisher.stop()

    total, stored = await check_exactly_once(kafka_bootstrap, topics, publisher, store_dir)
    segs = store_segments(store_dir, topics)
    verify_shared_store(a.config("replicator-a"), total, len(segs))
    for tp, end in ends.items():
        mine = [s for s in segs if (s.topic, s.partition) == tp]
        assert mine[0].start == 0 and mine[-1].end == end, (tp, mine[0], mine[-1], end)

    # A got its partitions back: its crash leftovers were resolved against the store
    left_a = spool_records(a.data_dir, topics)
    assert not left_a, f"A's spool still holds {sorted(left_a)}"
    assert "spool segment already covered by the store" in a.logs() or (
        "trimmed spool segment" in a.logs()), "A's leftovers were not resolved against the store"
    # B's leftovers belong to its old partitions, which A owns now: they may stay (nothing
    # ships a partition's leftovers but its owner), but must hold nothing the store lacks
    left_b = spool_records(b.data_dir, topics)
    assert set(left_b) <= b_parts, f"B's spool holds partitions B owns: {sorted(left_b)}"
    n_b = check_leftovers_redundant(left_b, stored, "B")
    for inst in (a, b):
        assert "Traceback" not in inst.logs(), f"{inst.name} logged a traceback"
    print(f"\nfailover: {total:,} events in {len(segs)} segments, exactly once; "
          f"A killed with {sum(len(v) for v in killed_a.values())} records in its spool, "
          f"B with {sum(len(v) for v in killed_b.values())}; {n_b} redundant records stay "
          f"in B's spool; {time.monotonic() - t0:.0f}s")


async def test_clean_rebalance_handover_store_exactly_once(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    t0 = time.monotonic()
    topics, a, b, publisher = await setup_group(kafka_bootstrap, tmp_path)
    every = {(t, p) for t in topics for p in range(PARTITIONS)}
    store_dir = a.store_dir
    publisher.start()
    try:
        a.start()
        await wait_owned(a, "A alone", every)
        await asyncio.sleep(4)
        b.start()  # A hands half of its partitions over
        await wait_owned(b, "B joined")
        await wait_for(lambda: a.owned() | b.owned() == every and not a.owned() & b.owned(),
                       60, "a stable split of the partitions")
        assert a.owned() and b.owned()
        await asyncio.sleep(4)
        assert await a.terminate() == 0, a.tail()  # A hands the rest over
        await wait_owned(b, "B alone", every)
        await asyncio.sleep(3)

        published = await publisher.stop()
        ends = await end_offsets(kafka_bootstrap, topics, PARTITIONS)
        assert sum(ends.values()) == published
        await wait_store_covers(store_dir, ends, b)
        assert await b.terminate() == 0, b.tail()
    finally:
        a.kill()
        b.kill()
        if not publisher._stop.is_set():
            await publisher.stop()

    total, _ = await check_exactly_once(kafka_bootstrap, topics, publisher, store_dir)
    segs = store_segments(store_dir, topics)
    verify_shared_store(b.config("replicator-b"), total, len(segs))
    for tp, end in ends.items():
        mine = [s for s in segs if (s.topic, s.partition) == tp]
        assert mine[0].start == 0 and mine[-1].end == end, (tp, mine[0], mine[-1], end)
    # a clean handover seals and ships before the partition moves: no leftovers anywhere,
    # and nobody ever needed crash recovery
    for inst in (a, b):
        assert not spool_records(inst.data_dir, topics), f"{inst.name}'s spool is not empty"
        logs = inst.logs()
        for msg in ("torn tail truncated", "already covered", "trimmed", "already in the store",
                    "offset gap", "Traceback"):
            assert msg not in logs, f"{inst.name}: {msg!r} in a clean handover\n{inst.tail()}"
    # partitions really moved twice: A alone -> split with B -> B alone
    a_asg, b_asg = a.assignments(), b.assignments()
    assert a_asg[0] == every and any(0 < len(x) < len(every) for x in a_asg[1:]), a_asg
    assert b_asg[-1] == every and any(0 < len(x) < len(every) for x in b_asg[:-1]), b_asg
    print(f"\nhandover: {total:,} events in {len(segs)} segments, exactly once; "
          f"{time.monotonic() - t0:.0f}s")
