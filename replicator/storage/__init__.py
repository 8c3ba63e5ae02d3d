"""Stores: where sealed segments (and later snapshots) live. See :class:`Store`."""

from __future__ import annotations

from replicator.storage.base import ObjectInfo, Store, open_store
from replicator.storage.local import LocalStore

__all__ = ["LocalStore", "ObjectInfo", "Store", "open_store"]
