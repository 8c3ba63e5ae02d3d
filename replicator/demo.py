"""Realistic, deterministic demo traffic: attendance check-ins, participants and configuration.

:class:`DemoGenerator` simulates the three source services of a small conference operator
(three events, their sessions and check-in devices, a few hundred participants, a few dozen
configuration entries) and yields one :class:`~replicator.publish.ChangeEvent` per change:

* participant registrations (upsert, version 1), later profile updates, deactivations
  (``active=false``) and occasional erasures (delete);
* attendance check-ins (mostly ``present``, some ``late``/``absent``/``excused``; BLE with a
  signal strength, QR, or manual by staff), then check-outs and status corrections as upserts
  of the same record (same key, version + 1), and a few deletes of mistaken check-ins;
* configuration changes: the same few dozen keys updated again and again, scoped overrides
  removed (delete) and re-created.

Invariants: the stream is a pure function of ``seed`` (and ``start``) unless a live ``clock``
is given; every event validates against ``schemas/``; every key's versions increase by one per
change, starting at 1, and continue after a delete; ``key`` equals the entity's primary-key
field in ``data``; timestamps never go backwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import unicodedata
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from replicator.errors import BrokerError, ConfigError
from replicator.publish import ChangeEvent, ChangePublisher, Op, format_ts
from replicator.schemas import SchemaRegistry

__all__ = ["DEFAULT_START", "DemoGenerator", "iter_events", "run_demo_publisher"]

log = logging.getLogger(__name__)

DEFAULT_START: Final[datetime] = datetime(2025, 3, 3, 7, 30, tzinfo=UTC)
"""Simulated clock start of a deterministic stream (a Monday morning, before doors open)."""

_FIRST_NAMES: Final = (
    "Aino", "Amara", "Ana", "Anders", "Astrid", "Bjørn", "Camille", "Chen", "Chiara", "Daniel",
    "Deepika", "Elif", "Emma", "Fatima", "Finn", "François", "Grace", "Hannah", "Hiroshi",
    "Ingrid", "Isabel", "Jakub", "Jonas", "José", "Julia", "Karin", "Kwame", "Lars", "Laura",
    "Lea", "Liam", "Lucía", "Magnus", "Maja", "Marek", "Maria", "Mateo", "Mei", "Mohammed",
    "Nadia", "Nils", "Noah", "Nora", "Olav", "Oliver", "Priya", "Rafael", "Ruth", "Sara",
    "Siobhán", "Sofia", "Søren", "Thomas", "Tomás", "Ugo", "Wei", "Yusuf", "Zoë", "Zofia",
)  # fmt: skip
_LAST_NAMES: Final = (
    "Andersen", "Bakker", "Berg", "Bianchi", "Dahl", "de Vries", "Dubois", "Eriksen",
    "Fernández", "García", "Haugen", "Hansen", "Jansen", "Johansson", "Kowalski", "Larsen",
    "Lefèvre", "Lindqvist", "Martin", "Meyer", "Moreau", "Müller", "Nakamura", "Nguyen",
    "Nielsen", "Novák", "O'Connor", "Okafor", "Olsen", "Ólafsdóttir", "Patel", "Pedersen",
    "Rossi", "Santos", "Schmidt", "Silva", "Strand", "Svensson", "Visser", "Wang", "Wójcik",
)  # fmt: skip
_ORGANISATIONS: Final = (
    ("Fjordline Health Trust", "fjordline-health.no"),
    ("Rotterdam Data Lab", "rdlab.nl"),
    ("Université Lumière Lyon 2", "univ-lyon2.fr"),
    ("Northwind Logistics", "northwind.example"),
    ("Helix Bioinformatics", "helixbio.eu"),
    ("City of Bergen", "bergen.kommune.no"),
    ("Kestrel Software", "kestrel.dev"),
    ("Arctic Energy Systems", "arcticenergy.no"),
    ("Polder Mobility", "poldermobility.nl"),
    ("Open Schools Network", "openschools.org"),
    ("Mediterranean Research Institute", "medri.it"),
    ("Baltic Fintech", "balticfintech.lt"),
)
_FREEMAIL: Final = ("gmail.com", "outlook.com", "proton.me", "online.no", "ziggo.nl")
_TAGS: Final = (
    "vip", "press", "first-time", "workshop", "dietary:vegetarian", "dietary:vegan",
    "dietary:halal", "accessibility:wheelchair", "speaker-dinner", "volunteer", "sponsor",
    "early-bird", "student", "remote-team", "badge-reprint",
)  # fmt: skip
_LATE_NOTES: Final = (
    "Train from Drammen delayed",
    "Arrived after keynote started",
    "Badge printer queue at registration",
    "Came from parallel workshop",
)
_ABSENT_NOTES: Final = (
    "Called in sick",
    "Flight cancelled (AMS)",
    "No-show, no message",
    "Double-booked with internal meeting",
)
_EXCUSED_NOTES: Final = (
    "Speaker prep in green room",
    "Approved by session chair",
    "Staff duty at info desk",
    "Medical appointment, notified in advance",
)
_STAFF: Final = (
    "staff:ingrid.haugen",
    "staff:marek.novak",
    "staff:lea.moreau",
    "staff:tomas.silva",
    "staff:nora.dahl",
)
_CONFIG_EDITORS: Final = (*_STAFF, "svc:config-admin", "svc:terraform")


@dataclass(frozen=True, kw_only=True)
class _Device:
    device_id: str
    method: str  # ble | qr | manual
    lat: float
    lon: float


@dataclass(frozen=True, kw_only=True)
class _Event:
    event_id: str
    timezone: str
    locale: str
    sessions: tuple[str, ...]
    devices: tuple[_Device, ...]


def _venue(
    rng: random.Random, slug: str, event_id: str, tz: str, locale: str, lat: float, lon: float
) -> _Event:
    sessions = tuple(
        f"ses-{slug}-d{day}-{slot}"
        for day in (1, 2)
        for slot in ("keynote", "track-a1", "track-b1", "workshop", "track-a2", "closing")
    )
    devices: list[_Device] = []
    for hall in ("halla", "hallb"):
        for n in (1, 2):
            devices.append(
                _Device(
                    device_id=f"ble-gw-{slug}-{hall}-{n:02d}",
                    method="ble",
                    lat=lat + rng.uniform(-0.0004, 0.0004),
                    lon=lon + rng.uniform(-0.0004, 0.0004),
                )
            )
    for n in (1, 2, 3):
        devices.append(_Device(device_id=f"qr-kiosk-{slug}-{n:02d}", method="qr", lat=lat, lon=lon))
    for n in (1, 2):
        devices.append(
            _Device(device_id=f"tablet-{slug}-staff-{n:02d}", method="manual", lat=lat, lon=lon)
        )
    return _Event(
        event_id=event_id,
        timezone=tz,
        locale=locale,
        sessions=sessions,
        devices=tuple(devices),
    )


def _ascii_slug(text: str) -> str:
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return "".join(c for c in folded.lower() if c.isalnum())


@dataclass(frozen=True, kw_only=True)
class _ConfigSpec:
    config_key: str
    scope: str
    scope_id: str | None
    description: str | None
    make_value: Callable[[random.Random], Any]


def _config_specs(events: Sequence[_Event]) -> tuple[_ConfigSpec, ...]:
    def ints(lo: int, hi: int, step: int = 1) -> Callable[[random.Random], Any]:
        return lambda r: r.randrange(lo, hi + 1, step)

    def flag(r: random.Random) -> Any:
        return r.random() < 0.5

    def pick(*options: Any) -> Callable[[random.Random], Any]:
        return lambda r: r.choice(options)

    def formats(r: random.Random) -> Any:
        return sorted(r.sample(["csv", "json", "pdf", "xlsx"], r.randint(1, 4)))

    def features(r: random.Random) -> Any:
        return {
            "ble_auto_checkout": r.random() < 0.7,
            "qr_offline_mode": r.random() < 0.5,
            "self_service_badges": r.random() < 0.3,
            "live_occupancy": r.random() < 0.6,
        }

    def rate_limit(r: random.Random) -> Any:
        return None if r.random() < 0.2 else r.choice([60, 120, 300, 600])

    g: list[tuple[str, str | None, Callable[[random.Random], Any]]] = [
        ("checkin.late_after_min", "Minutes after session start a check-in counts as late",
         ints(5, 20)),
        ("checkin.ble.rssi_threshold_dbm", "Weakest BLE signal accepted as presence",
         ints(-90, -60)),
        ("checkin.ble.dwell_time_s", "Seconds a badge must stay in range before check-in",
         ints(10, 120, 5)),
        ("checkin.qr.token_ttl_s", "Lifetime of a QR check-in token", ints(30, 300, 30)),
        ("checkin.manual.require_reason", "Manual check-ins need a note", flag),
        ("checkout.auto_after_min", "Close open records after this many minutes",
         ints(30, 240, 15)),
        ("export.formats", "Formats offered in attendance exports", formats),
        ("notifications.email.enabled", None, flag),
        ("notifications.sms.enabled", None, flag),
        ("retention.attendance_days", "Days attendance records are kept", ints(90, 730, 30)),
        ("retention.participant_days", "Days after last event a profile is kept",
         ints(180, 1095, 45)),
        ("privacy.mask_emails_in_exports", "Mask e-mail addresses in exports", flag),
        ("sync.batch_size", "Gateway upload batch size", ints(100, 1000, 50)),
        ("sync.interval_s", "Gateway upload interval", ints(5, 60, 5)),
        ("feature.flags", "Feature toggles for the check-in app", features),
        ("ui.default_locale", None, pick("en-GB", "nb-NO", "nl-NL", "fr-FR")),
        ("ui.theme", None, pick("light", "dark", "high-contrast")),
        ("reporting.timezone", "Time zone of generated reports",
         pick("Europe/Oslo", "Europe/Amsterdam", "Europe/Paris", "UTC")),
        ("badge.print.template", None, pick("v3-compact", "v3-large", "v4-qr-only")),
        ("api.rate_limit_per_min", "null means unlimited", rate_limit),
    ]  # fmt: skip
    specs = [
        _ConfigSpec(config_key=k, scope="global", scope_id=None, description=d, make_value=v)
        for k, d, v in g
    ]
    for ev in events:
        for name, desc, make in (
            ("checkin.late_after_min", "Event override of the late threshold", ints(5, 15)),
            ("checkin.ble.rssi_threshold_dbm", "Venue-specific BLE threshold", ints(-85, -65)),
            ("ui.default_locale", None, pick(ev.locale, "en-GB")),
            ("reporting.timezone", None, pick(ev.timezone)),
        ):
            specs.append(
                _ConfigSpec(
                    config_key=f"event.{ev.event_id}.{name}",
                    scope="event",
                    scope_id=ev.event_id,
                    description=desc,
                    make_value=make,
                )
            )
        for session_id in (ev.sessions[0], ev.sessions[3]):
            specs.append(
                _ConfigSpec(
                    config_key=f"session.{session_id}.capacity.max_attendees",
                    scope="session",
                    scope_id=session_id,
                    description="Room capacity enforced at check-in",
                    make_value=ints(40, 600, 20),
                )
            )
        for device in ev.devices[:2]:
            specs.append(
                _ConfigSpec(
                    config_key=f"device.{device.device_id}.heartbeat_interval_s",
                    scope="device",
                    scope_id=device.device_id,
                    description=None,
                    make_value=ints(10, 120, 10),
                )
            )
    return tuple(specs)


# Relative weights of the kinds of change (those that cannot happen yet are skipped).
_ACTIONS: Final[tuple[tuple[str, int], ...]] = (
    ("checkin", 480),
    ("checkout", 250),
    ("register", 60),
    ("participant_update", 45),
    ("deactivate", 8),
    ("config_change", 90),
    ("attendance_correction", 25),
    ("attendance_delete", 18),
    ("participant_erase", 4),
    ("config_delete", 6),
)


class DemoGenerator:
    """Infinite iterator of realistic :class:`ChangeEvent` values (see the module docstring).

    ``seed`` fixes the stream. ``start`` is the simulated clock's start and
    ``mean_interval_s`` the mean simulated time between changes. ``participants`` is the size
    of the pool of people who may register (25 register before the first check-in; the rest
    join over time). With ``clock`` (e.g. ``lambda: datetime.now(UTC)``) timestamps come from
    that clock instead, for live publishing; the stream is then deterministic except for its
    timestamps.
    """

    def __init__(
        self,
        *,
        seed: int,
        start: datetime = DEFAULT_START,
        mean_interval_s: float = 0.05,
        participants: int = 5000,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        if mean_interval_s <= 0:
            raise ConfigError("mean_interval_s", f"must be > 0, got {mean_interval_s}")
        if participants < 1:
            raise ConfigError("participants", f"must be >= 1, got {participants}")
        if start.tzinfo is None:
            raise ConfigError("start", "must be timezone-aware")
        self._rng = random.Random(seed)
        self._now = start.astimezone(UTC)
        self._mean_interval_s = mean_interval_s
        self._clock = clock
        self._pending: deque[ChangeEvent] = deque()
        self._versions: dict[str, int] = {}
        rng = self._rng
        self._events = (
            _venue(rng, "osl", "evt-2025-nordic-devsummit", "Europe/Oslo", "nb-NO",
                   59.9115, 10.7579),
            _venue(rng, "rtm", "evt-2025-health-data-forum", "Europe/Amsterdam", "nl-NL",
                   51.9244, 4.4777),
            _venue(rng, "lys", "evt-2025-edu-leaders", "Europe/Paris", "fr-FR",
                   45.7640, 4.8357),
        )  # fmt: skip
        self._config = _config_specs(self._events)
        self._config_live: list[bool] = [False] * len(self._config)
        self._identities: list[dict[str, Any]] = []
        taken: set[str] = set()
        while len(self._identities) < participants:
            identity = self._identity()
            if identity["participant_id"] not in taken:  # 48-bit ids: collisions are rare
                taken.add(identity["participant_id"])
                self._identities.append(identity)
        self._unregistered: list[int] = list(range(participants))
        self._registered: dict[str, dict[str, Any]] = {}
        self._registered_ids: list[str] = []
        self._open: dict[str, dict[str, Any]] = {}
        self._open_ids: list[str] = []
        self._recent: deque[dict[str, Any]] = deque(maxlen=500)
        self.produced = 0
        """Number of events yielded so far."""

    # -- iteration -------------------------------------------------------------------------

    def __iter__(self) -> DemoGenerator:
        return self

    def __next__(self) -> ChangeEvent:
        while not self._pending:
            self._step()
        self.produced += 1
        return self._pending.popleft()

    def take(self, n: int) -> list[ChangeEvent]:
        """The next ``n`` events."""
        return list(itertools.islice(self, n))

    @property
    def now(self) -> datetime:
        """The simulated clock (time of the most recent change)."""
        return self._now

    # -- identities ------------------------------------------------------------------------

    def _identity(self) -> dict[str, Any]:
        rng = self._rng
        first, last = rng.choice(_FIRST_NAMES), rng.choice(_LAST_NAMES)
        if rng.random() < 0.85:
            organisation, domain = rng.choice(_ORGANISATIONS)
        else:
            organisation, domain = None, rng.choice(_FREEMAIL)
        local = f"{_ascii_slug(first)}.{_ascii_slug(last)}"
        if domain in _FREEMAIL:
            local += str(rng.randrange(10, 99))
        role = rng.choices(("attendee", "speaker", "staff", "organiser"), (86, 8, 4, 2))[0]
        return {
            "participant_id": f"prt_{rng.getrandbits(48):012x}",
            "name": f"{first} {last}",
            "email": f"{local}@{domain}",
            "organisation": organisation,
            "role": role,
            "tags": sorted(rng.sample(_TAGS, rng.choices((0, 1, 2, 3), (50, 30, 15, 5))[0])),
        }

    # -- simulation ------------------------------------------------------------------------

    def _tick(self) -> str:
        # Drawn even with a live clock, so the stream differs only in its timestamps.
        step = self._rng.expovariate(1.0 / self._mean_interval_s)
        if self._clock is not None:
            self._now = max(self._clock().astimezone(UTC), self._now)
        else:
            self._now += timedelta(microseconds=max(1, round(step * 1_000_000)))
        return format_ts(self._now)

    def _next_version(self, key: str) -> int:
        version = self._versions.get(key, 0) + 1
        self._versions[key] = version
        return version

    def _emit(self, entity: str, op: Op, key: str, data: dict[str, Any] | None, ts: str) -> None:
        version = self._next_version(key)
        self._pending.append(
            ChangeEvent(entity=entity, op=op, key=key, data=data, ts=ts, version=version)
        )

    def _step(self) -> None:
        rng = self._rng
        possible: list[tuple[str, int]] = []
        has_active = bool(self._registered_ids)
        for action, weight in _ACTIONS:
            if action == "register" and not self._unregistered:
                continue
            if action in ("checkin", "participant_update", "deactivate", "participant_erase") and (
                not has_active
            ):
                continue
            if action == "checkout" and not self._open_ids:
                continue
            if action in ("attendance_correction", "attendance_delete") and not self._recent:
                continue
            possible.append((action, weight))
        if len(self._registered_ids) < 25 and self._unregistered:
            possible.append(("register", 2000))  # the registry fills up before doors open
        actions, weights = zip(*possible, strict=True)
        action = rng.choices(actions, weights)[0]
        ts = self._tick()
        getattr(self, f"_do_{action}")(ts)

    def _do_register(self, ts: str) -> None:
        rng = self._rng
        index = self._unregistered.pop(rng.randrange(len(self._unregistered)))
        row = dict(self._identities[index])
        row.update(active=True, created_at=ts, updated_at=ts)
        row["tags"] = list(row["tags"])
        pid = row["participant_id"]
        self._registered[pid] = row
        self._registered_ids.append(pid)
        self._emit("participant", "upsert", pid, _participant_image(row), ts)

    def _random_participant(self) -> dict[str, Any]:
        return self._registered[self._rng.choice(self._registered_ids)]

    def _do_participant_update(self, ts: str) -> None:
        rng = self._rng
        row = self._random_participant()
        change = rng.choices(("tags", "organisation", "role", "email", "reactivate"),
                             (45, 20, 10, 15, 10))[0]  # fmt: skip
        if change == "tags":
            row["tags"] = sorted(rng.sample(_TAGS, rng.randint(0, 4)))
        elif change == "organisation":
            row["organisation"] = rng.choice(_ORGANISATIONS)[0]
        elif change == "role":
            row["role"] = rng.choice(("attendee", "speaker", "staff", "organiser"))
        elif change == "email":
            local, _, _ = row["email"].partition("@")
            row["email"] = f"{local}@{rng.choice(_FREEMAIL)}"
        else:
            row["active"] = True
        row["updated_at"] = ts
        self._emit("participant", "upsert", row["participant_id"], _participant_image(row), ts)

    def _do_deactivate(self, ts: str) -> None:
        row = self._random_participant()
        row["active"] = False
        row["updated_at"] = ts
        self._emit("participant", "upsert", row["participant_id"], _participant_image(row), ts)

    def _do_participant_erase(self, ts: str) -> None:
        rng = self._rng
        pid = self._registered_ids.pop(rng.randrange(len(self._registered_ids)))
        del self._registered[pid]
        # The person may register again later: the identity goes back into the pool.
        self._unregistered.append(
            next(i for i, ident in enumerate(self._identities) if ident["participant_id"] == pid)
        )
        self._emit("participant", "delete", pid, None, ts)

    def _do_checkin(self, ts: str) -> None:
        rng = self._rng
        participant = self._random_participant()
        for _ in range(3):  # deactivated people rarely show up; a gateway still records them
            if participant["active"]:
                break
            participant = self._random_participant()
        event = rng.choice(self._events)
        session_id = rng.choice(event.sessions)
        status = rng.choices(("present", "late", "absent", "excused"), (80, 12, 5, 3))[0]
        method = (
            "manual"
            if status in ("absent", "excused")
            else rng.choices(("ble", "qr", "manual"), (58, 34, 8))[0]
        )
        device = rng.choice([d for d in event.devices if d.method == method])
        row: dict[str, Any] = {
            "record_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "participant_id": participant["participant_id"],
            "event_id": event.event_id,
            "session_id": session_id,
            "status": status,
            "check_in_at": ts,
            "check_out_at": None,
            "method": method,
            "device_id": device.device_id,
            "signal_strength_dbm": (
                max(-110, min(-30, round(rng.gauss(-67, 9)))) if method == "ble" else None
            ),
        }
        if method != "manual":
            row["location"] = {
                "lat": round(device.lat + rng.uniform(-0.00008, 0.00008), 6),
                "lon": round(device.lon + rng.uniform(-0.00008, 0.00008), 6),
            }
        notes = {"late": _LATE_NOTES, "absent": _ABSENT_NOTES, "excused": _EXCUSED_NOTES}
        row["notes"] = rng.choice(notes[status]) if status in notes and rng.random() < 0.7 else None
        row["recorded_by"] = (
            rng.choice(_STAFF) if method == "manual" else f"svc:checkin-gateway/{device.device_id}"
        )
        if status in ("present", "late"):
            self._open[row["record_id"]] = row
            self._open_ids.append(row["record_id"])
        self._recent.append(row)
        self._emit("attendance", "upsert", row["record_id"], dict(row), ts)

    def _do_checkout(self, ts: str) -> None:
        rng = self._rng
        i = rng.randrange(len(self._open_ids))
        self._open_ids[i], self._open_ids[-1] = self._open_ids[-1], self._open_ids[i]
        row = self._open.pop(self._open_ids.pop())
        row["check_out_at"] = ts
        if row["method"] == "ble":
            row["signal_strength_dbm"] = max(-110, min(-30, round(rng.gauss(-74, 8))))
        self._emit("attendance", "upsert", row["record_id"], dict(row), ts)

    def _do_attendance_correction(self, ts: str) -> None:
        rng = self._rng
        row = rng.choice(self._recent)
        if row["status"] == "absent":
            row["status"], row["notes"] = "excused", rng.choice(_EXCUSED_NOTES)
        elif row["status"] == "present":
            row["status"], row["notes"] = "late", "Corrected by session chair"
        else:
            row["notes"] = f"Reviewed by {rng.choice(_STAFF).removeprefix('staff:')}"
        self._emit("attendance", "upsert", row["record_id"], dict(row), ts)

    def _do_attendance_delete(self, ts: str) -> None:
        rng = self._rng
        row = self._recent[rng.randrange(len(self._recent))]
        self._recent.remove(row)
        record_id = row["record_id"]
        if self._open.pop(record_id, None) is not None:
            self._open_ids.remove(record_id)
        self._emit("attendance", "delete", record_id, None, ts)

    def _do_config_change(self, ts: str) -> None:
        rng = self._rng
        i = rng.randrange(len(self._config))
        spec = self._config[i]
        self._config_live[i] = True
        data = {
            "config_key": spec.config_key,
            "value": spec.make_value(rng),
            "scope": spec.scope,
            "scope_id": spec.scope_id,
            "updated_by": rng.choice(_CONFIG_EDITORS),
            "updated_at": ts,
            "description": spec.description,
        }
        self._emit("config", "upsert", spec.config_key, data, ts)

    def _do_config_delete(self, ts: str) -> None:
        rng = self._rng
        live = [i for i, on in enumerate(self._config_live) if on and self._config[i].scope_id]
        if not live:
            self._do_config_change(ts)
            return
        i = rng.choice(live)
        self._config_live[i] = False
        self._emit("config", "delete", self._config[i].config_key, None, ts)


def _participant_image(row: Mapping[str, Any]) -> dict[str, Any]:
    image = dict(row)
    image["tags"] = list(row["tags"])
    return image


async def _publish_until_stopped(
    bootstrap: str | Sequence[str],
    rate: float,
    stop: asyncio.Event,
    on_progress: Callable[[int], None] | None,
    generator: DemoGenerator,
    sent: int,
    max_batch: int,
    topic_for_entity: Mapping[str, str] | None,
    registry: SchemaRegistry | None,
    loop: asyncio.AbstractEventLoop,
) -> int:
    async with ChangePublisher(
        bootstrap_servers=bootstrap,
        client_id="replicator-demo",
        topic_for_entity=topic_for_entity,
        registry=registry,
    ) as publisher:
        origin, base = loop.time(), sent
        while not stop.is_set():
            due = int((loop.time() - origin) * rate) - (sent - base)
            if due > max(2 * rate, max_batch):  # more than ~2 s behind: do not burst
                log.warning("demo publisher behind schedule", extra={"dropped_backlog": due})
                origin, base = loop.time(), sent
                continue
            if due <= 0:
                wait = (sent - base + 1) / rate - (loop.time() - origin)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=max(wait, 0.001))
                continue
            batch = generator.take(min(due, max_batch))
            await publisher.publish_many(batch)
            sent += len(batch)
            if on_progress is not None:
                on_progress(sent)
    return sent


def iter_events(n: int, seed: int = 0) -> Iterator[ChangeEvent]:
    """The first ``n`` events of ``DemoGenerator(seed=seed)`` (for benchmarks and tests)."""
    return itertools.islice(DemoGenerator(seed=seed), n)


async def run_demo_publisher(
    bootstrap: str | Sequence[str],
    rate: float,
    stop: asyncio.Event,
    on_progress: Callable[[int], None] | None = None,
    *,
    seed: int = 0,
    max_batch: int = 500,
    topic_for_entity: Mapping[str, str] | None = None,
    registry: SchemaRegistry | None = None,
) -> int:
    """Publish demo traffic at roughly ``rate`` events/s until ``stop`` is set.

    Events get wall-clock timestamps. Each loop publishes the events that are due (at most
    ``max_batch``) with :meth:`ChangePublisher.publish_many`, so every event is acknowledged
    before it is counted; ``on_progress`` gets the running total after each batch. If the
    broker cannot keep up, the backlog is dropped rather than sent as one burst. Returns the
    number of events published.
    """
    if rate <= 0:
        raise ConfigError("rate", f"must be > 0 events/s, got {rate}")
    if max_batch < 1:
        raise ConfigError("max_batch", f"must be >= 1, got {max_batch}")
    generator = DemoGenerator(
        seed=seed,
        start=datetime.now(UTC),
        mean_interval_s=1.0 / rate,
        clock=lambda: datetime.now(UTC),
    )
    loop = asyncio.get_running_loop()
    sent = 0
    while not stop.is_set():
        try:
            sent = await _publish_until_stopped(
                bootstrap, rate, stop, on_progress, generator, sent, max_batch,
                topic_for_entity, registry, loop,
            )
        except BrokerError as exc:
            # A demo must ride out a broker restart: aiokafka's idempotent producer can end
            # up unusable (e.g. OutOfOrderSequenceNumber after expired batches), so start a
            # fresh producer after a pause instead of giving up.
            log.warning("demo publisher: %s; reconnecting in 2 s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=2.0)
    return sent
