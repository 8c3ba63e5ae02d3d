"""The relational layout of an entity, derived from its JSON Schema, and row conversion.

One table per entity. Columns, in this order:

* ``key`` -- the record key (text, primary key; sorted with ``COLLATE "C"`` semantics, i.e.
  by code point, which is also Python's ``str`` order);
* one column per property of the entity's ``data`` schema, in schema order, typed by
  :func:`column_kind` (string -> text, date-time string -> timestamptz, integer -> bigint,
  number -> double precision, boolean -> boolean, object/array/untyped -> jsonb);
* the change that produced the row: ``_version`` (bigint, nullable), ``_topic`` (text),
  ``_partition`` (integer), ``_offset`` (bigint), ``_ts`` (timestamptz: the event's ``ts``).

Values are converted once, into :class:`Cell` kinds, and the state digest is computed from
the same canonical forms a target yields when read back (see :mod:`replicator.restore.digest`),
so "what the backup says" and "what the target holds" compare exactly.

Invariant: ``canonical(kind, to_target(kind, v))`` equals ``canonical(kind, v)`` for every
target representation below -- tests check it per kind.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import orjson

Kind = Literal["text", "timestamptz", "bigint", "double", "boolean", "jsonb"]

META_COLUMNS: tuple[tuple[str, Kind], ...] = (
    ("_version", "bigint"),
    ("_topic", "text"),
    ("_partition", "bigint"),
    ("_offset", "bigint"),
    ("_ts", "timestamptz"),
)

PG_TYPES: dict[Kind, str] = {
    "text": "text",
    "timestamptz": "timestamptz",
    "bigint": "bigint",
    "double": "double precision",
    "boolean": "boolean",
    "jsonb": "jsonb",
}

SQLITE_TYPES: dict[Kind, str] = {
    "text": "TEXT",
    "timestamptz": "TEXT",  # RFC 3339 UTC with microseconds: sortable and readable
    "bigint": "INTEGER",
    "double": "REAL",
    "boolean": "INTEGER",
    "jsonb": "TEXT",  # canonical JSON (sorted keys)
}

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO = timedelta(microseconds=1)
_fromiso = datetime.fromisoformat


def column_kind(prop: Mapping[str, Any]) -> Kind:
    """The column kind of one JSON Schema property (``null`` in a type list is ignored)."""
    t = prop.get("type")
    types = [t] if isinstance(t, str) else [x for x in (t or []) if x != "null"]
    if len(types) != 1:
        return "jsonb"
    only = types[0]
    if only == "string":
        return "timestamptz" if prop.get("format") == "date-time" else "text"
    if only == "integer":
        return "bigint"
    if only == "number":
        return "double"
    if only == "boolean":
        return "boolean"
    return "jsonb"


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    kind: Kind


@dataclass(frozen=True, slots=True)
class TableLayout:
    """The table of one entity: ``key``, the data columns, then :data:`META_COLUMNS`."""

    entity: str
    data_columns: tuple[Column, ...]

    @classmethod
    def from_schema(cls, entity: str, schema: Mapping[str, Any]) -> TableLayout:
        props = schema.get("properties") or {}
        return cls(entity, tuple(Column(n, column_kind(p)) for n, p in props.items()))

    @property
    def columns(self) -> tuple[Column, ...]:
        return (
            Column("key", "text"),
            *self.data_columns,
            *(Column(n, k) for n, k in META_COLUMNS),
        )

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]


# -- canonical values (digest) -------------------------------------------------------------


def rfc3339_to_micros(value: str) -> int:
    """RFC 3339 -> microseconds since the epoch (digits beyond microseconds truncated; a leap
    second ``:60`` counts as ``:59.999999``)."""
    try:
        return (_fromiso(value) - EPOCH) // _MICRO
    except ValueError:
        pass
    value = value.upper()  # RFC 3339 allows "t" and "z"; fromisoformat does not
    try:
        dt = _fromiso(value)
    except ValueError:
        if value[17:19] != "60":
            raise
        dt = _fromiso(value[:17] + "59" + value[19:]).replace(microsecond=999999)
    return (dt - EPOCH) // _MICRO


def micros_to_datetime(us: int) -> datetime:
    return EPOCH + timedelta(microseconds=us)


def micros_to_text(us: int) -> str:
    """Microseconds -> ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (the SQLite representation)."""
    return micros_to_datetime(us).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def ts_text(value: str) -> str:
    """RFC 3339 -> ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` in UTC: the canonical timestamp text.

    Fast path (string slicing, no parsing) for UTC times without a leap second, which is
    what publishers send; anything else goes through :func:`rfc3339_to_micros`. Digits beyond
    microseconds are truncated, like PostgreSQL's input of a ``datetime``.
    """
    n = len(value)
    if n >= 20 and value[-1] in "Zz" and value[17:19] != "60":
        if n == 20:
            return value[:10] + "T" + value[11:19] + ".000000Z"
        if value[19] == ".":
            frac = value[20:-1]
            return value[:10] + "T" + value[11:19] + "." + (frac + "000000")[:6] + "Z"
    return micros_to_text(rfc3339_to_micros(value))


def datetime_text(dt: datetime) -> str:
    """An aware ``datetime`` (as PostgreSQL returns) -> the canonical timestamp text."""
    if dt.utcoffset():
        dt = dt.astimezone(UTC)
    return dt.isoformat(timespec="microseconds")[:26] + "Z"


def canonical_json(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def canonical(kind: Kind, value: Any) -> Any:
    """The canonical form of a value taken from an event (parsed JSON)."""
    if value is None:
        return None
    if kind == "text":
        return value
    if kind == "timestamptz":
        return rfc3339_to_micros(value)
    if kind == "bigint":
        return int(value)
    if kind == "double":
        return float(value)
    if kind == "boolean":
        return bool(value)
    return canonical_json(value)


def canonical_stored(kind: Kind, value: Any) -> Any:
    """The canonical form of a value read back from a target.

    Timestamps come as ``datetime`` (PostgreSQL) or RFC 3339 text (SQLite, JSONL); booleans
    as ``bool`` or ``0/1``; JSON columns as JSON text (``jsonb``/TEXT), never parsed.
    """
    if value is None:
        return None
    if kind == "timestamptz":
        return _stored_ts(value)
    if kind == "jsonb":
        return canonical_json(orjson.loads(value))
    return canonical(kind, value)


# -- compiled row converters (the restore's per-row hot path) -------------------------------

Converter = Callable[[Any], Any]


def compile_row(
    columns: Sequence[Column],
    converters: Mapping[Kind, Converter | None],
    *,
    source: Literal["mapping", "sequence"],
    offset: int = 0,
) -> Callable[[Any], tuple[Any, ...]]:
    """A function turning one source row into a tuple, one converted value per column.

    ``source="mapping"``: the row is the event's ``data`` dict (``data.get(name)``);
    ``"sequence"``: a row read back from a target, column ``i`` at ``row[offset + i]``.
    ``None`` stays ``None``; a kind without a converter is passed through. The function is
    generated once per layout (straight-line code: no per-value loop or dispatch), which
    makes restore's conversions several times cheaper than a generic loop.
    """
    env: dict[str, Any] = {}
    parts: list[str] = []
    for i, c in enumerate(columns):
        get = f"r.get({c.name!r})" if source == "mapping" else f"r[{offset + i}]"
        fn = converters.get(c.kind)
        if fn is None:
            parts.append(get)
        else:
            env[f"_c{i}"] = fn
            parts.append(f"(_c{i}(_v{i}) if (_v{i} := {get}) is not None else None)")
    body = ", ".join(parts) + ("," if len(parts) == 1 else "")
    code = f"def _row(r):\n    return ({body})\n"
    exec(compile(code, f"<row converter {len(columns)} columns>", "exec"), env)
    fn_row: Callable[[Any], tuple[Any, ...]] = env["_row"]
    return fn_row


#: event value -> canonical (digest) form, per kind
CANONICAL: dict[Kind, Converter | None] = {
    "text": None,
    "timestamptz": rfc3339_to_micros,
    "bigint": int,
    "double": float,
    "boolean": bool,
    "jsonb": canonical_json,
}


def _stored_ts(value: Any) -> int:
    if isinstance(value, datetime):
        return (value - EPOCH) // _MICRO
    return rfc3339_to_micros(value)


def _stored_json(value: Any) -> str:
    return canonical_json(orjson.loads(value))


#: value read back from a target -> canonical form, per kind
CANONICAL_STORED: dict[Kind, Converter | None] = {
    "text": None,
    "timestamptz": _stored_ts,
    "bigint": int,
    "double": float,
    "boolean": bool,
    "jsonb": _stored_json,
}
