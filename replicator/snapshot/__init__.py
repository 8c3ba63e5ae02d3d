"""Snapshots: the latest state per key as of a cut, in key-sorted, checksummed files."""
