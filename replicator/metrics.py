"""Prometheus metrics of one replicator instance (own registry: several can coexist)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """Every metric the service exports. Labels: ``topic``, ``partition``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.events_ingested = Counter(
            "replicator_events_ingested", "Events appended to segment logs", ["topic"], registry=r
        )
        self.events_quarantined = Counter(
            "replicator_events_quarantined",
            "Events diverted to the quarantine log",
            ["topic", "reason"],
            registry=r,
        )
        self.durable_offset = Gauge(
            "replicator_durable_offset",
            "Offset up to which (exclusive) records are fsync'd",
            ["topic", "partition"],
            registry=r,
        )
        self.consumer_lag = Gauge(
            "replicator_consumer_lag",
            "High watermark minus durable offset",
            ["topic", "partition"],
            registry=r,
        )
        self.watermark = Gauge(
            "replicator_watermark_seconds",
            "Newest time up to which the partition is durably covered (unix seconds)",
            ["topic", "partition"],
            registry=r,
        )
        self.fsync_seconds = Histogram(
            "replicator_fsync_seconds",
            "Latency of one group-commit write + fsync",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.group_commit_bytes = Histogram(
            "replicator_group_commit_bytes",
            "Uncompressed bytes made durable per group commit",
            buckets=(1e3, 1e4, 1e5, 2.5e5, 5e5, 1e6, 2e6, 4e6, 8e6, 1.6e7),
            registry=r,
        )
        self.segments_sealed = Counter(
            "replicator_segments_sealed", "Segments sealed and stored", ["topic"], registry=r
        )
        self.sealed_bytes = Counter(
            "replicator_sealed_bytes", "Bytes of sealed segments stored", ["topic"], registry=r
        )
        self.store_errors = Counter(
            "replicator_store_errors", "Failed store operations (retried)", ["op"], registry=r
        )
        self.destination_backlog = Gauge(
            "replicator_destination_backlog_objects",
            "Objects the primary store holds that a further destination still lacks",
            ["destination"], registry=r,
        )
        self.destination_up = Gauge(
            "replicator_destination_up", "1 when the destination's last operation succeeded",
            ["destination"], registry=r,
        )
        self.destination_rpo = Gauge(
            "replicator_destination_rpo_seconds",
            "Age of the newest point restorable from the destination (the RPO it gives)",
            ["destination"], registry=r,
        )
        self.destination_errors = Counter(
            "replicator_destination_errors", "Failed copies to a destination (retried)",
            ["destination"], registry=r,
        )
        self.drill_ok = Gauge(
            "replicator_drill_ok", "1 when the last disaster-recovery drill restored and "
            "verified, 0 when it failed", registry=r)
        self.drill_timestamp = Gauge(
            "replicator_drill_timestamp_seconds", "When the last drill ran (unix seconds)",
            registry=r)
        self.drill_rto = Gauge(
            "replicator_drill_rto_seconds", "Restore time measured by the last drill, "
            "extrapolated to the full data size", registry=r)
        self.drill_rpo = Gauge(
            "replicator_drill_rpo_seconds", "Age of the newest restorable point when the "
            "last drill ran", registry=r)
