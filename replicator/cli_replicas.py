"""Command line for destinations and replicas: ``mirror``, ``destinations``, ``follow``.
Registered on the main ``replicator`` group by :mod:`replicator.cli`."""

from __future__ import annotations

import time
from typing import Any

import click

from replicator.cli import _config, _dump, _human_bytes, _run, main
from replicator.restore.point import format_ms


@main.command()
@click.option("--from", "source_url", required=True,
              help="Store to copy from (file:///path, a path, or s3://bucket/prefix?...).")
@click.option("--to", "dest_url", required=True, help="Store to copy into.")
@click.option("--verify", is_flag=True,
              help="Afterwards compare the SHA-256 of every object on both sides.")
@click.option("--prefix", default="", help="Only objects under this prefix.")
@click.option("--create-bucket", is_flag=True, help="Create the destination bucket if absent.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def mirror(source_url: str, dest_url: str, verify: bool, prefix: str, create_bucket: bool,
           as_json: bool) -> None:
    """Copy every segment, snapshot and watermark the destination lacks (seeding a new
    disaster-recovery site, or repairing one).

    Data first, then snapshot manifests, then watermarks, so the destination is consistent
    at every moment. Existing objects are never overwritten; one whose size differs is
    reported as a conflict (exit 4). With --verify, a content mismatch also exits 4.

    \b
    Examples:
      replicator mirror --from ./var/replicator/store \\
        --to 's3://dr/replicator?endpoint=http://127.0.0.1:7070' --verify
    """
    from replicator.storage.base import open_store
    from replicator.storage.mirror import mirror as run_mirror
    from replicator.storage.s3 import S3Store

    src, dst = open_store(source_url), open_store(dest_url)
    t0 = time.monotonic()
    shown = {"n": 0, "bytes": 0}

    def progress(name: str, n: int) -> None:
        shown["n"] += 1
        shown["bytes"] += n
        if not as_json and shown["n"] % 50 == 0:
            click.echo(f"  ... {shown['n']} objects, {_human_bytes(shown['bytes'])}", err=True)

    async def go() -> Any:
        try:
            if create_bucket and isinstance(dst, S3Store):
                await dst.ensure_bucket()
            return await run_mirror(src, dst, verify=verify, prefix=prefix, progress=progress)
        finally:
            await src.close()
            await dst.close()

    result = _run(go())
    doc = {"from": src.url, "to": dst.url, **result.to_json(),
           "seconds": round(time.monotonic() - t0, 3)}
    if as_json:
        _dump(doc)
    else:
        click.echo(f"mirror {src.url} -> {dst.url}: copied {result.copied} objects "
                   f"({_human_bytes(result.copied_bytes)}), updated {result.updated} "
                   f"watermark/retention objects in {doc['seconds']}s")
        if verify:
            click.echo(f"verified {result.verified} objects by SHA-256")
        for name, a, b in result.conflicts:
            click.echo(f"CONFLICT {name}: source {a} bytes, destination {b} bytes "
                       "(not overwritten)", err=True)
        for name in result.mismatched:
            click.echo(f"MISMATCH {name}: contents differ", err=True)
        click.echo("ok" if result.ok else "FAILED")
    if not result.ok:
        raise SystemExit(4)


def default_live(cfg: Any) -> tuple[str, ...]:
    """This config's own service as the live endpoint (none when its HTTP port is off)."""
    return (f"http://{cfg.server.host}:{cfg.server.port}",) if cfg.server.port else ()


def print_destinations(rows: list[dict[str, Any]], rpo_objective_s: float) -> None:
    for r in rows:
        req = "required" if r["required"] else "optional"
        if not r["up"]:
            click.echo(f"{r['name']:<10} {req:<9} DOWN  {r['url']}: {r['error']}")
            continue
        rpo = "n/a (nothing restorable)" if r["rpo_s"] is None else f"{r['rpo_s']:.1f}s"
        state = "met" if r["rpo_met"] else "MISSED"
        behind = ", ".join(f"{k} -{v}" for k, v in r["behind_offsets"].items()) or "none"
        click.echo(
            f"{r['name']:<10} {req:<9} up    {r['objects']} objects "
            f"({_human_bytes(r['bytes'])}), backlog {r['backlog_objects']} "
            f"({_human_bytes(r['backlog_bytes'])}), behind: {behind}; newest restorable "
            f"{format_ms(r['newest_restorable_ms'])}, RPO {rpo} "
            f"[{state}, objective {rpo_objective_s:g}s]  {r['url']}")


@main.command("destinations")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.pass_context
def destinations_cmd(ctx: click.Context, as_json: bool) -> None:
    """Every destination (the primary store, then [[destinations]]): what it holds, how far
    behind the primary it is and the RPO it gives right now (age of its newest restorable
    point). Reads the stores directly; the running service shows its live queues at
    /v1/destinations."""
    from replicator.ops.status import destination_rows

    cfg = _config(ctx)
    rows = _run(destination_rows(cfg))
    if as_json:
        _dump({"destinations": rows, "rpo_objective_s": cfg.objectives.rpo_s})
        return
    print_destinations(rows, cfg.objectives.rpo_s)


@main.command()
@click.option("--target", "target_url", required=True,
              help="The replica: postgresql://user@host/db[?schema=replica] or "
                   "sqlite:///abs/path.db")
@click.option("--live", "live", multiple=True,
              help="HTTP endpoint of a running replicator to tail durable blocks from "
                   "(repeatable). Default: this config's [server] address.")
@click.option("--no-live", is_flag=True,
              help="Only sealed segments from the store (lag up to ingest.seal_age_s).")
@click.option("--poll-s", default=1.0, show_default=True,
              help="How often the store is listed for new segments.")
@click.option("--status", "status_only", is_flag=True,
              help="Print the replica's applied position and lag, then exit.")
@click.option("--json", "as_json", is_flag=True, help="JSON output (with --status).")
@click.pass_context
def follow(ctx: click.Context, target_url: str, live: tuple[str, ...], no_live: bool,
           poll_s: float, status_only: bool, as_json: bool) -> None:
    """Keep a standby database continuously in sync with the backup.

    A replica without positions is bootstrapped from the newest snapshot chain (a verified
    restore); then new changes are applied continuously, each batch in one transaction
    with the per-partition positions it reaches, so a crash or kill neither loses nor
    repeats a change. A follower whose position retention removed re-bootstraps.

    \b
    Examples:
      replicator follow --target sqlite:///srv/standby.db
      replicator follow --target 'postgresql://replicator@db/standby?schema=replica'
      replicator follow --target sqlite:///srv/standby.db --status --json
    """
    import asyncio
    import signal

    from replicator.auth import client_token
    from replicator.cli_restore import _registry
    from replicator.follow import Follower, follower_status, open_replica
    from replicator.storage.base import open_store

    cfg = _config(ctx)
    topics = list(cfg.kafka.topics)
    live = () if no_live else (live or default_live(cfg))
    token = client_token(cfg.server.tokens_file, cfg.ingest.data_dir)
    if status_only:
        replica = open_replica(target_url, read_only=True)
        doc = _run(follower_status(open_store(cfg.store_url), replica, topics, live,
                                   token=token))
        if as_json:
            _dump(doc)
            return
        click.echo(f"replica {doc['target']}: "
                   + ("bootstrapped" if doc["bootstrapped"] else "NOT bootstrapped")
                   + f", lag {doc['lag_events']} events, {doc['lag_s']:.1f}s")
        for r in doc["partitions"]:
            lag_s = "n/a" if r["lag_s"] is None else f"{r['lag_s']:.1f}s"
            durable = "" if r["durable_end"] is None else f"  durable end {r['durable_end']}"
            click.echo(f"  {r['topic']}[{r['partition']}]  applied {r['applied_offset']}  "
                       f"stored end {r['stored_end']}{durable}  lag {r['lag_events']} events "
                       f"({lag_s})")
        return
    reg = _registry()

    async def go() -> None:
        last = [0.0]

        def on_batch(f: Follower) -> None:
            now = time.monotonic()
            if now - last[0] >= 5:
                last[0] = now
                lag = sorted(f.stats.lag_ms[-1000:])
                p99 = f"{lag[int(len(lag) * 0.99) - 1 if len(lag) > 1 else 0]:.0f} ms" \
                    if lag else "n/a"
                click.echo(f"applied {f.stats.applied_events} events in {f.stats.batches} "
                           f"batches; live lag p99 {p99}", err=True)

        follower = Follower(store=open_store(cfg.store_url), replica=open_replica(target_url),
                            registry=reg, topics=topics, live=live, poll_s=poll_s,
                            archive_url=cfg.retention.archive_url, on_batch=on_batch,
                            token=token)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, follower.request_stop)
        async with follower:
            click.echo(f"following {cfg.store_url} into {follower.replica.location}"
                       + (f" (live: {', '.join(live)})" if live else ""), err=True)
            await follower.run()
        click.echo(f"stopped: applied {follower.stats.applied_events} events", err=True)

    _run(go())
