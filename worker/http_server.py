"""The worker's own HTTP listener: ``/metrics``, ``/healthz`` and ``/readyz``, on the engine's loop.

``/metrics`` serves the OpenMetrics exposition (with exemplars) when the scraper's ``Accept`` asks for it,
else the classic text format. Before each scrape the gauges read from Redis are refreshed (the queue's
backlog, plus any source added with :meth:`StatusServer.add_scrape_source`, e.g. the dead-letter store or
the dead-letter store), each read bounded by ``REDIS_READ_TIMEOUT`` seconds.

``/healthz`` answers 200 when the loop runs (it serves the request), Redis answers PING and the Celery
consumer is consuming; ``/readyz`` answers 200 when the consumer is consuming. Both return their checks
as JSON, 503 when one fails.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import cast

import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client.exposition import choose_encoder

from worker import logs, metrics
from worker.settings import Settings

log = logs.get("http")

REDIS_READ_TIMEOUT = 2.0
Read = Callable[[], Awaitable[float]]


class StatusServer:
    """The listener; create and start it on the running loop. ``client`` is the engine's Redis client."""

    def __init__(self, settings: Settings, client: aioredis.Redis, consuming: Callable[[], bool]) -> None:
        self._settings = settings
        self._redis = client
        self._consuming = consuming
        queue = settings.queue
        self._sources: list[tuple[str, Read, dict[str, str]]] = []
        self.add_scrape_source(metrics.QUEUE_MESSAGES, self._backlog, {"queue": queue})
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    def add_scrape_source(self, gauge: str, read: Read, labels: dict[str, str] | None = None) -> None:
        """Before each scrape, set ``gauge`` of :data:`metrics.READ_AT_SCRAPE` to what ``read`` returns.

        When it raises or takes over ``REDIS_READ_TIMEOUT`` seconds, ``gauge`` is left out of that scrape.
        """
        self._sources.append((gauge, read, labels or {}))

    async def start(self) -> int:
        """Listen on ``VBS_METRICS_HOST:VBS_METRICS_PORT``; returns the port (useful with port 0)."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._settings.metrics_host, self._settings.metrics_port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        log.info("metrics on http://%s:%s/metrics", self._settings.metrics_host, self.port)
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _backlog(self) -> float:
        return float(await cast(Awaitable[int], self._redis.llen(self._settings.queue)))

    async def _refresh(self, gauge: str, read: Read, labels: dict[str, str]) -> None:
        try:
            value = await asyncio.wait_for(read(), REDIS_READ_TIMEOUT)
        except Exception as exc:  # any failing source only blanks its gauge; the scrape goes on
            metrics.READ_AT_SCRAPE.clear(gauge)
            log.warning("cannot read %s: %s", gauge, type(exc).__name__)
        else:
            metrics.READ_AT_SCRAPE.set(gauge, value, labels)

    async def _metrics(self, request: web.Request) -> web.Response:
        await asyncio.gather(*(self._refresh(*source) for source in self._sources))
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(metrics.REGISTRY), headers={"Content-Type": content_type})

    async def _redis_answers(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self._redis.ping(), REDIS_READ_TIMEOUT))
        except Exception:  # a health check reports, it does not raise
            return False

    async def _healthz(self, _: web.Request) -> web.Response:
        checks = {"loop": True, "redis": await self._redis_answers(), "consuming": self._consuming()}
        return web.json_response(checks, status=200 if all(checks.values()) else 503)

    async def _readyz(self, _: web.Request) -> web.Response:
        checks = {"consuming": self._consuming()}
        return web.json_response(checks, status=200 if all(checks.values()) else 503)
