"""Copying what one store holds into another: ``replicator mirror`` and the destination
fan-out's catch-up both use it.

The planner (:func:`plan_mirror`) is pure: two listings in, an ordered list of copies out.
Order is what keeps a half-copied destination consistent at every instant:

1. immutable data (sealed segments, snapshot files), oldest offset first;
2. snapshot manifests, which a reader trusts only when their files exist;
3. mutable metadata (watermark objects, ``retention.json``), which claim coverage and so
   must arrive after the data they describe.

Immutable objects are put create-only and never overwritten: one that exists on both sides
with different sizes is a *conflict*, reported and left alone. Mutable ones are re-put when
their bytes differ. Nothing is ever deleted from the destination (a disaster-recovery copy
may keep more than the source after retention).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from replicator import naming
from replicator.errors import ObjectExistsError, ObjectNotFoundError, StoreError
from replicator.storage.base import ObjectInfo, Store, local_copy
from replicator.storage.local import LocalStore

log = logging.getLogger(__name__)


def is_mutable(name: str) -> bool:
    """Objects that are rewritten in place (everything else is written once)."""
    return name.startswith(naming.WATERMARKS_ROOT + "/") or name == naming.RETENTION_STATE


def is_manifest(name: str) -> bool:
    return name.endswith("/" + naming.MANIFEST_NAME)


def _rank(name: str) -> int:
    if is_mutable(name):
        return 2
    return 1 if is_manifest(name) else 0


@dataclass(frozen=True, slots=True)
class Copy:
    name: str
    size: int
    mutable: bool


@dataclass(frozen=True, slots=True)
class MirrorPlan:
    """What to copy, in order, and what cannot be copied (same name, other size)."""

    copies: tuple[Copy, ...]
    conflicts: tuple[tuple[str, int, int], ...]
    #: immutable objects already present on both sides with equal sizes
    present: tuple[ObjectInfo, ...]

    @property
    def missing(self) -> tuple[Copy, ...]:
        """Copies of objects the destination lacks entirely (its backlog)."""
        return tuple(c for c in self.copies if not c.mutable)

    @property
    def missing_bytes(self) -> int:
        return sum(c.size for c in self.missing)


def plan_mirror(source: Iterable[ObjectInfo], dest: Iterable[ObjectInfo]) -> MirrorPlan:
    """The copies that make ``dest`` hold everything ``source`` holds, in a safe order."""
    have = {o.name: o.size for o in dest}
    copies: list[Copy] = []
    conflicts: list[tuple[str, int, int]] = []
    present: list[ObjectInfo] = []
    for o in source:
        if naming.is_temp(o.name):
            continue
        mutable = is_mutable(o.name)
        if mutable:
            copies.append(Copy(o.name, o.size, True))  # the executor compares bytes
        elif o.name not in have:
            copies.append(Copy(o.name, o.size, False))
        elif have[o.name] != o.size:
            conflicts.append((o.name, o.size, have[o.name]))
        else:
            present.append(o)
    copies.sort(key=lambda c: (_rank(c.name), c.name))
    return MirrorPlan(tuple(copies), tuple(conflicts), tuple(present))


@dataclass(slots=True)
class MirrorResult:
    copied: int = 0
    copied_bytes: int = 0
    updated: int = 0
    verified: int = 0
    conflicts: list[tuple[str, int, int]] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.conflicts and not self.mismatched

    def to_json(self) -> dict[str, Any]:
        return {"copied": self.copied, "copied_bytes": self.copied_bytes,
                "updated": self.updated, "verified": self.verified,
                "conflicts": [{"name": n, "source_size": a, "dest_size": b}
                              for n, a, b in self.conflicts],
                "mismatched": self.mismatched, "ok": self.ok}


async def copy_object(source: Store, dest: Store, name: str, *, mutable: bool,
                      scratch: Path) -> int:
    """Copy one object; returns bytes written (0: a mutable object already equal).

    An immutable object that appears on the destination meanwhile (another copier won the
    race) is accepted when its size matches, else :class:`StoreError`.
    """
    if mutable:
        data = await source.get_bytes(name)
        with contextlib.suppress(ObjectNotFoundError):
            if await dest.get_bytes(name) == data:
                return 0
        await dest.put_bytes(name, data, create_only=False)
        return len(data)
    # a private copy for a local destination: it would hard-link a local source's file and
    # share every later fault with it
    async with local_copy(source, name, scratch, private=isinstance(dest, LocalStore)) as path:
        size = path.stat().st_size
        try:
            await dest.put_file(name, path, create_only=True)
        except ObjectExistsError:
            theirs = next((o.size for o in await dest.list(name) if o.name == name), -1)
            if theirs != size:
                raise StoreError(f"{name} exists on {dest.url} with {theirs} bytes, "
                                 f"source has {size}: not overwritten") from None
            return 0
        return size


async def sha256_of(store: Store, name: str, scratch: Path) -> str:
    async with local_copy(store, name, scratch) as path:
        return await asyncio.to_thread(_sha256_file, path)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


async def mirror(
    source: Store, dest: Store, *, verify: bool = False, prefix: str = "",
    progress: Callable[[str, int], None] | None = None,
) -> MirrorResult:
    """Copy every object of ``source`` (under ``prefix``) that ``dest`` lacks, in the order
    :func:`plan_mirror` gives; with ``verify``, compare the SHA-256 of every immutable
    object on both sides afterwards (what was there before included)."""
    src_objs = await source.list(prefix)
    plan = plan_mirror(src_objs, await dest.list(prefix))
    result = MirrorResult(conflicts=list(plan.conflicts))
    with tempfile.TemporaryDirectory(prefix="replicator-mirror-") as d:
        scratch = Path(d)
        for c in plan.copies:
            n = await copy_object(source, dest, c.name, mutable=c.mutable, scratch=scratch)
            if c.mutable:
                result.updated += 1 if n else 0
            elif n:
                result.copied += 1
            result.copied_bytes += n
            if progress is not None:
                progress(c.name, n)
        if verify:
            checked: Sequence[ObjectInfo] = [o for o in src_objs if not is_mutable(o.name)
                                             and not naming.is_temp(o.name)]
            conflicted = {n for n, _a, _b in plan.conflicts}
            for o in checked:
                if o.name in conflicted:
                    continue
                a = await sha256_of(source, o.name, scratch)
                try:
                    b = await sha256_of(dest, o.name, scratch)
                except ObjectNotFoundError:
                    b = ""
                if a != b:
                    result.mismatched.append(o.name)
                else:
                    result.verified += 1
                if progress is not None:
                    progress(o.name, 0)
    return result
