"""The msgspec fast-accept path never accepts what the precise validator rejects."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator.demo import iter_events
from replicator.fastcheck import FastAccept
from replicator.publish import ChangePublisher
from replicator.schemas import SchemaRegistry

REGISTRY = SchemaRegistry.load()
FAST = FastAccept(REGISTRY)
_PUB = ChangePublisher(bootstrap_servers="127.0.0.1:1")
VALID = [orjson.loads(_PUB.prepare(e)[1]) for e in iter_events(3000, seed=11)]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False)
    | st.text(max_size=30) | st.sampled_from(["2025-02-29T10:00:00Z", "2024-02-29T10:00:00Z",
                                              "present", "ble", "a@b.c", "a..b@c.d", "", "x" * 300,
                                              "2025-03-03T07:30:01+0100", "upsert", "delete"]),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.extend(_paths(v, (*prefix, k)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.extend(_paths(v, (*prefix, i)))
    return out


def _mutate(event: dict[str, Any], path: tuple[Any, ...], value: Any, delete: bool) -> Any:
    event = orjson.loads(orjson.dumps(event))
    target = event
    for p in path[:-1]:
        target = target[p]
    if delete and isinstance(target, dict):
        target.pop(path[-1], None)
    else:
        target[path[-1]] = value
    return event


def test_fast_path_accepts_every_valid_demo_event() -> None:
    assert FAST.unsupported == {}  # config's if/then rules are compiled too
    assert {e["entity"] for e in VALID} == set(REGISTRY.entities)
    assert len([e for e in VALID if e["entity"] == "config"]) > 100
    accepted = [e for e in VALID if FAST.entity_of(orjson.dumps(e)) == e["entity"]]
    assert len(accepted) == len(VALID)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    index=st.integers(0, len(VALID) - 1),
    choice=st.integers(0, 10_000),
    value=json_values,
    delete=st.booleans(),
)
def test_fast_accept_implies_slow_accept(index: int, choice: int, value: Any,
                                         delete: bool) -> None:
    event = VALID[index]
    paths = _paths(event)
    path = paths[choice % len(paths)]
    mutated = _mutate(event, path, value, delete)
    raw = orjson.dumps(mutated)
    if FAST.entity_of(raw) is not None:
        assert REGISTRY.validate(orjson.loads(raw)) is None, (path, value, delete)


@pytest.mark.parametrize(
    ("field", "value"),
    [("key", None), ("key", ""), ("op", "merge"), ("entity", "spaceship"), ("ts", "yesterday"),
     ("schema_version", 2), ("version", -1), ("extra", 1)],
)
def test_fast_path_rejects_bad_envelopes(field: str, value: Any) -> None:
    event = next(e for e in VALID if e["entity"] == "attendance" and e["op"] == "upsert")
    assert FAST.entity_of(orjson.dumps(event)) == "attendance"
    assert FAST.entity_of(orjson.dumps({**event, field: value})) is None


def test_fast_path_rejects_upsert_without_data_and_delete_with_data() -> None:
    up = next(e for e in VALID if e["entity"] == "attendance" and e["op"] == "upsert")
    assert FAST.entity_of(orjson.dumps({**up, "data": None})) is None
    assert FAST.entity_of(orjson.dumps({**up, "op": "delete"})) is None
    assert FAST.entity_of(b"{not json") is None
    assert FAST.entity_of(b"[]") is None


@pytest.mark.parametrize(
    "raw",
    [b'{"entity":"attendance","op":"upsert","key":"\xff"}', b"\xff\xfe", b'"\xc3"', b"",
     b'{"entity":"attendance","op":"delete","key":"a","ts":"2026-01-01T00:00:00Z",'
     b'"schema_version":1,"x\xff":1}'],
)
def test_bad_bytes_are_rejected_never_raised(raw: bytes) -> None:
    from replicator.ingest import EventValidator

    assert FAST.entity_of(raw) is None
    reason = EventValidator(registry=REGISTRY, max_event_bytes=1 << 20).check("attendance", raw)
    assert reason is not None and reason.startswith("malformed JSON"), reason


@settings(max_examples=2000, deadline=None)
@given(raw=st.binary(max_size=200))
def test_arbitrary_bytes_never_raise(raw: bytes) -> None:
    FAST.entity_of(raw)


# -- config: the scope / scope_id if-then rules (allOf at the root of config.json) --------

CONFIG_UPSERT = next(e for e in VALID if e["entity"] == "config" and e["op"] == "upsert")
_ABSENT = object()
scope_ids = st.sampled_from([_ABSENT, None, "", "e", "evt-2025-x", "x" * 64, "x" * 65, 0, 1.5,
                             True, [], {}, ["a"], "\n", "é"])
scopes = st.sampled_from([_ABSENT, None, "global", "event", "session", "device", "Global",
                          "", 1, ["global"]])


def _config_event(scope: Any, scope_id: Any) -> dict[str, Any]:
    event: dict[str, Any] = orjson.loads(orjson.dumps(CONFIG_UPSERT))
    for name, value in (("scope", scope), ("scope_id", scope_id)):
        if value is _ABSENT:
            event["data"].pop(name, None)
        else:
            event["data"][name] = value
    return event


@settings(max_examples=400, deadline=None)
@given(scope=scopes, scope_id=scope_ids)
def test_config_scope_rules_fast_equals_slow(scope: Any, scope_id: Any) -> None:
    """For these plain values the fast path is not stricter: it decides exactly like the
    precise validator (and never accepts what it rejects)."""
    event = _config_event(scope, scope_id)
    slow_ok = REGISTRY.validate(event) is None
    fast_ok = FAST.entity_of(orjson.dumps(event)) == "config"
    assert fast_ok == slow_ok, (scope, scope_id, REGISTRY.validate(event))


@pytest.mark.parametrize(
    ("scope", "scope_id", "valid"),
    [("global", None, True), ("global", _ABSENT, True), ("global", "evt-1", False),
     ("global", "", False), ("event", "evt-1", True), ("session", "s", True),
     ("device", "x" * 64, True), ("event", None, False), ("event", _ABSENT, False),
     ("event", "", False), ("device", "x" * 65, False), ("nowhere", None, False)],
)
def test_config_scope_rules(scope: str, scope_id: Any, valid: bool) -> None:
    event = _config_event(scope, scope_id)
    assert (REGISTRY.validate(event) is None) is valid
    assert (FAST.entity_of(orjson.dumps(event)) == "config") is valid


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    index=st.integers(0, 10_000),
    choice=st.integers(0, 10_000),
    value=json_values | scope_ids.filter(lambda v: v is not _ABSENT),
    delete=st.booleans(),
)
def test_config_mutations_fast_accept_implies_slow_accept(index: int, choice: int, value: Any,
                                                          delete: bool) -> None:
    configs = [e for e in VALID if e["entity"] == "config"]
    event = configs[index % len(configs)]
    paths = _paths(event)
    path = paths[choice % len(paths)]
    raw = orjson.dumps(_mutate(event, path, value, delete))
    if FAST.entity_of(raw) is not None:
        assert REGISTRY.validate(orjson.loads(raw)) is None, (path, value, delete)


# -- date-time fields: checked after decoding, all of an event's in one regex call ---------

GOOD_TS = "2025-03-03T07:30:01.310Z"
date_times = st.sampled_from([
    GOOD_TS, "2024-02-29T23:59:60+23:59", "2025-03-03t07:30:01z", f"{GOOD_TS}\n{GOOD_TS}",
    f"{GOOD_TS}\n", f"\n{GOOD_TS}", "2025-03-03 07:30:01Z", "2025-03-03T07:30:01+0100",
    "2025-02-29T07:30:01Z", "2025-03-03T07:30:01", "", "\n", f"{GOOD_TS} ", "２025-03-03T07:30:01Z",
]) | st.text(alphabet="0123456789-:TtZz.+\n ", max_size=30)
_DT_FIELDS = {"attendance": ("check_in_at", "check_out_at"),
              "participant": ("created_at", "updated_at"), "config": ("updated_at",)}


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    index=st.integers(0, len(VALID) - 1),
    values=st.lists(date_times | st.none(), min_size=3, max_size=3),
    absent=st.lists(st.booleans(), min_size=3, max_size=3),
)
def test_date_times_fast_accept_implies_slow_accept(index: int, values: list[Any],
                                                    absent: list[bool]) -> None:
    """A value holding a newline must not pass by shifting the joined date-times' count, and
    the fast path rejects no valid date-time."""
    event = orjson.loads(orjson.dumps(VALID[index]))
    names = ("ts", *_DT_FIELDS[event["entity"]])
    for name, value, gone in zip(names, values, absent, strict=False):
        target = event if name == "ts" else event.get("data")
        if target is None:
            continue
        if gone:
            target.pop(name, None)
        else:
            target[name] = value
    raw = orjson.dumps(event)
    slow = REGISTRY.validate(orjson.loads(raw))
    # exact for date-times: fast accepts iff the precise validator does
    assert (FAST.entity_of(raw) is not None) == (slow is None), (values, absent, slow)


@pytest.mark.parametrize(
    ("ts", "check_in_at", "check_out_at"),
    [(f"{GOOD_TS}\n{GOOD_TS}", GOOD_TS, None), (GOOD_TS, f"{GOOD_TS}\n{GOOD_TS}", _ABSENT),
     (GOOD_TS, GOOD_TS, f"{GOOD_TS}\n{GOOD_TS}"), (GOOD_TS, GOOD_TS, "2025-03-03 07:30:01Z"),
     ("2025-03-03T07:30:01+0100", GOOD_TS, GOOD_TS), (GOOD_TS, "2025-02-29T07:30:01Z", None)],
)
def test_bad_date_times_are_rejected(ts: str, check_in_at: str, check_out_at: Any) -> None:
    event = orjson.loads(orjson.dumps(
        next(e for e in VALID if e["entity"] == "attendance" and e["op"] == "upsert")))
    event["ts"] = ts
    event["data"]["check_in_at"] = check_in_at
    if check_out_at is _ABSENT:
        event["data"].pop("check_out_at", None)
    else:
        event["data"]["check_out_at"] = check_out_at
    assert REGISTRY.validate(event) is not None
    assert FAST.entity_of(orjson.dumps(event)) is None
    event["ts"] = event["data"]["check_in_at"] = GOOD_TS
    event["data"]["check_out_at"] = "2024-02-29T23:59:60+23:59"
    assert REGISTRY.validate(event) is None
    assert FAST.entity_of(orjson.dumps(event)) == "attendance"


# -- the compiler refuses rule forms it cannot decide exactly (slow path for that entity) --

@pytest.mark.parametrize(
    "rule",
    [
        {"if": {"properties": {"scope": {"pattern": "^g"}}}, "then": {"required": ["scope_id"]}},
        {"if": {"properties": {"scope": {"const": 1}}}, "then": {"required": ["scope_id"]}},
        {"if": {"properties": {"nope": {"const": "x"}}}, "then": {"required": ["scope_id"]}},
        {"if": {"required": ["scope"]}, "then": {"properties": {"scope_id": {"pattern": "x"}}}},
        {"if": {"required": ["scope"]}, "then": {"not": {"required": ["scope_id"]}}},
        {"if": {"required": ["scope"]}, "then": {"properties": {"scope_id": {"type": "object"}}}},
        {"required": ["scope"]},
        {"if": {"required": ["scope"]}, "then": {}, "unevaluatedProperties": False},
    ],
)
def test_unsupported_rules_fall_back_to_the_slow_path(rule: dict[str, Any]) -> None:
    from replicator.fastcheck import Unsupported, _Compiler

    schema = REGISTRY.json_schema("config")
    schema["allOf"] = [rule]
    with pytest.raises(Unsupported):
        _Compiler("config").root(schema)
