"""Command line for snapshots and retention: ``compact``, ``retention plan|apply``.
Registered on the main ``replicator`` group by :mod:`replicator.cli`."""

from __future__ import annotations

import time
from typing import Any

import click

from replicator.cli import _catalog, _config, _dump, _human_bytes, _run, main
from replicator.cli_restore import AT_HELP, _progress, _registry, _tiers
from replicator.compaction.planner import KINDS
from replicator.config import Config
from replicator.restore.point import format_ms


def _work_dir(cfg: Config) -> Any:
    return (cfg.ingest.data_dir / "compaction").resolve()


@main.command()
@click.option("--kind", type=click.Choice(KINDS), default="full", show_default=True,
              help="full: the complete state; differential: changes since the last full; "
                   "incremental: changes since the last snapshot of any kind; archive: a "
                   "full kept for the archive tier.")
@click.option("--at", "at_text",
              help="Snapshot as of this time instead of the newest durable point. "
                   + AT_HELP)
@click.option("--dry-run", is_flag=True, help="Print what would be read; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.pass_context
def compact(ctx: click.Context, kind: str, at_text: str | None, dry_run: bool,
            as_json: bool) -> None:
    """Build one snapshot now (the running service does this on the backup schedule).

    The snapshot is verified (every block re-read from the store, content hash compared)
    before its manifest makes it visible; an interrupted run leaves nothing visible and its
    leftovers are swept by the next one.

    \b
    Examples:
      replicator compact --kind full
      replicator compact --kind incremental --json
    """
    from replicator.compaction.runner import compact as run_compact
    from replicator.compaction.runner import make_compaction_plan
    from replicator.restore.point import Latest, parse_at

    cfg = _config(ctx)
    reg = _registry()
    cat = _catalog(cfg)
    tiers = _tiers(cfg, cat)

    async def go() -> None:
        at_ms: int | None = None
        if at_text:
            point = parse_at(at_text)
            if not isinstance(point, Latest):
                at_ms = point.ts_ms
        plan = await make_compaction_plan(cat, tiers, reg, cfg.kafka.topics, kind, at_ms)
        if dry_run:
            if as_json:
                _dump({"dry_run": True, "plan": plan.to_json()})
            else:
                click.echo(f"{kind} snapshot as of {format_ms(plan.time_ms)}: "
                           + (f"on top of {plan.parent.id}, " if plan.parent else "")
                           + (f"merging {', '.join(m.id for m in plan.layers)}, "
                              if plan.layers else "")
                           + f"{sum(len(p.reads) for p in plan.partitions)} segments "
                           f"({_human_bytes(plan.segment_bytes)}), about "
                           f"{plan.events_estimate:,} events")
            return
        bar, advance, _phase = _progress(not as_json, plan.events_estimate,
                                         f"compacting ({kind})")
        with bar:
            # planned again under the maintenance lock: a retention run may have changed
            # the chain since the estimate above
            rep = await run_compact(cat, tiers, reg, cfg.kafka.topics, kind,
                                    work_dir=_work_dir(cfg),
                                    budget=cfg.compaction.memory_entries, progress=advance,
                                    at_ms=at_ms)
        if as_json:
            _dump(rep.to_json())
            return
        m = rep.manifest
        for f in m.files:
            click.echo(f"  {f.entity}: {f.live:,} rows ({f.entries:,} entries, "
                       f"{f.tombstones:,} tombstones), {_human_bytes(f.bytes)}, digest "
                       f"{f.digest.split(':')[1][:12]}…")
        click.echo(f"{m.kind} snapshot {m.id} as of {format_ms(m.time_ms)}"
                   + (f" (parent {m.parent})" if m.parent else "")
                   + f": {rep.events:,} events read in {rep.seconds:.1f}s, verified")

    _run(go())


@main.group()
def retention() -> None:
    """What retention would remove, and removing it (raw segments after
    retention.segments_days, archive snapshots to the archive tier after
    retention.archive_after_days, archives deleted after retention.archive_delete_days)."""


async def _plan_retention(cfg: Config) -> Any:
    from replicator.restore.runner import load_catalog
    from replicator.retention import Policy, load_trimmed, plan_retention

    cat = _catalog(cfg)
    tiers = _tiers(cfg, cat)
    r = cfg.retention
    segs, _wms = await load_catalog(cat)
    return tiers, plan_retention(
        segs, await tiers.list(), topics=cfg.kafka.topics,
        policy=Policy(r.segments_days, r.archive_after_days, r.archive_delete_days),
        now_ms=int(time.time() * 1000), trimmed=await load_trimmed(cat.store))


def _print_retention(plan: Any, verb: str, limit: int = 8) -> None:
    click.echo(f"horizon {format_ms(plan.horizon_ms)}; window base: "
               f"{plan.anchor.id if plan.anchor else 'none'}")
    if plan.note:
        click.echo(plan.note)
    kinds: dict[str, list[Any]] = {}
    for a in plan.actions:
        kinds.setdefault(a.kind, []).append(a)
    for kind, acts in kinds.items():
        click.echo(f"{kind}: {len(acts)} ({_human_bytes(sum(a.bytes for a in acts))}) -- "
                   f"{acts[0].reason}")
        for a in acts[:limit]:
            click.echo(f"  {a.name}  ({_human_bytes(a.bytes)})")
        if len(acts) > limit:
            click.echo(f"  … and {len(acts) - limit} more (--json lists all)")
    total = sum(a.bytes for a in plan.actions)
    click.echo(f"{len(plan.actions)} actions {verb}, {_human_bytes(total)}")


@retention.command("plan")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.pass_context
def retention_plan(ctx: click.Context, as_json: bool) -> None:
    """Show what retention would remove now, and why. Changes nothing."""
    _, plan = _run(_plan_retention(_config(ctx)))
    if as_json:
        _dump(plan.to_json())
    else:
        _print_retention(plan, "planned")


@retention.command("apply")
@click.option("--confirm", is_flag=True, help="Required: really remove.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.pass_context
def retention_apply(ctx: click.Context, confirm: bool, as_json: bool) -> None:
    """Remove what `retention plan` shows (the window's base snapshot is re-verified first)."""
    from replicator.retention import apply_retention

    if not confirm:
        click.echo("replicator: error: retention apply removes backups; run `replicator "
                   "retention plan` to see what, then add --confirm", err=True)
        raise SystemExit(2)
    from replicator.compaction.runner import compaction_lock

    cfg = _config(ctx)

    async def go() -> Any:
        with compaction_lock(_work_dir(cfg)):  # one maintenance job per data directory
            tiers, plan = await _plan_retention(cfg)
            return plan, await apply_retention(tiers, plan)

    plan, done = _run(go())
    if as_json:
        _dump({**plan.to_json(), "done": len(done)})
    else:
        _print_retention(plan, "done")
