"""Command line for getting data back: ``restore``, ``backups list``, ``get``, ``history``,
``export``. Registered on the main ``replicator`` group by :mod:`replicator.cli`.

Exit codes (beyond those of :mod:`replicator.cli`): 2 bad request (malformed time, unknown
entity/topic, offsets beyond what is stored), 4 corrupt backup, 6 backup incomplete (a
segment file is missing), 7 point not restorable, 8 target error, 9 digest mismatch.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import click
import orjson

from replicator.cli import _catalog, _config, _dump, _human_bytes, _run, main
from replicator.config import Config
from replicator.restore.planner import RestorePlan, describe_backups, plan_scan
from replicator.restore.point import Point, format_ms, parse_at, parse_offsets
from replicator.schemas import SchemaRegistry
from replicator.snapshot.tiers import Tiers
from replicator.targets import SCHEMES

AT_HELP = ("RFC 3339 with a zone (2026-11-26T10:42:17Z), relative (-15m, -1h30m), "
           "@<epoch ms>, or 'latest'.")


def _registry() -> SchemaRegistry:
    return SchemaRegistry.load()


def _topic_entities(cfg: Config, reg: SchemaRegistry) -> dict[str, str]:
    return {t: t for t in cfg.kafka.topics if t in reg.entities}


def _tiers(cfg: Config, cat: Any) -> Tiers:
    return Tiers.for_store(cat.store, cfg.retention.archive_url)


def _split(values: str | None) -> list[str] | None:
    if not values:
        return None
    return [v.strip() for v in values.split(",") if v.strip()]


def _progress(enabled: bool, total: int, label: str) -> tuple[
        AbstractContextManager[Any], Callable[[int], None] | None,
        Callable[[str, int], None] | None]:
    """A rich progress bar on a terminal (thread-safe ``advance``; ``phase`` starts the next
    stage with its own total), else nothing."""
    if not enabled or not sys.stderr.isatty() or total <= 0:
        return nullcontext(), None, None
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(),
                    TimeRemainingColumn(), transient=True,
                    console=Console(stderr=True))
    task = prog.add_task(label, total=total)

    def advance(n: int) -> None:
        prog.update(task, advance=n)

    def phase(name: str, new_total: int) -> None:
        prog.reset(task, total=max(new_total, 1), description=name)

    return prog, advance, phase


def _print_plan(plan: RestorePlan) -> None:
    at = format_ms(plan.at_ms) if plan.at_ms is not None else "the given offsets"
    click.echo(f"restore plan: {', '.join(plan.entities)} at {at}")
    click.echo(f"  restorable window: {plan.window.describe()}")
    click.echo(f"  {plan.files} files, {_human_bytes(plan.bytes)}, about "
               f"{plan.events_estimate:,} events to replay (~{plan.seconds_estimate}s)")
    for m in plan.snapshots:
        click.echo(f"  snapshot {m.id} ({m.kind}, {format_ms(m.time_ms)}, "
                   f"{_human_bytes(m.size)})")
    for p in plan.partitions:
        cut = f"end offset {p.cut_offset}" if p.cut_offset is not None else (
            f"records <= {format_ms(p.cut_ms)}")
        base = f", from snapshot cut {p.snapshot_cut}" if p.snapshot_cut is not None else ""
        click.echo(f"  {p.topic}[{p.partition}]: {len(p.reads)} files, covered "
                   f"[{p.first}, {p.covered_end}){base}, cut: {cut}")
        for r in p.reads:
            click.echo(f"      {r.segment.location}: {r.segment.name} [{r.from_offset}, "
                       f"{r.to_offset})")


@main.command()
@click.option("--at", "at_text", help="The point to restore. " + AT_HELP)
@click.option("--offsets", "offsets_text",
              help="Instead of --at: topic:partition:end_offset,... (exclusive end; every "
                   "partition of the topics named).")
@click.option("--target", "target_url", envvar="REPLICATOR_RESTORE_TARGET",
              help=f"Where to restore: {SCHEMES}. Default: a new SQLite file under "
                   "<data_dir>/restores/. May come from REPLICATOR_RESTORE_TARGET instead "
                   "(keeps a password off the command line).")
@click.option("--entities", help="Comma-separated entities (default: all).")
@click.option("--keys", help="Comma-separated record keys: restore only these.")
@click.option("--dry-run", is_flag=True, help="Print the plan; read and write nothing.")
@click.option("--replace", is_flag=True,
              help="Allow a target that already holds data (replaced atomically on success).")
@click.option("--swap-into", help="PostgreSQL: after verification, atomically rename the "
                                  "fresh schema to this one (the old one is kept, renamed).")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.pass_context
def restore(ctx: click.Context, at_text: str | None, offsets_text: str | None,
            target_url: str | None, entities: str | None, keys: str | None, dry_run: bool,
            replace: bool, swap_into: str | None, as_json: bool) -> None:
    """Restore the state as of a point in time into PostgreSQL, SQLite or JSONL, verified by
    the state digest.

    \b
    Examples:
      replicator restore --at 2026-11-26T10:42:17Z --target postgresql://u@db/app
      replicator restore --at -15m --entities attendance --target sqlite:///tmp/a.db
      replicator restore --at latest --dry-run
    """
    from replicator.errors import BadRequestError
    from replicator.restore.runner import default_schema_name, execute_restore, make_plan

    if (at_text is None) == (offsets_text is None):
        click.echo("replicator: error: give exactly one of --at (a time or 'latest') or "
                   "--offsets (topic:partition:end_offset,...); see replicator restore --help",
                   err=True)
        sys.exit(2)
    cfg = _config(ctx)
    reg = _registry()
    cat = _catalog(cfg)

    async def go() -> None:
        point: Point = parse_at(at_text) if at_text is not None else parse_offsets(
            offsets_text or "")
        from replicator.targets.kafka import parse_kafka_url

        tiers = _tiers(cfg, cat)
        events_mode = bool(target_url and target_url.startswith("kafka://")
                           and parse_kafka_url(target_url)[2] == "events")
        plan = await make_plan(cat, reg, cfg.kafka.topics, point, _split(entities),
                               tiers=tiers, use_snapshots=not events_mode)
        late = [p for p in plan.partitions if p.first > 0 and p.snapshot_cut is None]
        if late and not as_json:
            click.echo("warning: the backup of " + ", ".join(
                f"{p.topic}[{p.partition}] starts at offset {p.first}" for p in late[:5])
                + (" …" if len(late) > 5 else "") + ": changes before that are not in it "
                "(ingest started after them, or they were removed)", err=True)
        if dry_run:
            if as_json:
                _dump({"dry_run": True, "plan": plan.to_json()})
            else:
                _print_plan(plan)
            return
        url = target_url
        if url is None:
            d = (cfg.ingest.data_dir / "restores").resolve()
            d.mkdir(parents=True, exist_ok=True)
            url = f"sqlite://{d / (default_schema_name(plan) + '.db')}"
        if swap_into and not url.startswith(("postgresql://", "postgres://")):
            raise BadRequestError("--swap-into only applies to a postgresql:// target")
        bar, advance, phase = _progress(not as_json, plan.events_estimate, "replaying")
        with bar:
            report = await execute_restore(cat, reg, plan, url, keys=_split(keys),
                                           replace=replace, swap_into=swap_into,
                                           progress=advance, phase=phase, tiers=tiers)
        if as_json:
            _dump({"dry_run": False, **report.to_json()})
            return
        total = sum(r.rows for r in report.results)
        where = report.location + (f" (schema {report.schema})" if report.schema else "")
        for r in report.results:
            click.echo(f"{r.entity}: {r.rows:,} rows, digest {r.actual.hex[:12]}…, ok")
        if report.replaced_schema:
            click.echo(f"previous schema kept as {report.replaced_schema}")
        click.echo(f"restored {total:,} rows into {where} at "
                   f"{format_ms(plan.at_ms) if plan.at_ms is not None else 'the given offsets'}"
                   f" in {report.seconds:.1f}s ({report.events:,} events replayed), digest ok")

    _run(go())


@main.group()
def backups() -> None:
    """What the backup holds and which points it can restore."""


@backups.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.pass_context
def backups_list(ctx: click.Context, as_json: bool) -> None:
    """Per entity: the restorable window (oldest and newest restorable time) and sizes;
    then the snapshot chain (fulls, differentials, incrementals, archive entries) with
    time, size, counts and digest."""
    from replicator.restore.runner import load_catalog
    from replicator.retention import load_trimmed

    cfg = _config(ctx)
    reg = _registry()
    cat = _catalog(cfg)
    tiers = _tiers(cfg, cat)

    async def go() -> tuple[Any, Any, Any, Any]:
        segs, wms = await load_catalog(cat)
        return segs, wms, await tiers.list(), await load_trimmed(cat.store)

    segs, wms, snaps, trimmed = _run(go())
    rows = describe_backups(segs, wms, topic_entities=_topic_entities(cfg, reg),
                            snapshots=snaps, trimmed=trimmed)
    if as_json:
        _dump({"store": cat.store.url, "entities": [r.to_json() for r in rows],
               "snapshots": [{**m.to_json(), "tier": tiers.tier_of(m), "bytes": m.size,
                              "time": format_ms(m.time_ms)} for m in snaps]})
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    table = Table(title=f"backups in {cat.store.url}", title_justify="left")
    for col in ("entity", "oldest restorable (UTC)", "newest restorable (UTC)"):
        table.add_column(col, no_wrap=True)
    for col in ("partitions", "segments", "events", "size"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        table.add_row(r.entity, format_ms(r.window.oldest_ms), format_ms(r.window.newest_ms),
                      str(r.partitions), str(r.segments), f"{r.events:,}",
                      _human_bytes(r.bytes))
    console.print(table)
    if snaps:
        chain = Table(title="snapshots", title_justify="left")
        for col in ("time (UTC)", "kind", "tier", "id", "parent"):
            chain.add_column(col, no_wrap=True)
        for col in ("rows", "entries", "size"):
            chain.add_column(col, justify="right", no_wrap=True)
        chain.add_column("digests", no_wrap=True)
        for m in snaps:
            chain.add_row(format_ms(m.time_ms), m.kind, tiers.tier_of(m), m.id[-6:],
                          m.parent[-6:] if m.parent else "-",
                          f"{sum(f.live for f in m.files):,}",
                          f"{sum(f.entries for f in m.files):,}", _human_bytes(m.size),
                          " ".join(f"{f.entity}={f.digest.split(':')[1][:8]}"
                                   for f in m.files))
        console.print(chain)
    else:
        click.echo("no snapshots yet (replicator compact --kind full)")
    for r in rows:
        for tp, a, b in r.holes:
            click.echo(f"warning: {r.entity}: {tp[0]}[{tp[1]}] offsets [{a}, {b}) are missing "
                       "from the backup", err=True)


def _scan_paths(cfg: Config, entity: str, from_ms: int | None, to_ms: int | None
                ) -> tuple[RestorePlan, dict[str, Path]]:
    from replicator.restore.runner import load_catalog, local_paths

    reg = _registry()
    cat = _catalog(cfg)

    async def go() -> tuple[RestorePlan, dict[str, Path]]:
        from replicator.retention import load_trimmed

        segs, wms = await load_catalog(cat)
        plan = plan_scan(segs, wms, topic_entities=_topic_entities(cfg, reg), entity=entity,
                         from_ms=from_ms, to_ms=to_ms)
        te = _topic_entities(cfg, reg)
        gone = {tp: off for tp, off in (await load_trimmed(cat.store)).items()
                if te.get(tp[0]) == entity}
        if gone:
            click.echo("warning: retention removed the segments before " + ", ".join(
                f"{t}[{p}]@{off}" for (t, p), off in sorted(gone.items()))
                + ": older changes are not in this history (snapshots keep only the "
                "latest state)", err=True)
        return plan, await local_paths(cat, plan)

    return _run(go())


@main.command()
@click.argument("entity")
@click.argument("key")
@click.option("--at", "at_text", default="latest", show_default=True, help=AT_HELP)
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.pass_context
def get(ctx: click.Context, entity: str, key: str, at_text: str, as_json: bool) -> None:
    """One record's state at a point in time (exit 1 if it did not exist then)."""
    import asyncio

    from replicator.restore.replay import replay
    from replicator.restore.runner import local_paths, make_plan, snapshot_paths

    cfg = _config(ctx)
    reg = _registry()
    cat = _catalog(cfg)

    async def go() -> tuple[RestorePlan, Any]:
        tiers = _tiers(cfg, cat)
        plan = await make_plan(cat, reg, cfg.kafka.topics, parse_at(at_text), [entity],
                               tiers=tiers)
        paths = await local_paths(cat, plan)
        snaps = await snapshot_paths(tiers, plan)  # read through each file's key index
        state = await asyncio.to_thread(replay, plan, lambda s: paths[s.name], keys={key},
                                        snapshot_opener=lambda m, n: snaps[(m.id, n)])
        return plan, state[entity].get(key)

    plan, change = _run(go())
    at = format_ms(plan.at_ms)
    if change is None or change[4] is None:
        what = "deleted" if change is not None else "absent"
        if as_json:
            _dump({"entity": entity, "key": key, "at": at, "exists": False, "state": what})
        else:
            click.echo(f"{entity} {key!r} did not exist at {at} ({what})")
        sys.exit(1)
    _version, ts, rank, off, value, _k, _h = change
    pp = plan.partitions[rank]
    event = orjson.loads(value)
    doc = {"entity": entity, "key": key, "at": at, "exists": True,
           "change": {"topic": pp.topic, "partition": pp.partition, "offset": off,
                      "timestamp": format_ms(ts), "version": event.get("version"),
                      "ts": event.get("ts")},
           "data": event.get("data")}
    if as_json:
        _dump(doc)
    else:
        click.echo(f"{entity} {key!r} at {at}: from {pp.topic}[{pp.partition}]@{off} "
                   f"({format_ms(ts)}, version {event.get('version')})")
        _dump(event.get("data"))


@main.command()
@click.argument("entity")
@click.argument("key")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.pass_context
def history(ctx: click.Context, entity: str, key: str, as_json: bool) -> None:
    """Every stored change of one record, with offsets and times (the audit trail)."""
    from replicator.restore.replay import scan

    cfg = _config(ctx)
    plan, paths = _scan_paths(cfg, entity, None, None)
    changes = []
    for c in scan(plan, lambda s: paths[s.name], key=key):
        ev = orjson.loads(c.value)
        changes.append({"topic": c.topic, "partition": c.partition, "offset": c.offset,
                        "timestamp": format_ms(c.ts_ms), "op": ev.get("op"),
                        "version": ev.get("version"), "ts": ev.get("ts"),
                        "data": ev.get("data")})
    if as_json:
        _dump({"entity": entity, "key": key, "changes": changes})
        return
    if not changes:
        click.echo(f"no stored change of {entity} {key!r}")
        return
    for ch in changes:
        click.echo(f"{ch['timestamp']}  {ch['topic']}[{ch['partition']}]@{ch['offset']}  "
                   f"{ch['op']:<6} version={ch['version']}")
    click.echo(f"{len(changes)} changes")


@main.command()
@click.option("--entity", required=True, help="The entity to export.")
@click.option("--from", "from_text", help="Start time (inclusive). " + AT_HELP)
@click.option("--to", "to_text", help="End time (inclusive). " + AT_HELP)
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl",
              show_default=True,
              help="jsonl: the original event bytes, one per line; csv: one row per event "
                   "with metadata and the data columns.")
@click.option("--output", "-o", type=click.Path(path_type=Path),
              help="Write here instead of stdout.")
@click.pass_context
def export(ctx: click.Context, entity: str, from_text: str | None, to_text: str | None,
           fmt: str, output: Path | None) -> None:
    """The change events of an entity in a time range, partition by partition."""
    from replicator.restore.layout import TableLayout
    from replicator.restore.point import parse_time
    from replicator.restore.replay import scan

    cfg = _config(ctx)
    from_ms = _run(_parse(from_text, parse_time)) if from_text else None
    to_ms = _run(_parse(to_text, parse_time)) if to_text else None
    plan, paths = _scan_paths(cfg, entity, from_ms, to_ms)
    records = scan(plan, lambda s: paths[s.name], from_ms=from_ms, to_ms=to_ms)
    out = open(output, "wb") if output else sys.stdout.buffer  # noqa: SIM115
    n = 0
    try:
        if fmt == "jsonl":
            for c in records:
                out.write(c.value)
                out.write(b"\n")
                n += 1
        else:
            import csv
            import io

            layout = TableLayout.from_schema(entity, _registry().json_schema(entity))
            names = [c.name for c in layout.data_columns]
            text = io.TextIOWrapper(out, encoding="utf-8", newline="", write_through=True)
            w = csv.writer(text)
            w.writerow(["topic", "partition", "offset", "timestamp", "op", "key", "version",
                        "ts", *names])
            for rows in _csv_rows(records, names):
                w.writerow(rows)
                n += 1
            text.detach()
    finally:
        if output:
            out.close()
    if output:
        click.echo(f"exported {n:,} events to {output}", err=True)


def _csv_rows(records: Any, names: list[str]) -> Iterator[list[Any]]:
    for c in records:
        ev = orjson.loads(c.value)
        data = ev.get("data") or {}
        vals = []
        for n in names:
            v = data.get(n)
            vals.append(orjson.dumps(v).decode() if isinstance(v, dict | list) else v)
        yield [c.topic, c.partition, c.offset, format_ms(c.ts_ms), ev.get("op"), ev.get("key"),
               ev.get("version"), ev.get("ts"), *vals]


async def _parse(text: str, parser: Callable[[str], int]) -> int:
    return parser(text)

