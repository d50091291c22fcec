"""The deletion engine: one long-lived asyncio loop in a thread of the worker process.

The loop owns the aiohttp session, the status listener (worker/http_server.py) and every coroutine.
The consumer hands it validated requests with :meth:`Engine.dispatch`, which returns at once; the request's
callback runs when every deletion of it is settled (accepted, gone, failed, duplicate or interrupted), and
the task is acknowledged then. An accepted deletion is then followed to its end in the background (up to
``settings.max_following`` at once; more are parked in Redis, and adopted as slots free), which records the
final outcome in the ledger and the metrics.

Bounds per process: at most ``settings.concurrency`` HTTP requests in flight, and at most
``LIVE_PER_SLOT * concurrency`` deletions between their claim and their delete's answer, however many IDs
the reserved tasks hold: the rest of a task's IDs wait as strings, not as coroutines.
Create an Engine inside the process that uses it (never before a fork).

Shutdown: :meth:`Engine.begin_shutdown` arms a deadline; past it, every deletion waiting (for the rate
limiter, a slot or a backoff) gives its ledger claim back and ends ``interrupted``, and so does every later
one, so a request settles within one HTTP attempt and its task goes back to the queue. Follow-ups still
waiting then stop; their deletions stay ``accepted`` with ``job_status`` ``pending``.
:meth:`Engine.wait_idle` waits for both.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker import jobs, logs, metrics
from worker.auth import Auth, make_auth
from worker.contract import DeletionRequest, InvalidTask, well_formed_pairs
from worker.http_server import StatusServer
from worker.ledger import DeadLetter, Ledger, kwargs_text
from worker.outcome import Answer, Verdict, classify, retry_wait
from worker.ratelimit import RateLimiter
from worker.settings import Settings
from worker.transport import new_session
from worker.vbs import VbsClient

log = logs.get("engine")
T = TypeVar("T")
_REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
ADOPT_BATCH = 100  # follow-ups adopted per Lua call
LIVE_PER_SLOT = 16  # deletions past their claim per HTTP slot: enough to keep the slots busy, few in memory


class Interrupted(Exception):
    """A wait cut short by the shutdown deadline."""


@dataclass(frozen=True, slots=True)
class DeletionResult:
    """How one backup's deletion ended. ``outcome`` is accepted, already_gone or failed."""

    backup_id: str
    outcome: str  # accepted, already_gone, failed, duplicate (not sent: done or in flight elsewhere) or
    # interrupted (shutdown deadline; claim released, not counted, the task must go back to the queue)
    reason: str  # bounded label: accepted, already_gone, status_400, exhausted_status_503, job_fail, ...
    attempts: int  # delete attempts made
    answer: Answer | None  # the last answer to the delete (None for a duplicate)
    job: jobs.JobResult | None = None  # how the followed deletion ended (None while not followed)


Outcomes = collections.Counter[str]  # deletions of one request by outcome (DeletionResult.outcome)
Settled = asyncio.Future[Outcomes]  # of a dispatched request


class Engine:
    """Runs deletions concurrently on a private event loop. Thread-safe entry points: :meth:`dispatch`,
    :meth:`reject`, :meth:`wait_idle`, :meth:`begin_shutdown`."""

    def __init__(
        self,
        settings: Settings,
        auth: Auth | None = None,
        rng: random.Random | None = None,
        consuming: Callable[[], bool] = lambda: True,
    ) -> None:
        self._settings = settings
        self._auth = auth  # None: chosen from the settings at start (make_auth)
        self._rng = rng or random.Random()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._session: aiohttp.ClientSession | None = None
        self._client: VbsClient | None = None
        self._slots: asyncio.Semaphore | None = None  # HTTP requests in flight
        self._live: asyncio.Semaphore | None = None  # deletions between claim and answer
        self._following: asyncio.Semaphore | None = None  # follow-ups running or reserved
        self._busy: set[asyncio.Task[Any]] = set()  # dispatched requests and follow-ups
        self._redis: aioredis.Redis | None = None
        self._ledger: Ledger | None = None
        self._limiter: RateLimiter | None = None
        self._poll_limiter: RateLimiter | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._adopter: asyncio.Task[None] | None = None  # takes over dead workers' follow-ups
        self._consuming = consuming
        self.status_server: StatusServer | None = None
        self.metrics_port: int | None = None
        self._stopping = False  # the shutdown deadline has passed
        self._waiters: set[asyncio.Task[Any]] = set()  # deletions in an interruptible wait
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

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

    def dispatch(
        self,
        request: DeletionRequest,
        settled: Callable[[Settled], object],
        not_before: float = 0.0,
        expires: float = 0.0,
    ) -> None:
        """Thread-safe, returns at once: delete every backup of ``request``, not before Unix time
        ``not_before``; ``settled(future)`` is called in the loop thread when every deletion is settled.
        A task past Unix time ``expires`` (0: never) when its eta comes settles as all ``expired``."""
        if self._loop is None:
            raise RuntimeError("engine not started")
        run = self._run_request(request, not_before, expires)
        self._loop.call_soon_threadsafe(lambda: self._spawn(run).add_done_callback(settled))

    def wait_idle(self, timeout: float) -> bool:
        """Block until no request or follow-up is left (True), or ``timeout`` seconds pass (False)."""
        return bool(self._submit(self._idle(timeout)))

    def begin_shutdown(self, grace: float) -> None:
        """Thread-safe: interrupt waiting and later deletions ``grace`` seconds from now (see module doc)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.call_later, grace, self._interrupt)

    def _interrupt(self) -> None:
        self._stopping = True
        log.warning("shutdown deadline: %d waiting deletion(s) and follow-up(s) stop", len(self._waiters))
        for task in list(self._waiters):
            task.cancel()

    async def _interruptible(self, wait: Callable[[], Awaitable[T]]) -> T:
        """Await ``wait()``; raise :class:`Interrupted` once the shutdown deadline has passed."""
        task = asyncio.current_task()
        assert task is not None
        if self._stopping:
            raise Interrupted
        self._waiters.add(task)
        try:
            return await wait()
        except asyncio.CancelledError:
            if not self._stopping:
                raise
            task.uncancel()
            raise Interrupted from None
        finally:
            self._waiters.discard(task)

    def reject(self, task_name: str, task_id: str | None, kwargs: dict[str, Any], error: InvalidTask) -> None:
        """Record a task that broke the contract: a dead letter, and ``rejected`` for its well-formed IDs."""
        letter = DeadLetter(
            kind="rejected_task",
            reason=error.reason,
            ts=time.time(),
            message=error.detail,
            task_name=task_name,
            task_id=task_id or uuid.uuid4().hex,
            kwargs=kwargs_text(kwargs),
            request_id=kwargs.get("request_id") if isinstance(kwargs.get("request_id"), str) else None,
        )
        self._submit(self._record_rejection(well_formed_pairs(kwargs), letter))

    def _submit(self, coroutine: Awaitable[T]) -> T:
        if self._loop is None:
            raise RuntimeError("engine not started")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()  # type: ignore[arg-type]

    async def _open(self) -> None:
        settings = self._settings
        self._session = new_session(settings)
        self._redis = aioredis.Redis.from_url(settings.redis_url, socket_timeout=10, socket_connect_timeout=5)
        if self._auth is None:
            self._auth = make_auth(settings, self._session, self._redis, self._rng)
        log.info("authentication: %s", self._auth.mode)
        self._client = VbsClient(self._session, settings, self._auth)
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._live = asyncio.Semaphore(LIVE_PER_SLOT * settings.concurrency)
        self._following = asyncio.Semaphore(settings.max_following)
        self._ledger = Ledger(self._redis, settings.ledger_ttl, self.owner, 3 * settings.heartbeat_interval)
        self._limiter = RateLimiter(self._redis, "delete", settings.rate_limit, settings.rate_burst)
        self._poll_limiter = (
            RateLimiter(self._redis, "poll", settings.poll_rate_limit, settings.rate_burst)
            if settings.poll_rate_limit > 0
            else self._limiter
        )
        self._heartbeat = asyncio.create_task(self._beat())
        if settings.follow_jobs:
            self._adopter = asyncio.create_task(self._adopt_orphans())
        metrics.RECENT_JOBS.resize(settings.recent_jobs)
        metrics.set_rate_limits(settings.rate_limit, settings.poll_rate_limit)
        self.status_server = StatusServer(settings, self._redis, self._consuming)
        ledger = self._ledger
        self.status_server.add_scrape_source(metrics.DEAD_LETTERS, lambda: ledger.dead_letter_count())
        self.metrics_port = await self.status_server.start()

    async def _close(self) -> None:
        for background in (self._heartbeat, self._adopter):
            if background is not None:
                background.cancel()
        if self._ledger is not None:
            try:
                await self._ledger.retire()
            except _REDIS_ERRORS:
                log.warning("could not remove the heartbeat at shutdown; it expires by itself")
        if self.status_server is not None:
            await self.status_server.stop()
        if self._session is not None:
            await self._session.close()
        if self._redis is not None:
            await self._redis.aclose()

    async def _record_rejection(self, pairs: list[tuple[str, str]], letter: DeadLetter) -> None:
        assert self._ledger is not None
        ledger = self._ledger
        await self._until_redis(lambda: ledger.reject(pairs, letter))

    async def _beat(self) -> None:
        """Keep this worker's heartbeat alive: claims of a live worker are never taken over."""
        assert self._ledger is not None
        interval = self._settings.heartbeat_interval
        while True:
            try:
                await self._ledger.heartbeat(max(1, round(interval * 3)))
            except _REDIS_ERRORS as exc:
                log.warning("heartbeat failed: %s", exc)
            await asyncio.sleep(interval)

    async def _adopt_orphans(self) -> None:
        """Every heartbeat interval, follow parked follow-ups and those of workers that died (see
        Ledger.adopt), as many as the free follow slots allow."""
        interval = self._settings.heartbeat_interval
        while not self._stopping:
            await asyncio.sleep(interval)
            try:
                while await self._adopt_some() == ADOPT_BATCH:
                    pass
            except _REDIS_ERRORS as exc:
                log.warning("could not look for orphaned follow-ups: %s", exc)

    async def _adopt_some(self) -> int:
        """Adopt up to ADOPT_BATCH follow-ups, as far as free follow slots allow; returns how many."""
        assert self._ledger is not None and self._following is not None
        slots = 0
        while slots < ADOPT_BATCH and not self._following.locked():
            await self._following.acquire()
            slots += 1
        records = []
        try:
            records = await self._ledger.adopt(slots) if slots else []
        finally:
            for _ in range(slots - len(records)):
                self._following.release()
        for record in records:
            project_id, backup_id, request_id = (
                record["project_id"],
                record["backup_id"],
                record["request_id"],
            )
            answer = Answer(status=int(record["status"] or 0), job_id=record["job_id"] or None)
            ctx: dict[str, object] = {
                "project_id": project_id,
                "backup_id": backup_id,
                "request_id": request_id or None,
                "job_id": answer.job_id,
            }
            accepted = DeletionResult(backup_id, "accepted", "accepted", 0, answer)
            plan = self._job_reader(project_id, backup_id, answer, ctx)
            if plan is None:  # nothing to follow after all
                self._following.release()
                await self._record(project_id, accepted, request_id or None, follow="end")
                continue
            log.info("following up a parked deletion, or one of a worker that died", extra={"ctx": ctx})
            self._spawn(self._follow_up(accepted, plan, project_id, request_id or None, ctx))
        return len(records)

    async def _until_redis(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run a Redis operation, waiting out outages (backoff up to 5 s): no record is ever lost."""
        delay = 0.25
        while True:
            try:
                return await call()
            except _REDIS_ERRORS as exc:
                log.warning("Redis unavailable (%s); retrying in %.2fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)

    async def _idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._busy and time.monotonic() < deadline:
            await asyncio.wait(set(self._busy), timeout=deadline - time.monotonic())
        return not self._busy

    async def _run_request(self, request: DeletionRequest, not_before: float, expires: float) -> Outcomes:
        try:
            delay = not_before - time.time()
            if delay > 0:  # a task with a Celery eta: wait here, holding only its message
                try:
                    await self._interruptible(functools.partial(asyncio.sleep, delay))
                except Interrupted:
                    return collections.Counter(interrupted=len(request.backup_ids))
                if expires and time.time() >= expires:
                    return collections.Counter(expired=len(request.backup_ids))
            return await self._delete_all(request)
        except Exception as exc:  # a bug: record the task rather than lose it silently
            log.exception("task failed inside the engine", extra={"ctx": {"request_id": request.request_id}})
            letter = DeadLetter(
                kind="rejected_task",
                reason="internal_error",
                ts=time.time(),
                message=f"{type(exc).__name__}: {str(exc)[:200]}",
                task_id=uuid.uuid4().hex,
                request_id=request.request_id,
                project_id=request.project_id,
                kwargs=kwargs_text(
                    {"project_id": request.project_id, "backup_ids": list(request.backup_ids)}
                ),
            )
            await self._record_rejection([], letter)
            return collections.Counter()

    async def _delete_all(self, request: DeletionRequest) -> Outcomes:
        """Start the deletions in request order as live slots free up; count how each one ended. Finished
        deletions are dropped at once, so a task holds only its IDs and its live deletions."""
        live = self._live
        assert live is not None
        outcomes: Outcomes = collections.Counter()
        running: set[asyncio.Task[DeletionResult]] = set()
        failures: list[BaseException] = []

        def finished(deletion: asyncio.Task[DeletionResult]) -> None:
            live.release()
            running.discard(deletion)
            if deletion.cancelled():
                return
            if (failure := deletion.exception()) is not None:
                failures.append(failure)
            else:
                outcomes[deletion.result().outcome] += 1

        started = 0
        try:
            for backup_id in request.backup_ids:
                try:
                    await self._interruptible(live.acquire)
                except Interrupted:
                    break
                deletion = asyncio.create_task(
                    self._delete_one(request.project_id, backup_id, request.request_id)
                )
                running.add(deletion)
                deletion.add_done_callback(finished)
                started += 1
            while running:
                await asyncio.wait(set(running))
        except asyncio.CancelledError:
            for deletion in running:
                deletion.cancel()
            raise
        if failures:
            raise failures[0]
        outcomes["interrupted"] += len(request.backup_ids) - started
        return outcomes

    async def _attempt(
        self, operation: str, call: Callable[[], Awaitable[Answer]], backup_id: str, job_id: str | None = None
    ) -> Answer:
        """Every HTTP call to VBS goes through here: a token of the shared rate limit (polls use the poll
        budget), a concurrency slot, and the request metrics with a ``backup_id`` / ``job_id`` exemplar.
        ``operation`` is delete, job or show."""
        assert self._slots is not None and self._limiter is not None and self._poll_limiter is not None
        await self._interruptible((self._limiter if operation == "delete" else self._poll_limiter).acquire)
        await self._interruptible(self._slots.acquire)
        try:
            metrics.IN_FLIGHT.inc()
            started = time.perf_counter()
            try:
                answer = await call()
            finally:
                metrics.IN_FLIGHT.dec()
            elapsed = time.perf_counter() - started
        finally:
            self._slots.release()
        job_id = job_id or answer.job_id
        exemplar = {"backup_id": backup_id}
        if jobs.usable_job_id(job_id):
            exemplar["job_id"] = str(job_id)
        metrics.REQUEST_DURATION.labels(operation).observe(elapsed, exemplar)
        if answer.auth_error is None:  # else nothing was sent
            metrics.HTTP_REQUESTS.labels(operation, metrics.status_label(answer.status)).inc(1, exemplar)
        return answer

    def _job_reader(
        self, project_id: str, backup_id: str, answer: Answer, ctx: dict[str, object]
    ) -> tuple[str | None, Callable[[], Awaitable[Answer]]] | None:
        """How to follow an accepted deletion (worker/jobs.py): the job ID (None in native modes, which read
        the backup) and the read; None when it is not followed (``VBS_FOLLOW_JOBS`` off, or no usable job
        ID in ``cloudbackups`` mode)."""
        client = self._client
        assert client is not None
        job_id = answer.job_id if self._settings.api == "cloudbackups" else None
        if self._settings.api == "cloudbackups" and not jobs.usable_job_id(job_id):
            log.warning("accepted without a usable job_id: not followed", extra={"ctx": ctx})
            return None
        if not self._settings.follow_jobs:
            if job_id is not None:
                metrics.RECENT_JOBS.record(job_id, backup_id, "accepted")
            return None
        if job_id is not None:
            operation, read = "job", functools.partial(client.get_job, project_id, job_id)
        else:
            operation, read = "show", functools.partial(client.get_backup, project_id, backup_id)
        return job_id, lambda: self._attempt(operation, read, backup_id, job_id)

    async def _follow_up(
        self,
        accepted: DeletionResult,
        plan: tuple[str | None, Callable[[], Awaitable[Answer]]],
        project_id: str,
        request_id: str | None,
        ctx: dict[str, object],
    ) -> None:
        """Follow an accepted deletion in the background (``plan`` from :meth:`_job_reader`), then record
        how it ended. Holds a follow slot, released at the end. Cut short by the shutdown deadline, the
        record stays ``job_status`` pending."""
        assert self._following is not None
        followed_job, read = plan
        metrics.FOLLOWING.inc()
        try:
            job = await jobs.follow(
                read,
                followed_job,
                accepted.backup_id,
                self._settings,
                ctx,
                sleep=lambda seconds: self._interruptible(functools.partial(asyncio.sleep, seconds)),
            )
        except Interrupted:  # the delete was accepted: count that, unconfirmed, rather than send it again
            log.info("shutdown deadline: accepted, follow-up cut short", extra={"ctx": ctx})
            if followed_job is not None:
                metrics.RECENT_JOBS.record(followed_job, accepted.backup_id, "accepted")
            metrics.DELETIONS.labels("accepted").inc()
            return
        finally:
            self._following.release()
            metrics.FOLLOWING.dec()
        if job.status == "success":
            ended = dataclasses.replace(accepted, job=job)
        else:
            ended = dataclasses.replace(accepted, outcome="failed", reason=f"job_{job.status}", job=job)
        await self._record(project_id, ended, request_id, follow="end")

    def _spawn(self, coroutine: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run ``coroutine`` as a task counted as busy until it ends (see :meth:`wait_idle`)."""
        task = asyncio.ensure_future(coroutine)
        self._busy.add(task)
        task.add_done_callback(self._busy.discard)
        return task

    async def _delete_one(self, project_id: str, backup_id: str, request_id: str | None) -> DeletionResult:
        """Claim the backup in the ledger, delete it, record the result (and a dead letter if it failed);
        an accepted deletion is then followed in the background, or parked when every follow slot is taken."""
        assert self._ledger is not None and self._following is not None
        ledger = self._ledger
        ctx: dict[str, object] = {
            "project_id": project_id,
            "backup_id": backup_id,
            "request_id": request_id,
            "job_id": None,
        }
        while True:
            verdict, detail = await self._until_redis(lambda: ledger.claim(project_id, backup_id, request_id))
            if verdict != "busy":
                break
            # In flight in a live worker (a redelivered or duplicate task): wait for its outcome, or for its
            # heartbeat to expire and take the claim over. Skipping it would lose the deletion if that
            # worker died before finishing, since this message would then be the last copy.
            try:
                await self._interruptible(lambda: asyncio.sleep(self._settings.heartbeat_interval))
            except Interrupted:
                return _interrupted(backup_id)
        if verdict != "claimed":
            log.info("duplicate skipped (%s: %s)", verdict, detail, extra={"ctx": ctx})
            metrics.DELETIONS.labels("duplicate").inc()
            return DeletionResult(backup_id, "duplicate", f"duplicate_{verdict}", 0, None)
        try:
            result = await self._send(project_id, backup_id, ctx)
        except (asyncio.CancelledError, Interrupted) as exc:
            await self._until_redis(lambda: ledger.release(project_id, backup_id))
            if isinstance(exc, asyncio.CancelledError):
                raise
            log.info("deletion interrupted by the shutdown deadline", extra={"ctx": ctx})
            return dataclasses.replace(_interrupted(backup_id), attempts=int(str(ctx.get("attempt", 0))))
        plan = None
        if result.outcome == "accepted":
            assert result.answer is not None
            plan = self._job_reader(project_id, backup_id, result.answer, ctx)
        if plan is None:
            await self._record(project_id, result, request_id)
        elif self._following.locked():  # every follow slot taken: park it in Redis, adopted when one frees
            await self._record(project_id, result, request_id, follow="park")
        else:
            await self._following.acquire()  # free: returns at once
            await self._record(project_id, result, request_id, follow="start")
            self._spawn(self._follow_up(result, plan, project_id, request_id, dict(ctx)))
        return result

    async def _record(
        self, project_id: str, result: DeletionResult, request_id: str | None, follow: str | None = None
    ) -> None:
        """Write ``result`` to the ledger (with a dead letter if it failed) and count it. ``follow``
        "start" (followed from now) or "park" (to be adopted when a follow slot frees): the record says
        ``job_status`` pending and the count waits for "end", when the follow-up records the job's outcome
        (its attempts are in already). See Ledger.finish."""
        assert self._ledger is not None
        ledger = self._ledger
        following = follow in ("start", "park")
        answer, job = result.answer, result.job
        assert answer is not None
        failed_job = job is not None and job.status != "success"
        error_code = job.error_code if job is not None and failed_job else answer.error_code
        message = job.fail_reason if job is not None and failed_job else answer.message
        update: dict[str, object] = {
            "attempts": 0 if follow == "end" else result.attempts,
            "status": answer.status,
            "error_code": error_code,
            "error": message,
            "vbs_request_id": answer.request_id,
            "job_id": answer.job_id,
            "job_status": "pending" if following else job.status if job is not None else None,
            "reason": result.reason,
        }
        if follow == "end" and result.outcome == "accepted":  # confirmed: the rest is recorded already
            update = {"job_status": update["job_status"]}
        letter = None
        if result.outcome == "failed":
            letter = DeadLetter(
                kind="deletion",
                reason=result.reason,
                ts=time.time(),
                project_id=project_id,
                backup_id=result.backup_id,
                status=answer.status,
                error_code=error_code,
                message=message,
                vbs_request_id=answer.request_id,
                request_id=request_id,
                attempts=result.attempts,
                job_id=answer.job_id,
            )
        backup_id = result.backup_id
        await self._until_redis(
            lambda: ledger.finish(project_id, backup_id, result.outcome, update, letter, follow)
        )
        if following:
            return
        metrics.DELETIONS.labels(result.outcome).inc()
        if result.outcome == "failed":
            status = "job" if failed_job else metrics.status_label(answer.status)
            metrics.FAILURES.labels(status, metrics.bounded_code(error_code)).inc()

    async def _send(self, project_id: str, backup_id: str, ctx: dict[str, object]) -> DeletionResult:
        """Attempt until accepted, gone, permanently failed, or out of attempts / throttle waits."""
        assert self._limiter is not None and self._client is not None
        settings = self._settings
        delete = functools.partial(self._client.delete, project_id, backup_id)
        attempts = transient = throttled = 0
        refreshed = False  # one more attempt after a 401 with fresh credentials, once per deletion
        while True:
            answer = await self._attempt("delete", delete, backup_id)
            attempts += 1
            if answer.auth_retry and not refreshed:
                refreshed = True
                metrics.RETRIES.labels("auth_refresh").inc()
                log.info("401: retrying with fresh credentials", extra={"ctx": ctx})
                continue
            decision = classify(answer, settings.retry_statuses)
            ctx.update(attempt=attempts, status=answer.status, vbs_request_id=answer.request_id)
            if decision.verdict in (Verdict.ACCEPTED, Verdict.GONE):
                ctx["job_id"] = answer.job_id
                log.info("deletion %s", decision.reason, extra={"ctx": ctx})
                return DeletionResult(backup_id, decision.verdict.value, decision.reason, attempts, answer)
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
                return DeletionResult(backup_id, "failed", decision.reason, attempts, answer)
            if exhausted:
                ctx.update(error_code=answer.error_code, error=answer.message)
                log.warning("deletion failed: retries exhausted (%s)", decision.reason, extra={"ctx": ctx})
                return DeletionResult(backup_id, "failed", f"exhausted_{decision.reason}", attempts, answer)
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
            if decision.verdict is Verdict.THROTTLED and self._limiter.enabled:
                await self._limiter.pause(wait)  # every worker waits, not only this deletion
            else:
                await self._interruptible(functools.partial(asyncio.sleep, wait))


def _interrupted(backup_id: str) -> DeletionResult:
    """A deletion the shutdown deadline stopped before it was sent (or between attempts)."""
    return DeletionResult(backup_id, "interrupted", "shutdown", 0, None)
