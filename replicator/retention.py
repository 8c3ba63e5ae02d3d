"""Retention and the archive tier: what may be removed, and removing it safely.

:func:`plan_retention` is pure (catalog + snapshots + policy + now -> actions with reasons);
:func:`apply_retention` follows a plan.

Rules (defaults from the operators' policy, :class:`~replicator.config.RetentionSettings`):

* The **anchor** is the newest full (or archive) snapshot in the hot tier stamped at or before
  the horizon ``now - segments_days`` whose cut the stored segments continue. Every point
  from the anchor's time on stays restorable (anchor + segments from its cut), which covers
  the whole window. Without an anchor nothing is removed.
* Segments that end at or before the anchor's cut are removed; the retention record
  (``retention.json``) notes per partition the offset below which segments are gone, so the
  restore planner never replays a trimmed history from its start. It is written *before*
  any segment is deleted.
* Hot snapshots older than the anchor are removed unless a kept snapshot's chain needs them.
* Archive snapshots older than ``archive_after_days`` move to the archive tier (copied,
  re-read and checked, then removed from the hot tier); archive-tier snapshots older than
  ``archive_delete_days`` are deleted. Removing a snapshot removes its manifest first, so a
  crash leaves an orphan directory (swept), never a manifest without its data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from replicator import naming
from replicator.catalog import SegmentInfo
from replicator.errors import ObjectExistsError, ObjectNotFoundError, RetentionError
from replicator.restore.planner import TP, segment_chains
from replicator.restore.point import format_ms
from replicator.snapshot.file import SnapshotFileReader
from replicator.snapshot.manifest import FULL_KINDS, Manifest, chain_of
from replicator.snapshot.tiers import Tiers
from replicator.storage.base import Store

DAY_MS = 86_400_000


@dataclass(frozen=True, slots=True)
class Policy:
    segments_days: float = 30.0
    archive_after_days: float = 90.0
    archive_delete_days: float = 365.0


@dataclass(frozen=True, slots=True)
class Action:
    #: delete-segment | delete-snapshot | archive-snapshot | delete-archive
    kind: str
    name: str
    reason: str
    bytes: int = 0
    #: for snapshot actions: the tier root the snapshot is listed under
    root: str = naming.SNAPSHOTS_ROOT

    def to_json(self) -> dict[str, Any]:
        return {"action": self.kind, "name": self.name, "reason": self.reason,
                "bytes": self.bytes}


@dataclass(frozen=True, slots=True)
class RetentionPlan:
    now_ms: int
    horizon_ms: int
    anchor: Manifest | None
    actions: tuple[Action, ...]
    trimmed: Mapping[TP, int] = field(default_factory=dict)
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "now": format_ms(self.now_ms), "horizon": format_ms(self.horizon_ms),
            "anchor": self.anchor.id if self.anchor else None, "note": self.note,
            "actions": [a.to_json() for a in self.actions],
            "bytes": sum(a.bytes for a in self.actions),
        }


def plan_retention(
    segments: Iterable[SegmentInfo],
    snapshots: Iterable[Manifest],
    *,
    topics: Iterable[str],
    policy: Policy,
    now_ms: int,
    trimmed: Mapping[TP, int] | None = None,
) -> RetentionPlan:
    stored = [s for s in segments if s.location == "store"]
    snaps = list(snapshots)
    trimmed = dict(trimmed or {})
    horizon = now_ms - int(policy.segments_days * DAY_MS)
    chains = segment_chains(stored, [], set(topics))
    by_id = {m.id: m for m in snaps}
    hot = [m for m in snaps if m.root == naming.SNAPSHOTS_ROOT]
    archived = [m for m in snaps if m.root == naming.ARCHIVE_ROOT]
    actions: list[Action] = []

    anchor: Manifest | None = None
    for m in sorted(hot, key=lambda m: (m.time_ms, m.id), reverse=True):
        if m.kind in FULL_KINDS and m.time_ms <= horizon and all(
                c.first <= m.cut.get(tp, c.first) for tp, c in chains.items()):
            anchor = m
            break
    note = ""
    keep: set[str] = set()
    if anchor is None:
        note = (f"no full snapshot at or before the horizon {format_ms(horizon)}: every "
                "segment and snapshot is kept")
    else:
        # segments wholly before the anchor's cut
        for s in stored:
            cut = anchor.cut.get((s.topic, s.partition))
            if cut is not None and s.end <= cut:
                actions.append(Action("delete-segment", s.name,
                                      f"before the cut of {anchor.id} (the window's base)",
                                      s.bytes))
                tp = (s.topic, s.partition)
                trimmed[tp] = max(trimmed.get(tp, 0), s.end)
        kept_hot = [m for m in hot if m.time_ms >= anchor.time_ms]
        for m in kept_hot:
            for link in chain_of(m.id, by_id) or [m]:
                keep.add(link.id)
        for m in hot:
            if m.id not in keep and m.kind != "archive":
                actions.append(Action("delete-snapshot", m.id,
                                      f"older than {anchor.id}; no point in the window "
                                      "needs it", m.size))
    move_before = now_ms - int(policy.archive_after_days * DAY_MS)
    for m in hot:
        if m.kind == "archive" and m.time_ms < move_before and (
                anchor is None or m.id not in keep):
            actions.append(Action("archive-snapshot", m.id,
                                  f"archive snapshot older than {policy.archive_after_days:g} "
                                  "days moves to the archive tier", m.size))
    delete_before = now_ms - int(policy.archive_delete_days * DAY_MS)
    for m in archived:
        if m.time_ms < delete_before:
            actions.append(Action("delete-archive", m.id,
                                  f"older than {policy.archive_delete_days:g} days", m.size,
                                  naming.ARCHIVE_ROOT))
    return RetentionPlan(now_ms, horizon, anchor, tuple(actions), trimmed, note)


async def load_trimmed(store: Store) -> dict[TP, int]:
    """The retention record: per partition, the offset below which segments were removed."""
    try:
        data = await store.get_bytes(naming.RETENTION_STATE)
    except ObjectNotFoundError:
        return {}
    try:
        doc = orjson.loads(data)
        return {(str(t), int(p)): int(v) for t, ps in doc["trimmed"].items()
                for p, v in ps.items()}
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise RetentionError(f"{naming.RETENTION_STATE} is unreadable: {exc}") from None


async def save_trimmed(store: Store, trimmed: Mapping[TP, int]) -> None:
    doc: dict[str, dict[str, int]] = {}
    for (t, p), v in sorted(trimmed.items()):
        doc.setdefault(t, {})[str(p)] = v
    await store.put_bytes(naming.RETENTION_STATE, orjson.dumps(
        {"trimmed": doc, "updated_ms": int(time.time() * 1000)}), create_only=False)


async def _delete_snapshot(store: Store, m: Manifest) -> None:
    await store.delete(naming.snapshot_manifest_name(m.id, m.root))  # invisible first
    for obj in await store.list(naming.snapshot_dir(m.id, m.root)):
        await store.delete(obj.name)
    await store.prune(naming.snapshot_dir(m.id, m.root))


async def _verify_snapshot(tiers: Tiers, m: Manifest) -> None:
    await tiers.check_manifest(m)
    for f in m.files:
        path = await tiers.fetch(m, f.name)
        with SnapshotFileReader(path, name=tiers.object_name(m, f.name)) as r:
            n, _ = r.verify()
        if n != f.entries:
            raise RetentionError(f"{m.id}/{f.name}: holds {n} entries, the manifest says "
                                 f"{f.entries}; nothing removed")


async def apply_retention(tiers: Tiers, plan: RetentionPlan) -> list[Action]:
    """Carry out ``plan``; return the actions done. The anchor is re-verified (every block
    checksum) before any segment it replaces is removed."""
    done: list[Action] = []
    by_kind = {k: [a for a in plan.actions if a.kind == k]
               for k in ("archive-snapshot", "delete-snapshot", "delete-segment",
                         "delete-archive")}
    snaps = {(m.root, m.id): m for m in await tiers.list()}
    for a in by_kind["archive-snapshot"]:
        m = snaps[(a.root, a.name)]
        await _verify_snapshot(tiers, m)
        moved = dataclasses.replace(m, root=naming.ARCHIVE_ROOT)
        for f in m.files:
            name = tiers.object_name(moved, f.name)
            existing = {o.name for o in await tiers.archive.list(name)}
            if name not in existing:
                await tiers.archive.put_file(name, await tiers.fetch(m, f.name))
        await _verify_snapshot(tiers, moved)
        with contextlib.suppress(ObjectExistsError):  # a run interrupted after this point
            await tiers.archive.put_bytes(
                naming.snapshot_manifest_name(m.id, naming.ARCHIVE_ROOT), m.encode())
        await _delete_snapshot(tiers.hot, m)
        done.append(a)
    for a in by_kind["delete-snapshot"]:
        await _delete_snapshot(tiers.hot, snaps[(a.root, a.name)])
        done.append(a)
    if by_kind["delete-segment"]:
        if plan.anchor is None:
            raise RetentionError("segment removal without an anchor snapshot")
        await _verify_snapshot(tiers, plan.anchor)
        await save_trimmed(tiers.hot, plan.trimmed)
        for a in by_kind["delete-segment"]:
            await tiers.hot.delete(a.name)
            done.append(a)
    for a in by_kind["delete-archive"]:
        await _delete_snapshot(tiers.archive, snaps[(a.root, a.name)])
        done.append(a)
    return done
