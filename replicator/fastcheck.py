"""A fast *accept* path for event validation: the JSON Schemas compiled into msgspec types.

``SchemaRegistry.validate`` (orjson + hand-written envelope checks + fastjsonschema) gives
precise reasons but costs ~10 µs per event. Ingest only needs the reasons for the rare bad
event. :class:`FastAccept` decodes the raw bytes straight into msgspec Structs generated from
the same ``schemas/*.json`` files, which validates types, enums, lengths, ranges, patterns
and unknown fields in one pass in C, then runs a short post-decode check in Python:

* ``format: date-time`` of ``ts`` and of the top-level ``data`` fields: all of an event's
  date-time strings are joined with ``"\\n"`` and matched by *one* regex that requires
  exactly that many RFC 3339 date-times separated by ``"\\n"`` (a date-time never contains
  ``"\\n"``, so a value holding one makes the count wrong and the match fail). msgspec
  calls a Python regex per constrained string (~0.6 µs each); one call per event is cheaper.
  Date-time fields nested deeper keep a msgspec pattern.
* ``allOf`` of ``if``/``then``/``else`` rules at the root of an entity schema (config's
  ``scope``/``scope_id`` rule), in a restricted form: the ``if`` may only use ``required``
  and string ``const``/``enum`` on declared properties (so deciding which branch applies is
  exact), ``then``/``else`` only ``required`` and ``type``/``minLength``/``maxLength``/
  string ``const``/``enum`` on declared properties.

Invariant (tested property): ``FastAccept.entity_of(raw) is not None`` implies
``SchemaRegistry.validate(orjson.loads(raw)) is None``. The fast path may reject valid events
(it is stricter, e.g. ``1.0`` for an integer) -- those simply take the precise slow path.
Any schema keyword or form the compiler does not understand makes that entity slow-path
only, so the schema files stay the single source of truth. The raw bytes are never
re-encoded: the caller stores the original bytes.
"""

from __future__ import annotations

import keyword
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal, Union

import fastjsonschema.draft07
import msgspec

from replicator.schemas import _RFC3339_PATTERN, SchemaRegistry

#: keywords that carry no validation (documentation, ids, our extensions)
_IGNORED = frozenset({"description", "title", "$id", "$schema", "$comment", "examples",
                      "default"})
_SUPPORTED = frozenset({"type", "enum", "minLength", "maxLength", "minimum", "maximum",
                        "format", "properties", "required", "additionalProperties", "items",
                        "minItems", "maxItems"})
#: keywords a ``then``/``else`` property schema may use (checked on decoded values)
_RULE_SUPPORTED = frozenset({"type", "minLength", "maxLength", "enum", "const"})
#: JSON type -> Python classes of decoded values (``integer``: int only, stricter than JSON)
_RULE_TYPES: dict[str, tuple[type, ...]] = {
    "null": (type(None),), "string": (str,), "boolean": (bool,), "integer": (int,),
    "number": (int, float),
}

#: RFC 3339 date-time without its end anchor. It never matches "\n" (no ``.``, no negated
#: or ``\s``-like classes: every character class in it is explicit), which the joined
#: date-time check relies on.
_DT_BODY = _RFC3339_PATTERN.removesuffix(r"\Z")
assert _DT_BODY != _RFC3339_PATTERN
assert re.search(r"(?<!\\)\.|\[\^|\\[sSdDwWnZ]", _DT_BODY) is None, _DT_BODY


def _dt_matcher(count: int) -> Callable[[str], re.Match[str] | None]:
    """``fullmatch`` of exactly ``count`` date-times joined by ``"\\n"``."""
    return re.compile(r"\n".join([_DT_BODY] * count)).fullmatch


class Unsupported(Exception):
    """The schema uses something the compiler does not translate (use the slow path)."""


def _format_pattern(fmt: str) -> str:
    if fmt == "date-time":
        return r"\A" + _RFC3339_PATTERN
    regex = fastjsonschema.draft07.CodeGeneratorDraft07.FORMAT_REGEXS.get(fmt)
    if regex is None:
        raise Unsupported(f"format {fmt!r}")
    return r"\A(?:" + regex.removeprefix("^") + ")"


def _keywords(schema: dict[str, Any]) -> set[str]:
    return {k for k in schema if k not in _IGNORED and not k.startswith("x-")}


class _Compiler:
    """Translates one entity schema into msgspec types plus the source of a post-decode check.

    Rules compile to Python *expressions* over the decoded ``data`` struct ``d`` (constants
    go to :attr:`consts`), which :func:`_post_check` joins into one generated function: one
    call per event instead of a closure per keyword.
    """

    def __init__(self, entity: str) -> None:
        self.entity = entity
        self.n = 0
        #: top-level ``data`` fields with ``format: date-time``, checked after decoding:
        #: (name, always a string: required and not nullable)
        self.dt_fields: list[tuple[str, bool]] = []
        #: root ``allOf`` rules as expressions over ``d`` that must all be true
        self.rules: list[str] = []
        self.consts: dict[str, Any] = {}

    def root(self, schema: dict[str, Any]) -> Any:
        """The msgspec type of an entity's ``data``; fills ``dt_fields`` and ``rules``."""
        schema = dict(schema)
        all_of = schema.pop("allOf", None)
        if schema.get("type") != "object":
            raise Unsupported(f"{self.entity}: root is not an object schema")
        data_type = self.struct(schema, self.entity, root=True)
        if all_of is not None:
            if not isinstance(all_of, list):
                raise Unsupported(f"{self.entity}: allOf is not a list")
            props = schema.get("properties", {})
            self.rules = [self._rule(sub, props, f"{self.entity}.allOf[{i}]")
                          for i, sub in enumerate(all_of)]
        return data_type

    def _const(self, value: Any) -> str:
        name = f"_C{len(self.consts)}"
        self.consts[name] = value
        return name

    def _strings(self, values: Any, path: str) -> str:
        """A ``const``/``enum`` in a rule: strings only, so equality is exact JSON equality."""
        if (not isinstance(values, list) or not values
                or not all(isinstance(v, str) for v in values)):
            raise Unsupported(f"{path}: const/enum of non-strings")
        return self._const(frozenset(values))

    def _rule(self, sub: Any, props: dict[str, Any], path: str) -> str:
        if not isinstance(sub, dict) or "if" not in sub:
            raise Unsupported(f"{path}: only if/then/else rules")
        unknown = _keywords(sub) - {"if", "then", "else"}
        if unknown:
            raise Unsupported(f"{path}: {sorted(unknown)}")
        cond = self._condition(sub["if"], props, path + ".if")
        then = self._requirement(sub.get("then"), props, path + ".then")
        other = self._requirement(sub.get("else"), props, path + ".else")
        return f"({then} if {cond} else {other})"

    def _names(self, schema: Any, props: dict[str, Any], path: str
               ) -> tuple[list[str], dict[str, Any]]:
        if not isinstance(schema, dict):
            raise Unsupported(f"{path}: not an object schema")
        unknown = _keywords(schema) - {"required", "properties"}
        if unknown:
            raise Unsupported(f"{path}: {sorted(unknown)}")
        required = schema.get("required", [])
        properties = schema.get("properties", {})
        if not isinstance(required, list) or not isinstance(properties, dict):
            raise Unsupported(f"{path}: malformed required/properties")
        for name in [*required, *properties]:
            # undeclared: the struct cannot show it to us; odd names: not an attribute
            if name not in props or not name.isidentifier() or keyword.iskeyword(name):
                raise Unsupported(f"{path}: property {name!r}")
        return required, properties

    def _condition(self, schema: Any, props: dict[str, Any], path: str) -> str:
        """Exact: true iff the decoded object is valid against the ``if`` schema (it picks
        the branch, so being stricter here would be as wrong as being laxer)."""
        required, properties = self._names(schema, props, path)
        terms = [f"d.{n} is not _UNSET" for n in required]
        for name, sub in properties.items():
            if not isinstance(sub, dict) or _keywords(sub) not in ({"const"}, {"enum"}):
                raise Unsupported(f"{path}.{name}: only const or enum in an if")
            allowed = self._strings([sub["const"]] if "const" in sub else sub["enum"], path)
            terms.append(f"(d.{name} is _UNSET or (d.{name}.__class__ is str "
                         f"and d.{name} in {allowed}))")
        return "(" + " and ".join(terms or ["True"]) + ")"

    def _requirement(self, schema: Any, props: dict[str, Any], path: str) -> str:
        """Exact or stricter: false whenever the object is invalid against the schema."""
        if schema is None:
            return "True"
        required, properties = self._names(schema, props, path)
        terms = [f"d.{n} is not _UNSET" for n in required]
        for name, sub in properties.items():
            terms.append(f"(d.{name} is _UNSET or {self._value(sub, f'd.{name}', path)})")
        return "(" + " and ".join(terms or ["True"]) + ")"

    def _value(self, schema: Any, v: str, path: str) -> str:
        """Expression: the decoded value ``v`` is valid against a ``then``/``else`` property
        schema (exact, or stricter: an integral float is not an ``integer`` here)."""
        if not isinstance(schema, dict):
            raise Unsupported(f"{path}: property schema is not an object")
        unknown = _keywords(schema) - _RULE_SUPPORTED
        if unknown:
            raise Unsupported(f"{path}: {sorted(unknown)}")
        terms: list[str] = []
        if "type" in schema:
            types = schema["type"]
            py: set[type] = set()
            for t in [types] if isinstance(types, str) else list(types):
                if t not in _RULE_TYPES:
                    raise Unsupported(f"{path}: type {t!r} in a rule")
                py.update(_RULE_TYPES[t])
            terms.append(f"{v}.__class__ in {self._const(frozenset(py))}")
        if "minLength" in schema or "maxLength" in schema:
            lo = int(schema.get("minLength", 0))
            hi = schema.get("maxLength")
            bound = f"{lo} <= len({v})" + ("" if hi is None else f" <= {int(hi)}")
            terms.append(f"({v}.__class__ is not str or {bound})")
        if "const" in schema:
            allowed = self._strings([schema["const"]], path)
            terms.append(f"({v}.__class__ is str and {v} in {allowed})")
        if "enum" in schema:
            allowed = self._strings(schema["enum"], path)
            terms.append(f"({v}.__class__ is str and {v} in {allowed})")
        return "(" + " and ".join(terms or ["True"]) + ")"

    def type_of(self, schema: dict[str, Any], path: str, defer_date_time: bool = False) -> Any:
        keys = _keywords(schema)
        unknown = keys - _SUPPORTED
        if unknown:
            raise Unsupported(f"{path}: {sorted(unknown)}")
        types = schema.get("type")
        if types is None:
            if "enum" in schema or keys:
                raise Unsupported(f"{path}: constraints without a type")
            return Any
        tlist = [types] if isinstance(types, str) else list(types)
        nullable = "null" in tlist
        tlist = [t for t in tlist if t != "null"]
        if len(tlist) != 1:
            raise Unsupported(f"{path}: type {types!r}")
        base = self._one(tlist[0], schema, path, defer_date_time)
        return (base | None) if nullable else base

    def _one(self, kind: str, schema: dict[str, Any], path: str,
             defer_date_time: bool = False) -> Any:
        if "enum" in schema:
            values = [v for v in schema["enum"] if v is not None]
            if kind != "string" or not all(isinstance(v, str) for v in values) or not values:
                raise Unsupported(f"{path}: enum of {kind}")
            if set(schema) & {"minLength", "maxLength", "format"}:
                raise Unsupported(f"{path}: enum with string constraints")
            return Literal[tuple(values)]
        if kind == "string":
            meta: dict[str, Any] = {}
            if "minLength" in schema:
                meta["min_length"] = int(schema["minLength"])
            if "maxLength" in schema:
                meta["max_length"] = int(schema["maxLength"])
            if "format" in schema:
                if defer_date_time and schema["format"] == "date-time":
                    name = path.rsplit(".", 1)[1]
                    if not name.isidentifier() or keyword.iskeyword(name):
                        raise Unsupported(f"{path}: property name")
                    self.dt_fields.append((name, False))  # struct() may set it to True
                else:
                    meta["pattern"] = _format_pattern(schema["format"])
            return Annotated[str, msgspec.Meta(**meta)] if meta else str
        if kind in ("integer", "number"):
            base: Any = int if kind == "integer" else float
            meta = {}
            if "minimum" in schema:
                meta["ge"] = schema["minimum"]
            if "maximum" in schema:
                meta["le"] = schema["maximum"]
            return Annotated[base, msgspec.Meta(**meta)] if meta else base
        if kind == "boolean":
            return bool
        if kind == "array":
            items = schema.get("items")
            if not isinstance(items, dict):
                raise Unsupported(f"{path}: array without a single items schema")
            inner = self.type_of(items, path + "[]")
            meta = {}
            if "minItems" in schema:
                meta["min_length"] = int(schema["minItems"])
            if "maxItems" in schema:
                meta["max_length"] = int(schema["maxItems"])
            list_type: Any = list.__class_getitem__(inner)
            return Annotated[list_type, msgspec.Meta(**meta)] if meta else list_type
        if kind == "object":
            return self.struct(schema, path)
        # (struct() is only reached through type_of, which rejected unknown keywords)
        raise Unsupported(f"{path}: type {kind!r}")

    def struct(self, schema: dict[str, Any], path: str, root: bool = False) -> Any:
        if root:
            unknown = _keywords(schema) - _SUPPORTED
            if unknown:
                raise Unsupported(f"{path}: {sorted(unknown)}")
        extra = schema.get("additionalProperties", True)
        if extra not in (True, False):
            raise Unsupported(f"{path}: additionalProperties schema")
        props: dict[str, Any] = schema.get("properties", {})
        required = set(schema.get("required", ()))
        if not required <= set(props):
            raise Unsupported(f"{path}: required field without a property schema")
        fields: list[Any] = []
        for name, sub in props.items():
            t = self.type_of(sub, f"{path}.{name}", defer_date_time=root)
            if root and self.dt_fields and self.dt_fields[-1] == (name, False):
                types = sub.get("type")
                nullable = types == "null" or (isinstance(types, list) and "null" in types)
                self.dt_fields[-1] = (name, name in required and not nullable)
            if name in required:
                fields.append((name, t))
            else:
                fields.append((name, t | msgspec.UnsetType, msgspec.UNSET))
        self.n += 1
        return msgspec.defstruct(
            f"_{self.entity}_{self.n}", fields, kw_only=True,
            forbid_unknown_fields=extra is False,
        )


def _post_check(entity: str, dt_fields: list[tuple[str, bool]], rules: list[str],
                consts: dict[str, Any]) -> Callable[[Any], bool]:
    """Generate the check msgspec cannot do in its decode pass, for one entity's events.

    The generated function (``event`` decoded, op/data consistency already checked)::

        def post(event):
            d = event.data
            if d is None:                       # delete: only ts
                return _M[1](event.ts) is not None
            if not <rule 0>: return False       # root allOf if/then/else rules
            parts = [event.ts]
            v = d.<required, non-null date-time field>
            if v not in parts: parts.append(v)   # equal values need one check (usual: = ts)
            v = d.<optional or nullable date-time field>
            if v.__class__ is str and v not in parts: parts.append(v)  # null/absent: none
            return _M[len(parts)]("\\n".join(parts)) is not None
    """
    fixed = [name for name, always in dt_fields if always]
    optional = [name for name, always in dt_fields if not always]
    lines = ["def post(event):",
             "    d = event.data",
             "    if d is None:",
             "        return _M[1](event.ts) is not None"]
    lines += [f"    if not {rule}:\n        return False" for rule in rules]
    lines.append("    parts = [event.ts]")
    for name in fixed:
        lines += [f"    v = d.{name}", "    if v not in parts:", "        parts.append(v)"]
    for name in optional:
        lines += [f"    v = d.{name}", "    if v.__class__ is str and v not in parts:",
                  "        parts.append(v)"]
    lines.append('    return _M[len(parts)]("\\n".join(parts)) is not None')
    namespace: dict[str, Any] = {
        **consts,
        "_UNSET": msgspec.UNSET,
        # _M[k]: exactly k date-times joined by "\n" (index 0 unused)
        "_M": [None, *(_dt_matcher(k) for k in range(1, len(dt_fields) + 2))],
    }
    exec(compile("\n".join(lines), f"<fastcheck {entity}>", "exec"), namespace)
    post: Callable[[Any], bool] = namespace["post"]
    return post


class FastAccept:
    """Decides in one msgspec decode whether raw bytes are a certainly-valid change event."""

    def __init__(self, registry: SchemaRegistry) -> None:
        self.unsupported: dict[str, str] = {}
        envelopes: list[Any] = []
        self._entity_of_type: dict[type, tuple[str, Callable[[Any], bool]]] = {}
        for entity in registry.entities:
            compiler = _Compiler(entity)
            try:
                data_type = compiler.root(registry.json_schema(entity))
            except Unsupported as exc:
                self.unsupported[entity] = str(exc)
                continue
            env = msgspec.defstruct(
                f"_{entity}_event",
                [
                    ("op", Literal["upsert", "delete"]),
                    ("key", Annotated[str, msgspec.Meta(min_length=1,
                                                        max_length=registry.key_max_length)]),
                    # ts: RFC 3339, checked by the post-decode check with data's date-times
                    ("ts", str),
                    ("schema_version", Literal[registry.schema_version(entity)]),
                    ("version", Annotated[int, msgspec.Meta(ge=0)] | None, None),
                    ("data", data_type | None, None),
                ],
                kw_only=True, forbid_unknown_fields=True, tag_field="entity", tag=entity,
            )
            envelopes.append(env)
            post = _post_check(entity, compiler.dt_fields, compiler.rules, compiler.consts)
            self._entity_of_type[env] = (entity, post)
        self._decoder: msgspec.json.Decoder[Any] | None = None
        if envelopes:
            union = envelopes[0] if len(envelopes) == 1 else Union[tuple(envelopes)]  # noqa: UP007
            self._decoder = msgspec.json.Decoder(union)

    def entity_of(self, raw: bytes) -> str | None:
        """The event's entity if ``raw`` is certainly a valid event, else ``None`` (unknown)."""
        decoder = self._decoder
        if decoder is None:
            return None
        try:
            event = decoder.decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError, ValueError):
            # ValueError covers UnicodeDecodeError (invalid UTF-8): never raise on bad input
            return None
        if (event.data is None) == (event.op == "upsert"):
            return None  # upsert without data / delete with data: let the slow path say so
        entity, post = self._entity_of_type[type(event)]
        return entity if post(event) else None
