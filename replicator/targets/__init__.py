"""Restore targets, chosen by URL scheme (see :func:`open_target`)."""

from __future__ import annotations

from pathlib import Path

from replicator.errors import BadRequestError
from replicator.targets.base import RestoreRecord, RowIn, Target

__all__ = ["SCHEMES", "RestoreRecord", "RowIn", "Target", "open_target"]

SCHEMES = (
    "postgresql://user@host:port/db[?schema=name], sqlite:///abs/path.db, jsonl:///abs/dir, "
    "kafka://host:port/prefix[?mode=state|events]"
)


def open_target(url: str, *, restore_id: str, default_schema: str,
                swap_into: str | None = None) -> Target:
    """A target for ``url``; nothing is contacted until :meth:`Target.open`."""
    if url.startswith(("postgresql://", "postgres://")):
        from replicator.targets.postgres import PostgresTarget

        return PostgresTarget(url, default_schema=default_schema, restore_id=restore_id,
                              swap_into=swap_into)
    if swap_into:
        raise BadRequestError("--swap-into only applies to a postgresql:// target")
    if url.startswith("kafka://"):
        from replicator.targets.kafka import KafkaTarget

        return KafkaTarget(url, restore_id)
    for scheme in ("sqlite://", "jsonl://"):
        if url.startswith(scheme):
            raw = url[len(scheme):]
            if not raw.startswith("/"):
                raise BadRequestError(
                    f"target {url!r}: the path must be absolute ({scheme}/abs/path)")
            path = Path(raw)
            if scheme == "sqlite://":
                from replicator.targets.sqlite import SqliteTarget

                return SqliteTarget(path, restore_id)
            from replicator.targets.jsonl import JsonlTarget

            return JsonlTarget(path, restore_id)
    from replicator.redact import redact_url

    raise BadRequestError(f"unsupported target {redact_url(url)!r}; use one of: {SCHEMES}")
