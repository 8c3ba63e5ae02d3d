"""Scheduled drills: the service runs ``replicator drill --json`` as a child process every
``drill.interval_s`` and exports the last result as metrics.

:func:`drill_due` is pure. The schedule counts from the newest kept report (so a restart
does not drill again at once), runs on the leader only (the instance that also compacts),
and a failed drill is a report and a metric (``replicator_drill_ok 0``), never a reason to
stop ingest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from replicator.compaction.schedule import _die_with_parent
from replicator.config import DrillSettings
from replicator.metrics import Metrics
from replicator.ops.drill import load_history, save_report
from replicator.redact import redact_text
from replicator.restore.point import format_ms

log = logging.getLogger(__name__)


#: seconds a stopping service gives a running drill to remove its scratch target
STOP_GRACE_S = 8.0

#: with no drill on record, the first one runs this long after the service started (there
#: is something to restore by then), or after drill.interval_s if that is shorter
FIRST_DELAY_S = 600.0


def drill_due(now_ms: int, last_ms: int | None, interval_s: float, started_ms: int) -> bool:
    if last_ms is None:
        return now_ms - started_ms >= min(interval_s, FIRST_DELAY_S) * 1000
    return now_ms - last_ms >= interval_s * 1000


def export(metrics: Metrics, report: dict[str, Any]) -> None:
    metrics.drill_ok.set(1 if report.get("ok") else 0)
    metrics.drill_timestamp.set(report.get("time_ms", 0) / 1000)
    if report.get("ok"):
        metrics.drill_rto.set(report.get("rto_extrapolated_s") or 0)
    if report.get("rpo_s") is not None:
        metrics.drill_rpo.set(report["rpo_s"])


class DrillScheduler:
    """Runs drills on the schedule until ``stop`` is set."""

    def __init__(self, *, settings: DrillSettings, data_dir: Path, metrics: Metrics,
                 config_path: Path | None, is_leader: Callable[[], bool] = lambda: True,
                 check_interval_s: float = 60.0) -> None:
        self.settings = settings
        self.data_dir = data_dir
        self.metrics = metrics
        self.config_path = config_path
        self.is_leader = is_leader
        self.check_interval_s = check_interval_s
        self.last: dict[str, Any] | None = None
        self.started_ms = int(time.time() * 1000)
        history = load_history(data_dir)
        if history:
            self.last = history[-1]
            export(metrics, self.last)

    async def run_one(self) -> dict[str, Any] | None:
        cfg = ["--config", str(self.config_path)] if self.config_path else []
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "replicator", *cfg, "drill", "--json",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL, preexec_fn=_die_with_parent)
        try:
            out, err = await proc.communicate()
        except asyncio.CancelledError:
            # SIGTERM first: the drill removes its scratch database or schema on the way
            # out; SIGKILL only if it does not end within the grace period
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
            raise
        try:
            report: dict[str, Any] = orjson.loads(out)
        except orjson.JSONDecodeError:
            # no report at all: a failed drill all the same, kept and exported as one
            detail = redact_text(err.decode(errors="replace").strip()[-500:])
            now = int(time.time() * 1000)
            report = {"id": f"failed-{now}", "time": format_ms(now), "time_ms": now,
                      "ok": False, "error": f"drill exited {proc.returncode} without a "
                      f"report: {detail}", "error_type": "internal", "rpo_s": None,
                      "objectives": {}, "rto_met": False, "rpo_met": False}
            with contextlib.suppress(OSError):
                save_report(self.data_dir, report, self.settings.keep)
        self.last = report
        export(self.metrics, report)
        (log.info if report.get("ok") else log.error)(
            "drill %s: %s", report.get("id"),
            f"ok, RTO {report.get('rto_extrapolated_s')}s, RPO {report.get('rpo_s')}s"
            if report.get("ok") else f"FAILED: {report.get('error')}")
        return report

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            last_ms = self.last.get("time_ms") if self.last else None
            if self.is_leader() and drill_due(int(time.time() * 1000), last_ms,
                                              self.settings.interval_s, self.started_ms):
                one = asyncio.create_task(self.run_one())
                stopping = asyncio.create_task(stop.wait())
                try:
                    await asyncio.wait({one, stopping}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stopping.cancel()
                    if not one.done():
                        one.cancel()  # the service stops: the drill cleans up and ends
                    try:
                        await one
                    except asyncio.CancelledError:
                        if not stop.is_set():
                            raise
                    except OSError as exc:
                        log.warning("drill could not start: %s", exc)
                if self.last is None or self.last.get("time_ms") == last_ms:
                    # no new report: wait a whole interval rather than retrying at once
                    self.last = {**(self.last or {}), "time_ms": int(time.time() * 1000)}
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.check_interval_s)
