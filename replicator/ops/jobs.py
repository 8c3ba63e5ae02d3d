"""Restore jobs of the admin API (``POST /v1/restores``, ``GET /v1/restores/{id}``).

A job is a ``replicator restore --json`` child process, so a restore never competes with
ingest for the service's event loop or memory, and behaves exactly like the command (plan,
digest verification, atomic visibility, exit codes). The target URL reaches the child in
its environment (``REPLICATOR_RESTORE_TARGET``), never on its command line, and is shown
everywhere else without its password.

Requests are checked before anything starts (:func:`restore_argv`, pure): exactly one of
``at``/``offsets``; a SQLite or JSONL target must lie inside ``<data_dir>/restores/`` (the
API never writes elsewhere on this machine); names are checked like the CLI checks them.
One job runs at a time; others wait in order. Finished jobs are kept as JSON files under
``<data_dir>/restores/jobs/`` and answer ``GET`` after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from replicator.compaction.schedule import _die_with_parent
from replicator.errors import BadRequestError
from replicator.redact import redact_text, redact_url
from replicator.restore.point import format_ms

log = logging.getLogger(__name__)

TARGET_ENV = "REPLICATOR_RESTORE_TARGET"
JOB_ID = re.compile(r"[0-9a-f]{16}")
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_ALLOWED = {"at", "offsets", "target", "entities", "keys", "replace", "swap_into"}


@dataclass
class Job:
    id: str
    request: dict[str, Any]
    state: str = "queued"  # queued | running | succeeded | failed
    created: str = field(default_factory=lambda: format_ms(int(time.time() * 1000)))
    started: str | None = None
    finished: str | None = None
    exit_code: int | None = None
    result: dict[str, Any] | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def restores_dir(data_dir: Path) -> Path:
    return (data_dir / "restores").resolve()


def _str_list(body: Mapping[str, Any], name: str) -> list[str] | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, str):
        value = [v for v in value.split(",") if v]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise BadRequestError(f"{name}: a list of strings")
    return value


def restore_argv(body: Any, data_dir: Path, job_id: str) -> tuple[list[str], str, str]:
    """(arguments after ``restore``, target URL, target as shown) for a request body, or
    BadRequestError naming what is wrong. Pure: touches nothing."""
    if not isinstance(body, dict):
        raise BadRequestError("the body must be a JSON object")
    unknown = sorted(set(body) - _ALLOWED)
    if unknown:
        raise BadRequestError(f"unknown field(s) {unknown}; known: {sorted(_ALLOWED)}")
    for field_name, field_value in body.items():
        items = field_value if isinstance(field_value, list) else [field_value]
        if any(isinstance(v, str) and ("\0" in v or "\n" in v) for v in items):
            raise BadRequestError(f"{field_name}: control characters are not allowed")
    at, offsets = body.get("at"), body.get("offsets")
    if (at is None) == (offsets is None):
        raise BadRequestError("give exactly one of 'at' (RFC 3339 time, -15m, latest) or "
                              "'offsets' (topic:partition:end,...)")
    args: list[str] = ["--json"]
    for name, value in (("at", at), ("offsets", offsets)):
        if value is not None:
            if not isinstance(value, str) or not value or "\n" in value:
                raise BadRequestError(f"{name}: a non-empty string")
            args.append(f"--{name}={value}")
    for name in ("entities", "keys"):
        values = _str_list(body, name)
        if values is not None:
            if name == "entities" and not all(_NAME.match(v) for v in values):
                raise BadRequestError("entities: names of letters, digits, . _ -")
            args.append(f"--{name}={','.join(values)}")
    for flag in ("replace",):
        value = body.get(flag, False)
        if not isinstance(value, bool):
            raise BadRequestError(f"{flag}: true or false")
        if value:
            args.append(f"--{flag}")
    swap = body.get("swap_into")
    if swap is not None:
        if not isinstance(swap, str) or not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", swap):
            raise BadRequestError("swap_into: a schema name (a-z 0-9 _, max 63)")
        args.append(f"--swap-into={swap}")
    target = body.get("target")
    root = restores_dir(data_dir)
    if target is None:
        target = f"sqlite://{root / f'api-{job_id}.db'}"
    if not isinstance(target, str):
        raise BadRequestError("target: a URL string")
    if target.startswith(("sqlite://", "jsonl://")):
        scheme, raw = target.split("://", 1)
        path = Path(raw)
        if not path.is_absolute() or ".." in path.parts or "\0" in raw:
            raise BadRequestError(f"target: a {scheme} path must be absolute, inside {root}")
        resolved = path.resolve()
        if not resolved.is_relative_to(root) or resolved == root:
            raise BadRequestError(f"target: {scheme} targets of the API must lie inside "
                                  f"{root}")
        if resolved.is_relative_to(root / "jobs"):
            raise BadRequestError(f"target: {root / 'jobs'} holds the job records")
        target = f"{scheme}://{resolved}"
    elif not target.startswith(("postgresql://", "postgres://", "kafka://")):
        raise BadRequestError("target: postgresql://, kafka://, or sqlite:// / jsonl:// "
                              f"inside {root}")
    return args, target, redact_url(target)


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


class RestoreJobs:
    """Runs restore requests one at a time as child processes; keeps their outcome."""

    def __init__(self, *, data_dir: Path, config_path: Path | None, keep: int = 200) -> None:
        self.data_dir = data_dir
        self.config_path = config_path
        self.keep = keep
        self._jobs: dict[str, Job] = {}
        self._queue: asyncio.Queue[tuple[Job, list[str], str]] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._proc: asyncio.subprocess.Process | None = None

    def _jobs_dir(self) -> Path:
        return restores_dir(self.data_dir) / "jobs"

    def submit(self, body: Any) -> Job:
        """Check and queue a request; BadRequestError before anything is queued."""
        job_id = uuid.uuid4().hex[:16]
        args, target, shown = restore_argv(body, self.data_dir, job_id)
        request = {k: v for k, v in body.items() if k != "target"}
        job = Job(id=job_id, request={**request, "target": shown})
        self._jobs[job_id] = job
        self._queue.put_nowait((job, args, target))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._run(), name="restore-jobs")
        log.info("restore job queued", extra={"job": job_id, "target": shown})
        return job

    def get(self, job_id: str) -> Job | None:
        if not JOB_ID.fullmatch(job_id):
            return None
        job = self._jobs.get(job_id)
        if job is not None:
            return job
        path = self._jobs_dir() / f"{job_id}.json"
        try:
            doc = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return None
        return Job(**doc)

    async def stop(self) -> None:
        """Kill a running restore (its target stays invisible: a restore commits
        atomically) and record it and every queued job as failed ("interrupted")."""
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._worker
        for job in self._jobs.values():
            if job.state in ("queued", "running"):
                job.state, job.error = "failed", "interrupted: the service stopped"
                job.finished = format_ms(int(time.time() * 1000))
                with contextlib.suppress(OSError):
                    self._persist(job)

    def sweep(self) -> int:
        """Remove scratch leftovers of restores killed with an earlier service (only the
        ones no live restore holds); returns how many."""
        from replicator.targets import scratch

        root = restores_dir(self.data_dir)
        if not root.is_dir():
            return 0
        n = 0
        dests = {root / p.name[1:].split(".tmp-restore-")[0].split(".new-restore-")[0]
                 for p in root.iterdir()
                 if p.name.startswith(".") and ("-restore-" in p.name)}
        for dest in dests:
            n += scratch.sweep(dest, _remove)
        return n

    async def _run(self) -> None:
        while not self._queue.empty():
            job, args, target = await self._queue.get()
            try:
                await self._one(job, args, target)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a job fails; the worker goes on with the next
                job.state, job.error = "failed", redact_text(f"{type(exc).__name__}: {exc}")
                job.finished = format_ms(int(time.time() * 1000))
                log.error("restore job failed to run", extra={"job": job.id})
                with contextlib.suppress(OSError):
                    self._persist(job)

    async def _one(self, job: Job, args: list[str], target: str) -> None:
        argv = [sys.executable, "-m", "replicator"]
        if self.config_path is not None:
            argv += ["--config", str(self.config_path)]
        argv += ["restore", *args]
        restores_dir(self.data_dir).mkdir(parents=True, exist_ok=True)
        env = {**os.environ, TARGET_ENV: target}
        job.state, job.started = "running", format_ms(int(time.time() * 1000))
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                env=env, stdin=asyncio.subprocess.DEVNULL, preexec_fn=_die_with_parent)
            out, err = await self._proc.communicate()
            job.exit_code = self._proc.returncode
        except OSError as exc:
            job.exit_code, out, err = -1, b"", str(exc).encode()
        job.finished = format_ms(int(time.time() * 1000))
        if job.exit_code == 0:
            try:
                job.result = orjson.loads(out)
                job.state = "succeeded"
            except orjson.JSONDecodeError:
                job.state, job.error = "failed", "restore printed no JSON report"
        else:
            job.state = "failed"
            lines = [ln for ln in err.decode(errors="replace").splitlines() if ln.strip()]
            job.error = redact_text(lines[-1]) if lines else f"exit code {job.exit_code}"
        if job.result is not None and isinstance(job.result.get("target"), str):
            job.result["target"] = redact_url(job.result["target"])
        log.info("restore job finished", extra={"job": job.id, "state": job.state,
                                                 "exit_code": job.exit_code})
        self._persist(job)

    def _persist(self, job: Job) -> None:
        d = self._jobs_dir()
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".tmp-{job.id}.json"
        tmp.write_bytes(orjson.dumps(job.to_json()))
        os.replace(tmp, d / f"{job.id}.json")
        done = sorted((p for p in d.glob("*.json")), key=lambda p: p.stat().st_mtime)
        for old in done[:-self.keep]:
            with contextlib.suppress(OSError):
                old.unlink()
        if len(self._jobs) > self.keep:
            for jid in [j for j, v in self._jobs.items() if v.finished][:-self.keep]:
                self._jobs.pop(jid, None)
