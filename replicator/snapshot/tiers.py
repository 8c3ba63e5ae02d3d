"""Where snapshots live: the hot tier (``snapshots/`` in the store) and the archive tier
(``archive/`` in the store, or in another store), and how they are listed and opened.

Invariants:
- A snapshot is listed only when its manifest exists (the manifest is written last).
- Objects under a snapshot directory without a manifest are leftovers of an interrupted
  compaction (or of an interrupted move between tiers); :meth:`Tiers.sweep_orphans`
  removes them, never a directory whose manifest exists.
"""

from __future__ import annotations

import builtins
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from replicator import naming
from replicator.errors import CorruptSnapshotError
from replicator.snapshot.manifest import Manifest
from replicator.storage.base import Store, open_store


@dataclass
class Tiers:
    hot: Store
    archive: Store
    tmp: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))

    @staticmethod
    def for_store(store: Store, archive_url: str = "") -> Tiers:
        return Tiers(store, open_store(archive_url) if archive_url else store)

    def tiers(self) -> list[tuple[str, Store, str]]:
        """(tier name, store, root) for each tier."""
        return [("hot", self.hot, naming.SNAPSHOTS_ROOT),
                ("archive", self.archive, naming.ARCHIVE_ROOT)]

    def object_name(self, m: Manifest, file_name: str) -> str:
        return naming.snapshot_dir(m.id, m.root) + file_name

    async def list(self, *, tier: str | None = None) -> builtins.list[Manifest]:
        """Every complete snapshot (both tiers unless ``tier``), oldest first."""
        out: list[Manifest] = []
        for name, store, root in self.tiers():
            if tier is not None and tier != name:
                continue
            for obj in await store.list(root + "/"):
                if not obj.name.endswith("/" + naming.MANIFEST_NAME) or naming.is_temp(obj.name):
                    continue
                parsed = naming.parse_snapshot_object(obj.name)
                if parsed is None or parsed[0] != root:
                    continue
                out.append(Manifest.decode(await store.get_bytes(obj.name), obj.name, root))
        out.sort(key=lambda m: (m.time_ms, m.id))
        return out

    async def close_archive(self) -> None:
        """Close the archive tier's store when it is a store of its own (the caller owns
        the hot one)."""
        if self.archive is not self.hot:
            await self.archive.close()

    def tier_of(self, m: Manifest) -> str:
        return "hot" if m.root == naming.SNAPSHOTS_ROOT else "archive"

    def store_of(self, m: Manifest) -> Store:
        return self.hot if self.tier_of(m) == "hot" else self.archive

    async def fetch(self, m: Manifest, file_name: str) -> Path:
        """A local path of one data file of ``m``."""
        name = self.object_name(m, file_name)
        return await self.store_of(m).fetch_to(
            name, self.tmp / ("snap-" + name.replace("/", "_")))

    @staticmethod
    async def _orphan_dirs(store: Store, root: str) -> dict[str, builtins.list[str]]:
        """Per snapshot id under ``root`` without a manifest: the objects its directory holds."""
        by_sid: dict[str, list[str]] = {}
        for o in await store.list(root + "/"):
            parsed = naming.parse_snapshot_object(o.name)
            if parsed is not None and parsed[0] == root:
                by_sid.setdefault(parsed[1], []).append(o.name)
        return {sid: names for sid, names in by_sid.items()
                if naming.snapshot_manifest_name(sid, root) not in names}

    async def orphans(self) -> builtins.list[tuple[Store, str]]:
        """Objects under snapshot directories that have no manifest."""
        return [(store, name) for _name, store, root in self.tiers()
                for names in (await self._orphan_dirs(store, root)).values() for name in names]

    async def sweep_orphans(self) -> int:
        """Delete the leftovers of interrupted compactions and archive moves: temp files of
        interrupted puts and directories without a manifest; return how many objects.
        Callers hold the maintenance lock (one compaction or retention run per data
        directory), so nothing is being written under these roots meanwhile."""
        n = 0
        for _name, store, root in self.tiers():
            n += await store.sweep(0.0, prefix=root + "/")
            for sid, names in (await self._orphan_dirs(store, root)).items():
                for name in names:
                    await store.delete(name)
                    n += 1
                await store.prune(naming.snapshot_dir(sid, root))
        return n

    async def check_manifest(self, m: Manifest) -> None:
        """Raise if a data file named by ``m`` is missing or has another size."""
        store = self.store_of(m)
        have = {o.name: o.size for o in await store.list(naming.snapshot_dir(m.id, m.root))}
        for f in m.files:
            name = self.object_name(m, f.name)
            if have.get(name) != f.bytes:
                raise CorruptSnapshotError(name, 0, "missing or of the wrong size "
                                           f"(manifest says {f.bytes} bytes)")
