"""The HTTP endpoint of a running replicator: Prometheus metrics and health.

``/metrics`` (Prometheus text), ``/healthz`` (the process is alive and its spool has not
failed), ``/readyz`` (partitions assigned and consuming), ``/v1/destinations`` (the
fan-out's state per destination) and ``/v1/tail?p=<topic>:<partition>:<from>&...&wait_ms=M``
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
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from replicator.metrics import Metrics

log = logging.getLogger(__name__)

TAIL_FRAME = struct.Struct("<qiIH")
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
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
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
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
