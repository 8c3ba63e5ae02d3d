"""Command line for operators: ``status``, ``drill``, ``plan``.
Registered on the main ``replicator`` group by :mod:`replicator.cli`."""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from replicator.cli import _config, _dump, _human_bytes, _run, main
from replicator.ops.drill import fmt_duration
from replicator.restore.point import format_ms

_STATE_STYLE = {"met": "green", "at risk": "yellow", "missed": "bold red", "unknown": "yellow"}


def status_renderable(doc: dict[str, Any]) -> Any:
    """The human status view (rich renderables)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = []
    head = Text(f"replicator status at {doc['time']}\n", style="bold")
    for name, o in doc["objectives"].items():
        label = {"rpo_local": "RPO (local durability)", "rpo_destinations":
                 "RPO (worst destination)", "rto": "RTO (last drill, extrapolated)"}[name]
        head.append(f"  {label:<32}")
        head.append(f"{o['state'].upper():<8}", style=_STATE_STYLE[o["state"]])
        head.append(f" {fmt_duration(o['value_s'])} of {fmt_duration(o['objective_s'])}\n")
    st = doc["store"]
    head.append(f"  store {st['url']}: " + (
        f"up (listed in {st.get('list_seconds', 0):.2f}s)" if st["up"]
        else f"DOWN: {st.get('error')}") + "\n")
    br = doc["broker"]
    head.append(f"  broker {br['bootstrap_servers']}: " + (
        "not asked" if br["up"] is None else "up" if br["up"] else f"DOWN: {br.get('error')}"))
    parts.append(head)
    if doc["partitions"]:
        t = Table(title="partitions", title_justify="left")
        for col in ("topic", "partition", "durable offset", "high watermark", "lag",
                    "committed", "RPO now"):
            t.add_column(col, justify="right" if col != "topic" else "left", no_wrap=True)
        for p in doc["partitions"]:
            t.add_row(p["topic"], str(p["partition"]), f"{p['durable_offset']:,}",
                      "?" if p["high_watermark"] is None else f"{p['high_watermark']:,}",
                      "?" if p["lag"] is None else f"{p['lag']:,}",
                      "-" if p["committed"] is None else f"{p['committed']:,}",
                      fmt_duration(p["rpo_s"]))
        parts.append(t)
    if doc["restorable"]:
        t = Table(title="restorable window", title_justify="left")
        for col in ("entity", "oldest (UTC)", "newest (UTC)", "events", "size"):
            t.add_column(col, no_wrap=True)
        for w in doc["restorable"]:
            t.add_row(w["entity"], w["oldest"] or "-", w["newest"] or "-", f"{w['events']:,}",
                      _human_bytes(w["bytes"]))
        parts.append(t)
    snaps = doc["snapshots"]
    parts.append(Text("snapshots: " + (", ".join(
        f"{k} {v['time']} ({fmt_duration(v['age_s'])} ago, {_human_bytes(v['bytes'])})"
        for k, v in sorted(snaps.items())) or "none yet")))
    q = doc["quarantine"]
    parts.append(Text("quarantine: " + ", ".join(f"{k} {v:,}" for k, v in q.items())))
    t = Table(title="destinations", title_justify="left")
    for col in ("name", "state", "backlog", "newest restorable (UTC)", "RPO"):
        t.add_column(col, no_wrap=True)
    for d in doc["destinations"]:
        if not d["up"]:
            t.add_row(d["name"], Text("DOWN", style="bold red"), "-", "-", d.get("error", ""))
            continue
        t.add_row(d["name"] + (" (required)" if d["required"] else ""), "up",
                  f"{d['backlog_objects']} ({_human_bytes(d['backlog_bytes'])})",
                  format_ms(d["newest_restorable_ms"]), fmt_duration(d["rpo_s"]))
    parts.append(t)
    dr = doc["last_drill"]
    parts.append(Text("last drill: " + ("none yet (replicator drill)" if dr is None else
                      f"{dr['time']} " + ("ok" if dr["ok"] else f"FAILED: {dr['error']}")
                      + (f", RTO {fmt_duration(dr.get('rto_extrapolated_s'))}"
                         if dr["ok"] else ""))))
    for f in doc.get("followers", []):
        parts.append(Text(f"follower {f['target']}: " + (
            "bootstrapped" if f["bootstrapped"] else "NOT bootstrapped")
            + f", lag {f['lag_events']} events, {f['lag_s']:.1f}s"))
    return Group(*parts)


@main.command("status")
@click.option("--follower", "followers", multiple=True,
              help="Also show this replica's applied position and lag (repeatable).")
@click.option("--no-broker", is_flag=True, help="Do not ask the broker (no lag, no local RPO).")
@click.option("--watch", is_flag=True, help="Refresh until Ctrl-C.")
@click.option("--interval", default=5.0, show_default=True, help="Seconds between refreshes "
              "with --watch.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.pass_context
def status_cmd(ctx: click.Context, followers: tuple[str, ...], no_broker: bool, watch: bool,
               interval: float, as_json: bool) -> None:
    """Whether the objectives hold right now: per partition the durable offset, consumer
    lag and the RPO achieved (age of the oldest event not yet durable); per destination its
    backlog and RPO; the restorable window; the newest snapshot of each kind; quarantine
    counts; store and broker health; the RTO from the last drill.

    Each objective is MET (within 75 % of it), AT RISK (within 100 %), MISSED, or UNKNOWN
    (no figure, e.g. no drill yet).

    \b
    Exit codes: 0 everything met, 10 an objective missed or a store down,
                11 an objective at risk or unknown.
    """
    import logging

    from replicator.ops.status import collect_status

    cfg = _config(ctx)
    # an unreachable broker is part of the status document; aiokafka's own retry errors
    # would only repeat it on stderr
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)

    async def one() -> dict[str, Any]:
        doc = await collect_status(cfg, broker=not no_broker)
        if followers:
            from replicator.auth import client_token
            from replicator.cli_replicas import default_live
            from replicator.follow import follower_status, open_replica
            from replicator.storage.base import open_store

            token = client_token(cfg.server.tokens_file, cfg.ingest.data_dir)
            doc["followers"] = [
                await follower_status(open_store(cfg.store_url),
                                      open_replica(u, read_only=True), list(cfg.kafka.topics),
                                      default_live(cfg), token=token)
                for u in followers]
        return doc

    if watch and not as_json:
        from rich.console import Console
        from rich.live import Live

        with Live(console=Console(), refresh_per_second=1, screen=False) as live:
            try:
                while True:
                    live.update(status_renderable(_run(one())))
                    time.sleep(interval)
            except KeyboardInterrupt:
                return
    while True:
        doc = _run(one())
        if as_json:
            _dump(doc)
        else:
            from rich.console import Console

            Console(width=None if sys.stdout.isatty() else 140).print(status_renderable(doc))
        if not watch:
            break
        try:
            time.sleep(interval)
        except KeyboardInterrupt:
            break
    if doc["exit_code"]:
        raise SystemExit(doc["exit_code"])


@main.command("drill")
@click.option("--at", "at", type=click.Choice(["latest", "random"]), default=None,
              help="The point to restore (default: drill.at, 'latest').")
@click.option("--target", default=None,
              help="Scratch target: a postgresql:// URL (a drill_<id> schema is created and "
                   "dropped). Default: drill.target, else a temporary SQLite database.")
@click.option("--from", "source", default=None,
              help="Drill from this destination (its name in [[destinations]]) instead of "
                   "the primary store: rehearses recovery from the disaster-recovery copy.")
@click.option("--seed", type=int, default=None, help="Random seed for --at random.")
@click.option("--no-save", is_flag=True, help="Do not keep the report in <data_dir>/drills.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.pass_context
def drill_cmd(ctx: click.Context, at: str | None, target: str | None, source: str | None,
              seed: int | None, no_save: bool, as_json: bool) -> None:
    """Rehearse a recovery: restore into a scratch target, verify the digest, measure the
    real RTO (extrapolated to the full data size) and the RPO, compare them with the
    objectives, keep a report, clean up.

    \b
    Exit codes: 0 drill ok and both objectives met; 12 drill ok but an objective missed;
    4 corrupt backup, 7 nothing restorable, 8 target error, 9 digest mismatch.
    """
    from replicator.ops.drill import load_history, render, run_drill, save_report

    cfg = _config(ctx)
    store_url = None
    if source is not None:
        named = {d.name: d.url for d in cfg.destinations}
        if source not in named:
            click.echo(f"replicator: error: --from {source!r}: not a destination; known: "
                       f"{', '.join(sorted(named)) or 'none'}", err=True)
            sys.exit(2)
        store_url = named[source]
    async def go() -> dict[str, Any] | None:
        import asyncio
        import signal

        # SIGTERM (systemctl stop, a Kubernetes deadline, the service stopping) cancels the
        # drill, so its scratch database or schema is removed before the process ends
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            return await run_drill(cfg, at=at or cfg.drill.at,
                                   target=target or cfg.drill.target, store_url=store_url,
                                   seed=seed)
        except asyncio.CancelledError:
            return None

    report = _run(go())
    if report is None:
        # asyncio.run has joined the restore's worker threads: nothing writes any more
        from replicator.ops.drill import scratch_root, sweep_scratch_dirs

        sweep_scratch_dirs(scratch_root(cfg.ingest.data_dir).resolve())
        click.echo("replicator: error: drill interrupted; its scratch target was removed",
                   err=True)
        sys.exit(130)
    if not no_save:
        save_report(cfg.ingest.data_dir, report, cfg.drill.keep)
    if as_json:
        _dump(report)
    else:
        click.echo(render(report, load_history(cfg.ingest.data_dir) if not no_save
                          else [report]))
    if not report["ok"]:
        sys.exit(_drill_failure_code(report.get("error_type") or ""))
    if not (report["rto_met"] and report["rpo_met"]):
        sys.exit(12)


def _drill_failure_code(error_type: str) -> int:
    """The exit code ``restore`` would give for the drill's error class."""
    from replicator import errors
    from replicator.cli import _exit_code

    cls = getattr(errors, error_type, errors.ReplicatorError)
    if not (isinstance(cls, type) and issubclass(cls, errors.ReplicatorError)):
        cls = errors.ReplicatorError
    return _exit_code(cls.__new__(cls))


@main.command("plan")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.pass_context
def plan_cmd(ctx: click.Context, as_json: bool) -> None:
    """The disaster-recovery plan from this configuration and the measured figures:
    objectives, backup schedule, destinations, the restore time to expect (from the last
    drill's throughput) and the steps for each scenario, with exact commands."""
    from replicator.catalog import Catalog
    from replicator.errors import ReplicatorError
    from replicator.ops.drill import load_history
    from replicator.ops.plan import build_plan, render_plan
    from replicator.restore.point import Latest
    from replicator.restore.runner import make_plan
    from replicator.schemas import SchemaRegistry
    from replicator.snapshot.tiers import Tiers
    from replicator.storage.base import open_store

    cfg = _config(ctx)
    path = ctx.ensure_object(dict).get("config_path")

    async def latest() -> tuple[int | None, float | None]:
        store = open_store(cfg.store_url)
        tiers = Tiers.for_store(store, cfg.retention.archive_url)
        try:
            p = await make_plan(Catalog(store=store), SchemaRegistry.load(
                cfg.ingest.schemas_dir), list(cfg.kafka.topics), Latest(), tiers=tiers)
            return p.bytes, p.seconds_estimate
        except ReplicatorError:
            return None, None  # nothing restorable yet: the plan says so
        finally:
            await tiers.close_archive()
            await store.close()

    restore_bytes, static = _run(latest())
    doc = build_plan(cfg, load_history(cfg.ingest.data_dir), restore_bytes=restore_bytes,
                     static_estimate_s=static,
                     config_arg=f"--config {path}" if path else "")
    if as_json:
        _dump(doc)
    else:
        click.echo(render_plan(doc))
