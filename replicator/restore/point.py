"""The point a restore targets: a time, ``latest``, or explicit per-partition offsets.

Accepted ``--at`` forms (anything else is refused with this list):

* RFC 3339 with an explicit offset: ``2026-11-26T10:42:17Z``, ``2026-11-26T10:42:17.250+01:00``
  (a time without ``Z``/``±hh:mm`` is ambiguous and refused);
* relative to now: ``-15m``, ``-2h``, ``-1h30m``, ``-45s``, ``-7d``;
* ``@<epoch milliseconds>``: ``@1764153737000``;
* ``latest``: the newest point every partition has durably covered.

Times are resolved to epoch milliseconds and compared with Kafka record timestamps (ms):
restoring to T includes every record whose timestamp is ``<= T``; sub-millisecond digits
are truncated, which gives the same set of records.

``--offsets topic:partition:offset,...`` gives, per partition, the **end** offset
(exclusive, like Kafka's committed offsets): records with ``offset < end`` are included.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from replicator.errors import BadRequestError

ACCEPTED = (
    "RFC 3339 with a zone (2026-11-26T10:42:17Z, 2026-11-26T10:42:17.250+01:00), "
    "relative (-15m, -1h30m, -7d), @<epoch ms>, or 'latest'"
)

_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$"
)
_RELATIVE = re.compile(r"^-((?:\d+[smhdw])+)$")
_REL_PART = re.compile(r"(\d+)([smhdw])")
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}


def _is_digits(s: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also accepts characters ``int()`` refuses (``²``)."""
    return s.isascii() and s.isdigit()


@dataclass(frozen=True, slots=True)
class AtTime:
    """Restore to a time: records with timestamp ``<= ts_ms``."""

    ts_ms: int


@dataclass(frozen=True, slots=True)
class Latest:
    """Restore to the newest point every selected partition has durably covered."""


@dataclass(frozen=True, slots=True)
class AtOffsets:
    """Restore exactly up to these end offsets (exclusive), one per partition."""

    ends: dict[tuple[str, int], int]


Point = AtTime | Latest | AtOffsets


def parse_time(text: str, *, now_ms: int | None = None) -> int:
    """A time in one of the accepted forms (not ``latest``) -> epoch milliseconds."""
    s = text.strip()
    if s.startswith("@"):
        digits = s[1:]
        if not _is_digits(digits):
            raise BadRequestError(
                f"malformed time {text!r}: expected @<epoch ms>; accepted: {ACCEPTED}"
            )
        return int(digits)
    m = _RELATIVE.match(s)
    if m:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        return now - sum(int(n) * _UNIT_MS[u] for n, u in _REL_PART.findall(m.group(1)))
    if not _RFC3339.match(s):
        hint = ""
        if re.match(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(:\d{2})?(\.\d+)?$", s):
            hint = " (no time zone: add Z for UTC or an offset like +02:00)"
        raise BadRequestError(f"malformed time {text!r}{hint}; accepted: {ACCEPTED}")
    frac = ""
    if "." in s:
        head, rest = s.split(".", 1)
        m_frac = re.match(r"\d+", rest)
        frac = m_frac.group(0) if m_frac else ""
        s = head + rest[len(frac):]
    try:
        dt = datetime.fromisoformat(s.replace("z", "Z").replace("t", "T"))
    except ValueError as exc:
        raise BadRequestError(f"malformed time {text!r}: {exc}; accepted: {ACCEPTED}") from None
    ms = int((frac + "000")[:3]) if frac else 0
    return int(dt.astimezone(UTC).timestamp()) * 1000 + ms


def parse_at(text: str, *, now_ms: int | None = None) -> AtTime | Latest:
    if text.strip().lower() == "latest":
        return Latest()
    return AtTime(parse_time(text, now_ms=now_ms))


def parse_offsets(text: str) -> AtOffsets:
    """``topic:partition:offset,...`` -> :class:`AtOffsets` (end offsets, exclusive)."""
    ends: dict[tuple[str, int], int] = {}
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        parts = item.rsplit(":", 2)
        if (len(parts) != 3 or not parts[0] or not _is_digits(parts[1])
                or not _is_digits(parts[2])):
            raise BadRequestError(
                f"malformed offset {item!r}: expected topic:partition:offset "
                "(end offset, exclusive), e.g. attendance:0:1500"
            )
        tp = (parts[0], int(parts[1]))
        if tp in ends:
            raise BadRequestError(f"offset for {tp[0]}:{tp[1]} given twice")
        ends[tp] = int(parts[2])
    if not ends:
        raise BadRequestError("--offsets is empty: expected topic:partition:offset,...")
    return AtOffsets(ends)


def format_ms(ms: int | None) -> str:
    """Epoch ms -> RFC 3339 UTC with milliseconds (``-`` for None)."""
    if ms is None:
        return "-"
    dt = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
