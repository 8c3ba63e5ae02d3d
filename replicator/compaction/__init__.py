"""Compaction: folding segments (and snapshot chains) into snapshots."""
