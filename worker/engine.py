"""The deletion engine: one long-lived asyncio loop in a thread of the worker process.

The loop owns the aiohttp session, the metrics listener and every coroutine. Celery task threads hand
it validated requests with :meth:`Engine.run` and block until their deletions are settled. At most
``settings.concurrency`` HTTP requests are in flight per process, whatever the number of task threads.
Create an Engine inside the process that uses it (never before a fork).
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from prometheus_client import generate_latest

from worker import logs, metrics
from worker.auth import Auth, StaticTokenAuth
from worker.contract import DeletionRequest
from worker.outcome import Answer, Verdict, classify, retry_wait
from worker.settings import Settings
from worker.vbs import VbsClient, new_session

log = logs.get("engine")


@dataclass(frozen=True, slots=True)
class DeletionResult:
    """How one backup's deletion ended. ``outcome`` is accepted, already_gone or failed."""

    backup_id: str
    outcome: str
    reason: str  # bounded label: accepted, already_gone, status_400, exhausted_status_503, ...
    attempts: int  # HTTP attempts made
    answer: Answer  # the last answer seen


class Engine:
    """Runs deletions concurrently on a private event loop; thread-safe entry point :meth:`run`."""

    def __init__(
        self, settings: Settings, auth: Auth | None = None, rng: random.Random | None = None
    ) -> None:
        self._settings = settings
        self._auth = auth or StaticTokenAuth(settings.auth_token)
        self._rng = rng or random.Random()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._session: aiohttp.ClientSession | None = None
        self._client: VbsClient | None = None
        self._slots: asyncio.Semaphore | None = None
        self._metrics_runner: web.AppRunner | None = None
        self.metrics_port: int | None = None

    def start(self) -> None:
        """Start the loop thread, open the session and the metrics listener; returns once ready."""
        if self._loop is not None:
            return
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vbs-engine", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._open(), self._loop).result()

    def stop(self) -> None:
        """Close the session and the listener, stop the loop and join its thread (idempotent)."""
        if self._loop is None or self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()
        self._loop = self._thread = None

    def run(self, request: DeletionRequest) -> list[DeletionResult]:
        """Delete every backup of ``request`` (blocking the calling thread); results in request order."""
        if self._loop is None:
            raise RuntimeError("engine not started")
        return asyncio.run_coroutine_threadsafe(self._delete_all(request), self._loop).result()

    async def _open(self) -> None:
        self._session = new_session(self._settings)
        self._client = VbsClient(self._session, self._settings, self._auth)
        self._slots = asyncio.Semaphore(self._settings.concurrency)
        app = web.Application()
        app.router.add_get("/metrics", _serve_metrics)
        self._metrics_runner = web.AppRunner(app, access_log=None)
        await self._metrics_runner.setup()
        site = web.TCPSite(self._metrics_runner, self._settings.metrics_host, self._settings.metrics_port)
        await site.start()
        self.metrics_port = int(self._metrics_runner.addresses[0][1])
        log.info("metrics on http://%s:%s/metrics", self._settings.metrics_host, self.metrics_port)

    async def _close(self) -> None:
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _delete_all(self, request: DeletionRequest) -> list[DeletionResult]:
        return list(
            await asyncio.gather(
                *(
                    self._delete_one(request.project_id, backup_id, request.request_id)
                    for backup_id in request.backup_ids
                )
            )
        )

    async def _attempt(self, project_id: str, backup_id: str) -> Answer:
        assert self._client is not None and self._slots is not None
        async with self._slots:
            metrics.IN_FLIGHT.inc()
            started = time.perf_counter()
            try:
                answer = await self._client.delete(project_id, backup_id)
            finally:
                metrics.IN_FLIGHT.dec()
            metrics.REQUEST_DURATION.labels("delete").observe(time.perf_counter() - started)
        metrics.HTTP_REQUESTS.labels("delete", metrics.status_label(answer.status)).inc()
        return answer

    async def _delete_one(self, project_id: str, backup_id: str, request_id: str | None) -> DeletionResult:
        """Attempt until accepted, gone, permanently failed, or out of attempts / throttle waits."""
        settings = self._settings
        ctx: dict[str, object] = {"project_id": project_id, "backup_id": backup_id, "request_id": request_id}
        attempts = transient = throttled = 0
        while True:
            answer = await self._attempt(project_id, backup_id)
            attempts += 1
            decision = classify(answer, settings.retry_statuses)
            ctx.update(attempt=attempts, status=answer.status, vbs_request_id=answer.request_id)
            if decision.verdict in (Verdict.ACCEPTED, Verdict.GONE):
                ctx["job_id"] = answer.job_id
                log.info("deletion %s", decision.reason, extra={"ctx": ctx})
                return self._finish(backup_id, decision.verdict.value, decision.reason, attempts, answer)
            if decision.verdict is Verdict.THROTTLED:
                throttled += 1
                exhausted = throttled > settings.max_throttle_waits
                backoff_step = throttled
            elif decision.verdict is Verdict.RETRY:
                transient += 1
                exhausted = transient >= settings.max_attempts
                backoff_step = transient
            else:
                ctx.update(error_code=answer.error_code, error=answer.message)
                log.warning("deletion failed permanently", extra={"ctx": ctx})
                return self._finish(backup_id, "failed", decision.reason, attempts, answer)
            if exhausted:
                ctx.update(error_code=answer.error_code, error=answer.message)
                log.warning("deletion failed: retries exhausted (%s)", decision.reason, extra={"ctx": ctx})
                return self._finish(backup_id, "failed", f"exhausted_{decision.reason}", attempts, answer)
            wait = retry_wait(
                answer,
                backoff_step,
                settings.backoff_base,
                settings.backoff_max,
                settings.retry_after_max,
                self._rng,
            )
            metrics.RETRIES.labels(decision.reason).inc()
            log.info("retrying in %.2fs after %s", wait, decision.reason, extra={"ctx": ctx})
            await asyncio.sleep(wait)

    @staticmethod
    def _finish(backup_id: str, outcome: str, reason: str, attempts: int, answer: Answer) -> DeletionResult:
        metrics.DELETIONS.labels(outcome).inc()
        if outcome == "failed":
            metrics.FAILURES.labels(
                metrics.status_label(answer.status), metrics.bounded_code(answer.error_code)
            ).inc()
        return DeletionResult(backup_id, outcome, reason, attempts, answer)


async def _serve_metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(metrics.REGISTRY), content_type="text/plain", charset="utf-8")
