"""replicator: durable, checksummed backups of Kafka change events.

The public API is curated here; everything else is an implementation detail.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
