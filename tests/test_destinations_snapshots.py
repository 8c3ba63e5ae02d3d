"""Snapshots written behind the spool's back (by the compactor process) reach every
destination as soon as the schedule says so, data before manifest."""

from __future__ import annotations

import asyncio
from pathlib import Path

from replicator.destinations import Destination, Fanout
from replicator.storage.local import LocalStore


class Recording(LocalStore):
    def __init__(self, *, root: Path) -> None:
        super().__init__(root=root)
        self.puts: list[str] = []

    async def put_file(self, name: str, source: Path, *, create_only: bool = True) -> None:
        await super().put_file(name, source, create_only=create_only)
        self.puts.append(name)


async def test_reconcile_soon_copies_a_new_snapshot_data_first(tmp_path: Path) -> None:
    primary = LocalStore(root=tmp_path / "primary")
    dest = Recording(root=tmp_path / "dr")
    fan = Fanout(primary=primary, destinations=[Destination(name="dr", store=dest)],
                 reconcile_interval_s=3600.0)
    async with fan:
        for _ in range(100):  # the first reconcile of an empty primary
            if fan.destinations[0].reconciled:
                break
            await asyncio.sleep(0.02)
        assert fan.destinations[0].reconciled
        sid = "snapshots/00000001795000000000-full-ab12cd34"
        # the compactor writes the file, then the manifest, straight into the primary
        primary.put_bytes_sync(f"{sid}/attendance.snap", b"x" * 1000)
        primary.put_bytes_sync(f"{sid}/manifest.json", b"{}")
        await asyncio.sleep(0.3)
        assert dest.puts == []  # nothing told the fan-out yet (next reconcile in an hour)
        fan.reconcile_soon()
        for _ in range(250):
            if len(dest.puts) == 2:
                break
            await asyncio.sleep(0.02)
    assert dest.puts == [f"{sid}/attendance.snap", f"{sid}/manifest.json"]
    assert dest.get_bytes_sync(f"{sid}/attendance.snap") == b"x" * 1000
