"""Configuration: a TOML file, then ``REPLICATOR_<SECTION>_<KEY>`` environment overrides.

Every value is checked once, here, and a bad one raises :class:`ConfigError` naming the
setting (``ingest.seal_age_s``), so the CLI prints one clear line, never a traceback.

Example (all keys optional; these are the defaults)::

    [kafka]
    bootstrap_servers = "127.0.0.1:9092"
    group_id = "replicator"
    topics = ["attendance", "participant", "config"]

    [store]
    url = ""                      # empty: <ingest.data_dir>/store (the primary destination)

    [[destinations]]              # further destinations (none by default), any number
    name = "dr"
    url = "s3://bucket/prefix?endpoint=https://s3.example.net"
    required = false              # true: Kafka commits wait until this one holds the data

    [ingest]
    data_dir = "./var/replicator"
    flush_interval_ms = 50
    commit_spacing_ms = 5
    seal_bytes = 67108864
    seal_age_s = 60
    max_event_bytes = 1048576

    [objectives]
    rpo_s = 3600
    rto_s = 14400

    [server]
    host = "127.0.0.1"
    port = 9187                   # 0: no metrics/health endpoint
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from replicator.errors import ConfigError, InvalidNameError
from replicator.naming import check_topic

ENV_PREFIX = "REPLICATOR_"
_DEST_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    bootstrap_servers: str = "127.0.0.1:9092"
    group_id: str = "replicator"
    topics: tuple[str, ...] = ("attendance", "participant", "config")
    client_id: str = "replicator"
    #: seconds to wait for the broker at start before failing with a clear error
    connect_timeout_s: float = 30.0
    session_timeout_ms: int = 10000
    heartbeat_interval_ms: int = 3000
    max_poll_records: int = 5000
    #: the broker answers a fetch once this many bytes are ready or ``fetch_max_wait_ms``
    #: passed: fewer, larger fetches cost less CPU on both sides at steady rates, and the
    #: wait bounds the latency it adds (part of the RPO budget together with the group commit)
    fetch_min_bytes: int = 256 * 1024
    fetch_max_wait_ms: int = 25


@dataclass(frozen=True, slots=True)
class StoreSettings:
    #: ``file:///path`` or a path; empty means ``<ingest.data_dir>/store``
    url: str = ""


@dataclass(frozen=True, slots=True)
class DestinationSettings:
    """A further destination: everything the primary store receives is copied to it."""

    name: str = ""
    url: str = ""
    #: Kafka offsets are committed only up to what this destination holds
    required: bool = False


@dataclass(frozen=True, slots=True)
class IngestSettings:
    data_dir: Path = Path("./var/replicator")
    #: upper bound between group commits (adaptive commit: one starts as soon as records are
    #: pending and none is in flight, but at least every flush_interval_ms)
    flush_interval_ms: int = 50
    #: minimum time between the starts of two group commits: lets a commit gather the
    #: records of several fetches (bigger blocks compress better, fewer fsyncs per event)
    commit_spacing_ms: int = 5
    seal_bytes: int = 64 * 1024 * 1024
    seal_age_s: float = 60.0
    block_bytes: int = 1024 * 1024
    max_event_bytes: int = 1024 * 1024
    commit_interval_ms: int = 1000
    watermark_interval_ms: int = 1000
    max_pending_bytes: int = 32 * 1024 * 1024
    schemas_dir: Path | None = None


@dataclass(frozen=True, slots=True)
class Objectives:
    rpo_s: float = 3600.0
    rto_s: float = 14400.0


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 9187
    #: file of admin API bearer tokens, one per line (``#`` comments allowed); tokens may
    #: also come from the ``REPLICATOR_ADMIN_TOKENS`` environment variable (comma-separated).
    #: Without any token, every protected endpoint answers 401.
    tokens_file: Path | None = None


@dataclass(frozen=True, slots=True)
class EncryptionSettings:
    """Encryption at rest (AES-256-GCM per segment block and per snapshot block).

    Keys come from ``key_file`` (one key per line: 64 hex digits or base64 of 32 bytes) or
    from the environment variable named by ``key_env`` (comma-separated). The first key
    encrypts; every listed key decrypts (rotation: put the new key first, keep the old ones
    while data written with them is retained). The key id written into each file is a
    fingerprint of the key, never the key.
    """

    enabled: bool = False
    key_file: Path | None = None
    key_env: str = "REPLICATOR_DATA_KEYS"


@dataclass(frozen=True, slots=True)
class DrillSettings:
    """Scheduled disaster-recovery drills run by the service (``replicator drill``)."""

    enabled: bool = True
    interval_s: float = 86400.0
    #: ``latest`` or ``random`` (a random point inside the restorable window)
    at: str = "latest"
    #: scratch target URL; empty: a temporary SQLite database, removed afterwards
    target: str = ""
    #: drill reports kept under ``<data_dir>/drills/``
    keep: int = 100


@dataclass(frozen=True, slots=True)
class VerifySettings:
    """Incremental verification (``replicator verify``)."""

    #: fraction of already-verified files re-checked on each run (rotating sample)
    sample_fraction: float = 0.05
    #: at least this many already-verified files are re-checked on each run
    sample_min: int = 8


@dataclass(frozen=True, slots=True)
class CompactionSettings:
    """The backup schedule: how often each snapshot kind is due (seconds since the newest
    snapshot of that kind); the service checks every ``check_interval_s``."""

    enabled: bool = True
    incremental_s: float = 3600.0
    differential_s: float = 86400.0
    full_s: float = 7 * 86400.0
    archive_s: float = 30 * 86400.0
    check_interval_s: float = 60.0
    #: changes buffered before a sorted run is spilled to disk (bounds compaction memory)
    memory_entries: int = 200_000


@dataclass(frozen=True, slots=True)
class RetentionSettings:
    """What is kept: raw segments for the point-in-time window; archive snapshots move to
    the archive tier after ``archive_after_days`` and are deleted after
    ``archive_delete_days``."""

    enabled: bool = True
    segments_days: float = 30.0
    archive_after_days: float = 90.0
    archive_delete_days: float = 365.0
    interval_s: float = 3600.0
    #: the archive tier: another store URL, or empty for the ``archive/`` prefix of the store
    archive_url: str = ""


@dataclass(frozen=True, slots=True)
class Config:
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    ingest: IngestSettings = field(default_factory=IngestSettings)
    objectives: Objectives = field(default_factory=Objectives)
    server: ServerSettings = field(default_factory=ServerSettings)
    compaction: CompactionSettings = field(default_factory=CompactionSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    destinations: tuple[DestinationSettings, ...] = ()
    encryption: EncryptionSettings = field(default_factory=EncryptionSettings)
    drill: DrillSettings = field(default_factory=DrillSettings)
    verify: VerifySettings = field(default_factory=VerifySettings)

    @property
    def store_url(self) -> str:
        return self.store.url or str(self.ingest.data_dir / "store")


_SECTIONS: dict[str, type[Any]] = {
    "kafka": KafkaSettings,
    "store": StoreSettings,
    "ingest": IngestSettings,
    "objectives": Objectives,
    "server": ServerSettings,
    "compaction": CompactionSettings,
    "retention": RetentionSettings,
    "encryption": EncryptionSettings,
    "drill": DrillSettings,
    "verify": VerifySettings,
}


def _coerce(setting: str, target: Any, value: Any, from_env: bool) -> Any:
    """Convert ``value`` (a TOML value, or an env string) to the type of the default ``target``.

    TOML values must already have the right type (``seal_bytes = "123"`` is an error);
    environment strings are parsed.
    """
    try:
        if isinstance(target, bool):
            if from_env:
                low = value.strip().lower()
                if low not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(value)
                return low in ("1", "true", "yes")
            if not isinstance(value, bool):
                raise TypeError(type(value).__name__)
            return value
        if isinstance(target, int):
            if isinstance(value, (bool, float)) or (isinstance(value, str) and not from_env):
                raise TypeError(type(value).__name__)
            return int(value)
        if isinstance(target, float):
            if isinstance(value, bool) or (isinstance(value, str) and not from_env):
                raise TypeError(type(value).__name__)
            return float(value)
        if isinstance(target, tuple):
            if from_env:
                return tuple(v.strip() for v in value.split(",") if v.strip())
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise TypeError("expected a list of strings")
            return tuple(value)
        if isinstance(target, Path) or (target is None and setting.endswith(("_dir", "_file"))):
            if not isinstance(value, str):
                raise TypeError(type(value).__name__)
            return Path(value) if value else None
        if isinstance(target, str):
            if not isinstance(value, str):
                raise TypeError(type(value).__name__)
            return value
    except (TypeError, ValueError) as exc:
        kind = {"tuple": "a list of strings", "PosixPath": "a path", "NoneType": "a path"}.get(
            type(target).__name__, type(target).__name__
        )
        raise ConfigError(setting, f"expected {kind}, got {value!r} ({exc})") from None
    raise ConfigError(setting, f"unsupported value {value!r}")


def _apply(
    section_name: str, current: Any, values: Mapping[str, Any], source: str, from_env: bool
) -> Any:
    known = {f.name for f in fields(current)}
    changes: dict[str, Any] = {}
    for key, value in values.items():
        setting = f"{section_name}.{key}"
        if key not in known:
            raise ConfigError(setting, f"unknown setting (from {source}); known: {sorted(known)}")
        changes[key] = _coerce(setting, getattr(current, key), value, from_env)
    return replace(current, **changes)


def _destinations(values: Any, source: str) -> tuple[DestinationSettings, ...]:
    if not isinstance(values, list) or not all(isinstance(v, dict) for v in values):
        raise ConfigError("destinations", "expected an array of tables ([[destinations]])")
    return tuple(_apply(f"destinations[{i}]", DestinationSettings(), v, source, from_env=False)
                 for i, v in enumerate(values))


def load_config(path: Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (optional), apply environment overrides, validate, return the config."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with path.open("rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError("--config", f"file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from None
    cfg = Config()
    for name, values in raw.items():
        if name == "destinations":
            cfg = replace(cfg, destinations=_destinations(values, str(path)))
            continue
        if name not in _SECTIONS:
            raise ConfigError(name, f"unknown section in {path}; known: {sorted(_SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(name, "expected a table")
        cfg = replace(
            cfg, **{name: _apply(name, getattr(cfg, name), values, str(path), from_env=False)}
        )
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX):
            continue
        rest = key[len(ENV_PREFIX) :].lower()
        section, _, setting = rest.partition("_")
        if section not in _SECTIONS or not setting:
            continue
        cfg = replace(
            cfg,
            **{section: _apply(section, getattr(cfg, section), {setting: value}, key, True)},
        )
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks: positive sizes, seal age within the RPO, legal topic names."""
    k, i, o = cfg.kafka, cfg.ingest, cfg.objectives
    if not k.bootstrap_servers.strip():
        raise ConfigError("kafka.bootstrap_servers", "must not be empty")
    if not k.topics:
        raise ConfigError("kafka.topics", "at least one topic is required")
    for t in k.topics:
        try:
            check_topic(t)
        except InvalidNameError as exc:
            raise ConfigError("kafka.topics", str(exc)) from None
    if not k.group_id:
        raise ConfigError("kafka.group_id", "must not be empty")
    if not 1 <= i.flush_interval_ms <= 10_000:
        raise ConfigError("ingest.flush_interval_ms", "must be between 1 and 10000")
    if not 0 <= i.commit_spacing_ms <= i.flush_interval_ms:
        raise ConfigError(
            "ingest.commit_spacing_ms",
            f"must be between 0 and ingest.flush_interval_ms ({i.flush_interval_ms})",
        )
    if i.seal_bytes < 64 * 1024:
        raise ConfigError("ingest.seal_bytes", "must be at least 65536")
    if i.seal_age_s <= 0:
        raise ConfigError("ingest.seal_age_s", "must be positive")
    if o.rpo_s <= 0 or o.rto_s <= 0:
        raise ConfigError("objectives.rpo_s", "objectives must be positive")
    if i.seal_age_s > o.rpo_s:
        raise ConfigError(
            "ingest.seal_age_s",
            f"{i.seal_age_s:g}s exceeds the RPO objective objectives.rpo_s={o.rpo_s:g}s: "
            "a sealed segment could be older than the RPO allows",
        )
    if i.max_event_bytes < 1024:
        raise ConfigError("ingest.max_event_bytes", "must be at least 1024")
    if i.block_bytes < 4096 or i.block_bytes > 16 * 1024 * 1024:
        raise ConfigError("ingest.block_bytes", "must be between 4096 and 16777216")
    c, r = cfg.compaction, cfg.retention
    for name in ("incremental_s", "differential_s", "full_s", "archive_s", "check_interval_s"):
        if getattr(c, name) <= 0:
            raise ConfigError(f"compaction.{name}", "must be positive")
    if c.memory_entries < 1000:
        raise ConfigError("compaction.memory_entries", "must be at least 1000")
    if r.segments_days <= 0 or r.interval_s <= 0:
        raise ConfigError("retention.segments_days", "retention periods must be positive")
    if not r.segments_days <= r.archive_after_days <= r.archive_delete_days:
        raise ConfigError(
            "retention.archive_after_days",
            "must satisfy segments_days <= archive_after_days <= archive_delete_days "
            f"(now {r.segments_days:g} / {r.archive_after_days:g} / "
            f"{r.archive_delete_days:g})")
    if c.full_s > r.segments_days * 86400:
        raise ConfigError(
            "compaction.full_s",
            f"a full snapshot every {c.full_s:g}s is rarer than the segment retention "
            f"({r.segments_days:g} days): points in the window would lose their base")
    seen = {"primary"}
    for n, dest in enumerate(cfg.destinations):
        where = f"destinations[{n}]"
        if not _DEST_NAME.fullmatch(dest.name):
            raise ConfigError(f"{where}.name", "required: 1-40 of a-z 0-9 _ - (not 'primary')")
        if dest.name in seen:
            raise ConfigError(f"{where}.name", f"{dest.name!r} is used twice (or is reserved)")
        seen.add(dest.name)
        if not dest.url:
            raise ConfigError(f"{where}.url", "required")
        if dest.url == cfg.store_url:
            raise ConfigError(f"{where}.url", "is the primary store itself ([store] url)")
        from replicator.storage.base import open_store

        open_store(dest.url)  # scheme and URL checks; no I/O
    if not 0 <= cfg.server.port <= 65535:
        raise ConfigError("server.port", "must be 0..65535")
    d, v = cfg.drill, cfg.verify
    if d.interval_s <= 0:
        raise ConfigError("drill.interval_s", "must be positive")
    if d.at not in ("latest", "random"):
        raise ConfigError("drill.at", f"must be 'latest' or 'random', got {d.at!r}")
    if d.keep < 1:
        raise ConfigError("drill.keep", "must be at least 1")
    if not 0 <= v.sample_fraction <= 1:
        raise ConfigError("verify.sample_fraction", "must be between 0 and 1")
    if v.sample_min < 0:
        raise ConfigError("verify.sample_min", "must not be negative")
    if not cfg.encryption.key_env or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*",
                                                      cfg.encryption.key_env):
        raise ConfigError("encryption.key_env", "must be an environment variable name")
