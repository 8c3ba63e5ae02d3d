"""The state digest: per entity, a row count and an order-independent hash of the rows.

``row hash = BLAKE2b-128(orjson([key, canonical(data column values)...]))`` read as a
big-endian integer (timestamps as integer microseconds since the epoch, JSON as sorted-key
JSON text; see :mod:`replicator.restore.layout`). The entity's hash is the sum of its row
hashes modulo 2**128: a sum (not XOR) so that two identical rows never cancel out, and
order-independent so that a target can be read back in any order. Only the key and the
data columns take part -- not the ``_version``/``_offset`` bookkeeping -- so the digest
describes the *state*: a snapshot (a later issue) and a replay of segments that reach the
same state agree.

The text form is ``<count>:<32 hex digits>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from hashlib import blake2b
from typing import Any

import orjson

_MASK = (1 << 128) - 1


@dataclass(frozen=True, slots=True)
class StateDigest:
    entity: str
    count: int
    value: int

    @property
    def hex(self) -> str:
        return f"{self.value:032x}"

    def __str__(self) -> str:
        return f"{self.count}:{self.hex}"

    def to_json(self) -> dict[str, Any]:
        return {"entity": self.entity, "rows": self.count, "digest": self.hex}


class DigestBuilder:
    """Accumulates rows (key + canonical data values) into a :class:`StateDigest`."""

    __slots__ = ("_acc", "count", "entity")

    def __init__(self, entity: str) -> None:
        self.entity = entity
        self.count = 0
        self._acc = 0

    def add(self, key: str, canonical_values: tuple[Any, ...]) -> None:
        h = blake2b(orjson.dumps((key, *canonical_values)), digest_size=16).digest()
        self._acc = (self._acc + int.from_bytes(h, "big")) & _MASK
        self.count += 1

    def add_sum(self, count: int, value: int) -> None:
        """Add ``count`` rows whose row hashes sum to ``value`` (computed elsewhere)."""
        self._acc = (self._acc + value) & _MASK
        self.count += count

    def result(self) -> StateDigest:
        return StateDigest(self.entity, self.count, self._acc)
