"""Segment logs: the on-disk format, the writer of active segments, the reader.

A segment is an append-only file of checksummed, lz4-compressed blocks of Kafka records
for one topic-partition, followed (once sealed) by a footer index. See docs/FORMAT.md.
"""

from __future__ import annotations

from replicator.segment.format import BlockMeta, Record, SegmentHeader, SegmentSummary
from replicator.segment.reader import SegmentReader, recover_active

__all__ = [
    "BlockMeta",
    "Record",
    "SegmentHeader",
    "SegmentReader",
    "SegmentSummary",
    "recover_active",
]
