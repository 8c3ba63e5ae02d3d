"""The restore target plug point.

A target receives, per entity, the live rows in key order and must make them visible
**atomically** at :meth:`Target.commit`: before it, nothing of this restore is visible (a
fresh schema inside an open transaction, a temp file, a temp directory); after a crash at
any moment, either the complete result or nothing is there, and a rerun succeeds.

Call order: ``open`` -> (``write`` per entity) -> ``read_digest`` per entity -> ``record``
-> ``commit``; ``abort`` on any failure (safe to call at any point, idempotent).

A relational target (:class:`CodecTarget`) is handed the live changes instead and converts
them with a :class:`~replicator.restore.rowcodec.RowCodec` (native when built), which also
computes the backup side of the digest in the same pass.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from replicator.restore.digest import StateDigest
from replicator.restore.layout import TableLayout
from replicator.restore.replay import LiveRow

if TYPE_CHECKING:
    from collections.abc import Callable

    from replicator.restore.digest import DigestBuilder
    from replicator.restore.planner import RestorePlan
    from replicator.restore.replay import Change
    from replicator.restore.rowcodec import RowCodec, RowTarget

#: One row as handed to a target: the winning change and its parsed event (``data`` inside).
RowIn = tuple[LiveRow, dict[str, Any]]


@dataclass(frozen=True, slots=True)
class RestoreRecord:
    """What the ``replicator_restores`` table keeps about a restore."""

    restore_id: str
    at: str | None
    at_ms: int | None
    cut: list[dict[str, Any]]
    counts: dict[str, int]
    digests: dict[str, str]
    started_at: str
    finished_at: str
    replicator_version: str


class Target(Protocol):
    #: where the result becomes visible, for messages (no credentials)
    location: str

    async def open(self, *, replace: bool) -> None:
        """Connect and check the destination; refuse one that holds data unless ``replace``."""

    async def write(self, layout: TableLayout, rows: Iterable[RowIn]) -> int:
        """Write one entity's rows (key order); returns the number written."""

    async def read_digest(self, layout: TableLayout) -> StateDigest:
        """The state digest of what the (not yet visible) result holds for an entity."""

    async def record(self, rec: RestoreRecord) -> None:
        """Store the restore's record alongside the data."""

    async def commit(self) -> None:
        """Make everything visible at once."""

    async def abort(self) -> None:
        """Discard everything written (idempotent)."""


class CodecTarget(Target, Protocol):
    #: the row form the target takes (``pg`` or ``sqlite``)
    row_target: RowTarget

    async def write_codec(self, codec: RowCodec, plan: RestorePlan,
                          changes: dict[str, Change], digest: DigestBuilder,
                          progress: Callable[[int], None] | None = None) -> int:
        """Write one entity's live ``changes`` converted by ``codec`` (key order), feeding
        ``digest``; returns the number written."""
