"""A snapshot's manifest: what it covers, how it chains, what it holds.

Invariants:
- The manifest is the last object of a snapshot to be written (create-only). A snapshot
  exists for every reader exactly when its manifest does; data files without a manifest are
  leftovers of an interrupted compaction and are swept.
- ``cut`` is per partition the exclusive end offset: the snapshot reflects every record with
  ``offset < cut`` and nothing after. Every record it reflects has ``timestamp <= time_ms``,
  so the snapshot can serve any restore to ``T >= time_ms`` (plus segment records from the
  cut with ``timestamp <= T``) and any offsets restore whose ends are all ``>= cut``.
- ``start`` is per partition the first offset the snapshot's own entries come from: the
  parent's cut for incrementals and differentials, the chain's first offset for a full.
- ``parent`` chains incrementals to the previous snapshot of any kind and differentials to
  a full; a full (or archive) has no parent. Entries of a later link win over an earlier
  link's for the same ``(key, partition)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from replicator import naming
from replicator.errors import CorruptSnapshotError

TP = tuple[str, int]
FULL_KINDS = ("full", "archive")


@dataclass(frozen=True, slots=True)
class SnapshotFile:
    """One topic's data file of a snapshot."""

    topic: str
    entity: str
    name: str  # file name inside the snapshot's directory (``<topic>.snap``)
    bytes: int
    entries: int
    live: int
    tombstones: int
    #: digest of the live winners among this file's entries ("<count>:<hex>"); for a full
    #: snapshot that is the entity's state digest at the snapshot's cut
    digest: str
    #: id of the key the file is encrypted with (docs/FORMAT.md §7.5); None: not encrypted
    key_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "topic": self.topic, "entity": self.entity, "name": self.name,
            "bytes": self.bytes, "entries": self.entries, "live": self.live,
            "tombstones": self.tombstones, "digest": self.digest}
        if self.key_id is not None:
            out["key_id"] = self.key_id
        return out


@dataclass(frozen=True, slots=True)
class Manifest:
    id: str
    kind: str
    time_ms: int
    created_ms: int
    parent: str | None
    cut: Mapping[TP, int]
    start: Mapping[TP, int]
    files: tuple[SnapshotFile, ...]
    #: where the snapshot lives: the store root it was listed under ("snapshots"/"archive")
    root: str = field(default=naming.SNAPSHOTS_ROOT, compare=False)

    @property
    def is_full(self) -> bool:
        return self.kind in FULL_KINDS

    @property
    def size(self) -> int:
        """Bytes of all data files."""
        return sum(f.bytes for f in self.files)

    def file_for(self, topic: str) -> SnapshotFile | None:
        return next((f for f in self.files if f.topic == topic), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": 1,
            "id": self.id,
            "kind": self.kind,
            "time_ms": self.time_ms,
            "created_ms": self.created_ms,
            "parent": self.parent,
            "cut": _tp_json(self.cut),
            "start": _tp_json(self.start),
            "files": [f.to_json() for f in self.files],
        }

    def encode(self) -> bytes:
        return orjson.dumps(self.to_json(), option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2)

    @staticmethod
    def decode(data: bytes, name: str, root: str = naming.SNAPSHOTS_ROOT) -> Manifest:
        try:
            d = orjson.loads(data)
            if int(d["format"]) != 1:
                raise ValueError(f"manifest format {d['format']} is not supported")
            sid = str(d["id"])
            time_ms, kind = naming.parse_snapshot_id(sid)
            if (time_ms, kind) != (int(d["time_ms"]), str(d["kind"])):
                raise ValueError("id disagrees with kind/time")
            return Manifest(
                id=sid, kind=kind, time_ms=time_ms, created_ms=int(d["created_ms"]),
                parent=None if d["parent"] is None else str(d["parent"]),
                cut=_tp_parse(d["cut"]), start=_tp_parse(d["start"]),
                files=tuple(SnapshotFile(
                    topic=str(f["topic"]), entity=str(f["entity"]), name=str(f["name"]),
                    bytes=int(f["bytes"]), entries=int(f["entries"]), live=int(f["live"]),
                    tombstones=int(f["tombstones"]), digest=str(f["digest"]),
                    key_id=None if f.get("key_id") is None else str(f["key_id"]),
                ) for f in d["files"]),
                root=root,
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise CorruptSnapshotError(name, 0, f"unreadable manifest: {exc}") from None


def _tp_json(m: Mapping[TP, int]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (t, p), v in sorted(m.items()):
        out.setdefault(t, {})[str(p)] = v
    return out


def _tp_parse(d: Mapping[str, Mapping[str, Any]]) -> dict[TP, int]:
    return {(str(t), int(p)): int(v) for t, parts in d.items() for p, v in parts.items()}


def chain_of(sid: str, by_id: Mapping[str, Manifest]) -> list[Manifest] | None:
    """The links from the root full to ``sid`` (base first), or ``None`` when a link is
    missing (a parent removed by retention or never completed)."""
    out: list[Manifest] = []
    cur: str | None = sid
    seen: set[str] = set()
    while cur is not None:
        m = by_id.get(cur)
        if m is None or cur in seen:
            return None
        seen.add(cur)
        out.append(m)
        cur = m.parent
    out.reverse()
    return out if out[0].is_full else None


def newest(manifests: Iterable[Manifest], kinds: Iterable[str] | None = None) -> Manifest | None:
    ks = set(kinds) if kinds is not None else None
    best: Manifest | None = None
    for m in manifests:
        if ks is not None and m.kind not in ks:
            continue
        if best is None or (m.time_ms, m.id) > (best.time_ms, best.id):
            best = m
    return best
