"""Change-event schemas: loading, compilation and the fast validation path used by ingest.

The contract lives in the repository's ``schemas/`` directory (``envelope.json`` plus one
JSON Schema per entity for ``data``). :class:`SchemaRegistry` loads it once and validates
decoded events with :meth:`SchemaRegistry.validate`, which returns ``None`` for a valid event
or a short, specific reason string (``"missing key"``, ``"unknown op 'merge'"``,
``"schema: data.status must be one of [...]"``) that ingest writes to the quarantine log.

How it stays fast and still equals the published schema:

* The envelope is checked by hand with plain dict access (a handful of ``dict.get`` and
  ``type() is`` checks). The values those checks use (entity names, ops, key length, allowed
  fields) are read from ``envelope.json`` at load time; the rules themselves (upsert needs
  data, delete has none, integer versions) are code, pinned to ``envelope.json`` by tests.
* Only the entity ``data`` schemas are compiled with fastjsonschema.
* ``format: date-time`` (``ts`` and every date-time field of ``data``) is checked by
  :func:`is_rfc3339`: the RFC 3339 section 5.6 grammar (``T``/``t`` separator, mandatory
  ``Z``/``z`` or ``±hh:mm`` offset, ASCII digits only, leap second ``:60`` allowed) plus real
  calendar days. This is stricter than fastjsonschema's built-in regex, which also accepts
  ``+hhmm`` offsets and non-ASCII digits.
* :meth:`SchemaRegistry.validate_with_jsonschema` runs the complete ``envelope.json`` (with its
  ``$ref`` to the entity schemas) through fastjsonschema. It is the slow reference path; the
  test-suite proves both paths accept and reject the same events.

Integer semantics follow JSON Schema draft-07: ``1.0`` is an integer. Like the published
schema, the fast path accepts it for ``version`` and ``schema_version``.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import fastjsonschema
import orjson

from replicator.errors import ConfigError

__all__ = [
    "DEFAULT_SCHEMA_DIR",
    "ENVELOPE_SCHEMA_FILE",
    "SchemaRegistry",
    "is_rfc3339",
]

log = logging.getLogger(__name__)

DEFAULT_SCHEMA_DIR: Final[Path] = Path(__file__).resolve().parent / "_schemas"
"""The repository's ``schemas/``, shipped inside the package as ``_schemas`` (a symlink in
the source tree; building a wheel copies the files, so a plain ``pip install`` has them)."""

ENVELOPE_SCHEMA_FILE: Final[str] = "envelope.json"

_REASON_VALUE_MAX: Final[int] = 40
"""Values quoted in reasons are cut to this many characters so a reason stays one short line."""

_RFC3339_PATTERN: Final[str] = (
    # full-date. Days 01-28 are the cheap common branch; 29, 30 and 31 are checked against the
    # month (and 02-29 against leap years, 400-year rule included) by fixed-width lookbehinds,
    # which is ~35 % faster than spelling out every month/leap-year combination.
    r"[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|1[0-9]|2[0-8]"
    r"|(?<=-(?:0[13-9]|1[0-2])-)(?:29|30)|(?<=-(?:0[13578]|1[02])-)31"
    r"|(?<=(?:0[48]|[2468][048]|[13579][26])-02-)29"
    r"|(?<=(?:[02468][048]|[13579][26])00-02-)29)"
    # "T" full-time: partial-time (leap second :60 allowed) and a mandatory offset
    r"[Tt](?:[01][0-9]|2[0-3]):[0-5][0-9]:(?:[0-5][0-9]|60)(?:\.[0-9]+)?"
    r"(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])\Z"
)
"""RFC 3339 ``date-time`` as one regex, anchored at the end (use with ``match``).

ASCII digits only (``[0-9]``, never ``\\d``), so it needs no flags and is also handed to
fastjsonschema as the ``date-time`` format of every entity schema.
"""

_rfc3339_match: Final = re.compile(_RFC3339_PATTERN).match


def is_rfc3339(value: object) -> bool:
    """True if ``value`` is a string in RFC 3339 ``date-time`` form naming a real calendar day.

    Grammar: ``YYYY-MM-DDThh:mm:ss[.frac](Z|±hh:mm)``; ``t`` and ``z`` are accepted
    (RFC 3339 is case-insensitive there); seconds may be ``60`` (leap second); February 29
    only in leap years. The offset is mandatory, so naive local times are rejected. Cost: one
    regex match (about as cheap as a check can be in Python).
    """
    return type(value) is str and _rfc3339_match(value) is not None


_MISSING: Final = object()
_JsonValidator = Callable[..., Any]


def _show(value: object) -> str:
    """Render a bad value for a reason string: ``repr``, cut to a short length."""
    if isinstance(value, str) and len(value) > _REASON_VALUE_MAX:
        return repr(value[:_REASON_VALUE_MAX]) + "…"
    text = repr(value)
    return text if len(text) <= _REASON_VALUE_MAX else text[:_REASON_VALUE_MAX] + "…"


def _is_json_integer(value: object) -> bool:
    """JSON Schema ``integer``: an int (not bool) or a float with no fractional part."""
    t = type(value)
    return t is int or (t is float and value.is_integer())  # type: ignore[attr-defined]


def _field_reason(name: str, value: object) -> str:
    """Reason for a required string-valued envelope field that is missing, null or not a str."""
    if value is _MISSING:
        return f"missing {name}"
    if value is None:
        return f"null {name}"
    return f"{name} is not a string ({type(value).__name__})"


def _read_schema(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError("schemas", f"schema file not found: {path}") from None
    except OSError as exc:
        raise ConfigError("schemas", f"cannot read schema file {path}: {exc}") from exc
    try:
        schema = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ConfigError("schemas", f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(schema, dict):
        raise ConfigError("schemas", f"{path} does not contain a JSON object")
    return schema


def _compile(
    schema: dict[str, Any], path: Path, handlers: Mapping[str, Callable[[str], Any]] | None = None
) -> _JsonValidator:
    try:
        return fastjsonschema.compile(
            schema,
            handlers=dict(handlers or {}),
            formats={"date-time": _RFC3339_PATTERN},
        )
    except fastjsonschema.JsonSchemaDefinitionException as exc:
        raise ConfigError("schemas", f"{path} is not a valid JSON Schema: {exc}") from exc


@dataclass(frozen=True, kw_only=True)
class SchemaRegistry:
    """The loaded, compiled event contract. Build it with :meth:`load`.

    Invariants:

    * ``entities`` is exactly the ``entity`` enum of ``envelope.json``, in file order, and
      every entity has a compiled ``data`` validator and a current ``schema_version``.
    * :meth:`validate` accepts an event if and only if ``envelope.json`` (with the entity
      schema for ``data``) accepts it and its ``schema_version`` is one this registry knows.
    * The registry never changes after :meth:`load`; it is safe to share between tasks.
    """

    directory: Path
    """Directory the schemas were loaded from."""
    entities: tuple[str, ...]
    """Entity names, in the order of the envelope's ``entity`` enum."""
    ops: tuple[str, ...]
    """Operation names, in the order of the envelope's ``op`` enum."""
    key_max_length: int
    """Longest allowed ``key``, in characters (code points)."""
    schema_versions: Mapping[str, int]
    """Current ``schema_version`` per entity (from each schema's ``x-schema-version``)."""
    primary_keys: Mapping[str, str]
    """Field of ``data`` that holds the record's key, per entity (``x-primary-key``)."""
    envelope_schema: Mapping[str, Any] = field(repr=False)
    _entity_schemas: Mapping[str, dict[str, Any]] = field(repr=False)
    _checks: dict[str, tuple[_JsonValidator, int]] = field(repr=False)
    """entity -> (compiled data validator, current schema_version); a plain dict (hot path)."""
    _envelope_validator: _JsonValidator = field(repr=False)
    _envelope_fields: frozenset[str] = field(repr=False)

    @classmethod
    def load(cls, directory: Path | None = None) -> SchemaRegistry:
        """Load and compile ``envelope.json`` and one ``<entity>.json`` per envelope entity.

        ``directory`` defaults to :data:`DEFAULT_SCHEMA_DIR`. Raises
        :class:`~replicator.errors.ConfigError` naming the file when a schema is missing,
        is not JSON, or is not a valid JSON Schema.
        """
        directory = (directory or DEFAULT_SCHEMA_DIR).resolve()
        env_path = directory / ENVELOPE_SCHEMA_FILE
        envelope = _read_schema(env_path)
        try:
            props: dict[str, Any] = envelope["properties"]
            entities = tuple(str(e) for e in props["entity"]["enum"])
            ops = tuple(str(o) for o in props["op"]["enum"])
            key_max = int(props["key"]["maxLength"])
            fields = frozenset(props)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                "schemas",
                f"{env_path} lacks properties.entity.enum, properties.op.enum "
                f"or properties.key.maxLength ({exc!r})",
            ) from exc
        if set(ops) != {"upsert", "delete"}:
            raise ConfigError("schemas", f"{env_path}: op enum must be upsert and delete")

        entity_schemas: dict[str, dict[str, Any]] = {}
        validators: dict[str, _JsonValidator] = {}
        versions: dict[str, int] = {}
        primary_keys: dict[str, str] = {}
        by_uri: dict[str, dict[str, Any]] = {}
        for entity in entities:
            path = directory / f"{entity}.json"
            schema = _read_schema(path)
            entity_schemas[entity] = schema
            validators[entity] = _compile(schema, path)
            versions[entity] = int(schema.get("x-schema-version", 1))
            primary_keys[entity] = str(schema.get("x-primary-key", "id"))
            if "$id" in schema:
                by_uri[str(schema["$id"])] = schema

        def resolve(uri: str) -> Any:
            try:
                return by_uri[uri]
            except KeyError:
                raise ConfigError(
                    "schemas", f"{env_path} refers to {uri}, which is not in {directory}"
                ) from None

        handlers = {"https": resolve, "http": resolve}
        envelope_validator = _compile(envelope, env_path, handlers)
        log.debug(
            "loaded event schemas",
            extra={"directory": str(directory), "entities": entities, "versions": versions},
        )
        return cls(
            directory=directory,
            entities=entities,
            ops=ops,
            key_max_length=key_max,
            schema_versions=MappingProxyType(versions),
            primary_keys=MappingProxyType(primary_keys),
            envelope_schema=MappingProxyType(envelope),
            _entity_schemas=MappingProxyType(entity_schemas),
            _checks={e: (validators[e], versions[e]) for e in entities},
            _envelope_validator=envelope_validator,
            _envelope_fields=fields,
        )

    def json_schema(self, entity: str) -> dict[str, Any]:
        """A deep copy of the JSON Schema of ``entity``'s ``data`` (KeyError if unknown)."""
        return copy.deepcopy(self._entity_schemas[entity])

    def schema_version(self, entity: str) -> int:
        """The current ``schema_version`` publishers must put on ``entity`` events."""
        return self.schema_versions[entity]

    def validate(self, event: object) -> str | None:
        """Return ``None`` if ``event`` (a decoded JSON value) is valid, else a short reason.

        Checks, in order, stopping at the first failure: the event is an object; ``entity``,
        ``op``, ``key``, ``ts`` (RFC 3339, see :func:`is_rfc3339`), ``schema_version``
        (must be the entity's current version), ``version``; no unexpected fields; ``data``
        present for upsert and absent/null for delete; ``data`` against the entity schema.
        Never raises for any input.
        """
        if not isinstance(event, dict):
            return f"event is not a JSON object ({type(event).__name__})"
        get = event.get

        entity = get("entity", _MISSING)
        check = self._checks.get(entity) if type(entity) is str else None
        if check is None:
            if type(entity) is str:
                return f"unknown entity {_show(entity)}"
            return _field_reason("entity", entity)

        op = get("op", _MISSING)
        if op != "upsert" and op != "delete":
            if type(op) is str:
                return f"unknown op {_show(op)}"
            return _field_reason("op", op)

        key = get("key", _MISSING)
        if type(key) is not str:
            return _field_reason("key", key)
        if not key:
            return "empty key"
        if len(key) > self.key_max_length:
            return f"key longer than {self.key_max_length} characters ({len(key)})"

        ts = get("ts", _MISSING)
        if type(ts) is not str:
            return _field_reason("ts", ts)
        if _rfc3339_match(ts) is None:
            return f"bad ts {_show(ts)}: not an RFC 3339 date-time"

        validator, current_version = check
        schema_version = get("schema_version", _MISSING)
        # `type() is int` first: the common case costs one identity test (bools and integral
        # floats take the slow branch, where 1.0 is accepted as JSON Schema says).
        if type(schema_version) is not int or schema_version != current_version:
            if schema_version is _MISSING:
                return "missing schema_version"
            if schema_version != current_version or not _is_json_integer(schema_version):
                return (
                    f"unsupported schema_version {_show(schema_version)} for {entity} "
                    f"(current: {current_version})"
                )

        version = get("version")
        if version is not None and (
            version < 0 if type(version) is int else (not _is_json_integer(version) or version < 0)
        ):
            return f"bad version {_show(version)}: must be an integer >= 0 or null"

        if not event.keys() <= self._envelope_fields:
            extra = sorted(str(k) for k in event.keys() - self._envelope_fields)
            return f"unexpected field {_show(extra[0])}"

        data = get("data")
        if op == "upsert":
            if data is None:
                return "upsert without data"
            if type(data) is not dict:
                return f"data is not an object ({type(data).__name__})"
            try:
                validator(data)
            except fastjsonschema.JsonSchemaValueException as exc:
                return f"schema: {exc.message}"
            return None
        if data is not None:
            return "delete with data"
        return None

    def validate_with_jsonschema(self, event: object) -> str | None:
        """Reference check of ``event`` against the complete ``envelope.json``. Slow path.

        Returns ``None`` or fastjsonschema's message (``"event.data.status must be ..."``).
        Unlike :meth:`validate` it does not know which ``schema_version`` values are current;
        tests use it to prove :meth:`validate` implements exactly the published schema.
        """
        try:
            self._envelope_validator(event, name_prefix="event")
        except fastjsonschema.JsonSchemaValueException as exc:
            return str(exc.message)
        return None
