"""The HTTP endpoint of a running replicator: Prometheus metrics and health.

``/metrics`` (Prometheus text), ``/healthz`` (the process is alive and its spool has not
failed), ``/readyz`` (partitions assigned and consuming), ``/v1/destinations`` (the
fan-out's state per destination) and ``/v1/tail/{topic}/{partition}?from=N&wait_ms=M``
(live followers: the durable blocks holding offsets ``>= N``, long-polled up to ``M`` ms).
Binds to loopback by default.

Tail response body: frames of ``<qI`` (wall-clock ms at which the block became durable,
block length) followed by the block exactly as in a segment file (docs/FORMAT.md §3).
Headers ``X-Replicator-Durable`` (durable end offset) and ``X-Replicator-Oldest`` (oldest
offset the buffer holds; a follower needing older offsets reads sealed segments). 404: this
instance does not own the partition.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from replicator.metrics import Metrics

log = logging.getLogger(__name__)

TAIL_FRAME = struct.Struct("<qI")
#: what a tail source returns for one partition: (durable end, blocks, oldest buffered)
TailFn = Callable[[str, int, int], "tuple[int, list[tuple[int, bytes]], int | None] | None"]


class HealthServer:
    """aiohttp server; ``healthy``/``ready`` are callables polled per request."""

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
    ) -> None:
        self.metrics = metrics
        self.host = host
        self.port = port
        self._healthy = healthy
        self._ready = ready
        self._tail = tail
        self._destinations = destinations
        self._runner: web.AppRunner | None = None

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
            topic = request.match_info["topic"]
            partition = int(request.match_info["partition"])
            start = int(request.query.get("from", "0"))
            wait_ms = min(30_000, max(0, int(request.query.get("wait_ms", "0"))))
        except ValueError:
            raise web.HTTPBadRequest(text="partition, from and wait_ms must be integers") from None
        deadline = time.monotonic() + wait_ms / 1000
        while True:
            got = self._tail(topic, partition, start)
            if got is None:
                raise web.HTTPNotFound(text=f"{topic}[{partition}] is not owned here")
            durable, blocks, oldest = got
            if blocks or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.005)
        body = b"".join(TAIL_FRAME.pack(ms, len(b)) + b for ms, b in blocks)
        return web.Response(body=body, content_type="application/octet-stream", headers={
            "X-Replicator-Durable": str(durable),
            "X-Replicator-Oldest": "" if oldest is None else str(oldest)})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/v1/destinations", self._dests)
        app.router.add_get("/v1/tail/{topic}/{partition}", self._tail_handler)
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
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
