"""Shared test helpers: topics, configs, reading back what was stored, a subprocess service.

The oracle for "stored exactly once with identical bytes" is :func:`stored_records`: it
reads every sealed segment in the store and every segment left in the spool, and the
tests compare the result with what the publisher was acknowledged for.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from replicator import naming
from replicator.config import Config, IngestSettings, KafkaSettings, ServerSettings
from replicator.segment.format import Record
from replicator.segment.reader import SegmentReader

REPO_ROOT = Path(__file__).resolve().parent.parent


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def create_topics(bootstrap: str, names: list[str], partitions: int = 3) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names]
        )
        for _ in range(100):  # wait until metadata shows them
            if set(names) <= set(await admin.list_topics()):
                return
            await asyncio.sleep(0.1)
    finally:
        await admin.close()


def make_config(
    data_dir: Path, bootstrap: str, topics: list[str], *, group: str | None = None, **ingest: Any
) -> Config:
    base = Config()
    return replace(
        base,
        kafka=KafkaSettings(
            bootstrap_servers=bootstrap, group_id=group or unique("grp"), topics=tuple(topics),
            session_timeout_ms=6000, heartbeat_interval_ms=1000, connect_timeout_s=20,
        ),
        ingest=replace(IngestSettings(), data_dir=data_dir, **ingest),
        server=ServerSettings(port=0),
    )


def write_config_toml(path: Path, cfg: Config) -> Path:
    i, k = cfg.ingest, cfg.kafka
    topics = ", ".join(f'"{t}"' for t in k.topics)
    path.write_text(
        f"""[kafka]
bootstrap_servers = "{k.bootstrap_servers}"
group_id = "{k.group_id}"
topics = [{topics}]
session_timeout_ms = {k.session_timeout_ms}
heartbeat_interval_ms = {k.heartbeat_interval_ms}

[ingest]
data_dir = "{i.data_dir}"
flush_interval_ms = {i.flush_interval_ms}
seal_bytes = {i.seal_bytes}
seal_age_s = {i.seal_age_s}

[server]
port = 0
"""
    )
    return path


def segment_files(data_dir: Path, topics: list[str] | None = None) -> list[Path]:
    """Every segment file: sealed ones in the store, sealed and active ones in the spool."""
    out: list[Path] = []
    store = data_dir / "store" / "segments"
    spool = data_dir / "spool"
    for root in (store, spool):
        if not root.is_dir():
            continue
        for p in sorted(root.rglob("*")):
            if not p.is_file() or naming.is_temp(p.name):
                continue
            if topics is not None and p.relative_to(root).parts[0] not in topics:
                continue
            if p.suffix in (".seg", ".sealed", ".active"):
                out.append(p)
    return out


def stored_records(
    data_dir: Path, topics: list[str] | None = None
) -> dict[tuple[str, int], list[Record]]:
    """All records stored per topic-partition, in file order (duplicates kept, to detect)."""
    out: dict[tuple[str, int], list[Record]] = defaultdict(list)
    for path in segment_files(data_dir, topics):
        with SegmentReader(path, expect_sealed=path.suffix != ".active") as r:
            r.verify()
            out[(r.header.topic, r.header.partition)].extend(r.iter_records())
    for recs in out.values():
        recs.sort(key=lambda r: r.offset)
    return dict(out)


def assert_exactly_once(
    stored: dict[tuple[str, int], list[Record]],
    expected: dict[tuple[str, int], dict[int, bytes | None]],
) -> int:
    """Every expected (tp, offset) stored once with identical value bytes; nothing extra."""
    total = 0
    for tp, want in expected.items():
        recs = stored.get(tp, [])
        offsets = [r.offset for r in recs]
        dupes = len(offsets) - len(set(offsets))
        assert dupes == 0, f"{tp}: {dupes} offsets stored more than once"
        got = {r.offset: r.value for r in recs}
        missing = sorted(set(want) - set(got))
        assert not missing, f"{tp}: {len(missing)} acked offsets missing, first {missing[:5]}"
        extra = sorted(set(got) - set(want))
        assert not extra, f"{tp}: {len(extra)} unexpected offsets stored, first {extra[:5]}"
        for off, value in want.items():
            assert got[off] == value, f"{tp}@{off}: stored bytes differ from the published ones"
        total += len(want)
    for tp in stored:
        assert tp in expected or not stored[tp], f"records stored for unexpected {tp}"
    return total


class ServiceProcess:
    """``python -m replicator run`` as a child process, for SIGKILL tests."""

    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ)
        env.pop("REPLICATOR_CONFIG", None)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "replicator", "--config", str(self.config_path),
                 "run", "--no-progress"],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env, cwd=REPO_ROOT,
            )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def terminate(self, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


async def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def kafka_contents(
    bootstrap: str, topics: list[str], *, read_committed: bool = True
) -> dict[tuple[str, int], dict[int, bytes | None]]:
    """Everything Kafka holds for ``topics`` right now: ``{(topic, partition): {offset: value}}``.

    Read with a plain aiokafka consumer (no group) up to the end offsets taken at the start.
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest",
        isolation_level="read_committed" if read_committed else "read_uncommitted",
    )
    await consumer.start()
    try:
        cluster = await consumer._client.fetch_all_metadata()
        tps = [TopicPartition(t, p) for t in topics
               for p in sorted(cluster.partitions_for_topic(t) or set())]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: dict[tuple[str, int], dict[int, bytes | None]] = {(tp.topic, tp.partition): {}
                                                                for tp in tps}
        remaining = {tp for tp in tps if ends[tp] > 0}
        deadline = time.monotonic() + 120
        while remaining and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500, max_records=10000)
            for tp, msgs in batch.items():
                for m in msgs:
                    out[(tp.topic, tp.partition)][m.offset] = m.value
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
        assert not remaining, f"could not read {remaining} to its end"
        return out
    finally:
        await consumer.stop()


async def publish_demo(
    bootstrap: str, topics: dict[str, str], n: int, *, seed: int = 1, batch: int = 2000
) -> int:
    """Publish ``n`` demo events to ``topics`` (entity -> topic); return how many were acked."""
    from replicator.demo import iter_events
    from replicator.publish import ChangePublisher

    acked = 0
    async with ChangePublisher(bootstrap_servers=bootstrap, topic_for_entity=topics) as pub:
        events = iter_events(n, seed=seed)
        while True:
            chunk = [e for _, e in zip(range(batch), events, strict=False)]
            if not chunk:
                break
            acked += len(await pub.publish_many(chunk))
    return acked
