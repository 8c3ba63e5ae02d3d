"""Every name and path the replicator writes is built here, and only here.

Invariants:
- Offsets are zero-padded to 20 digits and partitions to 6, so lexical order of names
  is numeric order (a store listing sorted by name is sorted by offset).
- A segment name carries its topic, partition and covered offset range ``[start, end)``
  (``end`` exclusive: the consumer position after the last record it covers).
- Names built from outside input (topics, entities, file names) are validated: no path
  separators, no ``..``, nothing that could escape the store or data directory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from replicator.errors import InvalidNameError

OFFSET_DIGITS = 20
PARTITION_DIGITS = 6
SEGMENT_SUFFIX = ".seg"
ACTIVE_SUFFIX = ".active"
SEALED_SUFFIX = ".sealed"
TEMP_PREFIX = ".tmp-"

SEGMENTS_ROOT = "segments"
WATERMARKS_ROOT = "watermarks"
SNAPSHOTS_ROOT = "snapshots"
ARCHIVE_ROOT = "archive"
MANIFEST_NAME = "manifest.json"
SNAPSHOT_SUFFIX = ".snap"
SNAPSHOT_KINDS = ("full", "differential", "incremental", "archive")
RETENTION_STATE = "retention.json"

_TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_SEGMENT_RE = re.compile(
    r"^segments/(?P<topic>[A-Za-z0-9._-]+)/(?P<partition>\d{6})/"
    r"(?P<start>\d{20})-(?P<end>\d{20})\.seg$"
)


def check_topic(topic: str) -> str:
    """Return ``topic`` if it is a legal Kafka topic name that is safe as a path part."""
    if not _TOPIC_RE.match(topic) or topic in (".", ".."):
        raise InvalidNameError(f"invalid topic name {topic!r}: use 1-249 of [A-Za-z0-9._-]")
    return topic


def check_partition(partition: int) -> int:
    if not 0 <= partition < 10**PARTITION_DIGITS:
        raise InvalidNameError(f"invalid partition {partition!r}")
    return partition


def check_offset(offset: int) -> int:
    if not 0 <= offset < 10**OFFSET_DIGITS:
        raise InvalidNameError(f"invalid offset {offset!r}")
    return offset


@dataclass(frozen=True, slots=True, order=True)
class SegmentName:
    """A sealed segment's identity: topic-partition and covered range ``[start, end)``."""

    topic: str
    partition: int
    start: int
    end: int

    @property
    def name(self) -> str:
        return segment_name(self.topic, self.partition, self.start, self.end)


def partition_dir(topic: str, partition: int) -> str:
    """Relative directory of one topic-partition: ``<topic>/<partition:06d>``."""
    return f"{check_topic(topic)}/{check_partition(partition):0{PARTITION_DIGITS}d}"


def segments_prefix(topic: str | None = None, partition: int | None = None) -> str:
    """Store prefix under which segments of a topic (and partition) are listed."""
    if topic is None:
        return f"{SEGMENTS_ROOT}/"
    if partition is None:
        return f"{SEGMENTS_ROOT}/{check_topic(topic)}/"
    return f"{SEGMENTS_ROOT}/{partition_dir(topic, partition)}/"


def segment_name(topic: str, partition: int, start: int, end: int) -> str:
    """Store name of a sealed segment covering offsets ``[start, end)``."""
    if end < start:
        raise InvalidNameError(f"segment range end {end} < start {start}")
    return (
        f"{segments_prefix(topic, partition)}"
        f"{check_offset(start):0{OFFSET_DIGITS}d}-{check_offset(end):0{OFFSET_DIGITS}d}"
        f"{SEGMENT_SUFFIX}"
    )


def parse_segment_name(name: str) -> SegmentName:
    """Parse a store name produced by :func:`segment_name`; reject anything else."""
    m = _SEGMENT_RE.match(name)
    if m is None:
        raise InvalidNameError(f"not a segment name: {name!r}")
    return SegmentName(
        topic=check_topic(m["topic"]),
        partition=int(m["partition"]),
        start=int(m["start"]),
        end=int(m["end"]),
    )


def is_segment_name(name: str) -> bool:
    return _SEGMENT_RE.match(name) is not None


_SNAPSHOT_ID_RE = re.compile(
    r"^(?P<time>\d{20})-(?P<kind>full|differential|incremental|archive)-(?P<token>[0-9a-f]{6,32})$"
)


def snapshot_id(time_ms: int, kind: str, token: str) -> str:
    """A snapshot's id: ``<time_ms:020d>-<kind>-<token>``; lexical order is time order."""
    sid = f"{check_offset(time_ms):0{OFFSET_DIGITS}d}-{kind}-{token}"
    parse_snapshot_id(sid)
    return sid


def parse_snapshot_id(sid: str) -> tuple[int, str]:
    """``(time_ms, kind)`` of a snapshot id built by :func:`snapshot_id`."""
    m = _SNAPSHOT_ID_RE.match(sid)
    if m is None:
        raise InvalidNameError(f"not a snapshot id: {sid!r}")
    return int(m["time"]), m["kind"]


def snapshot_dir(sid: str, root: str = SNAPSHOTS_ROOT) -> str:
    """Store prefix of one snapshot (``root`` is ``snapshots`` or the archive tier's)."""
    parse_snapshot_id(sid)
    return f"{root}/{sid}/"


def snapshot_manifest_name(sid: str, root: str = SNAPSHOTS_ROOT) -> str:
    """The manifest: written last, create-only; its presence makes the snapshot visible."""
    return snapshot_dir(sid, root) + MANIFEST_NAME


def snapshot_file_name(sid: str, topic: str, root: str = SNAPSHOTS_ROOT) -> str:
    """One topic's data file inside a snapshot."""
    return snapshot_dir(sid, root) + check_topic(topic) + SNAPSHOT_SUFFIX


def parse_snapshot_object(name: str) -> tuple[str, str, str] | None:
    """``(root, snapshot id, file name)`` for an object under a snapshot directory."""
    parts = name.split("/")
    if len(parts) < 3:
        return None
    root, sid, rest = "/".join(parts[:-2]), parts[-2], parts[-1]
    if _SNAPSHOT_ID_RE.match(sid) is None:
        return None
    return root, sid, rest


def watermark_name(topic: str, partition: int) -> str:
    """Store name of a partition's watermark record (the only object that is replaced)."""
    return f"{WATERMARKS_ROOT}/{partition_dir(topic, partition)}.json"


def spool_dir(data_dir: Path, topic: str, partition: int) -> Path:
    """Local directory holding the active (unsealed) segment of one partition."""
    return data_dir / "spool" / check_topic(topic) / f"{check_partition(partition):06d}"


def active_segment_path(data_dir: Path, topic: str, partition: int, start: int) -> Path:
    """Path of the active segment whose coverage starts at ``start``."""
    return spool_dir(data_dir, topic, partition) / (
        f"{check_offset(start):0{OFFSET_DIGITS}d}{ACTIVE_SUFFIX}"
    )


def parse_active_path(path: Path) -> int:
    """Base offset of an active segment path built by :func:`active_segment_path`."""
    stem = path.name.removesuffix(ACTIVE_SUFFIX)
    if not path.name.endswith(ACTIVE_SUFFIX) or len(stem) != OFFSET_DIGITS or not stem.isdigit():
        raise InvalidNameError(f"not an active segment: {path}")
    return int(stem)


def sealed_spool_path(data_dir: Path, topic: str, partition: int, start: int, end: int) -> Path:
    """A segment sealed locally but not yet acknowledged by the store (ships on restart)."""
    return spool_dir(data_dir, topic, partition) / (
        f"{check_offset(start):0{OFFSET_DIGITS}d}-{check_offset(end):0{OFFSET_DIGITS}d}"
        f"{SEALED_SUFFIX}"
    )


def quarantine_path(data_dir: Path, topic: str) -> Path:
    """Per-topic quarantine log (JSON lines) for events that failed validation."""
    return data_dir / "quarantine" / f"{check_topic(topic)}.jsonl"


def temp_sibling(path: Path, token: str) -> Path:
    """Temporary name beside ``path``; swept at start if a crash leaves it behind."""
    return path.with_name(f"{TEMP_PREFIX}{token}-{path.name}")


def is_temp(name: str) -> bool:
    return name.rsplit("/", 1)[-1].startswith(TEMP_PREFIX)


def check_relative_name(name: str) -> str:
    """Validate a store-relative object name: no absolute paths, no ``..``, no empties."""
    if not name or name.startswith("/") or "\\" in name or "\x00" in name:
        raise InvalidNameError(f"invalid object name {name!r}")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise InvalidNameError(f"invalid object name {name!r}")
    return name
