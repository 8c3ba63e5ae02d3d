"""Command line for ``verify``: checksums, continuity and snapshot digests of the whole
backup, incrementally. Registered on the main ``replicator`` group by :mod:`replicator.cli`."""

from __future__ import annotations

import sys
from typing import Any

import click

from replicator.cli import EXIT_CORRUPT, EXIT_MISSING, _config, _dump, _run, main
from replicator.cli_restore import _progress, _registry

#: gap-ok / overlap / changed notes printed one by one up to this many (--json lists all)
NOTE_LINES = 20


@main.command()
@click.option("--deep", is_flag=True,
              help="Also rebuild each snapshot not rebuilt before from the segments it "
                   "covers and compare its state digest (reads those segments).")
@click.option("--full", is_flag=True,
              help="Read every file, whatever the state remembers (with --deep: rebuild "
                   "every snapshot again).")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.pass_context
def verify(ctx: click.Context, deep: bool, full: bool, as_json: bool) -> None:
    """Check the backup: every segment's and snapshot file's checksums, offset continuity
    per partition (each gap with its reason), snapshot manifests and digests.

    Incremental: the state in <data_dir>/verify-state.json remembers what verified, so a
    run reads new or changed files, files that failed before, and a rotating sample of
    the others (verify.sample_fraction, at least verify.sample_min).

    \b
    Exit codes:
      0  everything checked is ok (gaps explained by retention or Kafka are ok)
      4  corrupt: a checksum, framing, size or digest check failed (wins over 6)
      6  missing: a segment or snapshot file that should exist does not
      5  the store could not be read

    \b
    Examples:
      replicator verify                  # hourly: new files + a sample
      replicator verify --deep --json    # daily: also rebuild new snapshots
      replicator verify --full --deep    # after an incident: everything
    """
    from replicator.ops.verify import STATE_FILE, verify_store
    from replicator.storage import open_store

    cfg = _config(ctx)
    store = open_store(cfg.store_url)
    archive_url = cfg.retention.archive_url
    archive = open_store(archive_url) if archive_url else None
    bar, advance, phase = _progress(True, 1, "listing the store")

    async def go() -> Any:
        try:
            with bar:
                return await verify_store(
                    store, archive=archive, state_path=cfg.ingest.data_dir / STATE_FILE,
                    sample_fraction=cfg.verify.sample_fraction,
                    sample_min=cfg.verify.sample_min, full=full, deep=deep,
                    registry=_registry() if deep else None, advance=advance, phase=phase,
                    deep_budget=cfg.compaction.memory_entries)
        finally:
            await store.close()
            if archive is not None:
                await archive.close()

    report = _run(go())
    if as_json:
        _dump(report.to_json())
    else:
        _print_report(report)
    if report.status == "corrupt":
        sys.exit(EXIT_CORRUPT)
    if report.status == "missing":
        sys.exit(EXIT_MISSING)


def _print_report(report: Any) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    title = f"verify {report.store}" + (f" (archive {report.archive})" if report.archive else "")
    table = Table(title=escape(title), title_justify="left")
    for col in ("check", "listed", "read", "skipped", "problems"):
        table.add_column(col, justify="left" if col == "check" else "right", no_wrap=True)
    c = report.checks
    for label, key in (("segments", "segments"), ("snapshot files", "snapshot_files")):
        d = c.get(key, {})
        table.add_row(label, f"{d.get('listed', 0):,}", f"{d.get('checked', 0):,}",
                      f"{d.get('skipped', 0):,}", str(d.get("failed", 0)))
    m = c.get("manifests", {})
    table.add_row("manifests", str(m.get("listed", 0)), str(m.get("checked", 0)), "0",
                  str(m.get("failed", 0)))
    cont = c.get("continuity", {})
    table.add_row("continuity (partitions)", str(cont.get("partitions", 0)),
                  str(cont.get("partitions", 0)), "0",
                  str(cont.get("missing", 0) + c.get("watermarks", {}).get("failed", 0)))
    if "deep" in c:
        d = c["deep"]
        table.add_row("deep (snapshots rebuilt)", str(d["snapshots"]), str(d["rebuilt"]),
                      str(d["already_verified"] + d["skipped"]), str(d["mismatch"]))
    Console(width=None if sys.stdout.isatty() else 120).print(table)
    for f in report.problems:
        where = f" at byte {f.position}" if f.position is not None else ""
        rng = (f" [{f.offset}, {f.end})" if f.offset is not None and f.end is not None
               else f" (offset {f.offset})" if f.offset is not None else "")
        click.echo(f"{f.kind.upper()}: {f.name}{where}{rng}: {f.detail}")
    notes = [f for f in report.findings if not f.is_problem]
    for f in notes[:NOTE_LINES]:
        reason = f" ({f.reason})" if f.reason else ""
        click.echo(f"note {f.kind}{reason}: {f.name}: {f.detail}")
    if len(notes) > NOTE_LINES:
        click.echo(f"… and {len(notes) - NOTE_LINES} more notes (--json lists all)")
    for sid, why in report.deep_skipped[:NOTE_LINES]:
        click.echo(f"deep: {sid} not rebuilt: {why}")
    for n in report.notes:
        click.echo(f"note: {n}")
    if report.rotation_runs:
        click.echo(f"sample: {report.sample} of {report.old_files:,} verified files re-read; "
                   f"every one is re-read within {report.rotation_runs} runs")
    click.echo(f"verify: {report.verdict()}")
