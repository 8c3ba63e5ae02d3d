"""The quarantine log: events that failed validation, kept with their original bytes.

One JSON-lines file per topic under ``<data_dir>/quarantine/``. Each line holds the
topic, partition, offset, Kafka timestamp, the reason, and the original key, value and
headers (base64, so any bytes survive). Entries are buffered on the event loop and
fsync'd by the group commit *before* the block that covers their offsets, so a durable
coverage range never hides an event that is neither stored nor quarantined.

Invariant: after a crash, an event may be quarantined twice (re-consumed after its line
was fsync'd but before its block was); :func:`read_quarantine` drops such repeats by
``(partition, offset)``. It is never quarantined zero times.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from replicator import naming
from replicator.storage.local import fsync_dir, makedirs_durable, write_all


@dataclass(frozen=True, slots=True)
class QuarantinedEvent:
    topic: str
    partition: int
    offset: int
    timestamp: int
    reason: str
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]


def _b64(b: bytes | None) -> str | None:
    return None if b is None else base64.b64encode(b).decode()


def _unb64(s: str | None) -> bytes | None:
    return None if s is None else base64.b64decode(s)


class QuarantineLog:
    """Append-only quarantine file of one topic. ``add`` on the loop, ``sync`` in a thread."""

    def __init__(self, *, data_dir: Path, topic: str) -> None:
        self.topic = topic
        self.path = naming.quarantine_path(data_dir, topic)
        self._lines: list[bytes] = []
        self._fd = -1
        self.count = 0

    def add(
        self,
        *,
        partition: int,
        offset: int,
        timestamp: int,
        reason: str,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes | None]],
    ) -> None:
        self._lines.append(
            orjson.dumps(
                {
                    "topic": self.topic,
                    "partition": partition,
                    "offset": offset,
                    "timestamp": timestamp,
                    "reason": reason,
                    "key": _b64(key),
                    "value": _b64(value),
                    "headers": [[n, _b64(v)] for n, v in headers],
                }
            )
            + b"\n"
        )
        self.count += 1

    @property
    def has_pending(self) -> bool:
        return bool(self._lines)

    def sync(self) -> int:
        """Write and fsync buffered lines (blocking). Returns how many were written."""
        lines, self._lines = self._lines, []
        if not lines:
            return 0
        if self._fd < 0:
            makedirs_durable(self.path.parent)
            created = not self.path.exists()
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
            if created:
                fsync_dir(self.path.parent)
            else:
                _cut_torn_tail(self._fd)
        write_all(self._fd, b"".join(lines))
        os.fsync(self._fd)
        return len(lines)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _cut_torn_tail(fd: int) -> None:
    """Truncate a last line that lacks its newline (a write torn by a crash), fsync'd.

    Appending after a torn line would glue the next entry onto it, and the reader would
    drop both as one undecodable line. The torn entry itself is safe to cut: its lines
    are fsync'd before the block covering its offset, so that offset is not durable and
    the event is consumed and quarantined again.
    """
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    keep, pos = 0, size
    while pos > 0:
        start = max(0, pos - 65536)
        nl = os.pread(fd, pos - start, start).rfind(b"\n")
        if nl >= 0:
            keep = start + nl + 1
            break
        pos = start
    os.ftruncate(fd, keep)
    os.fsync(fd)


def read_quarantine(path: Path) -> Iterator[QuarantinedEvent]:
    """Entries of a quarantine file, first occurrence of each ``(partition, offset)`` only.

    A torn last line (crash mid-write) is ignored.
    """
    seen: set[tuple[int, int]] = set()
    if not path.exists():
        return
    with path.open("rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                d = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            ident = (int(d["partition"]), int(d["offset"]))
            if ident in seen:
                continue
            seen.add(ident)
            yield QuarantinedEvent(
                topic=d["topic"],
                partition=ident[0],
                offset=ident[1],
                timestamp=int(d["timestamp"]),
                reason=d["reason"],
                key=_unb64(d["key"]),
                value=_unb64(d["value"]),
                headers=tuple((n, _unb64(v)) for n, v in d["headers"]),
            )
