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


def test_fast_path_accepts_valid_demo_events_of_supported_entities() -> None:
    assert set(FAST.unsupported) <= {"config"}  # config's if/then rules use the slow path
    supported = [e for e in VALID if e["entity"] not in FAST.unsupported]
    assert len(supported) > 2000
    accepted = [e for e in supported if FAST.entity_of(orjson.dumps(e)) == e["entity"]]
    assert len(accepted) == len(supported)


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
