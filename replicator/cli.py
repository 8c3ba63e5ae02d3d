"""Command line: ``replicator run | segments | quarantine | topics | demo`` (and, from
:mod:`replicator.cli_restore`, ``restore | backups | get | history | export``).

Errors from the replicator's own hierarchy become one line on stderr and a distinct exit
code; a traceback means a bug. Every listing has ``--json`` for scripts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click
import orjson

from replicator import __version__, crypto
from replicator.config import Config, load_config
from replicator.errors import (
    BackupIncompleteError,
    BadRequestError,
    BrokerError,
    ConfigError,
    CorruptSegmentError,
    DigestMismatchError,
    PointNotRestorableError,
    ReplicatorError,
    SegmentError,
    StoreError,
    TargetError,
)

T = TypeVar("T")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_BROKER = 3
EXIT_CORRUPT = 4
EXIT_STORE = 5
EXIT_MISSING = 6
EXIT_NOT_RESTORABLE = 7
EXIT_TARGET = 8
EXIT_DIGEST = 9


class _KeyValueFormatter(logging.Formatter):
    """``time level logger message key=value ...`` including ``extra`` fields."""

    _std = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extras = {k: v for k, v in record.__dict__.items() if k not in self._std}
        if extras:
            base += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return base


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_KeyValueFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiokafka", "aiobotocore", "botocore"):  # per-connection chatter
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def _exit_code(exc: ReplicatorError) -> int:
    if isinstance(exc, (ConfigError, BadRequestError)):
        return EXIT_CONFIG
    if isinstance(exc, PointNotRestorableError):
        return EXIT_NOT_RESTORABLE
    if isinstance(exc, BackupIncompleteError):
        return EXIT_MISSING
    if isinstance(exc, TargetError):
        return EXIT_TARGET
    if isinstance(exc, DigestMismatchError):
        return EXIT_DIGEST
    if isinstance(exc, BrokerError):
        return EXIT_BROKER
    if isinstance(exc, (CorruptSegmentError, SegmentError)):
        return EXIT_CORRUPT
    if isinstance(exc, StoreError):
        return EXIT_STORE
    return EXIT_ERROR


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine; turn replicator errors into one line and an exit code."""
    try:
        return asyncio.run(coro)
    except ReplicatorError as exc:
        click.echo(f"replicator: error: {exc}", err=True)
        sys.exit(_exit_code(exc))


def _config(ctx: click.Context) -> Config:
    obj: dict[str, Any] = ctx.ensure_object(dict)
    if "config" not in obj:
        path: Path | None = obj.get("config_path")
        try:
            loaded = load_config(path)
            # the keyring every reader and writer of this process uses (docs/OPERATIONS.md,
            # "Encryption at rest"); unusable keys stop every command here, naming the setting
            crypto.configure(loaded)
            obj["config"] = loaded
        except ConfigError as exc:
            click.echo(f"replicator: error: bad configuration: {exc}", err=True)
            sys.exit(EXIT_CONFIG)
    cfg: Config = obj["config"]
    return cfg


def _dump(obj: Any) -> None:
    click.echo(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode())


def _fmt_ts(ms: int) -> str:
    if ms is None or ms < 0:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _short_ts(ms: int) -> str:
    if ms is None or ms < 0:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%m-%d %H:%M:%S")


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    envvar="REPLICATOR_CONFIG",
    help="TOML configuration file (env REPLICATOR_CONFIG). Settings can be "
    "overridden with REPLICATOR_<SECTION>_<KEY>, e.g. "
    "REPLICATOR_KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092.",
)
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
@click.version_option(__version__, prog_name="replicator")
@click.pass_context
def main(ctx: click.Context, config_path: Path | None, log_level: str) -> None:
    """replicator: Kafka change events -> durable, checksummed segment logs -> any point in time.

    Start with `replicator run` (the service). Inspect what is stored with
    `replicator segments list`, check it with `replicator segments verify`.
    """
    ctx.ensure_object(dict)["config_path"] = config_path
    _setup_logging(log_level)


# -- run -------------------------------------------------------------------------------------


@main.command()
@click.option(
    "--demo-rate",
    type=float,
    default=0.0,
    help="Also run the demo publisher at this many events/s (0: off).",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Live progress table (default: on when stdout is a terminal).",
)
@click.pass_context
def run(ctx: click.Context, demo_rate: float, progress: bool | None) -> None:
    """Run the service: consume the topics, write segments, seal and store them; take
    snapshots on the backup schedule and apply retention (see [compaction] and [retention]).

    Stops cleanly on SIGINT/SIGTERM: everything consumed is fsync'd, sealed and stored, and
    durable offsets are committed.
    """
    cfg = _config(ctx)
    show = sys.stdout.isatty() if progress is None else progress
    code = _run(_serve(cfg, demo_rate=demo_rate, show_progress=show,
                       config_path=ctx.ensure_object(dict).get("config_path")))
    sys.exit(code)


async def _serve(cfg: Config, *, demo_rate: float, show_progress: bool,
                 config_path: Path | None = None) -> int:
    from replicator.demo import run_demo_publisher
    from replicator.ingest import Ingestor
    from replicator.server import HealthServer

    log = logging.getLogger("replicator.run")
    loop = asyncio.get_running_loop()
    tokens = None
    if cfg.server.port:
        from replicator.auth import server_tokens

        # before anything starts: a bad tokens file is one line and nothing consumed
        tokens = server_tokens(cfg.server.tokens_file, cfg.ingest.data_dir)
        log.info("admin API tokens", extra={"source": tokens.source})
    ingestor = Ingestor(config=cfg)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await ingestor.start()
    server: HealthServer | None = None
    if cfg.server.port:
        from replicator.ops.jobs import RestoreJobs
        from replicator.ops.status import backups_document, collect_status

        jobs = RestoreJobs(data_dir=cfg.ingest.data_dir, config_path=config_path)
        if jobs.sweep():
            log.info("removed scratch files of interrupted restore jobs")
        server = HealthServer(
            metrics=ingestor.metrics,
            host=cfg.server.host,
            port=cfg.server.port,
            healthy=lambda: ingestor.healthy,
            ready=lambda: ingestor.serving,
            tail=ingestor.tail,
            destinations=(ingestor.fanout.status if ingestor.fanout is not None else None),
            tokens=tokens,
            status=lambda: collect_status(cfg),
            backups=lambda: backups_document(cfg),
            jobs=jobs,
        )
        try:
            await server.start()
        except OSError as exc:
            await ingestor.stop()
            raise ConfigError(
                "server.port",
                f"cannot listen on {cfg.server.host}:{cfg.server.port}: {exc.strerror}",
            ) from None
    published = [0]
    tasks: list[asyncio.Task[Any]] = [asyncio.create_task(ingestor.run(), name="ingest")]
    if demo_rate > 0:

        def on_pub(n: int) -> None:
            published[0] = n

        tasks.append(
            asyncio.create_task(
                run_demo_publisher(cfg.kafka.bootstrap_servers, demo_rate, stop, on_pub),
                name="demo-publisher",
            )
        )
    if cfg.compaction.enabled:
        from replicator.compaction.schedule import Scheduler
        from replicator.snapshot.tiers import Tiers

        tiers = Tiers.for_store(ingestor.store, cfg.retention.archive_url)
        first = cfg.kafka.topics[0]
        scheduler = Scheduler(compaction=cfg.compaction, retention=cfg.retention,
                              list_snapshots=tiers.list, config_path=config_path,
                              is_leader=lambda: ingestor.owns(first, 0),
                              on_written=(ingestor.fanout.reconcile_soon
                                          if ingestor.fanout is not None else None))
        tasks.append(asyncio.create_task(scheduler.run(stop), name="backup-schedule"))
    if cfg.drill.enabled:
        from replicator.ops.drill_schedule import DrillScheduler

        first_topic = cfg.kafka.topics[0]
        drills = DrillScheduler(settings=cfg.drill, data_dir=cfg.ingest.data_dir,
                                metrics=ingestor.metrics, config_path=config_path,
                                is_leader=lambda: ingestor.owns(first_topic, 0))
        tasks.append(asyncio.create_task(drills.run(stop), name="drill-schedule"))
    display = _Progress(ingestor, published) if show_progress else None
    stopper = asyncio.create_task(stop.wait())
    code = EXIT_OK
    stopped = False
    try:
        if display is not None:
            display.start()
        while True:
            done, _ = await asyncio.wait(
                [*tasks, stopper], timeout=0.5, return_when=asyncio.FIRST_COMPLETED
            )
            if display is not None:
                display.update()
            if stopper in done:
                log.info("stopping: sealing and storing everything consumed")
                break
            failed = [t for t in done if t is not stopper]
            for t in failed:
                tasks.remove(t)
                failure = t.exception()
                if t.get_name() in ("demo-publisher", "backup-schedule", "drill-schedule"):
                    # neither the demo nor the snapshot schedule may stop the backup
                    log.error("%s stopped: %s", t.get_name(), failure)
                    continue
                if failure is not None:
                    raise failure
                stopped = True  # ingest returned: a stop was requested
            if stopped or not tasks:
                break
    finally:
        stop.set()
        ingestor.request_stop()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(t, timeout=10)
        stopper.cancel()
        await ingestor.stop()
        if server is not None:
            await server.stop()
        if display is not None:
            display.stop()
    s = ingestor.stats
    click.echo(
        f"replicator stopped: {s.ingested:,} events durable, {s.quarantined:,} quarantined; "
        f"all segments sealed and stored in {ingestor.store.url}",
        err=True,
    )
    return code


class _Progress:
    """Live terminal table: events/s, durable offsets, sealed segments (rich)."""

    def __init__(self, ingestor: Any, published: list[int]) -> None:
        from rich.console import Console
        from rich.live import Live

        self.ingestor = ingestor
        self.published = published
        self.console = Console()
        self.live = Live(console=self.console, refresh_per_second=2, transient=False)
        self._last = (time.monotonic(), 0)
        self._eps = 0.0

    def start(self) -> None:
        self.live.start()

    def stop(self) -> None:
        self.live.stop()

    def update(self) -> None:
        from rich.table import Table

        now = time.monotonic()
        ing = self.ingestor
        t0, n0 = self._last
        if now - t0 >= 1.0:
            self._eps = (ing.stats.ingested - n0) / (now - t0)
            self._last = (now, ing.stats.ingested)
        table = Table(
            title=(
                f"replicator  {self._eps:,.0f} events/s  ingested {ing.stats.ingested:,}  "
                f"quarantined {ing.stats.quarantined:,}"
                + (f"  demo published {self.published[0]:,}" if self.published[0] else "")
            )
        )
        for col in ("topic", "partition", "durable offset", "watermark", "sealed segments"):
            table.add_column(col, justify="right" if col != "topic" else "left")
        for p in ing.partition_status():
            table.add_row(
                p["topic"],
                str(p["partition"]),
                f"{p['durable']:,}",
                _fmt_ts(p["watermark_ms"]) if p["watermark_ms"] else "-",
                str(p["sealed"]),
            )
        self.live.update(table)


# -- segments ---------------------------------------------------------------------------------


@main.group()
def segments() -> None:
    """Inspect and verify stored segment logs."""


def _catalog(cfg: Config) -> Any:
    from replicator.catalog import Catalog
    from replicator.storage import open_store

    return Catalog(store=open_store(cfg.store_url), data_dir=cfg.ingest.data_dir)


@segments.command("list")
@click.option("--topic", help="Only this topic.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.option("--no-spool", is_flag=True, help="Only sealed segments in the store.")
@click.pass_context
def segments_list(ctx: click.Context, topic: str | None, as_json: bool, no_spool: bool) -> None:
    """Per topic-partition: offset range, time range, records, bytes, compression ratio."""
    cfg = _config(ctx)
    cat = _catalog(cfg)
    entries = _run(cat.list(topic, include_spool=not no_spool))
    if as_json:
        _dump({"store": cat.store.url, "segments": [e.to_json() for e in entries]})
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"segments in {cat.store.url}", title_justify="left")
    table.add_column("topic\\[partition]", no_wrap=True)
    table.add_column("offsets [start, end)", no_wrap=True)
    table.add_column("time range (UTC)", no_wrap=True)
    for col in ("records", "bytes", "ratio"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("where", no_wrap=True)
    for e in entries:
        table.add_row(
            escape(f"{e.topic}[{e.partition}]"),
            f"{e.start}-{e.end}",
            f"{_short_ts(e.min_ts)} .. {_short_ts(e.max_ts)}",
            f"{e.records:,}",
            _human_bytes(e.bytes),
            f"{e.compression_ratio:.2f}",
            e.location if e.sealed else f"{e.location}*",
        )
    # piped output is not cut to 80 columns: scripts and logs get whole rows
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    total = sum(e.records for e in entries)
    click.echo(
        f"{len(entries)} segments, {total:,} records, {_human_bytes(sum(e.bytes for e in entries))}"
    )


@segments.command("inspect")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def segments_inspect(ctx: click.Context, name: str, as_json: bool) -> None:
    """Summary and block index of one segment (a store name or a file path)."""
    cfg = _config(ctx)
    entry, blocks = _run(_catalog(cfg).inspect(name))
    if as_json:
        _dump({"segment": entry.to_json(), "blocks": blocks})
        return
    click.echo(
        f"{entry.name}\n  {entry.topic}[{entry.partition}] offsets [{entry.start}, "
        f"{entry.end})  {entry.records:,} records  {_human_bytes(entry.bytes)} "
        f"(raw {_human_bytes(entry.raw_bytes)}, ratio {entry.compression_ratio:.2f})\n"
        f"  time {_fmt_ts(entry.min_ts)} – {_fmt_ts(entry.max_ts)}  "
        f"sealed={entry.sealed}  blocks={len(blocks)}"
    )
    for b in blocks:
        click.echo(
            f"  @{b['position']:>10}  [{b['start']}, {b['end']})  {b['records']:>6} rec  "
            f"{b['bytes']:>9} B  {_fmt_ts(b['min_ts'])} – {_fmt_ts(b['max_ts'])}"
        )


@segments.command("verify")
@click.option("--topic")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def segments_verify(ctx: click.Context, topic: str | None, as_json: bool) -> None:
    """Check every stored segment's checksums, record framing and offset continuity.

    Exit 0 if all is well, 4 if a segment is corrupt, 6 if there is a gap between segments.
    """
    cfg = _config(ctx)
    entries, problems = _run(_catalog(cfg).verify(topic))
    if as_json:
        _dump(
            {
                "segments": len(entries),
                "records": sum(e.records for e in entries),
                "problems": [p.to_json() for p in problems],
            }
        )
    else:
        for p in problems:
            where = f" at byte {p.position}" if p.position is not None else ""
            off = f" (offset {p.offset})" if p.offset is not None else ""
            click.echo(f"{p.kind.upper()}: {p.name}{where}{off}: {p.detail}")
        click.echo(
            f"verified {len(entries)} segments, {sum(e.records for e in entries):,} "
            f"records: {'ok' if not problems else f'{len(problems)} problem(s)'}"
        )
    problems = [p for p in problems if p.kind != "unverifiable"]  # shown, not failures
    if any(p.kind in ("corrupt", "unreadable") for p in problems):
        sys.exit(EXIT_CORRUPT)
    if problems:
        sys.exit(EXIT_MISSING)


# -- quarantine -------------------------------------------------------------------------------


@main.command("quarantine")
@click.option("--topic", help="Only this topic.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def quarantine_cmd(ctx: click.Context, topic: str | None, as_json: bool) -> None:
    """Events that failed validation, with their reason and original bytes."""
    from replicator.quarantine import read_quarantine

    cfg = _config(ctx)
    qdir = cfg.ingest.data_dir / "quarantine"
    files = sorted(qdir.glob("*.jsonl")) if qdir.is_dir() else []
    rows = []
    for f in files:
        if topic and f.stem != topic:
            continue
        for q in read_quarantine(f):
            rows.append(
                {
                    "topic": q.topic,
                    "partition": q.partition,
                    "offset": q.offset,
                    "timestamp": q.timestamp,
                    "reason": q.reason,
                    "value_preview": (q.value or b"")[:80].decode("utf-8", "replace"),
                }
            )
    if as_json:
        _dump({"quarantined": rows})
        return
    for r in rows:
        click.echo(f"{r['topic']}[{r['partition']}]@{r['offset']}  {r['reason']}")
    click.echo(f"{len(rows)} quarantined event(s)")


# -- topics & demo ----------------------------------------------------------------------------


@main.command("topics")
@click.option("--partitions", default=3, show_default=True)
@click.option("--replication-factor", default=1, show_default=True)
@click.pass_context
def topics_cmd(ctx: click.Context, partitions: int, replication_factor: int) -> None:
    """Create the configured topics if they do not exist (idempotent)."""
    cfg = _config(ctx)
    created = _run(_ensure_topics(cfg, partitions, replication_factor))
    click.echo(
        f"topics ready: {', '.join(cfg.kafka.topics)}"
        + (f" (created {', '.join(created)})" if created else "")
    )


async def _ensure_topics(cfg: Config, partitions: int, rf: int) -> list[str]:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError

    admin = AIOKafkaAdminClient(bootstrap_servers=cfg.kafka.bootstrap_servers)
    try:
        await asyncio.wait_for(admin.start(), timeout=cfg.kafka.connect_timeout_s)
    except (KafkaConnectionError, TimeoutError, OSError) as exc:
        raise BrokerError(
            f"cannot reach Kafka at kafka.bootstrap_servers="
            f"{cfg.kafka.bootstrap_servers!r}: {exc or type(exc).__name__}"
        ) from None
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in cfg.kafka.topics if t not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(
                    [NewTopic(t, num_partitions=partitions, replication_factor=rf) for t in missing]
                )
        return missing
    finally:
        await admin.close()


@main.command("demo")
@click.option("--rate", default=200.0, show_default=True, help="Events per second.")
@click.option("--seed", default=0, show_default=True)
@click.pass_context
def demo_cmd(ctx: click.Context, rate: float, seed: int) -> None:
    """Publish realistic attendance / participant / config changes until Ctrl-C."""
    cfg = _config(ctx)

    async def go() -> int:
        from replicator.demo import run_demo_publisher

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        last = [time.monotonic()]

        def progress(n: int) -> None:
            if time.monotonic() - last[0] >= 2:
                last[0] = time.monotonic()
                click.echo(f"published {n:,} events", err=True)

        return await run_demo_publisher(
            cfg.kafka.bootstrap_servers, rate, stop, progress, seed=seed
        )

    n = _run(go())
    click.echo(f"published {n:,} events")


if __name__ == "__main__":
    main()


# restore, backups, get, history, export, compact, retention: registered on ``main``
from replicator import cli_compact, cli_ops, cli_replicas, cli_restore, cli_verify  # noqa: E402,F401
