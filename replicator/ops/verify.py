"""Verifying a backup: every stored file's checksums, offset continuity per partition,
snapshot digests -- and, with ``deep``, each snapshot's state rebuilt from the segments it
covers and compared with the digest it records.

Two halves:

* **pure** -- :func:`plan_verify` (which files to read this run), :func:`continuity`
  (holes between segments, each with its reason), :func:`manifest_findings`,
  :func:`deep_due` / :func:`deep_source` (which snapshots to rebuild, from what). No I/O,
  no clock: every scenario is a unit test (tests/test_verify_planner.py).
* **executor** -- :func:`verify_store` lists the store, follows the plan, records the
  outcome in the state file and returns a :class:`VerifyReport`.

Invariants:

- **Incremental, never forgetful.** The state (``<data_dir>/verify-state.json``, one
  section per store URL) remembers per object its size, its checksum (the CRC of its
  footer, from the trailer), when it was last verified and the result. A run reads the
  files that are new, whose size changed, or whose last result was not ``ok`` -- a failed
  file stays failed until it verifies -- plus a **rotating sample** of the others: the
  ``max(sample_min, ceil(sample_fraction * n))`` verified longest ago (ties by name). Every
  old file is therefore re-read within ``ceil(n / sample)`` runs, and a run's cost depends
  on what is new, not on the size of the archive. ``full`` reads everything.
- **Names are checked every run**, all of them: continuity needs only the listing, the
  watermark objects and ``retention.json``; manifests are small and read every run.
- **A gap has a reason.** Offsets inside a segment's range without a record are Kafka's
  (transaction markers, compaction, quarantine) and never reported. Between stored
  segments, or before the first / after the last one: below the retention point
  (``retention.json``) a gap is ``gap-ok`` (retention); before the first segment of a
  partition that nothing says was ever stored, it is ``gap-ok`` (kafka: ingest began at
  Kafka's log start); anything else is ``missing`` (a file is gone).
- **Kinds.** Problems: ``corrupt`` (a checksum, framing, size or count check failed),
  ``digest-mismatch`` (a snapshot's recorded digest disagrees with its file or with a
  rebuild from segments) -- both make the run *corrupt* -- and ``missing`` (a file that
  should exist does not). Notes, which do not fail a run: ``gap-ok``, ``overlap`` (two
  segments hold the same offsets; restores read the one reaching further) and ``changed``
  (an immutable file's checksum differs from the copy verified before, and the new
  content verifies).
- **Deep** rebuilds each snapshot once: snapshots are immutable, so one that was rebuilt
  and matched, whose files still carry the same checksums, is not rebuilt again (its
  bytes keep being checked by the rotating sample). See :func:`deep_source` for what a
  snapshot is rebuilt from.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from replicator import crypto, naming
from replicator.catalog import (
    Catalog,
    Problem,
    SegmentInfo,
    check_segment_file,
    find_gaps,
    find_missing_tails,
)
from replicator.compaction.build import DEFAULT_BUDGET, build_topic
from replicator.errors import (
    CorruptSegmentError,
    KeyNotFoundError,
    ObjectNotFoundError,
    ReplicatorError,
    RetentionError,
    SegmentError,
    StoreError,
)
from replicator.restore.layout import TableLayout
from replicator.restore.planner import TP, PartitionPlan, Read
from replicator.restore.point import format_ms
from replicator.restore.replay import ReplayStats
from replicator.retention import load_trimmed
from replicator.segment import format as fmt
from replicator.snapshot import format as sfmt
from replicator.snapshot.file import SnapshotFileReader
from replicator.snapshot.manifest import Manifest, SnapshotFile
from replicator.snapshot.tiers import Tiers
from replicator.storage.base import Store, local_copy
from replicator.storage.local import LocalStore, fsync_dir

if TYPE_CHECKING:
    from replicator.schemas import SchemaRegistry

log = logging.getLogger(__name__)

STATE_FILE = "verify-state.json"
STATE_FORMAT = 1

#: problem kinds and what they make of the whole run
PROBLEM_KINDS = {"corrupt": "corrupt", "digest-mismatch": "corrupt", "missing": "missing"}
NOTE_KINDS = ("gap-ok", "overlap", "changed", "unverifiable")

SEGMENT = "segment"
SNAPSHOT = "snapshot"


# -- findings ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing a run found. ``offset``/``end``: the offsets concerned (``[offset, end)``
    for a gap); ``position``: byte position of a bad block; ``reason``: why a gap is not
    data loss (``retention`` | ``kafka``)."""

    kind: str
    name: str
    detail: str
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    end: int | None = None
    position: int | None = None
    reason: str | None = None

    @property
    def is_problem(self) -> bool:
        return self.kind in PROBLEM_KINDS

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "detail": self.detail,
                "topic": self.topic, "partition": self.partition, "offset": self.offset,
                "end": self.end, "position": self.position, "reason": self.reason}


def finding_of(p: Problem) -> Finding:
    """A catalog problem (corrupt | unreadable | unverifiable segment) as a finding;
    ``unverifiable`` (no key here) is a note, read again every run until the key is."""
    kind = "unverifiable" if p.kind == "unverifiable" else "corrupt"
    return Finding(kind, p.name, p.detail, p.topic, p.partition, p.offset,
                   position=p.position)


# -- state ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FileState:
    """What the last check of one object found."""

    size: int
    #: the object's checksum: CRC-32 of its footer, from the trailer (``None``: unreadable)
    checksum: str | None
    verified_ms: int
    #: the run number that verified it (orders the rotating sample; robust to clock steps)
    run: int
    #: ``ok`` or the finding's kind
    result: str
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "checksum": self.checksum, "verified_ms": self.verified_ms,
                "run": self.run, "result": self.result, "detail": self.detail}

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> FileState:
        return FileState(int(d["size"]), None if d.get("checksum") is None else str(d["checksum"]),
                         int(d["verified_ms"]), int(d["run"]), str(d["result"]),
                         str(d.get("detail", "")))


@dataclass(frozen=True, slots=True)
class DeepRecord:
    """A snapshot rebuilt from segments: the result and the identity of the files it was."""

    result: str  # ok | digest-mismatch
    verified_ms: int
    #: (tier root, checksums of its data files in manifest order)
    identity: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"result": self.result, "verified_ms": self.verified_ms,
                "identity": list(self.identity)}

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> DeepRecord:
        return DeepRecord(str(d["result"]), int(d["verified_ms"]),
                          tuple(str(x) for x in d["identity"]))


@dataclass(frozen=True, slots=True)
class StoreState:
    """One store's section of the state file."""

    run: int = 0
    files: Mapping[str, FileState] = field(default_factory=dict)
    deep: Mapping[str, DeepRecord] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"run": self.run,
                "files": {n: s.to_json() for n, s in sorted(self.files.items())},
                "deep": {sid: r.to_json() for sid, r in sorted(self.deep.items())}}

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> StoreState:
        return StoreState(int(d.get("run", 0)),
                          {str(n): FileState.from_json(s) for n, s in d.get("files", {}).items()},
                          {str(k): DeepRecord.from_json(r) for k, r in d.get("deep", {}).items()})


def load_state(path: Path) -> tuple[dict[str, StoreState], str | None]:
    """Every store's section of the state file, and why it was ignored (unreadable: then
    every file counts as new -- the safe direction)."""
    try:
        doc = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return {}, None
    except (OSError, orjson.JSONDecodeError) as exc:
        return {}, f"{path} is unreadable ({exc}); every file is checked"
    try:
        if int(doc["format"]) != STATE_FORMAT:
            return {}, f"{path} has format {doc['format']}; every file is checked"
        return {str(url): StoreState.from_json(s) for url, s in doc["stores"].items()}, None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return {}, f"{path} is malformed ({exc!r}); every file is checked"


def save_state(path: Path, updates: Mapping[str, StoreState]) -> None:
    """Write the sections of ``updates`` (other stores' sections are kept): temp file,
    fsync, rename, fsync of the directory."""
    stores, _ = load_state(path)
    stores.update(updates)
    data = orjson.dumps({"format": STATE_FORMAT,
                         "stores": {u: s.to_json() for u, s in sorted(stores.items())}})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = naming.temp_sibling(path, secrets.token_hex(4))
    try:
        with tmp.open("xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


# -- the planner (pure) -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Candidate:
    """A stored object verify knows how to check."""

    name: str
    size: int
    kind: str  # segment | snapshot


@dataclass(frozen=True, slots=True)
class Check:
    """Read ``name`` this run, and why: new | changed | failed | sample | full."""

    name: str
    size: int
    kind: str
    reason: str


@dataclass(frozen=True, slots=True)
class VerifyPlan:
    checks: tuple[Check, ...]
    #: verified before, unchanged, not in this run's sample
    skipped: tuple[str, ...]
    #: in the state but no longer listed (removed by retention, or missing: the continuity
    #: and manifest checks say which); forgotten
    dropped: tuple[str, ...]
    #: already-verified files, and how many of them this run re-reads
    old_files: int
    sample: int

    @property
    def rotation_runs(self) -> int | None:
        """Runs after which every old file has been re-read (``None``: never, no sample)."""
        if not self.old_files:
            return 0
        return math.ceil(self.old_files / self.sample) if self.sample else None


def sample_size(old_files: int, fraction: float, minimum: int) -> int:
    """How many already-verified files one run re-reads."""
    return min(old_files, max(minimum, math.ceil(old_files * fraction)))


def plan_verify(files: Iterable[Candidate], state: StoreState, *, sample_fraction: float,
                sample_min: int, full: bool = False) -> VerifyPlan:
    """Which of ``files`` to read this run (see the module docstring).

    The sample is the ``sample_size`` old files with the oldest ``(run, verified_ms,
    name)``: deterministic, and round-robin -- a file read now moves to the back."""
    checks: list[Check] = []
    old: list[tuple[int, int, str, Candidate]] = []
    listed: set[str] = set()
    for f in sorted(files, key=lambda c: c.name):
        listed.add(f.name)
        st = state.files.get(f.name)
        if full:
            reason = "full"
        elif st is None:
            reason = "new"
        elif st.size != f.size:
            reason = "changed"
        elif st.result != "ok":
            reason = "failed"
        else:
            old.append((st.run, st.verified_ms, f.name, f))
            continue
        checks.append(Check(f.name, f.size, f.kind, reason))
    k = sample_size(len(old), sample_fraction, sample_min)
    old.sort(key=lambda x: (x[0], x[1], x[2]))
    checks += [Check(f.name, f.size, f.kind, "sample") for *_, f in old[:k]]
    return VerifyPlan(
        checks=tuple(checks),
        skipped=tuple(sorted(f.name for *_, f in old[k:])),
        dropped=tuple(sorted(set(state.files) - listed)),
        old_files=len(old), sample=k,
    )


@dataclass(frozen=True, slots=True)
class Outcome:
    """What reading one planned file found (``vanished``: gone since the listing)."""

    check: Check
    finding: Finding | None = None
    checksum: str | None = None
    vanished: bool = False


def next_state(state: StoreState, plan: VerifyPlan, outcomes: Iterable[Outcome], *,
               now_ms: int, deep: Mapping[str, DeepRecord] | None = None) -> StoreState:
    """The state after a run: its outcomes recorded (as run ``state.run + 1``), dropped and
    vanished files forgotten, everything else kept as it was."""
    run = state.run + 1
    files = {n: s for n, s in state.files.items() if n not in set(plan.dropped)}
    for o in outcomes:
        if o.vanished:
            files.pop(o.check.name, None)
            continue
        f = o.finding
        files[o.check.name] = FileState(o.check.size, o.checksum, now_ms, run,
                                        "ok" if f is None else f.kind,
                                        "" if f is None else f.detail)
    return StoreState(run, files, dict(state.deep if deep is None else deep))


def changed_note(check: Check, before: FileState | None, checksum: str | None
                 ) -> Finding | None:
    """A note when a file that verified before now verifies with another checksum (sealed
    files never change: someone rewrote it)."""
    if (before is None or before.result != "ok" or before.checksum is None
            or checksum is None or before.checksum == checksum):
        return None
    return Finding("changed", check.name,
                   f"its checksum was {before.checksum} when verified at "
                   f"{format_ms(before.verified_ms)}, now {checksum}; the new content verifies")


# -- continuity (pure) ------------------------------------------------------------------------


def _gap(name: str, tp: TP, a: int | None, b: int, trimmed: int, where: str) -> list[Finding]:
    """The gap ``[a, b)`` (``a`` unknown: ``None``) split at the retention point."""
    out: list[Finding] = []
    t, p = tp
    if trimmed and (a is None or a < trimmed):
        hi = min(b, trimmed)
        rng = f"[{a}, {hi})" if a is not None else f"below {hi}"
        out.append(Finding("gap-ok", name, f"offsets {rng} {where}: removed by retention "
                           f"(retention.json: segments before {trimmed} were trimmed)",
                           t, p, a, hi, reason="retention"))
    lo = a if a is not None and a >= trimmed else (trimmed if trimmed else a)
    if lo is None or lo < b:
        rng = f"[{lo}, {b})" if lo is not None else f"below {b}"
        out.append(Finding("missing", name, f"offsets {rng} {where}: a segment file is "
                           "missing", t, p, lo, b))
    return out


def continuity(segment_names: Iterable[str], stored_ends: Mapping[TP, tuple[str, int]],
               trimmed: Mapping[TP, int], known_starts: Mapping[TP, int] | None = None
               ) -> list[Finding]:
    """Holes and overlaps in each partition's stored offsets, each with its reason.

    ``stored_ends``: per partition the watermark object's name and the ``stored_end`` it
    records (segments were stored up to there); ``trimmed``: ``retention.json``;
    ``known_starts``: per partition the lowest offset a snapshot says segments started at
    (its ``start``), evidence that the store once held data from there."""
    names = sorted(segment_names)
    known_starts = known_starts or {}
    out: list[Finding] = []
    for p in find_gaps(names):
        tp = (p.topic, p.partition)
        if p.kind == "overlap":
            out.append(Finding("overlap", p.name, p.detail + "; restores read the segment "
                               "reaching further", p.topic, p.partition, p.offset))
            continue
        seg = naming.parse_segment_name(p.name)
        out += _gap(p.name, tp, p.offset, seg.start, trimmed.get(tp, 0),
                    f"between stored segments (before {seg.name.rsplit('/', 1)[-1]})")
    for p in find_missing_tails(names, dict(stored_ends)):
        tp = (p.topic, p.partition)
        out += _gap(p.name, tp, p.offset, stored_ends[tp][1], trimmed.get(tp, 0),
                    "after the newest stored segment (the watermark object records them "
                    "as stored)")
    first: dict[TP, naming.SegmentName] = {}
    for n in names:
        seg = naming.parse_segment_name(n)
        tp = (seg.topic, seg.partition)
        if tp not in first or seg.start < first[tp].start:
            first[tp] = seg
    for tp, seg in sorted(first.items()):
        t = trimmed.get(tp, 0)
        k = known_starts.get(tp)
        if seg.start == 0:
            continue
        if t and seg.start <= t:
            out.append(Finding("gap-ok", seg.name, f"offsets below {seg.start}: removed by "
                               f"retention (retention.json: trimmed up to {t})", tp[0], tp[1],
                               None, seg.start, reason="retention"))
        elif t:
            out.append(Finding("missing", seg.name, f"offsets [{t}, {seg.start}) before the "
                               f"first stored segment: retention trimmed up to {t} only, a "
                               "segment file is missing", tp[0], tp[1], t, seg.start))
        elif k is not None and k < seg.start:
            out.append(Finding("missing", seg.name, f"offsets [{k}, {seg.start}) before the "
                               f"first stored segment: a snapshot was built from offset {k}, "
                               "a segment file is missing", tp[0], tp[1], k, seg.start))
        elif seg.start > 0:
            out.append(Finding("gap-ok", seg.name, f"offsets below {seg.start}: ingest began "
                               "there (Kafka's log start at the time: its retention or "
                               "compaction had removed earlier offsets)", tp[0], tp[1], None,
                               seg.start, reason="kafka"))
    return out


# -- manifests (pure) -------------------------------------------------------------------------


def manifest_findings(manifests: Sequence[Manifest], sizes: Callable[[Manifest, str],
                      int | None], object_name: Callable[[Manifest, str], str]
                      ) -> tuple[list[Finding], list[tuple[Manifest, SnapshotFile]]]:
    """Per manifest: its data files present with the size it records, its parent present.
    Returns the findings and the data files worth reading (present, right size).

    ``sizes(m, object name)``: the listed size of the object in ``m``'s tier (``None``:
    not listed)."""
    ids = {m.id for m in manifests}
    out: list[Finding] = []
    good: list[tuple[Manifest, SnapshotFile]] = []
    for m in manifests:
        mname = naming.snapshot_manifest_name(m.id, m.root)
        for f in m.files:
            name = object_name(m, f.name)
            size = sizes(m, name)
            if size is None:
                out.append(Finding("missing", name, f"data file of snapshot {m.id} "
                                   f"({f.entity}) is missing", f.topic))
            elif size != f.bytes:
                out.append(Finding("corrupt", name, f"{size} bytes, the manifest of {m.id} "
                                   f"records {f.bytes}", f.topic))
            else:
                good.append((m, f))
        if m.parent is not None and m.parent not in ids:
            out.append(Finding("missing", mname, f"its parent snapshot {m.parent} is gone: "
                               f"the {m.kind} cannot be restored"))
    return out, good


# -- deep (pure) ------------------------------------------------------------------------------


def deep_identity(m: Manifest, checksums: Callable[[Manifest, str], str | None]
                  ) -> tuple[str, ...]:
    """What a deep result is remembered against: the tier and its files' checksums."""
    return (m.root, *(str(checksums(m, f.name)) for f in m.files))


def deep_due(manifests: Iterable[Manifest], records: Mapping[str, DeepRecord],
             identities: Mapping[str, tuple[str, ...]], *, redo: bool = False
             ) -> tuple[list[Manifest], list[Manifest]]:
    """(snapshots to rebuild this run, snapshots already rebuilt and matched with the same
    files), both oldest first. Not ``ok`` before, or other files since: due again."""
    due: list[Manifest] = []
    done: list[Manifest] = []
    for m in sorted(manifests, key=lambda m: (m.time_ms, m.id)):
        r = records.get(m.id)
        if not redo and r is not None and r.result == "ok" and r.identity == identities.get(m.id):
            done.append(m)
        else:
            due.append(m)
    return due, done


@dataclass(frozen=True, slots=True)
class DeepSource:
    """What one snapshot is rebuilt from: ``base`` (a full already rebuilt and matched;
    ``None``: nothing) and, per partition, the segment reads covering ``[lo, cut)``."""

    manifest: Manifest
    base: Manifest | None
    reads: Mapping[TP, tuple[Read, ...]]
    ranges: Mapping[TP, tuple[int, int]]
    skip: str | None = None

    @property
    def how(self) -> str:
        if self.base is not None:
            return f"snapshot {self.base.id} + segments"
        return "segments"


def segment_info(name: str, size: int) -> SegmentInfo:
    """A store segment known by its name only (all a replay needs to open it)."""
    s = naming.parse_segment_name(name)
    return SegmentInfo(name=name, location="store", topic=s.topic, partition=s.partition,
                       start=s.start, end=s.end, records=0, min_ts=-1, max_ts=-1,
                       watermark_ms=0, bytes=size)


def cover(segs: Sequence[SegmentInfo], lo: int, hi: int
          ) -> tuple[tuple[Read, ...], tuple[int, int] | None]:
    """Reads of ``segs`` (one partition's, any order) covering ``[lo, hi)`` without a hole,
    or the first hole."""
    reads: list[Read] = []
    pos = lo
    for s in sorted(segs, key=lambda s: (s.start, -s.end)):
        if pos >= hi:
            break
        if s.end <= pos:
            continue
        if s.start > pos:
            return tuple(reads), (pos, min(s.start, hi))
        reads.append(Read(s, pos, min(s.end, hi)))
        pos = s.end
    if pos < hi:
        return tuple(reads), (pos, hi)
    return tuple(reads), None


def deep_source(m: Manifest, manifests: Iterable[Manifest],
                segments: Mapping[TP, Sequence[SegmentInfo]], trimmed: Mapping[TP, int],
                verified: Collection[str]) -> DeepSource:
    """What ``m`` can be rebuilt from, or why it cannot be.

    * An incremental or differential holds the changes of ``[start, cut)``: rebuilt from
      exactly those segment offsets.
    * A full (or archive) holds the whole state at its cut: rebuilt from the newest
      earlier full in ``verified`` (rebuilt and matched itself, this run or before) plus the
      segments from its cut -- so each full is checked against the previous one and the
      segments between them; without one, from every segment since the partition's first
      stored offset, as long as retention has removed none (and none is missing below the
      offset the full itself was built from).
    """
    tps = sorted(m.cut)

    def reads_for(ranges: Mapping[TP, tuple[int, int]]) -> tuple[dict[TP, tuple[Read, ...]],
                                                                 str | None]:
        out: dict[TP, tuple[Read, ...]] = {}
        for tp, (lo, hi) in ranges.items():
            if hi < lo:
                return out, f"{tp[0]}:{tp[1]}: the cut {hi} is below the start {lo}"
            rs, hole = cover(segments.get(tp, ()), lo, hi)
            if hole is not None:
                t = trimmed.get(tp, 0)
                why = (f"segments before offset {t} were removed by retention" if t > hole[0]
                       else "a segment file is missing")
                return out, f"{tp[0]}:{tp[1]}: offsets [{hole[0]}, {hole[1]}) are not " \
                            f"stored ({why})"
            out[tp] = rs
        return out, None

    if not m.is_full:
        ranges = {tp: (m.start.get(tp, m.cut[tp]), m.cut[tp]) for tp in tps}
        reads, skip = reads_for(ranges)
        return DeepSource(m, None, reads, ranges, skip)
    topics = {f.topic for f in m.files}
    bases = sorted((b for b in manifests
                    if b.is_full and b.id in verified and (b.time_ms, b.id) < (m.time_ms, m.id)),
                   key=lambda b: (b.time_ms, b.id), reverse=True)
    for b in bases:
        if any(b.file_for(t) is None and any(tp[0] == t for tp in b.cut) for t in topics):
            continue
        ranges = {}
        usable = True
        for tp in tps:
            lo = b.cut.get(tp)
            if lo is None:  # a partition created after the base: from its first offset
                if trimmed.get(tp, 0):
                    usable = False
                    break
                lo = min((s.start for s in segments.get(tp, ())), default=m.cut[tp])
            ranges[tp] = (lo, m.cut[tp])
        if not usable or any(lo > hi for lo, hi in ranges.values()):
            continue
        reads, skip = reads_for(ranges)
        if skip is None:
            return DeepSource(m, b, reads, ranges)
    cut_tps = [tp for tp in tps if trimmed.get(tp, 0)]
    if cut_tps:
        t, p = cut_tps[0]
        return DeepSource(m, None, {}, {}, f"no earlier full snapshot was rebuilt and matched "
                          f"to start from, and segments of {t}:{p} before offset "
                          f"{trimmed[(t, p)]} were removed by retention")
    ranges = {}
    for tp in tps:
        first = min((s.start for s in segments.get(tp, ())), default=m.cut[tp])
        built_from = m.start.get(tp, first)
        if first > built_from:
            return DeepSource(m, None, {}, {}, f"{tp[0]}:{tp[1]}: it was built from offset "
                              f"{built_from} but the stored segments begin at {first} (a "
                              "segment file is missing)")
        ranges[tp] = (first, m.cut[tp])
    reads, skip = reads_for(ranges)
    return DeepSource(m, None, reads, ranges, skip)


# -- the report -------------------------------------------------------------------------------


@dataclass
class VerifyReport:
    store: str
    archive: str | None
    full: bool
    deep: bool
    run: int = 0
    findings: list[Finding] = field(default_factory=list)
    #: per check kind: counts (see :meth:`to_json`)
    checks: dict[str, dict[str, int]] = field(default_factory=dict)
    files_checked: int = 0
    files_skipped: int = 0
    bytes_read: int = 0
    elapsed_s: float = 0.0
    old_files: int = 0
    sample: int = 0
    rotation_runs: int | None = 0
    #: deep: snapshots rebuilt (id, what from, result) and those that could not be (id, why)
    deep_rebuilt: list[tuple[str, str, str]] = field(default_factory=list)
    deep_skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.is_problem]

    @property
    def status(self) -> str:
        """``ok``, or ``corrupt`` (wins) / ``missing``: the worst problem's class."""
        classes = {PROBLEM_KINDS[f.kind] for f in self.problems}
        return "corrupt" if "corrupt" in classes else "missing" if classes else "ok"

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.findings:
            out[f.kind] = out.get(f.kind, 0) + 1
        return out

    def verdict(self) -> str:
        """One line: the outcome, what was read, how long it took."""
        c = self.counts()
        notes = ", ".join(f"{c[k]} {k}" for k in NOTE_KINDS if c.get(k))
        head = "ok" if self.status == "ok" else self.status.upper() + ": " + ", ".join(
            f"{c[k]} {k}" for k in PROBLEM_KINDS if c.get(k))
        return (f"{head} -- {self.files_checked} files checked, {self.files_skipped} skipped "
                f"(verified before), {self.bytes_read / 2**20:.1f} MiB read in "
                f"{self.elapsed_s:.1f}s" + (f"; notes: {notes}" if notes else ""))

    def to_json(self) -> dict[str, Any]:
        return {
            "store": self.store, "archive": self.archive, "status": self.status,
            "full": self.full, "deep": self.deep, "run": self.run,
            "checks": self.checks, "counts": self.counts(),
            "files_checked": self.files_checked, "files_skipped": self.files_skipped,
            "bytes_read": self.bytes_read, "elapsed_s": round(self.elapsed_s, 3),
            "sample": {"old_files": self.old_files, "size": self.sample,
                       "rotation_runs": self.rotation_runs},
            "problems": [f.to_json() for f in self.findings],
            "deep_rebuilt": [{"snapshot": s, "from": how, "result": r}
                             for s, how, r in self.deep_rebuilt],
            "deep_skipped": [{"snapshot": s, "reason": r} for s, r in self.deep_skipped],
            "notes": self.notes,
        }


# -- the executor -----------------------------------------------------------------------------

Advance = Callable[[int], None]
Phase = Callable[[str, int], None]


def _trailer_checksum(path: Path, magic: bytes) -> str | None:
    """The footer CRC a file's trailer records (both formats end with the same trailer
    layout), as 8 hex digits; ``None`` without a valid trailer."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            if size < fmt.TRAILER.size:
                return None
            f.seek(size - fmt.TRAILER.size)
            _pos, _len, crc, got = fmt.TRAILER.unpack(f.read(fmt.TRAILER.size))
    except (OSError, struct.error):
        return None
    return f"{crc:08x}" if got == magic else None


def _check_segment(path: Path, name: str) -> tuple[Finding | None, str | None]:
    _entry, problem = check_segment_file(path, name)
    return (None if problem is None else finding_of(problem),
            _trailer_checksum(path, fmt.TRAILER_MAGIC))


def _check_snapshot(path: Path, name: str, f: SnapshotFile) -> tuple[Finding | None, str | None]:
    """Every block, the order, the index, and the footer's counts and digest against the
    manifest's."""
    checksum = _trailer_checksum(path, sfmt.TRAILER_MAGIC)

    def bad(detail: str, kind: str = "corrupt", position: int | None = None
            ) -> tuple[Finding, str | None]:
        return Finding(kind, name, detail, f.topic, position=position), checksum

    try:
        with SnapshotFileReader(path, name=name) as r:
            n, content = r.verify()
            summary, size = r.summary, r.size
    except CorruptSegmentError as exc:  # an authentication failure is corruption too
        return bad(exc.reason, position=exc.position)
    except KeyNotFoundError as exc:
        # on a host without any key: not evidence of damage; it stays unverified (read
        # again every run) until it runs where the keys are. With keys configured, one
        # missing from them blocks every restore of this file: a problem
        if crypto.installed() is None:
            return bad(f"cannot be checked here: {exc}", kind="unverifiable")
        return bad(f"unreadable snapshot file: {exc}")
    except (ReplicatorError, OSError, ValueError, struct.error, KeyError) as exc:
        return bad(f"unreadable snapshot file: {exc}")
    if size != f.bytes:
        return bad(f"{size} bytes, the manifest records {f.bytes}")
    if n != f.entries:
        return bad(f"holds {n} entries, the manifest records {f.entries}")
    if summary.get("content_hash", content) != content:
        return bad("content hash of the blocks differs from the one in its footer")
    if (summary.get("live"), summary.get("tombstones")) != (f.live, f.tombstones):
        return bad(f"footer counts {summary.get('live')} live / {summary.get('tombstones')} "
                   f"tombstones, the manifest {f.live} / {f.tombstones}")
    if summary.get("digest") != f.digest:
        return bad(f"footer digest {summary.get('digest')} differs from the manifest's "
                   f"{f.digest}", kind="digest-mismatch")
    return None, checksum


@dataclass
class _StoreRun:
    """One store's part of a run: its objects, candidates, plan and outcomes."""

    store: Store
    state: StoreState
    candidates: list[Candidate] = field(default_factory=list)
    snapshot_files: dict[str, SnapshotFile] = field(default_factory=dict)
    plan: VerifyPlan | None = None
    outcomes: list[Outcome] = field(default_factory=list)


async def verify_store(
    store: Store,
    *,
    state_path: Path,
    archive: Store | None = None,
    sample_fraction: float = 0.05,
    sample_min: int = 8,
    full: bool = False,
    deep: bool = False,
    registry: SchemaRegistry | None = None,
    advance: Advance | None = None,
    phase: Phase | None = None,
    concurrency: int | None = None,
    now_ms: int | None = None,
    deep_budget: int | None = None,
) -> VerifyReport:
    """Verify ``store`` (and the archive tier: its ``archive/`` prefix, or ``archive``);
    record what was verified in ``state_path``; return the report.

    ``registry`` (a :class:`~replicator.schemas.SchemaRegistry`) is needed with ``deep``;
    ``advance``/``phase`` drive a progress display (files checked, snapshots rebuilt)."""
    t0 = time.monotonic()
    now = int(time.time() * 1000) if now_ms is None else now_ms
    for where in (store, archive):
        if isinstance(where, LocalStore) and not where.root.is_dir():
            raise StoreError(f"store directory {where.root} does not exist (check store.url "
                             "/ ingest.data_dir)")
    tiers = Tiers(store, archive if archive is not None else store)
    separate = archive is not None and archive.url != store.url
    states, state_note = load_state(state_path)
    report = VerifyReport(store=store.url, archive=archive.url if separate and archive else None,
                          full=full, deep=deep)
    if state_note:
        report.notes.append(state_note)
    runs: dict[str, _StoreRun] = {store.url: _StoreRun(store, states.get(store.url, StoreState()))}
    if separate and archive is not None:
        runs[archive.url] = _StoreRun(archive, states.get(archive.url, StoreState()))
    findings: list[Finding] = []

    # 1. names: watermarks first (a segment stored meanwhile only adds coverage), then the
    # segments, then retention.json (written before retention deletes anything)
    cat = Catalog(store=store, data_dir=None)
    wm_problems: list[Problem] = []
    stored_ends = {(d["topic"], d["partition"]): (d["name"], d["stored_end"])
                   for d in await cat.watermarks(None, wm_problems)
                   if d["stored_end"] is not None}
    findings += [finding_of(p) for p in wm_problems]
    seg_objs = [o for o in await store.list(naming.segments_prefix())
                if naming.is_segment_name(o.name)]
    try:
        trimmed = await load_trimmed(store)
    except RetentionError as exc:
        findings.append(Finding("corrupt", naming.RETENTION_STATE, str(exc)))
        trimmed = {}
    runs[store.url].candidates += [Candidate(o.name, o.size, SEGMENT) for o in seg_objs]

    # 2. manifests (read every run), and their data files as candidates
    sizes: dict[str, dict[str, int]] = {}
    manifests: list[Manifest] = []
    manifest_bytes = 0
    n_manifests = 0
    for _tier, tstore, root in tiers.tiers():
        listing = {o.name: o.size for o in await tstore.list(root + "/")}
        sizes.setdefault(tstore.url, {}).update(listing)
        for name in sorted(listing):
            parsed = naming.parse_snapshot_object(name)
            if parsed is None or parsed[0] != root or parsed[2] != naming.MANIFEST_NAME:
                continue
            n_manifests += 1
            try:
                data = await tstore.get_bytes(name)
            except ObjectNotFoundError:
                continue  # removed by retention since the listing
            manifest_bytes += len(data)
            try:
                manifests.append(Manifest.decode(data, name, root))
            except CorruptSegmentError as exc:
                findings.append(Finding("corrupt", name, exc.reason))
    manifests.sort(key=lambda m: (m.time_ms, m.id))
    mfind, good = manifest_findings(
        manifests, lambda m, n: sizes[tiers.store_of(m).url].get(n), tiers.object_name)
    findings += mfind
    for m, f in good:
        run = runs[tiers.store_of(m).url]
        name = tiers.object_name(m, f.name)
        run.candidates.append(Candidate(name, f.bytes, SNAPSHOT))
        run.snapshot_files[name] = f

    # 3. continuity, from names alone
    known: dict[TP, int] = {}
    for m in manifests:
        for tp, first in m.start.items():
            known[tp] = min(known.get(tp, first), first)
    cont = continuity([o.name for o in seg_objs], stored_ends, trimmed, known)
    findings += cont
    partitions = {(seg.topic, seg.partition)
                  for seg in (naming.parse_segment_name(o.name) for o in seg_objs)}

    # 4. checksums of the planned files
    for r in runs.values():
        r.plan = plan_verify(r.candidates, r.state, sample_fraction=sample_fraction,
                             sample_min=sample_min, full=full)
    total = sum(len(r.plan.checks) for r in runs.values() if r.plan)
    if phase is not None:
        phase("verifying files", total)
    with tempfile.TemporaryDirectory(prefix="replicator-verify-") as tmp:
        scratch = Path(tmp)
        for r in runs.values():
            assert r.plan is not None
            r.outcomes = await _check_all(r, scratch, advance, concurrency)
            for o in r.outcomes:
                if o.vanished:
                    continue
                report.bytes_read += o.check.size
                if o.finding is not None:
                    findings.append(o.finding)
                else:
                    note = changed_note(o.check, r.state.files.get(o.check.name), o.checksum)
                    if note is not None:
                        findings.append(note)

        # 5. deep
        deep_records = dict(runs[store.url].state.deep)
        if deep:
            new_files = {u: next_state(r.state, r.plan, r.outcomes, now_ms=now).files
                         for u, r in runs.items() if r.plan is not None}
            report.bytes_read += await _deep(
                report, findings, tiers, manifests, seg_objs, trimmed, new_files,
                deep_records, registry, scratch, full=full, now_ms=now, advance=advance,
                phase=phase, budget=deep_budget)

    # 6. record, report
    updates: dict[str, StoreState] = {}
    failed_by_deep = {f.name for f in findings if f.kind == "corrupt"}
    for url, r in runs.items():
        assert r.plan is not None
        st = next_state(r.state, r.plan, r.outcomes, now_ms=now,
                        deep=deep_records if url == store.url else None)
        # a segment found corrupt while rebuilding a snapshot is failed from now on
        files = dict(st.files)
        for name in failed_by_deep & set(files):
            if files[name].result == "ok":
                files[name] = replace(files[name], result="corrupt",
                                      detail="found corrupt by verify --deep")
        updates[url] = replace(st, files=files)
        report.files_checked += sum(1 for o in r.outcomes if not o.vanished)
        report.files_skipped += len(r.plan.skipped)
        report.old_files += r.plan.old_files
        report.sample += r.plan.sample
    rot = [r.plan.rotation_runs for r in runs.values() if r.plan is not None]
    report.rotation_runs = None if any(x is None for x in rot) else max(
        (x for x in rot if x is not None), default=0)
    report.run = updates[store.url].run
    await asyncio.to_thread(save_state, state_path, updates)

    report.bytes_read += manifest_bytes
    report.findings = _dedupe(findings)
    kind_of = {c.name: c.kind for r in runs.values() for c in r.candidates}
    for label, kind in (("segments", SEGMENT), ("snapshot_files", SNAPSHOT)):
        outs = [o for r in runs.values() for o in r.outcomes if o.check.kind == kind]
        report.checks[label] = {
            "listed": sum(1 for k in kind_of.values() if k == kind),
            "checked": sum(1 for o in outs if not o.vanished),
            "failed": sum(1 for o in outs if o.finding is not None),
            "skipped": sum(1 for r in runs.values() if r.plan for n in r.plan.skipped
                           if kind_of.get(n) == kind),
        }
    report.checks["manifests"] = {
        "listed": n_manifests, "checked": n_manifests,
        "failed": sum(1 for f in report.findings if f.name.endswith("/" + naming.MANIFEST_NAME)
                      and f.is_problem)}
    report.checks["continuity"] = {
        "partitions": len(partitions | set(stored_ends)),
        "missing": sum(1 for f in cont if f.kind == "missing"),
        "gap_ok": sum(1 for f in cont if f.kind == "gap-ok"),
        "overlaps": sum(1 for f in cont if f.kind == "overlap"),
    }
    report.checks["watermarks"] = {"failed": len(wm_problems)}
    if not seg_objs and not stored_ends and not n_manifests:
        report.notes.append("the store holds no segments, watermarks or snapshots: nothing "
                            "to verify")
    if "deep" in report.checks:
        report.checks["deep"] = report.checks.pop("deep")
    report.elapsed_s = time.monotonic() - t0
    return report


def _dedupe(findings: Iterable[Finding]) -> list[Finding]:
    """One finding per (kind, name, detail): corrupt, digest mismatches, missing, then the
    notes; in the order found within each."""
    seen: set[tuple[str, str, str]] = set()
    out: list[Finding] = []
    for f in findings:
        k = (f.kind, f.name, f.detail)
        if k not in seen:
            seen.add(k)
            out.append(f)
    rank = {"corrupt": 0, "digest-mismatch": 1, "missing": 2}
    out.sort(key=lambda f: rank.get(f.kind, 3))
    return out


async def _check_all(r: _StoreRun, scratch: Path, advance: Advance | None,
                     concurrency: int | None) -> list[Outcome]:
    """Read every planned file of one store: in place for a local store, fetched (a few at
    a time) into ``scratch`` otherwise."""
    assert r.plan is not None
    limit = concurrency or (1 if isinstance(r.store, LocalStore) else 4)
    sem = asyncio.Semaphore(limit)

    async def one(c: Check) -> Outcome:
        async with sem:
            try:
                async with local_copy(r.store, c.name, scratch) as path:
                    if c.kind == SEGMENT:
                        finding, checksum = await asyncio.to_thread(_check_segment, path, c.name)
                    else:
                        finding, checksum = await asyncio.to_thread(
                            _check_snapshot, path, c.name, r.snapshot_files[c.name])
            except ObjectNotFoundError:
                return Outcome(c, vanished=True)  # removed since the listing (retention)
            finally:
                if advance is not None:
                    advance(1)
            return Outcome(c, finding, checksum)

    return list(await asyncio.gather(*(one(c) for c in r.plan.checks)))


async def _deep(report: VerifyReport, findings: list[Finding], tiers: Tiers,
                manifests: Sequence[Manifest], seg_objs: Sequence[Any],
                trimmed: Mapping[TP, int], files: Mapping[str, Mapping[str, FileState]],
                records: dict[str, DeepRecord], registry: SchemaRegistry | None,
                scratch: Path, *, full: bool,
                now_ms: int, advance: Advance | None, phase: Phase | None,
                budget: int | None) -> int:
    """Rebuild the due snapshots (oldest first) and compare; update ``records``; return the
    bytes read."""
    if registry is None:
        from replicator.schemas import SchemaRegistry

        registry = SchemaRegistry.load()

    def checksum(m: Manifest, file_name: str) -> str | None:
        st = files.get(tiers.store_of(m).url, {}).get(tiers.object_name(m, file_name))
        return st.checksum if st is not None and st.result == "ok" else None

    identities = {m.id: deep_identity(m, checksum) for m in manifests}
    # a record of a snapshot no longer stored is forgotten
    for sid in set(records) - set(identities):
        records.pop(sid)
    due, done = deep_due(manifests, records, identities, redo=full)
    # bases for rebuilding fulls: matched before with the same files (even when redoing:
    # their bytes are checked again this run), or matched in this run
    verified = {m.id for m in deep_due(manifests, records, identities)[1]}
    segs: dict[TP, list[SegmentInfo]] = {}
    for o in seg_objs:
        s = segment_info(o.name, o.size)
        segs.setdefault((s.topic, s.partition), []).append(s)
    bad_files = {f.name for f in findings if f.is_problem}
    stats = {"snapshots": len(manifests), "already_verified": len(done), "rebuilt": 0,
             "ok": 0, "mismatch": 0, "skipped": 0}
    read = 0
    if phase is not None:
        phase("rebuilding snapshots (--deep)", len(due))
    for m in due:
        try:
            names = [tiers.object_name(m, f.name) for f in m.files]
            if any(n in bad_files for n in names) or any(
                    checksum(m, f.name) is None for f in m.files):
                stats["skipped"] += 1
                report.deep_skipped.append((m.id, "its data files did not verify"))
                continue
            unknown = sorted({f.entity for f in m.files} - set(registry.entities))
            src = deep_source(m, manifests, segs, trimmed, verified)
            if unknown:
                src = replace(src, skip=f"entity {unknown[0]!r} has no schema here")
            if src.skip is not None:
                stats["skipped"] += 1
                report.deep_skipped.append((m.id, src.skip))
                continue
            try:
                mismatches, n = await _rebuild(src, tiers, registry, scratch,
                                               budget or DEFAULT_BUDGET)
            except CorruptSegmentError as exc:
                findings.append(Finding("corrupt", exc.path, exc.reason, offset=exc.offset,
                                        position=exc.position))
                stats["skipped"] += 1
                report.deep_skipped.append((m.id, f"a file it is rebuilt from is corrupt: "
                                                  f"{exc.path}"))
                continue
            except ObjectNotFoundError as exc:
                stats["skipped"] += 1
                report.deep_skipped.append((m.id, f"{exc.name} vanished during the run"))
                continue
            except SegmentError as exc:  # readable but not usable here (e.g. no key for it)
                stats["skipped"] += 1
                report.deep_skipped.append((m.id, str(exc)))
                continue
            stats["rebuilt"] += 1
            read += n
            mname = naming.snapshot_manifest_name(m.id, m.root)
            for detail in mismatches:
                findings.append(Finding("digest-mismatch", mname,
                                        f"rebuilt from {src.how}: {detail}"))
            stats["mismatch" if mismatches else "ok"] += 1
            report.deep_rebuilt.append((m.id, src.how, "digest-mismatch" if mismatches
                                        else "ok"))
            records[m.id] = DeepRecord("digest-mismatch" if mismatches else "ok", now_ms,
                                       identities[m.id])
            if mismatches:
                verified.discard(m.id)
            else:
                verified.add(m.id)
        finally:
            if advance is not None:
                advance(1)
    report.checks["deep"] = stats  # (moved after the others by the caller)
    return read


def _opener(paths: Mapping[str, Path]) -> Callable[[SegmentInfo], Path]:
    def opener(s: SegmentInfo) -> Path:
        return paths[s.name]

    return opener


async def _rebuild(src: DeepSource, tiers: Tiers, registry: SchemaRegistry, scratch: Path,
                   budget: int
                   ) -> tuple[list[str], int]:
    """Rebuild every data file of ``src.manifest`` in ``scratch`` and compare digest,
    counts and cut with the manifest; return the mismatches and the bytes read."""
    m = src.manifest
    mismatches: list[str] = []
    read = 0
    for f in m.files:
        tps = sorted(tp for tp in src.ranges if tp[0] == f.topic)
        work = scratch / f"deep-{secrets.token_hex(4)}"
        work.mkdir()
        try:
            async with contextlib.AsyncExitStack() as stack:
                paths: dict[str, Path] = {}
                for tp in tps:
                    for rd in src.reads[tp]:
                        if rd.segment.name not in paths:
                            paths[rd.segment.name] = await stack.enter_async_context(
                                local_copy(tiers.hot, rd.segment.name, work))
                            read += rd.segment.bytes
                layers: list[tuple[Path, str]] = []
                if src.base is not None:
                    bf = src.base.file_for(f.topic)
                    if bf is not None:
                        bname = tiers.object_name(src.base, bf.name)
                        layers.append((await stack.enter_async_context(
                            local_copy(tiers.store_of(src.base), bname, work)), bname))
                        read += bf.bytes
                parts = [PartitionPlan(
                    topic=tp[0], partition=tp[1], entity=f.entity, reads=src.reads[tp],
                    cut_offset=None, cut_ms=None, first=src.ranges[tp][0],
                    covered_end=src.ranges[tp][1], newest_ms=0, snapshot_cut=src.ranges[tp][0],
                ) for tp in tps]
                layout = TableLayout.from_schema(f.entity, registry.json_schema(f.entity))
                meta = {"snapshot_id": m.id, "kind": m.kind, "topic": f.topic,
                        "entity": f.entity, "time_ms": m.time_ms}
                res = await asyncio.to_thread(
                    build_topic, topic=f.topic, layout=layout, parts=parts,
                    stop_ms=m.time_ms, opener=_opener(paths), layer_files=layers,
                    out_path=work / "rebuilt.snap", work_dir=work, meta=meta, budget=budget,
                    stats=ReplayStats())
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)
        if res.digest != f.digest:
            mismatches.append(f"{f.entity}: digest {res.digest}, the snapshot records "
                              f"{f.digest}")
        elif (res.entries, res.tombstones) != (f.entries, f.tombstones):
            mismatches.append(f"{f.entity}: {res.entries} entries / {res.tombstones} "
                              f"tombstones, the snapshot records {f.entries} / {f.tombstones}")
        for p, c in sorted(res.cuts.items()):
            want = m.cut.get((f.topic, p))
            if want is not None and c != want:
                mismatches.append(f"{f.topic}:{p}: a record after the snapshot's time lies "
                                  f"before its cut {want} (at offset {c})")
    return mismatches, read
