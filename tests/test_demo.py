"""DemoGenerator: deterministic, valid, realistic change streams (and how they are published)."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from replicator.demo import DEFAULT_START, DemoGenerator, iter_events, run_demo_publisher
from replicator.errors import ConfigError, ValidationError
from replicator.publish import ChangeEvent, ChangePublisher, format_ts
from replicator.schemas import SchemaRegistry

N = 20_000


@pytest.fixture(scope="module")
def registry() -> SchemaRegistry:
    return SchemaRegistry.load()


@pytest.fixture(scope="module")
def events() -> list[ChangeEvent]:
    return DemoGenerator(seed=7).take(N)


def test_same_seed_same_stream(events: list[ChangeEvent]) -> None:
    again = DemoGenerator(seed=7).take(N)
    assert again == events
    assert [e.data for e in again] == [e.data for e in events]


def test_different_seed_different_stream(events: list[ChangeEvent]) -> None:
    other = DemoGenerator(seed=8).take(200)
    assert [e.key for e in other] != [e.key for e in events[:200]]


def test_iter_events_is_the_generator_prefix(events: list[ChangeEvent]) -> None:
    assert list(iter_events(500, seed=7)) == events[:500]
    assert len(list(iter_events(0, seed=7))) == 0
    gen = DemoGenerator(seed=7)
    assert gen.take(3) + gen.take(2) == events[:5]
    assert gen.produced == 5


def test_every_event_validates(registry: SchemaRegistry, events: list[ChangeEvent]) -> None:
    reasons = Counter(
        registry.validate(orjson.loads(orjson.dumps(e.envelope(schema_version=1)))) for e in events
    )
    assert reasons == Counter({None: N})


def test_mix_of_entities_and_ops(events: list[ChangeEvent]) -> None:
    mix = Counter((e.entity, e.op) for e in events)
    assert set(mix) == {
        ("attendance", "upsert"),
        ("attendance", "delete"),
        ("participant", "upsert"),
        ("participant", "delete"),
        ("config", "upsert"),
        ("config", "delete"),
    }
    assert sum(mix.values()) == N
    assert 0.70 * N < mix[("attendance", "upsert")] < 0.90 * N
    assert 0.04 * N < mix[("participant", "upsert")] < 0.15 * N
    assert 0.05 * N < mix[("config", "upsert")] < 0.15 * N
    deletes = sum(n for (_, op), n in mix.items() if op == "delete")
    assert 0.01 * N < deletes < 0.06 * N


def test_keys_repeat_and_versions_count_up_per_key(events: list[ChangeEvent]) -> None:
    seen: dict[str, int] = {}
    for e in events:
        assert e.version == seen.get(e.key, 0) + 1, e
        seen[e.key] = e.version
    updated = [k for k, v in seen.items() if v >= 2]
    assert len(updated) > 0.3 * len(seen)
    # a delete does not reset the version: a deleted key that comes back continues counting
    deleted = {e.key: e.version or 0 for e in events if e.op == "delete"}
    revived = [
        e
        for e in events
        if e.op == "upsert" and e.key in deleted and (e.version or 0) > deleted[e.key]
    ]
    assert revived, "some deleted keys are upserted again (config overrides, re-registrations)"


def test_key_is_the_primary_key_and_deletes_carry_no_data(
    registry: SchemaRegistry, events: list[ChangeEvent]
) -> None:
    for e in events:
        if e.op == "upsert":
            assert e.data is not None
            assert e.data[registry.primary_keys[e.entity]] == e.key
        else:
            assert e.data is None


def test_timestamps_never_go_backwards(events: list[ChangeEvent]) -> None:
    stamps = [e.ts for e in events]
    assert all(isinstance(t, str) for t in stamps)
    assert stamps == sorted(stamps, key=lambda t: datetime.fromisoformat(str(t)))
    first = datetime.fromisoformat(str(stamps[0]))
    last = datetime.fromisoformat(str(stamps[-1]))
    assert first > DEFAULT_START
    # mean 50 ms between changes: 20k events span roughly 1000 s of simulated time
    assert timedelta(seconds=800) < last - first < timedelta(seconds=1200)


def test_attendance_lifecycle(events: list[ChangeEvent]) -> None:
    att = [e for e in events if e.entity == "attendance" and e.op == "upsert"]
    assert all(e.data is not None for e in att)
    rows = [dict(e.data or {}) for e in att]
    statuses = Counter(r["status"] for r in rows if r["check_out_at"] is None)
    assert set(statuses) == {"present", "late", "absent", "excused"}
    assert statuses["present"] > statuses["late"] > statuses["absent"]
    methods = Counter(r["method"] for r in rows)
    assert set(methods) == {"ble", "qr", "manual"}
    for r in rows:
        signal = r["signal_strength_dbm"]
        if r["method"] == "ble":
            assert isinstance(signal, int) and -110 <= signal <= -30
        else:
            assert signal is None
        if r["status"] in ("absent", "excused"):
            assert r["method"] == "manual"
            assert r["recorded_by"].startswith("staff:")
    # check-outs are later upserts of the same record: same key, version + 1, times ordered
    checkouts = [e for e in att if e.data is not None and e.data["check_out_at"] is not None]
    assert len(checkouts) > 0.2 * len(att)
    first_seen: dict[str, ChangeEvent] = {}
    for e in att:
        first_seen.setdefault(e.key, e)
    for e in checkouts[:500]:
        opened = first_seen[e.key]
        assert opened.data is not None and e.data is not None
        assert opened.data["check_out_at"] is None
        assert e.version is not None and opened.version == 1 and e.version >= 2
        assert e.data["check_in_at"] == opened.data["check_in_at"]
        assert e.data["check_out_at"] > e.data["check_in_at"]


def test_participants_are_updated_and_deactivated(events: list[ChangeEvent]) -> None:
    parts = [e for e in events if e.entity == "participant" and e.op == "upsert"]
    assert any(e.version == 1 for e in parts)
    assert any(e.version is not None and e.version >= 2 for e in parts)
    assert any(e.data is not None and e.data["active"] is False for e in parts)
    emails = {e.data["email"] for e in parts if e.data is not None}
    assert all(email.isascii() and email.count("@") == 1 for email in emails)
    names = {e.data["name"] for e in parts if e.data is not None}
    assert any(not name.isascii() for name in names), "names exercise UTF-8"


def test_config_keys_are_a_few_dozen_updated_repeatedly(events: list[ChangeEvent]) -> None:
    cfg = [e for e in events if e.entity == "config"]
    keys = Counter(e.key for e in cfg)
    assert len(keys) == 44  # 20 global + per event (4 event + 2 session + 2 device) x 3
    assert min(keys.values()) >= 5
    scopes = Counter(e.data["scope"] for e in cfg if e.data is not None)
    assert set(scopes) == {"global", "event", "session", "device"}
    assert {type(e.data["value"]) for e in cfg if e.data is not None} >= {
        int,
        bool,
        str,
        list,
        dict,
    }
    assert all(
        (e.data["scope"] == "global") == (e.data["scope_id"] is None)
        for e in cfg
        if e.data is not None
    )
    # only scoped overrides are ever removed
    assert all(not e.key.startswith("checkin.") for e in cfg if e.op == "delete")


def test_attendance_envelopes_are_realistically_sized(events: list[ChangeEvent]) -> None:
    sizes = [
        len(orjson.dumps(e.envelope(schema_version=1)))
        for e in events
        if e.entity == "attendance" and e.op == "upsert"
    ]
    assert min(sizes) >= 300 and max(sizes) <= 700
    assert 450 <= sum(sizes) / len(sizes) <= 650


def test_live_clock_stamps_events_with_its_time() -> None:
    moment = datetime(2026, 1, 5, 9, 0, 0, 123000, tzinfo=UTC)
    gen = DemoGenerator(seed=1, clock=lambda: moment)
    assert [e.ts for e in gen.take(10)] == ["2026-01-05T09:00:00.123Z"] * 10
    assert [e.key for e in DemoGenerator(seed=1, clock=lambda: moment).take(10)] == [
        e.key for e in DemoGenerator(seed=1).take(10)
    ]


def test_generator_rejects_bad_parameters() -> None:
    with pytest.raises(ConfigError) as info:
        DemoGenerator(seed=1, mean_interval_s=0)
    assert info.value.setting == "mean_interval_s"
    with pytest.raises(ConfigError):
        DemoGenerator(seed=1, participants=0)
    with pytest.raises(ConfigError):
        DemoGenerator(seed=1, start=datetime(2025, 1, 1))  # naive


async def test_run_demo_publisher_rejects_bad_rate_before_connecting() -> None:
    with pytest.raises(ConfigError) as info:
        await run_demo_publisher("127.0.0.1:1", 0, asyncio.Event())
    assert info.value.setting == "rate"


# -- the publisher's envelope building (no broker needed: prepare() never sends) ----------


def test_publisher_prepares_demo_events_as_validated_envelopes(
    registry: SchemaRegistry, events: list[ChangeEvent]
) -> None:
    pub = ChangePublisher(
        bootstrap_servers="127.0.0.1:1",
        registry=registry,
        topic_for_entity={"config": "cfg-changes"},
    )
    assert pub.topics == {
        "attendance": "attendance",
        "participant": "participant",
        "config": "cfg-changes",
    }
    for e in events[:2000]:
        topic, value = pub.prepare(e)
        assert topic == ("cfg-changes" if e.entity == "config" else e.entity)
        decoded = orjson.loads(value)
        assert decoded == orjson.loads(orjson.dumps(e.envelope(schema_version=1)))
        assert list(decoded)[:4] == ["entity", "op", "key", "ts"]
        assert decoded["schema_version"] == 1


def test_publisher_refuses_invalid_events_with_the_reason(registry: SchemaRegistry) -> None:
    pub = ChangePublisher(bootstrap_servers="127.0.0.1:1", registry=registry)
    with pytest.raises(ValidationError) as info:
        pub.prepare(ChangeEvent(entity="attendance", op="upsert", key="r-1", ts=None))
    assert info.value.reason == "upsert without data"
    with pytest.raises(ValidationError) as info:
        pub.prepare(ChangeEvent(entity="spaceship", op="delete", key="x"))
    assert info.value.reason == "unknown entity 'spaceship'"
    with pytest.raises(ValidationError) as info:
        pub.prepare(ChangeEvent(entity="config", op="delete", key="", ts="2025-01-01T00:00:00Z"))
    assert info.value.reason == "empty key"


def test_publisher_default_ts_is_now_utc_with_milliseconds(registry: SchemaRegistry) -> None:
    pub = ChangePublisher(bootstrap_servers="127.0.0.1:1", registry=registry)
    before = datetime.now(UTC) - timedelta(milliseconds=1)
    _, value = pub.prepare(ChangeEvent(entity="participant", op="delete", key="prt_1"))
    ts = orjson.loads(value)["ts"]
    assert len(ts) == 24 and ts.endswith("Z") and ts[19] == "."
    assert before <= datetime.fromisoformat(ts) <= datetime.now(UTC)


def test_format_ts() -> None:
    from zoneinfo import ZoneInfo

    oslo = datetime(2025, 3, 3, 9, 15, 2, 123456, tzinfo=ZoneInfo("Europe/Oslo"))
    assert format_ts(oslo) == "2025-03-03T08:15:02.123Z"
    with pytest.raises(ValidationError) as info:
        format_ts(datetime(2025, 3, 3, 9, 15))
    assert info.value.reason == "bad ts '2025-03-03T09:15:00': naive datetime (no UTC offset)"


def test_publisher_configuration_errors(registry: SchemaRegistry) -> None:
    with pytest.raises(ConfigError) as info:
        ChangePublisher(
            bootstrap_servers="x:1", registry=registry, topic_for_entity={"spaceship": "s"}
        )
    assert info.value.setting == "topic_for_entity"
    with pytest.raises(ConfigError) as info:
        ChangePublisher(bootstrap_servers="x:1", registry=registry, producer_options={"acks": 1})
    assert info.value.message == "cannot override acks here"


async def test_transaction_needs_a_transactional_id(registry: SchemaRegistry) -> None:
    pub = ChangePublisher(bootstrap_servers="x:1", registry=registry)
    with pytest.raises(ConfigError) as info:
        async with pub.transaction():
            pass
    assert info.value.setting == "transactional_id"
