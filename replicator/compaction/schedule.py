"""The backup schedule: which snapshot kind is due, and the service task that runs it.

:func:`due_kind` is pure (now + existing snapshots + settings -> a kind or ``None``). The
service's :class:`Scheduler` runs each due compaction -- and retention -- as a child process
(``python -m replicator compact``), so the CPU-heavy merge never competes with ingest for
the event loop or the GIL, and a crash of either cannot take the other down.

Precedence when several kinds are due: archive, full, differential, incremental (one per
check; the next check picks up the rest). Ages are measured from each snapshot's creation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path

import orjson

from replicator.config import CompactionSettings, RetentionSettings
from replicator.errors import ReplicatorError
from replicator.snapshot.manifest import FULL_KINDS, Manifest

log = logging.getLogger(__name__)


def _die_with_parent() -> None:
    """In the child: be killed when the service dies (Linux ``PR_SET_PDEATHSIG``), so a
    SIGKILLed service never leaves a compaction running on its own."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def due_kind(now_ms: int, snapshots: Iterable[Manifest], s: CompactionSettings) -> str | None:
    snaps = list(snapshots)

    def age_s(kinds: Sequence[str]) -> float | None:
        times = [m.created_ms for m in snaps if m.kind in kinds]
        return (now_ms - max(times)) / 1000 if times else None

    full_age = age_s(FULL_KINDS)
    if full_age is None:
        return "full"
    archive_age = age_s(("archive",))
    if archive_age is None or archive_age >= s.archive_s:
        return "archive"
    if full_age >= s.full_s:
        return "full"
    diff_age = age_s(("differential", *FULL_KINDS))
    if diff_age is not None and diff_age >= s.differential_s:
        return "differential"
    any_age = age_s(("full", "archive", "differential", "incremental"))
    if any_age is not None and any_age >= s.incremental_s:
        return "incremental"
    return None


class Scheduler:
    """Runs the schedule until ``stop`` is set. Failures are logged and retried at the next
    check; they never stop ingest.

    With several instances in one consumer group sharing a store, ``is_leader`` elects the
    one that compacts and applies retention: the service passes "this instance is assigned
    partition 0 of the first topic", which Kafka's group protocol gives to exactly one member
    at a time (a rebalance may briefly overlap two; the store's create-only puts keep each
    snapshot whole, and a leftover is swept by the next run)."""

    def __init__(self, *, compaction: CompactionSettings, retention: RetentionSettings,
                 list_snapshots: Callable[[], Awaitable[list[Manifest]]],
                 config_path: Path | None,
                 is_leader: Callable[[], bool] = lambda: True,
                 on_written: Callable[[], None] | None = None) -> None:
        self.compaction = compaction
        self.retention = retention
        self._list = list_snapshots
        self._config_path = config_path
        self.last_result: dict[str, object] | None = None
        self.last_error: str | None = None
        self._last_retention = 0.0
        self._is_leader = is_leader
        #: called after a snapshot was written (the fan-out copies it to the destinations)
        self._on_written = on_written

    def _argv(self, *args: str) -> list[str]:
        cfg = ["--config", str(self._config_path)] if self._config_path else []
        return [sys.executable, "-m", "replicator", *cfg, *args]

    async def _child(self, *args: str) -> dict[str, object] | None:
        proc = await asyncio.create_subprocess_exec(
            *self._argv(*args), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, preexec_fn=_die_with_parent)
        try:
            out, err = await proc.communicate()
        except asyncio.CancelledError:
            proc.kill()  # an interrupted compaction leaves nothing visible (swept next run)
            await proc.wait()
            raise
        if proc.returncode != 0:
            self.last_error = err.decode(errors="replace").strip()
            quiet = "nothing to compact" in self.last_error or "nothing new" in self.last_error
            (log.info if quiet else log.warning)(
                "replicator %s failed (exit %s): %s", " ".join(args), proc.returncode,
                self.last_error)
            return None
        self.last_error = None
        doc: dict[str, object] = orjson.loads(out)
        return doc

    async def check(self) -> str | None:
        """One scheduling step: run the due compaction (if any) and retention (when its
        interval has passed); return the kind run. Only the leader does anything: with
        several instances sharing a store, one compactor at a time (see :meth:`run`)."""
        if not self._is_leader():
            return None
        kind = due_kind(int(time.time() * 1000), await self._list(), self.compaction)
        if kind is not None:
            res = await self._child("compact", "--kind", kind, "--json")
            if res is not None:
                self.last_result = res
                log.info("snapshot %s (%s) written", res.get("id"), kind)
                if self._on_written is not None:
                    self._on_written()
        if self.retention.enabled and (
                time.monotonic() - self._last_retention >= self.retention.interval_s):
            self._last_retention = time.monotonic()
            await self._child("retention", "apply", "--confirm", "--json")
        return kind

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.check()
            except (ReplicatorError, OSError, ValueError) as exc:
                # a store hiccup (a manifest removed mid-listing, an unreadable one) must not
                # end the schedule: log it and try again at the next check
                self.last_error = str(exc)
                log.warning("backup schedule check failed: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.compaction.check_interval_s)
