"""The HTTP endpoint of a running replicator: health, metrics and the admin API.

``/healthz`` (the process is alive and its spool has not failed) and ``/readyz``
(partitions assigned and consuming) are open; everything else needs ``Authorization:
Bearer <token>`` (:mod:`replicator.auth`; a missing or wrong token is 401 with nothing
else said): ``/metrics`` (Prometheus text), ``/v1/openapi.json`` (the API's OpenAPI
document, :mod:`replicator.openapi`), ``/v1/status``, ``/v1/backups``, ``POST
/v1/restores`` and ``GET /v1/restores/{id}`` (restore jobs, :mod:`replicator.ops.jobs`),
``/v1/destinations`` (the fan-out's state per destination) and
``/v1/tail?p=<topic>:<partition>:<from>&...&wait_ms=M``
(live followers: the durable blocks holding offsets ``>= from`` of every requested partition
this instance owns, in one response, long-polled up to ``M`` ms when there are none;
``head=1``: only the header, no blocks).
Binds to loopback by default.

Tail response body: frames of ``<qiIH`` (wall-clock ms at which the block became durable,
partition, block length, topic length), the topic (UTF-8), then the block exactly as in a
segment file (docs/FORMAT.md §2.2). Header ``X-Replicator-Partitions``: JSON
``{"topic:partition": [durable end, oldest buffered offset or null]}`` for the requested
partitions owned here (absent: not owned); a follower needing offsets below the oldest
buffered one reads sealed segments.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from replicator.auth import Tokens, bearer
from replicator.errors import BadRequestError, ReplicatorError
from replicator.metrics import Metrics

log = logging.getLogger(__name__)

TAIL_FRAME = struct.Struct("<qiIH")
#: what a tail source returns for one partition: (durable end, blocks, oldest buffered)
TailFn = Callable[[str, int, int], "tuple[int, list[tuple[int, bytes]], int | None] | None"]
DocFn = Callable[[], Awaitable[dict[str, Any]]]
#: paths answered without a token
PUBLIC = frozenset({"/healthz", "/readyz"})


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _dumps(obj: Any) -> str:
    import orjson

    return orjson.dumps(obj).decode()


class HealthServer:
    """aiohttp server; ``healthy``/``ready`` are callables polled per request.

    ``tokens``: the accepted bearer tokens (None or empty: every protected path is 401).
    ``status``/``backups``: coroutines producing those documents (404 when absent);
    ``jobs``: the restore-job runner (404 when absent).
    """

    def __init__(
        self,
        *,
        metrics: Metrics,
        host: str,
        port: int,
        healthy: Callable[[], bool],
        ready: Callable[[], bool],
        tail: TailFn | None = None,
        destinations: Callable[[], list[dict[str, Any]]] | None = None,
        tokens: Tokens | None = None,
        status: DocFn | None = None,
        backups: DocFn | None = None,
        jobs: Any = None,
    ) -> None:
        self.metrics = metrics
        self.host = host
        self.port = port
        self._healthy = healthy
        self._ready = ready
        self._tail = tail
        self._destinations = destinations
        self._tokens = tokens
        self._status = status
        self._backups = backups
        self._jobs = jobs
        self._runner: web.AppRunner | None = None

    @web.middleware
    async def _auth(self, request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        if request.path in PUBLIC:
            return await handler(request)
        presented = bearer(request.headers.get("Authorization"))
        if self._tokens is None or not self._tokens.check(presented):
            resp = _error(401, "unauthorized")
            resp.headers["WWW-Authenticate"] = 'Bearer realm="replicator"'
            return resp
        return await handler(request)

    async def _openapi(self, _request: web.Request) -> web.Response:
        from replicator.openapi import document

        return web.json_response(document())

    async def _doc(self, fn: DocFn | None, what: str) -> web.Response:
        if fn is None:
            return _error(404, f"no {what} on this instance")
        try:
            return web.json_response(await fn(), dumps=_dumps)
        except ReplicatorError as exc:
            return _error(503, f"{what} unavailable: {exc}")

    async def _status_handler(self, _request: web.Request) -> web.Response:
        return await self._doc(self._status, "status")

    async def _backups_handler(self, _request: web.Request) -> web.Response:
        return await self._doc(self._backups, "backups")

    async def _restore_post(self, request: web.Request) -> web.Response:
        if self._jobs is None:
            return _error(404, "no restore jobs on this instance")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body must be a JSON object")
        try:
            job = self._jobs.submit(body)
        except BadRequestError as exc:
            return _error(400, str(exc))
        return web.json_response(job.to_json(), status=202,
                                 headers={"Location": f"/v1/restores/{job.id}"})

    async def _restore_get(self, request: web.Request) -> web.Response:
        job = self._jobs.get(request.match_info["id"]) if self._jobs is not None else None
        if job is None:
            return _error(404, "no such restore job")
        return web.json_response(job.to_json())

    async def _metrics(self, _request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _request: web.Request) -> web.Response:
        ok = self._healthy()
        return web.json_response({"status": "ok" if ok else "failing"}, status=200 if ok else 503)

    async def _readyz(self, _request: web.Request) -> web.Response:
        ok = self._ready()
        return web.json_response({"ready": ok}, status=200 if ok else 503)

    async def _dests(self, _request: web.Request) -> web.Response:
        return web.json_response({"destinations": self._destinations()
                                  if self._destinations else []})

    async def _tail_handler(self, request: web.Request) -> web.Response:
        if self._tail is None:
            raise web.HTTPNotFound(text="no live tail on this instance")
        try:
            wanted: list[tuple[str, int, int]] = []
            for spec in request.query.getall("p", []):
                topic, part_s, start_s = spec.rsplit(":", 2)
                wanted.append((topic, int(part_s), int(start_s)))
            wait_ms = min(30_000, max(0, int(request.query.get("wait_ms", "0"))))
            head_only = request.query.get("head", "0") not in ("", "0")
        except ValueError:
            raise web.HTTPBadRequest(
                text="p=<topic>:<partition>:<from offset> (repeatable) and wait_ms=<ms>") from None
        deadline = time.monotonic() + wait_ms / 1000
        while True:
            frames: list[bytes] = []
            state: dict[str, list[int | None]] = {}
            for topic, part, start in wanted:
                got = self._tail(topic, part, start)
                if got is None:
                    continue  # not owned here
                durable, blocks, oldest = got
                state[f"{topic}:{part}"] = [durable, oldest]
                if head_only:
                    continue
                name = topic.encode()
                frames.extend(TAIL_FRAME.pack(ms, part, len(b), len(name)) + name + b
                              for ms, b in blocks)
            if frames or head_only or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.005)
        return web.Response(body=b"".join(frames), content_type="application/octet-stream",
                            headers={"X-Replicator-Partitions": json.dumps(
                                state, separators=(",", ":"))})

    async def start(self) -> None:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/v1/openapi.json", self._openapi)
        app.router.add_get("/v1/status", self._status_handler)
        app.router.add_get("/v1/backups", self._backups_handler)
        app.router.add_post("/v1/restores", self._restore_post)
        app.router.add_get("/v1/restores/{id}", self._restore_get)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/v1/destinations", self._dests)
        app.router.add_get("/v1/tail", self._tail_handler)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.port = sockets[0].getsockname()[1]
        log.info(
            "metrics and health endpoint listening", extra={"host": self.host, "port": self.port}
        )

    async def stop(self) -> None:
        if self._jobs is not None:
            await self._jobs.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
