"""The native row codec (``replicator.restore._rows``) against the Python reference: the
same target rows and the same digests, for plain and hostile events, both target kinds."""

from __future__ import annotations

import os
import random
from datetime import UTC, datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from replicator.restore.digest import DigestBuilder
from replicator.restore.layout import Column, TableLayout
from replicator.restore.rowcodec import RowCodec, RowTarget, native

needs_native = pytest.mark.skipif(native is None and os.environ.get("CI") != "true",
                                  reason="native row codec not built (no C compiler)")


def test_native_rows_are_built_in_ci() -> None:
    if os.environ.get("CI") == "true" and not os.environ.get("REPLICATOR_NO_NATIVE"):
        assert native is not None, "replicator.restore._rows was not built"


LAYOUT = TableLayout("thing", (
    Column("name", "text"), Column("at", "timestamptz"), Column("n", "bigint"),
    Column("x", "double"), Column("ok", "boolean"), Column("doc", "jsonb"),
))
PLAN: Any = SimpleNamespace(partitions=[SimpleNamespace(topic="thing", partition=0),
                                        SimpleNamespace(topic="thing", partition=1)])

PLAIN_TS = ["2026-01-02T03:04:05Z", "2026-01-02T03:04:05.1Z", "2024-02-29T23:59:59.999999Z",
            "0001-01-01T00:00:00Z", "9999-12-31T23:59:59.5Z", "1969-12-31T23:59:59.123Z"]
ODD_TS = ["2026-01-02t03:04:05z", "2026-01-02T05:04:05+02:00", "2026-01-02T03:04:05.1234567Z",
          "2016-12-31T23:59:60Z", "2026-01-02 03:04:05Z", "2026-01-02T03:04:05.Z"]


def _data(rng: random.Random) -> Any:
    r = rng.random()
    if r < 0.03:
        return None
    if r < 0.05:
        return {}
    if r < 0.06:
        return []
    d: dict[str, Any] = {
        "name": rng.choice(["a", "ünï", "", "x\"y", None, "日本"]),
        "at": rng.choice(PLAIN_TS * 3 + ODD_TS + [None]),
        "n": rng.choice([0, -1, 2**62, None, 7]),
        "x": rng.choice([0.5, -1e300, 3, 1e16, None, 2.0]),
        "ok": rng.choice([True, False, None]),
        "doc": rng.choice([{"b": 1, "a": [1, 2, {"z": None, "y": 1.5}]}, [], "s", 1, None,
                           {"k": "ü"}]),
        "extra": "ignored",
    }
    if rng.random() < 0.05:  # a value of an unexpected type: the whole row goes slow
        d[rng.choice(["name", "n", "x", "ok"])] = rng.choice(["12", 5.0, True])
    if rng.random() < 0.1:
        del d[rng.choice(list(d))]
    return d


def _changes(seed: int, n: int = 300) -> dict[str, Any]:
    rng = random.Random(seed)
    out: dict[str, Any] = {}
    for i in range(n):
        key = rng.choice(["k", "ключ", "z"]) + str(i)
        ev: dict[str, Any] = {"entity": "thing", "op": "upsert", "key": key,
                              "data": _data(rng)}
        if rng.random() < 0.8:
            ev["ts"] = rng.choice(PLAIN_TS + ODD_TS[:3])
        if rng.random() < 0.7:
            ev["version"] = rng.randint(0, 10)
        value = None if rng.random() < 0.1 else orjson.dumps(ev)
        rank = rng.randint(0, 1)
        out[key] = (ev.get("version", -1), 0, rank, rng.randint(0, 10**6), value, None, b"")
    return out


def _encode(target: RowTarget, changes: dict[str, Any], use_native: bool
            ) -> tuple[list[tuple[Any, ...]], str]:
    codec = RowCodec(LAYOUT, target, use_native=use_native)
    d = DigestBuilder("thing")
    rows = list(codec.rows(PLAN, changes, d))
    return rows, str(d.result())


@needs_native
@pytest.mark.parametrize("target", ["pg", "sqlite"])
@pytest.mark.parametrize("seed", range(6))
def test_rows_and_digest_equal_the_reference(target: RowTarget, seed: int) -> None:
    changes = _changes(seed)
    ref_rows, ref_digest = _encode(target, changes, False)
    nat_rows, nat_digest = _encode(target, changes, True)
    assert len(ref_rows) > 200
    assert nat_rows == ref_rows
    for a, b in zip(nat_rows, ref_rows, strict=True):  # same types, not only equal values
        assert [type(x) for x in a] == [type(x) for x in b]
    assert nat_digest == ref_digest


@needs_native
@pytest.mark.parametrize("bad", [b"not json", b"[1, 2]", b'{"key": "a", "data": [1]}',
                                 b'{"key": "a", "data": {"at": "2026-02-30T00:00:00Z"}}'])
def test_bad_events_fail_like_the_reference(bad: bytes) -> None:
    changes = {"a": (-1, 0, 0, 1, bad, None, b"")}
    errors = []
    for use_native in (False, True):
        with pytest.raises(Exception) as exc:
            _encode("pg", changes, use_native)
        errors.append(type(exc.value))
    assert errors[0] is errors[1]


def _stored(target: RowTarget, rng: random.Random) -> tuple[Any, ...]:
    us = rng.randint(-10**15, 10**16)
    dt = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)
    if target == "pg":
        at: Any = dt if rng.random() < 0.8 else dt.astimezone(timezone(timedelta(hours=2)))
        ok: Any = rng.choice([True, False])
    else:
        at = dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if rng.random() < 0.8 else \
            dt.strftime("%Y-%m-%dT%H:%M:%S+00:00")
        ok = rng.choice([0, 1])
    doc = orjson.dumps({"b": [1, 2.5], "a": "ü"}).decode()
    return (f"k{rng.random()}", rng.choice(["t", None]), rng.choice([at, None]),
            rng.choice([5, None]), rng.choice([1.5, 2.0, None]), rng.choice([ok, None]),
            rng.choice([doc, None, "[]"]))


@needs_native
@pytest.mark.parametrize("target", ["pg", "sqlite"])
def test_read_back_digest_equals_the_reference(target: RowTarget) -> None:
    rng = random.Random(5)
    rows = [_stored(target, rng) for _ in range(500)]
    digests = []
    for use_native in (False, True):
        d = DigestBuilder("thing")
        RowCodec(LAYOUT, target, use_native=use_native).digest_stored(iter(rows), d)
        digests.append(d.result())
    assert digests[0] == digests[1]
    assert digests[0].count == 500


@needs_native
def test_native_blake2b_equals_hashlib() -> None:
    from hashlib import blake2b

    rng = random.Random(3)
    for n in [0, 1, 127, 128, 129, 255, 256, 257, 1000, *(rng.randint(0, 3000) for _ in range(50))]:
        data = rng.randbytes(n)
        hi, lo = native.blake2b_128(data)
        assert (hi << 64) | lo == int.from_bytes(blake2b(data, digest_size=16).digest(), "big")


def _pg_binary_reference(layout: TableLayout, rows: list[tuple[Any, ...]]) -> bytes:
    """PostgreSQL binary COPY data written from the reference rows with ``struct``: an
    independent encoder of the format (docs: COPY ... WITH (FORMAT binary))."""
    import struct

    out = [b"PGCOPY\n\xff\r\n\x00", struct.pack(">ii", 0, 0)]
    kinds = [c.kind for c in layout.columns]
    pg_epoch = datetime(2000, 1, 1, tzinfo=UTC)
    for row in rows:
        out.append(struct.pack(">h", len(row)))
        for kind, v in zip(kinds, row, strict=True):
            if v is None:
                out.append(struct.pack(">i", -1))
                continue
            if kind == "text":
                b = v.encode()
            elif kind == "jsonb":
                b = b"\x01" + v.encode()
            elif kind == "timestamptz":
                b = struct.pack(">q", (v - pg_epoch) // timedelta(microseconds=1))
            elif kind == "bigint":
                b = struct.pack(">q", v)
            elif kind == "double":
                b = struct.pack(">d", v)
            else:
                b = b"\x01" if v else b"\x00"
            out.append(struct.pack(">i", len(b)) + b)
    out.append(b"\xff\xff")
    return b"".join(out)


@needs_native
@pytest.mark.parametrize("seed", range(4))
def test_pg_binary_copy_data_equals_an_independent_encoder(seed: int) -> None:
    changes = _changes(seed)
    # only rows PostgreSQL can hold: drop those with a value of an unexpected type
    ref_rows, _ = _encode("pg", changes, False)
    layout_kinds = [c.kind for c in LAYOUT.columns]
    fits = {r[0] for r in ref_rows if all(
        v is None or (k in ("text", "jsonb") and isinstance(v, str))
        or (k == "bigint" and type(v) is int) or (k == "double" and type(v) is float)
        or (k == "boolean" and type(v) is bool) or (k == "timestamptz" and isinstance(v, datetime))
        for k, v in zip(layout_kinds, r, strict=True))}
    changes = {k: v for k, v in changes.items() if k in fits or v[4] is None}
    ref_rows, ref_digest = _encode("pg", changes, False)
    codec = RowCodec(LAYOUT, "pg")
    d = DigestBuilder("thing")
    data = b"".join(codec.pg_copy_data(PLAN, changes, d))
    assert data == _pg_binary_reference(LAYOUT, ref_rows)
    assert str(d.result()) == ref_digest


@needs_native
def test_pg_binary_refuses_a_value_that_does_not_fit() -> None:
    ev = {"key": "a", "data": {"name": 5}}  # the digest takes it; a text column does not
    changes = {"a": (-1, 0, 0, 1, orjson.dumps(ev), None, b"")}
    with pytest.raises(ValueError, match="column 1: expected str, got int"):
        b"".join(RowCodec(LAYOUT, "pg").pg_copy_data(PLAN, changes, DigestBuilder("thing")))


@needs_native
def test_pg_binary_read_back_digest_in_any_chunking() -> None:
    """The read-back of ``COPY (SELECT key, data columns) TO STDOUT (FORMAT binary)``,
    fed in chunks cut anywhere, digests like the reference does from asyncpg's rows."""
    import asyncio

    rng = random.Random(9)
    rows = []
    for _ in range(300):
        r = list(_stored("pg", rng))
        if isinstance(r[2], datetime):
            r[2] = r[2].astimezone(UTC)
        rows.append(tuple(r))
    kinds_layout = SimpleNamespace(columns=[Column("key", "text"), *LAYOUT.data_columns])
    data = _pg_binary_reference(kinds_layout, rows)  # type: ignore[arg-type]
    ref = DigestBuilder("thing")
    RowCodec(LAYOUT, "pg", use_native=False).digest_stored(iter(rows), ref)

    async def feed(sink: Any, cuts: list[int]) -> None:
        pos = 0
        for n in cuts:
            await sink.feed(data[pos : pos + n])
            pos += n
        if pos < len(data):
            await sink.feed(data[pos:])

    for cuts in ([len(data)], [1] * 3000, [rng.randint(1, 700) for _ in range(200)]):
        d = DigestBuilder("thing")
        sink = RowCodec(LAYOUT, "pg").pg_copy_digest(d)
        asyncio.run(feed(sink, cuts))
        sink.finish()
        assert d.result() == ref.result()
    sink = RowCodec(LAYOUT, "pg").pg_copy_digest(DigestBuilder("thing"))
    asyncio.run(sink.feed(data[:-2]))
    with pytest.raises(ValueError, match="ended before its trailer"):
        sink.finish()


# -- the raw JSON path (event bytes scanned natively) against the orjson path and the
# reference, on event texts written by hand: whitespace, escapes, duplicate names, odd
# numbers, bad UTF-8 -- everything the scanner must either take with orjson's meaning or
# hand back.

_HOSTILE_DATA = [
    '{"name":"a","n":1}',
    '{ "name" : "a" , "n" : 1 , "x" : 2.5 }',
    '{"name":"a","name":"b","n":1,"n":null}',  # duplicates: the last wins
    '{"name":"x\\"y","n":2}', '{"name":"tab\\tbar"}', '{"name":"\\u00fc"}',
    '{"n\\u0061me":"escaped name"}',
    '{"n":-0}', '{"n":1E2}', '{"n":1.0}', '{"n":123456789012345678}',
    '{"n":1234567890123456789}', '{"n":12345678901234567890123}', '{"n":-9223372036854775808}',
    '{"x":-0}', '{"x":-0.0}', '{"x":1.50}', '{"x":0.00001}', '{"x":1e-7}', '{"x":1e400}',
    '{"x":3}', '{"x":1e16}', '{"x":0.1}', '{"x":123456789.12345678}',
    '{"ok":true}', '{"ok":1}', '{"ok":"true"}',
    '{"at":"2026-01-02T03:04:05.123Z"}', '{"at":"2026-02-30T03:04:05Z"}', '{"at":5}',
    '{"doc":{"b":1,"a":2}}', '{"doc":{"a":1,"b":[1,2.5,{"c":null}]}}', '{"doc":{"a":1,"a":2}}',
    '{"doc":{"a":0.00001}}', '{"doc":{"a":1.50}}', '{"doc":{"a":-0}}', '{"doc":[]}',
    '{"doc":{ "a" : [ 1 , 2 ] }}', '{"doc":"str"}', '{"doc":{"k":"\\n"}}', '{"doc":1e2}',
    '{"doc":{"é":1,"z":2}}', '{"doc":{"z":1,"é":2}}', '{"doc":[[[[[[[[[[[[1]]]]]]]]]]]]}',
    '{"name":"日本","extra":{"deep":[1,{"x":"y"}]}}', '{"extra":"\\ud83d\\ude00"}',
    '{"name":"a","extra":[1,]}', '{"name":"a",}', 'null', '[]', '""', '0', 'false', '[1]',
    '"x"', '{}',
]
_HOSTILE_EVENTS = [
    *(('{"key":"k","ts":"2026-01-02T03:04:05Z","version":3,"data":' + d + '}').encode()
      for d in _HOSTILE_DATA),
    b'{"data":{"name":"a"},"data":null}', b'{"data":null,"data":{"name":"a"}}',
    b' \n{"data":{"name":"a"}} \t', b'{"data":{"name":"a"}}x', b'\xef\xbb\xbf{"data":{}}',
    b'{"version":1.0,"data":{"name":"a"}}', b'{"version":"3","data":{"name":"a"}}',
    b'{"version":-0,"ts":null,"data":{"name":"a"}}', b'{"ts":5,"data":{"name":"a"}}',
    b'{"ts":"2026-01-02T05:04:05+02:00","data":{"name":"a"}}',
    b'{"data":{"name":"\xc3\xbc"}}', b'{"data":{"name":"\xc3"}}',
    b'{"data":{"name":"\xed\xa0\x80"}}',
    b'{"data":{"name":"a\x01b"}}', b'{"data":{"extra":"\xff"}}', b'{"data":{"name":"a"}',
    b'{"d\\u0061ta":{"name":"a"}}', b'{"data":{"name":"a"},"other":[{"deep":{"x":[1,2]}}]}',
]


def _one(target: RowTarget, value: bytes, *, use_native: bool, raw: bool
         ) -> tuple[Any, ...]:
    changes = {"k\"ey\n": (-1, 0, 1, 42, value, None, b"")}
    was = native.set_raw(raw) if native is not None else True
    try:
        rows, digest = _encode(target, changes, use_native)
        return ("ok", rows, [[type(x) for x in r] for r in rows], digest)
    except Exception as exc:  # the failure must be the same kind on every path
        return ("error", type(exc))
    finally:
        if native is not None:
            native.set_raw(was)


@needs_native
@pytest.mark.parametrize("target", ["pg", "sqlite"])
@pytest.mark.parametrize("value", _HOSTILE_EVENTS)
def test_raw_path_equals_the_orjson_path_and_the_reference(target: RowTarget,
                                                           value: bytes) -> None:
    ref = _one(target, value, use_native=False, raw=False)
    assert _one(target, value, use_native=True, raw=False) == ref
    assert _one(target, value, use_native=True, raw=True) == ref


@needs_native
def test_raw_path_binary_copy_equals_the_orjson_path() -> None:
    """PostgreSQL binary COPY data and digests of the raw path equal those of the orjson
    path, for hostile events that PostgreSQL can hold and for random float literals in a
    jsonb value (the scanner decides which of them are already canonical)."""
    rng = random.Random(11)
    floats = [repr(rng.uniform(-1e3, 1e3)) for _ in range(200)]
    floats += [f"{rng.uniform(-100, 100):.{rng.randint(0, 17)}f}" for _ in range(200)]
    floats += [repr(rng.random() * 10 ** rng.randint(-8, 20)) for _ in range(200)]
    floats += ["0.0", "-0.0", "5.0", "0.0001", "0.00012", "0.00001", "10.10", "1234567890123456.0",
               "123456789012345.6", "0.1000000000000000055511151231257827"]
    events = [b'{"data":{"doc":{"a":' + f.encode() + b'},"x":' + f.encode() + b"}}"
              for f in floats]
    def pg_takes(value: bytes) -> bool:
        one = {"k": (-1, 0, 0, 1, value, None, b"")}
        try:
            b"".join(RowCodec(LAYOUT, "pg").pg_copy_data(PLAN, one, DigestBuilder("thing")))
        except Exception:
            return False
        return True

    hostile = [v for v in _HOSTILE_EVENTS if pg_takes(v)]
    assert len(hostile) > 40
    changes = {f"k{i:04d}": (-1, 0, i % 2, i, v, None, b"")
               for i, v in enumerate(events + hostile)}
    outs = []
    for raw in (False, True):
        native.set_raw(raw)
        try:
            d = DigestBuilder("thing")
            data = b"".join(RowCodec(LAYOUT, "pg").pg_copy_data(PLAN, changes, d))
            outs.append((data, str(d.result())))
        finally:
            native.set_raw(True)
    assert outs[0] == outs[1]
    assert len(outs[0][0]) > 10_000


@needs_native
def test_read_back_digest_of_hostile_stored_values() -> None:
    """Rows read back from PostgreSQL (binary COPY) with text that needs escaping, jsonb
    that is not canonical as PostgreSQL writes it, and doubles orjson writes with an
    exponent digest like the reference does from asyncpg's rows."""
    import asyncio

    texts = ['plain', 'q"uote', 'back\\slash', 'ctl\x01\x1f\x7f', 'nl\n\t\r\b\f', 'ünï 日本', '']
    docs = ['{"a": 1, "b": [1, 2.5]}', '{"b": 1, "aa": 2}', '{"a": 1.50}', '{"a": 0.00001}',
            '[1, {"z": "\\n", "y": null}]', '"s"', '1e2', '{"é": 1, "z": 2}', '{}']
    doubles = [1e20, 1e-7, -0.0, 0.1, 5.0, 123456789.125, float("inf")]
    rng = random.Random(4)
    stamps = [datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC), datetime(1, 1, 1, tzinfo=UTC),
              None]
    rows = [(rng.choice(["k", 'k"', "k\n", "ü"]) + str(i), rng.choice([*texts, None]),
             rng.choice(stamps), rng.choice([5, -(2**63), None]), rng.choice([*doubles, None]),
             rng.choice([True, False]), rng.choice([*docs, None]))
            for i in range(400)]
    kinds_layout = SimpleNamespace(columns=[Column("key", "text"), *LAYOUT.data_columns])
    data = _pg_binary_reference(kinds_layout, rows)  # type: ignore[arg-type]
    ref = DigestBuilder("thing")
    RowCodec(LAYOUT, "pg", use_native=False).digest_stored(iter(rows), ref)
    d = DigestBuilder("thing")
    sink = RowCodec(LAYOUT, "pg").pg_copy_digest(d)
    asyncio.run(sink.feed(data))
    sink.finish()
    assert d.result() == ref.result()
    # the same rows as asyncpg and sqlite3 give them (Python values), digested natively
    d = DigestBuilder("thing")
    RowCodec(LAYOUT, "pg").digest_stored(iter(rows), d)
    assert d.result() == ref.result()
    lite = [(k, t, None if at is None else
             at.isoformat(timespec="microseconds").replace("+00:00", "Z"), n, x,
             int(ok), doc) for k, t, at, n, x, ok, doc in rows]
    lite += [("big", None, None, 2**70, None, 3, None), ("tz", None, "2026-01-02T05:04:05+02:00",
             None, None, 0, None)]
    digests = []
    for use_native in (False, True):
        d = DigestBuilder("thing")
        try:
            RowCodec(LAYOUT, "sqlite", use_native=use_native).digest_stored(iter(lite), d)
        except Exception as exc:  # 2**70 does not fit the digest's JSON: fails on both paths
            digests.append(type(exc))
            continue
        digests.append(d.result())
    assert digests[0] == digests[1]
    d = DigestBuilder("thing")
    lite.pop(-2)
    RowCodec(LAYOUT, "sqlite").digest_stored(iter(lite), d)
    ref = DigestBuilder("thing")
    RowCodec(LAYOUT, "sqlite", use_native=False).digest_stored(iter(lite), ref)
    assert d.result() == ref.result() and d.result().count == 401


needs_native_sqlite = pytest.mark.skipif(
    (native is None or not hasattr(native, "sqlite_load")) and os.environ.get("CI") != "true",
    reason="native SQLite loader not built (no SQLite headers)")


def test_native_sqlite_is_built_in_ci() -> None:
    if os.environ.get("CI") == "true" and not os.environ.get("REPLICATOR_NO_NATIVE"):
        assert native is not None and hasattr(native, "sqlite_load"), \
            "replicator.restore._rows was built without SQLite (libsqlite3-dev missing?)"


@needs_native_sqlite
@pytest.mark.parametrize("raw", [True, False])
def test_native_sqlite_load_and_read_back_equal_executemany(tmp_path: Any, raw: bool) -> None:
    """The native loader stores what executemany stores (every column, same types), its
    digest is the reference's, and the native read-back digests like the reference; an
    insert SQLite refuses halfway (a CHECK) fails the load with SQLite's message and leaves
    no table behind."""
    import sqlite3

    from replicator.restore.rowcodec import SqliteFailure
    from replicator.targets.sqlite import SqliteTarget, create_table_sql

    changes = _changes(3, n=3000)  # > several chunks of the loader
    changes.update({f"h{i}": (-1, 0, 0, i, v, None, b"") for i, v in enumerate(
        v for v in _HOSTILE_EVENTS if _one("sqlite", v, use_native=False, raw=False)[0] == "ok")})
    ref_rows, ref_digest = _encode("sqlite", changes, False)
    db = tmp_path / "n.db"
    sqlite3.connect(db).close()
    was = native.set_raw(raw)
    try:
        d = DigestBuilder("thing")
        n = RowCodec(LAYOUT, "sqlite").sqlite_load(
            db, create_table_sql(LAYOUT), SqliteTarget._insert_sql(LAYOUT), PLAN, changes, d)
    finally:
        native.set_raw(was)
    assert n == len(ref_rows) > 2500
    assert str(d.result()) == ref_digest
    ref_db = sqlite3.connect(tmp_path / "ref.db")
    ref_db.execute(create_table_sql(LAYOUT))
    ref_db.executemany(SqliteTarget._insert_sql(LAYOUT), ref_rows)
    expected = ref_db.execute('SELECT * FROM "thing" ORDER BY key').fetchall()
    ref_db.close()
    conn = sqlite3.connect(db)
    stored = conn.execute('SELECT * FROM "thing" ORDER BY key').fetchall()
    conn.close()
    assert stored == expected
    assert [[type(x) for x in r] for r in stored] == [[type(x) for x in r] for r in expected]
    cols = ", ".join(f'"{c.name}"' for c in (LAYOUT.columns[0], *LAYOUT.data_columns))
    back = DigestBuilder("thing")
    RowCodec(LAYOUT, "sqlite").sqlite_digest(db, f'SELECT {cols} FROM "thing"', back)
    ref_back = DigestBuilder("thing")  # values of unexpected types may not round-trip:
    conn = sqlite3.connect(db)         # compare with the reference's read of the same file
    RowCodec(LAYOUT, "sqlite", use_native=False).digest_stored(
        conn.execute(f'SELECT {cols} FROM "thing"'), ref_back)
    conn.close()
    assert back.result() == ref_back.result()
    assert back.result().count == n

    bad = tmp_path / "bad.db"
    sqlite3.connect(bad).close()
    create = create_table_sql(LAYOUT).replace('"n" INTEGER', '"n" INTEGER CHECK ("n" != 7)')
    assert create != create_table_sql(LAYOUT)
    with pytest.raises(SqliteFailure, match="CHECK constraint failed"):
        RowCodec(LAYOUT, "sqlite").sqlite_load(bad, create, SqliteTarget._insert_sql(LAYOUT),
                                               PLAN, changes, DigestBuilder("thing"))
    conn = sqlite3.connect(bad)
    assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone() == (0,)
    conn.close()


@needs_native
def test_sort_changes_orders_like_sorted() -> None:
    """The native key order is sorted()'s (code points), for keys that share long prefixes,
    hold NUL, non-ASCII and astral characters; keys it cannot encode leave it to sorted()."""
    rng = random.Random(12)
    alphabet = ["a", "b", "\x00", "é", "日", "\U0001f600", "z", "0"]
    keys = {"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(3000)}
    keys |= {"x" * 16 + s for s in ["", "\x00", "a", "\x00a", "é"]}
    keys |= {"x" * 15 + s for s in ["", "\x00", "a", "aa"]}
    changes = {k: (i, 0, 0, i, b"v", None, b"") for i, k in enumerate(keys)}
    got = native.sort_changes(changes)
    assert got is not None
    assert got[0] == sorted(changes)
    assert got[1] == [changes[k] for k in got[0]]
    assert native.sort_changes({"a": 1, "\ud800": 2}) is None
    assert native.sort_changes({"a": 1, 5: 2}) is None
    assert native.sort_changes({}) == ([], [])


@needs_native
def test_sort_changes_survives_the_dict_changing_meanwhile() -> None:
    """sort_changes lets the GIL go while it sorts: it must hold its own references (a
    review found the first version reading freed keys: the interpreter crashed). Run in a
    child process, so that a crash fails this test instead of the test run."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent('''
        import threading
        from replicator.restore import _rows
        for attempt in range(3):
            d = {("é" * 20) + str(i) * 3: (i,) for i in range(200_000)}
            keys = list(d)[::-1]
            go = threading.Event()
            def drop(ks=keys):
                go.wait()
                while ks:
                    d.pop(ks.pop(), None)
            del keys
            t = threading.Thread(target=drop)
            t.start()
            go.set()
            r = _rows.sort_changes(d)
            t.join()
            assert r is not None and r[0] == sorted(r[0]) and len(r[0]) == len(r[1])
        print("ok")
    ''')
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok"


@needs_native
def test_exact_float_check_never_disagrees_with_repr() -> None:
    """The 128-bit check that decides whether a 16/17-digit literal is repr() of its
    double: whenever it says yes, repr agrees; and it decides nearly every canonical
    literal of that length (else the speed-up would silently be gone)."""
    import math
    import struct

    rng = random.Random(17)
    said_yes = decided = canonical = 0
    for i in range(60_000):
        kind = i % 5
        if kind == 0:
            x = rng.uniform(-1e4, 1e4)
        elif kind == 1:
            x = struct.unpack("d", struct.pack("Q", rng.getrandbits(64)))[0]
        elif kind == 2:
            x = 59.9 + rng.randrange(1000) / 1e4  # the bench's locations
        elif kind == 3:
            x = math.ldexp(1.0, rng.randrange(-13, 53)) * (1 + rng.randrange(3) * 2**-52)
        else:
            x = rng.uniform(1e-4, 1e16)
        if not math.isfinite(x):
            continue
        lits = {repr(x), f"{x:.17g}", f"{x:.16g}", repr(math.nextafter(x, math.inf)),
                f"{math.nextafter(x, -math.inf):.17g}", f"{x:.17f}"[:19]}
        for lit in lits:
            if "e" in lit or "n" in lit or "." not in lit:
                continue
            yes = native.literal_is_repr(lit.encode())
            is_repr = repr(float(lit)) == lit
            assert not yes or is_repr, lit
            said_yes += yes
            digits = len(lit.lstrip("-").replace(".", "").lstrip("0"))
            if is_repr and digits >= 16 and not lit.endswith(".0") and abs(float(lit)) < 1e15:
                canonical += 1
                decided += yes
    assert said_yes > 10_000
    assert decided > 0.97 * canonical


@needs_native_sqlite
def test_native_sqlite_read_back_reports_a_read_error(tmp_path: Any) -> None:
    """A page SQLite cannot read, met by the reader thread halfway through the table, fails
    the read-back with SQLite's message (no digest of half a table)."""
    import sqlite3

    from replicator.restore.rowcodec import SqliteFailure

    db = tmp_path / "c.db"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA page_size=4096")
    conn.execute("CREATE TABLE t (key TEXT PRIMARY KEY, n INTEGER, note TEXT)")
    conn.executemany("INSERT INTO t VALUES (?, ?, ?)",
                     [(f"k{i:06d}", i, "x" * 200) for i in range(20_000)])
    conn.commit()
    conn.close()
    size = db.stat().st_size
    with open(db, "r+b") as f:  # a run of table pages past the middle: garbage
        f.seek((size // 4096 * 2 // 3) * 4096)
        f.write(b"\xa5" * 4096 * 8)
    layout = TableLayout("t", (Column("n", "bigint"), Column("note", "text")))
    with pytest.raises(SqliteFailure, match=r"^read: .*(malformed|corrupt)"):
        RowCodec(layout, "sqlite").sqlite_digest(
            db, 'SELECT key, n, note FROM t', DigestBuilder("t"))
