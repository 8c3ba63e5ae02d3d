"""SIGKILL during a restore (SQLite and PostgreSQL), then a rerun.

Each iteration starts ``replicator restore`` as a subprocess, waits until it is provably
mid-way (SQLite: its temp file exists; PostgreSQL: its connection holds an open transaction),
waits a further random moment (seeded) within the time a full restore takes, and SIGKILLs it.
Afterwards no partial result may be visible -- the destination is absent (or, had the kill
landed after the commit, complete) -- and a rerun must succeed with exactly the oracle's
state, sweeping any leftover temp file.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from replicator.restore.layout import TableLayout
from tests.helpers import REPO_ROOT
from tests.restore_history import (
    ENTITIES,
    History,
    Oracle,
    build_history,
    canonical_rows,
    layouts,
    stored_rows,
)

SQLITE_KILLS = 5
PG_KILLS = 4


def write_config(path: Path, store_root: Path, data_dir: Path) -> Path:
    topics = ", ".join(f'"{t}"' for t in ENTITIES)
    path.write_text(f"""[kafka]
topics = [{topics}]

[store]
url = "{store_root}"

[ingest]
data_dir = "{data_dir}"
""")
    return path


@dataclass
class Big:
    history: History
    config: Path
    root: Path
    want: dict[str, dict[str, tuple[Any, ...]]]  # entity -> canonical rows at latest


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Big:
    root = tmp_path_factory.mktemp("kill")
    h = build_history(root / "hist", events=40_000, seed=9, per_segment=4000)
    cfg = write_config(root / "replicator.toml", h.store_root, root / "data")
    lay = layouts()
    oracle = Oracle(h)
    return Big(h, cfg, root, {e: canonical_rows(lay[e], oracle.state(e)) for e in ENTITIES})


def kill_delay(rng: random.Random, i: int, n: int, full: float) -> float:
    """A random moment for the i-th of ``n`` kills, as a part of a full restore's duration:
    the first early (replay: nothing written yet), the others in equal slices of the second
    half (load, read-back, commit), where a non-atomic target would show a partial result."""
    if i == 0:
        return full * rng.uniform(0.05, 0.5)
    return full * (0.5 + 0.45 * (i - 1 + rng.random()) / (n - 1))


def start_restore(b: Big, target: str, *extra: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPLICATOR_")}
    return subprocess.Popen(
        [sys.executable, "-m", "replicator", "--config", str(b.config), "restore", "--at",
         "latest", "--target", target, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        cwd=REPO_ROOT, env=env,
    )


def finish(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    _out, err = proc.communicate(timeout=300)
    return proc.returncode, err.decode(errors="replace")


def kill(proc: subprocess.Popen[bytes]) -> bool:
    """SIGKILL; True if the process was still running (killed mid-way)."""
    alive = proc.poll() is None
    if alive:
        proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    return alive and proc.returncode == -signal.SIGKILL


def expected(b: Big) -> dict[str, Any]:
    """What a complete restore shows: every table, the oracle's rows, one restore record."""
    return {"tables": sorted([*ENTITIES, "replicator_restores"]), "rows": b.want, "records": 1}


def sqlite_state(path: Path) -> dict[str, Any]:
    """What a reader sees in the SQLite file (comparable with :func:`expected`)."""
    lay = layouts()
    rows: dict[str, dict[str, tuple[Any, ...]]] = {}
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        tables = sorted(r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'"))
        for e in ENTITIES:
            if e in tables:
                cols = ", ".join(f'"{c.name}"'
                                 for c in (lay[e].columns[0], *lay[e].data_columns))
                rows[e] = stored_rows(lay[e],
                                      conn.execute(f'SELECT {cols} FROM "{e}"').fetchall())
        records = (conn.execute("SELECT count(*) FROM replicator_restores").fetchone()[0]
                   if "replicator_restores" in tables else None)
    return {"tables": tables, "rows": rows, "records": records}


def test_sigkill_sqlite_restore_then_rerun(big: Big, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    dest = out / "r.db"
    url = f"sqlite://{dest}"

    def temp_files() -> list[Path]:
        return sorted(out.glob(".r.db.tmp-restore-*"))

    def wait_mid_way(proc: subprocess.Popen[bytes]) -> None:
        """Until the restore has created its own temp file (or ended)."""
        before = set(temp_files())
        while proc.poll() is None and not set(temp_files()) - before:
            time.sleep(0.005)

    def timed_run(*extra: str) -> float:
        """An uninterrupted restore; returns how long it took from its temp file's creation
        to the result's appearance under its name (the kill moments follow the machine's
        current speed; the process's own exit afterwards is not part of the window)."""
        replaced = dest.stat().st_ino if dest.exists() else None
        proc = start_restore(big, url, *extra)
        wait_mid_way(proc)
        t_mid = time.monotonic()
        while proc.poll() is None and (not dest.exists() or dest.stat().st_ino == replaced):
            time.sleep(0.002)
        t_done = time.monotonic()
        code, err = finish(proc)
        assert code == 0, err
        assert [p.name for p in out.iterdir()] == ["r.db"], "temp file left behind"
        assert sqlite_state(dest) == expected(big)
        dest.unlink()
        return t_done - t_mid

    full = timed_run()
    rng = random.Random(1234)
    mid_way = 0
    for i in range(SQLITE_KILLS):
        proc = start_restore(big, url)
        wait_mid_way(proc)
        time.sleep(kill_delay(rng, i, SQLITE_KILLS, full))
        killed = kill(proc)
        names = [p.name for p in out.iterdir()]
        if dest.exists():  # the kill came after the atomic rename: it must be complete
            assert sqlite_state(dest) == expected(big), f"iteration {i}: partial result visible"
        else:
            mid_way += killed
        assert set(names) <= {"r.db", *(p.name for p in temp_files())}, names
        assert len(temp_files()) <= 1
        # the rerun succeeds, sweeps the temp file and holds the oracle's state
        full = timed_run(*(["--replace"] if dest.exists() else []))
    assert mid_way >= 1, "no kill landed mid-way through a restore"


async def _pg_in_tx(dsn: str, app: str) -> bool:
    conn = await asyncpg.connect(dsn)
    try:
        n = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 "
            "AND xact_start IS NOT NULL", app)
        return bool(n)
    finally:
        await conn.close()


async def _pg_schema(dsn: str, schema: str) -> dict[str, Any] | None:
    """What a reader sees in ``schema`` (comparable with :func:`expected`), or None when
    the schema is not visible."""
    conn = await asyncpg.connect(dsn)
    try:
        if not await conn.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = $1",
                                   schema):
            return None
        tables = sorted(r[0] for r in await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = $1", schema))
        lay: dict[str, TableLayout] = layouts()
        rows: dict[str, dict[str, tuple[Any, ...]]] = {}
        for e in ENTITIES:
            if e in tables:
                cols = ", ".join(f'"{c.name}"'
                                 for c in (lay[e].columns[0], *lay[e].data_columns))
                got = await conn.fetch(f'SELECT {cols} FROM "{schema}"."{e}"')
                rows[e] = stored_rows(lay[e], [tuple(r) for r in got])
        records = (await conn.fetchval(f'SELECT count(*) FROM "{schema}".replicator_restores')
                   if "replicator_restores" in tables else None)
        return {"tables": tables, "rows": rows, "records": records}
    finally:
        await conn.close()


async def _drop(dsn: str, schema: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def test_sigkill_postgres_restore_then_rerun(big: Big, pg_dsn: str) -> None:
    run = uuid.uuid4().hex[:6]

    async def wait_mid_way(proc: subprocess.Popen[bytes], app: str) -> None:
        while proc.poll() is None and not await _pg_in_tx(pg_dsn, app):
            await asyncio.sleep(0.01)

    def url(schema: str, app: str) -> str:
        return f"{pg_dsn}?schema={schema}&application_name={app}"

    async def timed_run(schema: str, app: str, *extra: str) -> float:
        """An uninterrupted restore; returns how long it took once its transaction was open
        (the kill moments follow the machine's current speed)."""
        proc = start_restore(big, url(schema, app), *extra)
        await wait_mid_way(proc, app)
        t_mid = time.monotonic()
        code, err = await asyncio.to_thread(finish, proc)
        assert code == 0, err
        assert await _pg_schema(pg_dsn, schema) == expected(big)
        await _drop(pg_dsn, schema)
        return time.monotonic() - t_mid

    full = await timed_run(f"kill_{run}_base", f"rkill_{run}_base")
    rng = random.Random(4321)
    mid_way = 0
    for i in range(PG_KILLS):
        schema, app = f"kill_{run}_{i}", f"rkill_{run}_{i}"
        proc = start_restore(big, url(schema, app))
        await wait_mid_way(proc, app)
        await asyncio.sleep(kill_delay(rng, i, PG_KILLS, full))
        killed = await asyncio.to_thread(kill, proc)
        seen = await _pg_schema(pg_dsn, schema)
        if seen is not None:  # killed after the commit: complete
            assert seen == expected(big), f"iteration {i}: partial schema visible"
        else:
            mid_way += killed
        # the rerun succeeds (waiting, if need be, for the server to drop the dead session)
        full = await timed_run(schema, app + "_rerun",
                               *(["--replace"] if seen is not None else []))
    assert mid_way >= 1, "no kill landed mid-way through a restore"
