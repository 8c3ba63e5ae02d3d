"""Disaster-recovery drill: restore into a scratch target, verify, measure, report, clean up.

A drill is a real restore (:func:`~replicator.restore.runner.execute_restore`, digest
verified) from the store alone — the spool is left out, as it would be lost with the
machine — into a scratch target that is removed afterwards: a temporary SQLite file by
default, or a fresh ``drill_<id>`` schema of a PostgreSQL database.

Figures (all in the report):

* ``rto_s`` — wall time of the restore (plan, fetch, replay, load, verify);
* ``rto_extrapolated_s`` — ``rto_s`` scaled to a restore of the newest point of every
  entity: its replay part by the bytes that restore reads over the bytes this drill read,
  its load part (write, read-back digest) by the rows it writes over the rows this drill
  wrote (estimated from the plan: snapshot live rows plus every later event, an upper
  bound); a drill of ``latest`` needs no scaling;
* ``rpo_s`` — age of the newest restorable point of the store at the drill's start.

Reports are JSON files ``<data_dir>/drills/<time>-<id>.json`` (and the human report as
``.txt``); the newest ``drill.keep`` are kept. The scratch is removed on success, failure and
cancellation; what a hard kill leaves is removed by a later drill: scratch directories no
running drill holds (each holds a lock on its own), and ``drill_*`` schemas once older than a
day (or twice the RTO objective). A failed
drill (corrupt backup, digest mismatch, nothing restorable, anything else that breaks) is a
report with ``ok: false`` and the error, never an exception the caller must catch.
"""

from __future__ import annotations

import calendar
import contextlib
import fcntl
import os
import random
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson

from replicator.config import Config
from replicator.errors import BadRequestError, ReplicatorError
from replicator.redact import redact_text
from replicator.restore.point import AtTime, Latest, Point, format_ms

DRILLS_DIR = "drills"


def drills_dir(data_dir: Path) -> Path:
    return data_dir / DRILLS_DIR


def scratch_root(data_dir: Path) -> Path:
    """Where default (SQLite) drills put their scratch database: on the data volume, not
    in /tmp, so the size is accounted where the operator looks and leftovers are found."""
    return drills_dir(data_dir) / "scratch"


def pick_point(mode: str, oldest_ms: int | None, newest_ms: int | None,
               rng: random.Random) -> Point:
    """``latest``, or for ``random`` a uniformly random millisecond of the restorable
    window ``[oldest_ms, newest_ms]`` (``latest`` when the window is a single point or
    unknown)."""
    if mode == "latest" or oldest_ms is None or newest_ms is None or newest_ms <= oldest_ms:
        return Latest()
    if mode != "random":
        raise BadRequestError(f"drill --at: 'latest' or 'random', got {mode!r}")
    return AtTime(rng.randint(oldest_ms, newest_ms))


def extrapolate(seconds: float, *, replay_s: float, load_s: float, drill_bytes: int,
                full_bytes: int, drill_rows: int, full_rows: int) -> float:
    """Restore time scaled to the full data: the replay part by bytes read, the load part
    (write, read-back digest) by rows, the rest as measured; never below the measured
    time."""
    def factor(full: int, drill: int) -> float:
        return max(1.0, full / drill) if drill > 0 else 1.0

    other = max(0.0, seconds - replay_s - load_s)
    return other + replay_s * factor(full_bytes, drill_bytes) + load_s * factor(
        full_rows, drill_rows)


def full_rows_estimate(latest: Any) -> int:
    """Rows a restore of the newest point writes, from its plan without reading data: the
    live rows of its base snapshot, the entries of the snapshots layered on it and every
    event after them (an upper bound)."""
    topics = {p.topic for p in latest.partitions}
    chain = list(latest.snapshots)  # base (a full) first
    base = sum(f.live for m in chain[:1] for f in m.files if f.topic in topics)
    later = sum(f.entries for m in chain[1:] for f in m.files if f.topic in topics)
    return int(base + later + sum(p.events_estimate for p in latest.partitions))


def scratch_pg_url(url: str, schema: str) -> str:
    """``url`` with ``schema=<schema>`` (any given schema replaced: a drill never writes
    into an existing one)."""
    parts = urlsplit(url)
    params = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
              if k != "schema"]
    params.append(("schema", schema))
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(params), ""))


#: scratch left by a drill killed hard (SIGKILL, power loss) is removed by a later drill
#: once it is older than this many seconds (or 2 x objectives.rto_s, if longer)
STALE_SCRATCH_S = 86400.0
_DRILL_SCHEMA = re.compile(r"drill_(\d{8})t(\d{6})(\d{3})z_[0-9a-f]{6}")


def stale_cutoff_ms(now_ms: int, rto_s: float) -> int:
    return now_ms - int(max(STALE_SCRATCH_S, 2 * rto_s) * 1000)


def schema_time_ms(schema: str) -> int | None:
    """When the drill that created ``schema`` started (from its name), else None."""
    m = _DRILL_SCHEMA.fullmatch(schema)
    if m is None:
        return None
    t = time.strptime(m.group(1) + m.group(2), "%Y%m%d%H%M%S")
    return int(calendar.timegm(t) * 1000) + int(m.group(3))


def claim_scratch(path: Path) -> int:
    """Lock the scratch directory ``path`` for this drill (released when the fd closes,
    also by the kernel when the process dies); returns the fd."""
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def sweep_scratch_dirs(root: Path) -> int:
    """Remove scratch directories no running drill holds (left by drills that were killed,
    or whose restore thread was still writing when they were cancelled)."""
    from replicator.targets.scratch import remove_unlocked

    if not root.is_dir():
        return 0
    return remove_unlocked(list(root.iterdir()),
                           lambda p: shutil.rmtree(p, ignore_errors=True))


async def _drop_pg_schema(url: str, schema: str, *, stale_before_ms: int | None = None
                          ) -> None:
    """Drop ``schema``; with ``stale_before_ms`` also every drill schema created before it
    (left by drills killed hard)."""
    import asyncpg

    from replicator.targets.postgres import _q, split_url

    dsn, _schema, _shown = split_url(url)
    conn = await asyncpg.connect(dsn)
    try:
        names = [schema]
        if stale_before_ms is not None:
            rows = await conn.fetch("SELECT nspname FROM pg_namespace "
                                    "WHERE nspname LIKE 'drill\\_%'")
            names += [r["nspname"] for r in rows if (t := schema_time_ms(r["nspname"]))
                      is not None and t < stale_before_ms]
        for name in names:
            await conn.execute(f"DROP SCHEMA IF EXISTS {_q(name)} CASCADE")
    finally:
        await conn.close()


async def run_drill(cfg: Config, *, at: str = "latest", target: str | None = None,
                    store_url: str | None = None, seed: int | None = None,
                    progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run one drill and return its report (also when it failed: ``ok`` false)."""
    from replicator.catalog import Catalog
    from replicator.restore.runner import execute_restore, make_plan
    from replicator.schemas import SchemaRegistry
    from replicator.snapshot.tiers import Tiers
    from replicator.storage.base import open_store

    started_ms = int(time.time() * 1000)
    # sortable by time to the millisecond (pruning keeps the newest by name)
    drill_id = (time.strftime("%Y%m%dT%H%M%S", time.gmtime(started_ms / 1000))
                + f"{started_ms % 1000:03d}Z-" + uuid.uuid4().hex[:6])
    store = open_store(store_url or cfg.store_url)
    report: dict[str, Any] = {
        "id": drill_id, "time": format_ms(started_ms), "time_ms": started_ms,
        "store": store.url, "mode": at, "ok": False, "error": None,
        "objectives": {"rpo_s": cfg.objectives.rpo_s, "rto_s": cfg.objectives.rto_s},
    }
    scratch_dir: Path | None = None
    scratch_fd: int | None = None
    pg_cleanup: tuple[str, str] | None = None
    cutoff = stale_cutoff_ms(started_ms, cfg.objectives.rto_s)
    tiers = Tiers.for_store(store, cfg.retention.archive_url)
    t0 = time.monotonic()
    try:
        reg = SchemaRegistry.load(cfg.ingest.schemas_dir)
        cat = Catalog(store=store)  # store only: the spool is lost with the machine
        topics = list(cfg.kafka.topics)
        latest = await make_plan(cat, reg, topics, Latest(), tiers=tiers)
        point = pick_point(at, latest.window.oldest_ms, latest.at_ms, random.Random(seed))
        plan = latest if isinstance(point, Latest) else await make_plan(
            cat, reg, topics, point, tiers=tiers)
        report["at"] = format_ms(plan.at_ms) if plan.at_ms is not None else None
        report["rpo_s"] = (None if latest.at_ms is None
                           else round(max(0.0, (started_ms - latest.at_ms) / 1e3), 3))
        if target is None or target == "":
            root = scratch_root(cfg.ingest.data_dir).resolve()  # data_dir may be relative
            sweep_scratch_dirs(root)
            root.mkdir(parents=True, exist_ok=True)
            scratch_dir = Path(tempfile.mkdtemp(prefix=f"{drill_id}-", dir=root))
            scratch_fd = claim_scratch(scratch_dir)
            url = f"sqlite://{scratch_dir / 'drill.db'}"
            report["target"] = "temporary SQLite database"
        elif target.startswith(("postgresql://", "postgres://")):
            schema = "drill_" + drill_id.lower().replace("-", "_")
            url = scratch_pg_url(target, schema)
            pg_cleanup = (url, schema)
            from replicator.targets.postgres import split_url

            report["target"] = f"{split_url(url)[2]} (schema {schema})"
        else:
            raise BadRequestError("drill --target: a postgresql:// URL (a scratch schema "
                                  "is created and dropped), or nothing for a temporary "
                                  "SQLite database")
        restore = await execute_restore(cat, reg, plan, url, progress=progress, tiers=tiers)
        seconds = time.monotonic() - t0
        rows = {r.entity: r.rows for r in restore.results}
        drill_rows = sum(rows.values())
        full_rows = drill_rows if plan is latest else max(drill_rows,
                                                          full_rows_estimate(latest))
        report.update(
            ok=True, rto_s=round(seconds, 3),
            rto_extrapolated_s=round(extrapolate(
                seconds, replay_s=restore.replay_seconds, load_s=restore.load_seconds,
                drill_bytes=plan.bytes, full_bytes=latest.bytes, drill_rows=drill_rows,
                full_rows=full_rows), 3),
            full_rows=full_rows,
            bytes_read=plan.bytes, full_bytes=latest.bytes, events=restore.events,
            rows=rows, digests={r.entity: r.actual.hex for r in restore.results},
            replay_seconds=round(restore.replay_seconds, 3),
            load_seconds=round(restore.load_seconds, 3),
            snapshots=[m.id for m in plan.snapshots])
    except ReplicatorError as exc:
        report.update(ok=False, error=redact_text(str(exc)), error_type=type(exc).__name__,
                      rto_s=round(time.monotonic() - t0, 3))
    except Exception as exc:  # a drill that breaks is a failed drill, with a report
        report.update(ok=False, error=redact_text(f"{type(exc).__name__}: {exc}"),
                      error_type="internal", rto_s=round(time.monotonic() - t0, 3))
    finally:
        # runs on success, failure and cancellation (SIGTERM of the drill command)
        await tiers.close_archive()
        await store.close()
        if scratch_dir is not None:
            shutil.rmtree(scratch_dir, ignore_errors=True)
        if scratch_fd is not None:
            os.close(scratch_fd)  # a cancelled restore thread may still write: the next
            # sweep (the drill command runs one once its threads ended) removes the rest
        if pg_cleanup is not None:
            with contextlib.suppress(Exception):
                await _drop_pg_schema(*pg_cleanup, stale_before_ms=cutoff)
    report["rto_met"] = bool(report["ok"]) and (
        report.get("rto_extrapolated_s", 0) <= cfg.objectives.rto_s)
    rpo = report.get("rpo_s")
    report["rpo_met"] = rpo is not None and rpo <= cfg.objectives.rpo_s
    return report


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_report(data_dir: Path, report: dict[str, Any], keep: int) -> Path:
    """Write ``report`` atomically under ``<data_dir>/drills/`` as ``<id>.json`` and the
    human report (with the chart of the kept drills) as ``<id>.txt``; prune to the newest
    ``keep``."""
    d = drills_dir(data_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{report['id']}.json"
    _write(path, orjson.dumps(report, option=orjson.OPT_INDENT_2))
    reports = sorted(p for p in d.glob("*.json"))
    for old in reports[:-keep]:
        with contextlib.suppress(OSError):
            old.unlink()
        with contextlib.suppress(OSError):
            old.with_suffix(".txt").unlink()
    _write(path.with_suffix(".txt"), (render(report, load_history(data_dir)) + "\n").encode())
    return path


def load_history(data_dir: Path) -> list[dict[str, Any]]:
    """Every kept drill report, oldest first (unreadable files are skipped)."""
    out: list[dict[str, Any]] = []
    d = drills_dir(data_dir)
    if not d.is_dir():
        return out
    for p in sorted(d.glob("*.json")):
        try:
            doc = orjson.loads(p.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            continue
        if isinstance(doc, dict) and "id" in doc:
            out.append(doc)
    out.sort(key=lambda r: r.get("time_ms", 0))
    return out


_BARS = " ▁▂▃▄▅▆▇█"


def fmt_duration(v: float | None) -> str:
    """``12.3s``, ``4.5m``, ``2.0h``, ``367.8d``; ``n/a`` for None."""
    if v is None or v != v:
        return "n/a"
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
        if v >= size * (2 if unit == "d" else 1):
            return f"{v / size:.1f}{unit}"
    return f"{v:.2f}s" if v < 10 else f"{v:.1f}s"


def sparkline(values: Sequence[float | None]) -> str:
    """One character per value, scaled to the largest (``×`` for a failed drill)."""
    real = [v for v in values if v is not None]
    top = max(real, default=0.0) or 1.0
    return "".join("×" if v is None else _BARS[min(8, max(1, round(v / top * 8)))]
                   for v in values)


def render(report: dict[str, Any], history: Sequence[dict[str, Any]]) -> str:
    """The human report: verdict, figures against the objectives, and a chart of the last
    drills' RTO and RPO."""
    obj = {"rto_s": float("nan"), "rpo_s": float("nan"), **report.get("objectives", {})}
    lines = [f"drill {report['id']} at {report.get('at') or report.get('mode', '-')} from "
             f"{report.get('store', '-')} into {report.get('target', '-')}"]
    if report["ok"]:
        for entity in sorted(report.get("rows", {})):
            lines.append(f"  {entity}: {report['rows'][entity]:,} rows, digest "
                         f"{report['digests'][entity][:12]}…, ok")
        lines.append(
            f"  RTO {fmt_duration(report['rto_s'])} measured, "
            f"{fmt_duration(report['rto_extrapolated_s'])} for the full data "
            f"({report['full_bytes']:,} bytes): "
            f"{'met' if report['rto_met'] else 'MISSED'} (objective "
            f"{fmt_duration(obj['rto_s'])})")
    else:
        lines.append(f"  FAILED: {report['error']}")
    rpo = report.get("rpo_s")
    lines.append(f"  RPO {fmt_duration(rpo)}: " + ("met" if report.get("rpo_met") else "MISSED")
                 + f" (objective {fmt_duration(obj['rpo_s'])})")
    recent = list(history)[-30:]
    if recent:
        rto = [r.get("rto_extrapolated_s") if r.get("ok") else None for r in recent]
        rpos = [r.get("rpo_s") for r in recent]
        fails = sum(1 for r in recent if not r.get("ok"))
        top_rto = max((v for v in rto if v is not None), default=0.0)
        top_rpo = max((v for v in rpos if v is not None), default=0.0)
        lines.append(f"last {len(recent)} drills ({fails} failed):")
        lines.append(f"  RTO {sparkline(rto)}  max {fmt_duration(top_rto)}")
        lines.append(f"  RPO {sparkline(rpos)}  max {fmt_duration(top_rpo)}")
    return "\n".join(lines)
