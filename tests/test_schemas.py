"""SchemaRegistry: the event contract of schemas/ and the fast validation path of ingest."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from replicator.demo import iter_events
from replicator.errors import ConfigError
from replicator.schemas import DEFAULT_SCHEMA_DIR, SchemaRegistry, is_rfc3339

Event = dict[str, Any]

TS = "2025-03-03T08:15:02.123Z"


@pytest.fixture(scope="module")
def registry() -> SchemaRegistry:
    return SchemaRegistry.load()


def attendance() -> Event:
    return {
        "entity": "attendance",
        "op": "upsert",
        "key": "6f1c2d8e-5b7a-4c1e-9d2f-0a1b2c3d4e5f",
        "ts": TS,
        "version": 2,
        "schema_version": 1,
        "data": {
            "record_id": "6f1c2d8e-5b7a-4c1e-9d2f-0a1b2c3d4e5f",
            "participant_id": "prt_0a1b2c3d4e5f",
            "event_id": "evt-2025-nordic-devsummit",
            "session_id": "ses-osl-d1-keynote",
            "status": "present",
            "check_in_at": "2025-03-03T08:01:44.870Z",
            "check_out_at": "2025-03-03T09:02:10.004+01:00",
            "method": "ble",
            "device_id": "ble-gw-osl-halla-01",
            "signal_strength_dbm": -67,
            "location": {"lat": 59.9115, "lon": 10.7579},
            "notes": None,
            "recorded_by": "svc:checkin-gateway/ble-gw-osl-halla-01",
        },
    }


def participant() -> Event:
    return {
        "entity": "participant",
        "op": "upsert",
        "key": "prt_0a1b2c3d4e5f",
        "ts": TS,
        "schema_version": 1,
        "data": {
            "participant_id": "prt_0a1b2c3d4e5f",
            "name": "Zoë Ólafsdóttir",
            "email": "zoe.olafsdottir@helixbio.eu",
            "organisation": "Helix Bioinformatics",
            "role": "speaker",
            "active": True,
            "tags": ["vip", "dietary:vegan"],
            "created_at": "2025-02-01T10:00:00Z",
            "updated_at": TS,
        },
    }


def config() -> Event:
    return {
        "entity": "config",
        "op": "upsert",
        "key": "checkin.ble.rssi_threshold_dbm",
        "ts": TS,
        "version": 14,
        "schema_version": 1,
        "data": {
            "config_key": "checkin.ble.rssi_threshold_dbm",
            "value": {"threshold": -75, "fallback": None, "zones": ["halla", "hallb"]},
            "scope": "global",
            "scope_id": None,
            "updated_by": "staff:lea.moreau",
            "updated_at": TS,
            "description": None,
        },
    }


def delete(entity: str = "participant", key: str = "prt_0a1b2c3d4e5f") -> Event:
    return {"entity": entity, "op": "delete", "key": key, "ts": TS, "schema_version": 1}


VALID: dict[str, Callable[[], Event]] = {
    "attendance upsert": attendance,
    "participant upsert": participant,
    "config upsert": config,
    "attendance delete": lambda: delete("attendance", "6f1c2d8e"),
    "participant delete": delete,
    "config delete with null data and version": lambda: {
        **delete("config", "event.evt-x.ui.default_locale"),
        "data": None,
        "version": 0,
    },
    "attendance minimal (optional fields absent)": lambda: mutate(
        attendance(),
        lambda e: [e["data"].pop(f) for f in ("check_out_at", "location", "notes")],
    ),
    "session-scoped config with a null value": lambda: mutate(
        config(),
        lambda e: e["data"].update(scope="session", scope_id="ses-osl-d1-keynote", value=None),
    ),
    "lowercase t and z, leap day, leap second": lambda: mutate(
        participant(),
        lambda e: e.update(ts="2024-02-29t23:59:60.5z"),
    ),
    "version null": lambda: mutate(participant(), lambda e: e.update(version=None)),
}


def mutate(event: Event, change: Callable[[Event], object]) -> Event:
    event = copy.deepcopy(event)
    change(event)
    return event


def without(field: str, make: Callable[[], Event] = attendance) -> Callable[[], Event]:
    return lambda: mutate(make(), lambda e: e.pop(field))


def with_(make: Callable[[], Event] = attendance, **fields: object) -> Callable[[], Event]:
    return lambda: mutate(make(), lambda e: e.update(fields))


def with_data(make: Callable[[], Event] = attendance, **fields: object) -> Callable[[], Event]:
    return lambda: mutate(make(), lambda e: e["data"].update(fields))


# (case, event factory, exact reason)
INVALID: list[tuple[str, Callable[[], Event], str]] = [
    ("missing key", without("key"), "missing key"),
    ("null key", with_(key=None), "null key"),
    ("empty key", with_(key=""), "empty key"),
    ("key not a string", with_(key=42), "key is not a string (int)"),
    ("key too long", with_(key="k" * 257), "key longer than 256 characters (257)"),
    ("unknown op", with_(op="merge"), "unknown op 'merge'"),
    ("missing op", without("op"), "missing op"),
    ("op not a string", with_(op=["upsert"]), "op is not a string (list)"),
    ("unknown entity", with_(entity="foo"), "unknown entity 'foo'"),
    ("missing entity", without("entity"), "missing entity"),
    ("null entity", with_(entity=None), "null entity"),
    ("unhashable entity", with_(entity={"a": 1}), "entity is not a string (dict)"),
    (
        "long unknown entity is cut",
        with_(entity="x" * 100),
        "unknown entity '" + "x" * 40 + "'…",
    ),
    ("missing ts", without("ts"), "missing ts"),
    ("ts not a string", with_(ts=1709453702), "ts is not a string (int)"),
    ("bad ts", with_(ts="yesterday"), "bad ts 'yesterday': not an RFC 3339 date-time"),
    (
        "naive ts",
        with_(ts="2025-03-03T08:15:02"),
        "bad ts '2025-03-03T08:15:02': not an RFC 3339 date-time",
    ),
    (
        "ts not a real day",
        with_(ts="2025-02-29T08:15:02Z"),
        "bad ts '2025-02-29T08:15:02Z': not an RFC 3339 date-time",
    ),
    ("missing schema_version", without("schema_version"), "missing schema_version"),
    (
        "future schema_version",
        with_(schema_version=2),
        "unsupported schema_version 2 for attendance (current: 1)",
    ),
    (
        "bool schema_version",
        with_(schema_version=True),
        "unsupported schema_version True for attendance (current: 1)",
    ),
    ("negative version", with_(version=-1), "bad version -1: must be an integer >= 0 or null"),
    ("bool version", with_(version=False), "bad version False: must be an integer >= 0 or null"),
    (
        "negative float version",
        with_(version=-2.0),
        "bad version -2.0: must be an integer >= 0 or null",
    ),
    (
        "string version",
        with_(version="3"),
        "bad version '3': must be an integer >= 0 or null",
    ),
    ("unexpected field", with_(colour="red"), "unexpected field 'colour'"),
    ("upsert without data", without("data"), "upsert without data"),
    ("upsert with null data", with_(data=None), "upsert without data"),
    ("data not an object", with_(data=[1, 2]), "data is not an object (list)"),
    ("delete with data", with_(delete, data={"participant_id": "p"}), "delete with data"),
    (
        "bad status enum",
        with_data(status="teleported"),
        "schema: data.status must be one of ['present', 'late', 'absent', 'excused']",
    ),
    (
        "wrong type",
        with_data(signal_strength_dbm="strong"),
        "schema: data.signal_strength_dbm must be integer or null",
    ),
    (
        "bool is not an integer",
        with_data(signal_strength_dbm=True),
        "schema: data.signal_strength_dbm must be integer or null",
    ),
    (
        "out of range",
        with_data(signal_strength_dbm=-121),
        "schema: data.signal_strength_dbm must be bigger than or equal to -120",
    ),
    (
        "nested out of range",
        with_data(location={"lat": 91.0, "lon": 0.0}),
        "schema: data.location.lat must be smaller than or equal to 90",
    ),
    (
        "missing required data field",
        lambda: mutate(attendance(), lambda e: e["data"].pop("status")),
        "schema: data must contain ['status'] properties",
    ),
    (
        "unknown data field",
        with_data(colour="red"),
        "schema: data must not contain {'colour'} properties",
    ),
    (
        "bad date-time in data",
        with_data(check_in_at="2025-03-03 08:01"),
        "schema: data.check_in_at must be date-time",
    ),
    (
        "date-time offset without colon in data",
        with_data(check_out_at="2025-03-03T09:02:10+0100"),
        "schema: data.check_out_at must be date-time",
    ),
    (
        "participant active not boolean",
        with_data(participant, active="yes"),
        "schema: data.active must be boolean",
    ),
    (
        "participant role enum",
        with_data(participant, role="vip"),
        "schema: data.role must be one of ['attendee', 'speaker', 'staff', 'organiser']",
    ),
    (
        "participant tags must be strings",
        with_data(participant, tags=["vip", 7]),
        "schema: data.tags[1] must be string",
    ),
    (
        "config global with scope_id",
        with_data(config, scope_id="evt-x"),
        "schema: data.scope_id must be null",
    ),
    (
        "config device scope without scope_id",
        lambda: mutate(
            config(), lambda e: (e["data"].pop("scope_id"), e["data"].update(scope="device"))
        ),
        "schema: data must contain ['scope_id'] properties",
    ),
    (
        "config unknown scope",
        with_data(config, scope="planet"),
        "schema: data.scope must be one of ['global', 'event', 'session', 'device']",
    ),
]


def test_registry_shape(registry: SchemaRegistry) -> None:
    assert registry.directory == DEFAULT_SCHEMA_DIR.resolve()
    # the package ships the repository's schemas/ (a symlink in a source checkout)
    assert Path(__file__).resolve().parent.parent / "schemas" == DEFAULT_SCHEMA_DIR.resolve()
    assert {p.name for p in DEFAULT_SCHEMA_DIR.glob("*.json")} == {
        "envelope.json", "attendance.json", "participant.json", "config.json"}
    assert registry.entities == ("attendance", "participant", "config")
    assert registry.ops == ("upsert", "delete")
    assert registry.key_max_length == 256
    assert dict(registry.schema_versions) == {"attendance": 1, "participant": 1, "config": 1}
    assert registry.schema_version("config") == 1
    assert dict(registry.primary_keys) == {
        "attendance": "record_id",
        "participant": "participant_id",
        "config": "config_key",
    }


def test_json_schema_is_the_entity_data_schema_and_a_copy(registry: SchemaRegistry) -> None:
    schema = registry.json_schema("attendance")
    assert schema["title"] == "Attendance record"
    assert schema["$id"] == "https://replicator.invalid/schemas/attendance.json"
    assert schema["properties"]["status"]["enum"] == ["present", "late", "absent", "excused"]
    assert schema["properties"]["signal_strength_dbm"]["type"] == ["integer", "null"]
    assert schema["properties"]["check_in_at"] == {"type": "string", "format": "date-time"}
    schema["properties"].clear()
    assert "status" in registry.json_schema("attendance")["properties"]
    assert registry.json_schema("participant")["properties"]["role"]["enum"] == [
        "attendee",
        "speaker",
        "staff",
        "organiser",
    ]
    assert registry.json_schema("config")["required"] == [
        "config_key",
        "value",
        "scope",
        "updated_by",
        "updated_at",
    ]
    with pytest.raises(KeyError):
        registry.json_schema("spaceship")


def test_every_schema_file_declares_draft07_id_and_title() -> None:
    for name in ("envelope", "attendance", "participant", "config"):
        schema = orjson.loads((DEFAULT_SCHEMA_DIR / f"{name}.json").read_bytes())
        assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
        assert schema["$id"] == f"https://replicator.invalid/schemas/{name}.json"
        assert schema["title"]
        assert schema["additionalProperties"] is False


@pytest.mark.parametrize("make", VALID.values(), ids=list(VALID))
def test_valid_events_pass(registry: SchemaRegistry, make: Callable[[], Event]) -> None:
    event = make()
    assert registry.validate(event) is None
    assert registry.validate_with_jsonschema(event) is None


@pytest.mark.parametrize(
    ("make", "reason"), [(m, r) for _, m, r in INVALID], ids=[c for c, _, _ in INVALID]
)
def test_invalid_events_give_their_specific_reason(
    registry: SchemaRegistry, make: Callable[[], Event], reason: str
) -> None:
    assert registry.validate(make()) == reason


@pytest.mark.parametrize(
    ("make", "reason"), [(m, r) for _, m, r in INVALID], ids=[c for c, _, _ in INVALID]
)
def test_fast_path_agrees_with_envelope_json(
    registry: SchemaRegistry, make: Callable[[], Event], reason: str
) -> None:
    """Whatever the hand-written checks reject, the published envelope.json rejects too."""
    event = make()
    if reason.startswith("unsupported schema_version") and event["schema_version"] == 2:
        # envelope.json allows any schema_version >= 1; only the registry knows which exist.
        assert registry.validate_with_jsonschema(event) is None
        return
    assert registry.validate_with_jsonschema(event) is not None


def test_schema_reason_also_names_the_field_in_the_reference_path(
    registry: SchemaRegistry,
) -> None:
    event = with_data(status="teleported")()
    assert registry.validate_with_jsonschema(event) == (
        "event.data.status must be one of ['present', 'late', 'absent', 'excused']"
    )


@pytest.mark.parametrize(
    "event",
    [None, 1, "attendance", [attendance()], b"{}"],
    ids=["null", "int", "str", "list", "bytes"],
)
def test_non_objects_are_rejected_without_raising(registry: SchemaRegistry, event: object) -> None:
    assert registry.validate(event) == f"event is not a JSON object ({type(event).__name__})"


def test_integral_floats_are_integers_like_in_json_schema(registry: SchemaRegistry) -> None:
    event = with_(version=3.0, schema_version=1.0)()
    assert registry.validate(event) is None
    assert registry.validate_with_jsonschema(event) is None
    assert registry.validate(with_(version=3.5)()) == (
        "bad version 3.5: must be an integer >= 0 or null"
    )


def test_validate_does_not_modify_the_event(registry: SchemaRegistry) -> None:
    event = attendance()
    before = copy.deepcopy(event)
    assert registry.validate(event) is None
    assert event == before


def test_decoded_demo_events_agree_with_reference(registry: SchemaRegistry) -> None:
    decoded = [
        orjson.loads(orjson.dumps(e.envelope(schema_version=1))) for e in iter_events(3000, 11)
    ]
    assert [registry.validate(e) for e in decoded] == [None] * 3000
    assert [registry.validate_with_jsonschema(e) for e in decoded] == [None] * 3000


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("2025-03-03T08:15:02Z", True),
        ("2025-03-03T08:15:02.123456789Z", True),
        ("2025-03-03t08:15:02z", True),
        ("2025-03-03T08:15:02+01:00", True),
        ("2025-03-03T08:15:02-23:59", True),
        ("2016-12-31T23:59:60Z", True),
        ("2024-02-29T00:00:00Z", True),
        ("2000-02-29T00:00:00Z", True),
        ("1900-02-29T00:00:00Z", False),
        ("2025-02-29T00:00:00Z", False),
        ("2025-04-31T00:00:00Z", False),
        ("2025-04-30T00:00:00Z", True),
        ("2025-01-31T00:00:00Z", True),
        ("2025-12-31T23:59:59Z", True),
        ("2025-02-28T00:00:00Z", True),
        ("2025-02-30T00:00:00Z", False),
        ("2024-02-30T00:00:00Z", False),
        ("2100-02-29T00:00:00Z", False),
        ("2400-02-29T00:00:00Z", True),
        ("2096-02-29T00:00:00Z", True),
        ("2025-00-10T00:00:00Z", False),
        ("2025-03-00T00:00:00Z", False),
        ("2025-03-32T00:00:00Z", False),
        ("2025-13-01T00:00:00Z", False),
        ("2025-03-03T24:00:00Z", False),
        ("2025-03-03T08:15:02", False),
        ("2025-03-03 08:15:02Z", False),
        ("2025-03-03T08:15:02+0100", False),
        ("2025-03-03T08:15Z", False),
        ("2025-03-03", False),
        ("2025-03-03T08:15:02Z\n", False),
        ("٢٠٢٥-03-03T08:15:02Z", False),
        ("", False),
        (None, False),
        (1709453702, False),
    ],
)
def test_is_rfc3339(value: object, ok: bool) -> None:
    assert is_rfc3339(value) is ok


def test_load_from_explicit_directory(tmp_path: Path) -> None:
    shutil.copytree(DEFAULT_SCHEMA_DIR, tmp_path / "schemas")
    registry = SchemaRegistry.load(tmp_path / "schemas")
    assert registry.directory == (tmp_path / "schemas").resolve()
    assert registry.validate(attendance()) is None


def test_schema_version_comes_from_the_entity_schema(tmp_path: Path) -> None:
    shutil.copytree(DEFAULT_SCHEMA_DIR, tmp_path / "s")
    path = tmp_path / "s" / "config.json"
    path.write_bytes(orjson.dumps({**orjson.loads(path.read_bytes()), "x-schema-version": 2}))
    registry = SchemaRegistry.load(tmp_path / "s")
    assert dict(registry.schema_versions) == {"attendance": 1, "participant": 1, "config": 2}
    assert registry.validate(with_(config, schema_version=2)()) is None
    assert registry.validate(config()) == "unsupported schema_version 1 for config (current: 2)"


def test_missing_entity_schema_is_a_config_error(tmp_path: Path) -> None:
    shutil.copytree(DEFAULT_SCHEMA_DIR, tmp_path / "s")
    (tmp_path / "s" / "participant.json").unlink()
    with pytest.raises(ConfigError) as info:
        SchemaRegistry.load(tmp_path / "s")
    assert info.value.setting == "schemas"
    assert str(tmp_path / "s" / "participant.json") in info.value.message
    assert "not found" in info.value.message


def test_malformed_schema_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    shutil.copytree(DEFAULT_SCHEMA_DIR, tmp_path / "s")
    (tmp_path / "s" / "attendance.json").write_text('{"type": "object",')
    with pytest.raises(ConfigError) as info:
        SchemaRegistry.load(tmp_path / "s")
    assert f"{tmp_path / 's' / 'attendance.json'} is not valid JSON" in info.value.message


def test_invalid_json_schema_is_a_config_error(tmp_path: Path) -> None:
    shutil.copytree(DEFAULT_SCHEMA_DIR, tmp_path / "s")
    (tmp_path / "s" / "config.json").write_text('{"type": "objekt"}')
    with pytest.raises(ConfigError) as info:
        SchemaRegistry.load(tmp_path / "s")
    assert "config.json is not a valid JSON Schema" in info.value.message
