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


@main.command("destinations")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.pass_context
def destinations_cmd(ctx: click.Context, as_json: bool) -> None:
    """Every destination (the primary store, then [[destinations]]): what it holds, how far
    behind the primary it is and the RPO it gives right now (age of its newest restorable
    point). Reads the stores directly; the running service shows the same live at
    /v1/destinations."""
    from replicator.destinations import coverage
    from replicator.storage.base import open_store
    from replicator.storage.mirror import plan_mirror

    cfg = _config(ctx)
    named = [("primary", cfg.store_url, True)] + [
        (d.name, d.url, d.required) for d in cfg.destinations]

    async def go() -> list[dict[str, Any]]:
        primary = open_store(cfg.store_url)
        out: list[dict[str, Any]] = []
        try:
            p_objs = await primary.list()
            p_cov = await coverage(primary, p_objs)
            now = int(time.time() * 1000)
            for name, url, required in named:
                store = primary if name == "primary" else open_store(url)
                row: dict[str, Any] = {"name": name, "url": store.url, "required": required}
                try:
                    objs = p_objs if store is primary else await store.list()
                    cov = p_cov if store is primary else await coverage(store, objs)
                    plan = plan_mirror(p_objs, objs)
                    behind = {f"{t}[{p}]": end - cov.ends.get((t, p), 0)
                              for (t, p), end in p_cov.ends.items()
                              if end > cov.ends.get((t, p), 0)}
                    row.update(up=True, objects=cov.objects, bytes=cov.bytes,
                               backlog_objects=len(plan.missing),
                               backlog_bytes=plan.missing_bytes, behind_offsets=behind,
                               newest_restorable_ms=cov.newest_ms,
                               rpo_s=None if cov.newest_ms is None
                               else round(max(0.0, (now - cov.newest_ms) / 1e3), 3),
                               conflicts=len(plan.conflicts))
                except Exception as exc:  # one destination down is a row, not a failure
                    row.update(up=False, error=str(exc))
                finally:
                    if store is not primary:
                        await store.close()
                out.append(row)
        finally:
            await primary.close()
        return out

    rows = _run(go())
    if as_json:
        _dump({"destinations": rows, "rpo_objective_s": cfg.objectives.rpo_s})
        return
    for r in rows:
        req = "required" if r["required"] else "optional"
        if not r["up"]:
            click.echo(f"{r['name']:<10} {req:<9} DOWN  {r['url']}: {r['error']}")
            continue
        rpo = "n/a (nothing restorable)" if r["rpo_s"] is None else f"{r['rpo_s']:.1f}s"
        state = "met" if r["rpo_s"] is not None and r["rpo_s"] <= cfg.objectives.rpo_s \
            else "MISSED"
        click.echo(
            f"{r['name']:<10} {req:<9} up    {r['objects']} objects "
            f"({_human_bytes(r['bytes'])}), backlog {r['backlog_objects']} "
            f"({_human_bytes(r['backlog_bytes'])}), newest restorable "
            f"{format_ms(r['newest_restorable_ms'])}, RPO {rpo} [{state}]  {r['url']}")
