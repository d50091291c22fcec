"""Running retention policies: list, plan, enqueue; once (``vbs-deleter retention``) or on a schedule (beat).

A run lists the whole project first; a listing that fails on any page enqueues nothing for that run. The
beat process is one asyncio loop: it serves its own ``/metrics`` (``VBS_BEAT_METRICS_PORT``), keeps the
time of each policy's last attempt and success in Redis (``vbs:retention:<policy>``, so a restart keeps
the schedule and the last-success gauge) and sends tasks with the ordinary producer (JSON only; Celery
beat is not used, so no schedule file is pickled to disk).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import redis
import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import generate_latest

from worker import logs, metrics
from worker.auth import make_auth
from worker.producer import Producer, batches
from worker.ratelimit import RateLimiter
from worker.retention import Plan, Policy, PolicyError, load_policies, plan, table
from worker.settings import Settings
from worker.transport import new_session
from worker.vbs import ListingError, VbsClient

log = logs.get("retention")
STATE_KEY = "vbs:retention:{policy}"  # hash: last_attempt, last_success (unix seconds)


@dataclass(frozen=True)
class RunResult:
    """How one policy run ended: ``result`` is ok, list_failed or enqueue_failed."""

    policy: str
    result: str
    plan: Plan | None
    enqueued: int
    error: str | None = None


def _count_list_call(status: int, seconds: float) -> None:
    metrics.HTTP_REQUESTS.labels("list", metrics.status_label(status)).inc()
    metrics.REQUEST_DURATION.labels("list").observe(seconds)


@dataclass(frozen=True)
class Lister:
    """The VBS client a retention run lists with (same auth interface as the worker's deletes) and the
    shared rate limiter its pages draw from (the poll budget when ``VBS_POLL_RATE_LIMIT`` is set)."""

    client: VbsClient
    limiter: RateLimiter


def lister(session: aiohttp.ClientSession, redis_client: aioredis.Redis, settings: Settings) -> Lister:
    client = VbsClient(session, settings, make_auth(settings, session, redis_client))
    if settings.poll_rate_limit > 0:
        limiter = RateLimiter(redis_client, "poll", settings.poll_rate_limit, settings.rate_burst)
    else:
        limiter = RateLimiter(redis_client, "delete", settings.rate_limit, settings.rate_burst)
    return Lister(client, limiter)


async def plan_policy(source: Lister, name: str, policy: Policy) -> Plan:
    """List the policy's project completely and plan; :class:`ListingError` if any page fails."""
    listing = await source.client.list_backups(
        policy.project_id, on_page=_count_list_call, before_page=source.limiter.acquire
    )
    return plan(name, policy, listing, datetime.now(UTC))


def enqueue_plan(producer: Producer, planned: Plan) -> int:
    """Send the plan's deletions as ``vbs.delete_backups`` tasks; returns the number of IDs sent.

    Raises :class:`EnqueueFailed` (with the count sent before) when the broker fails part-way; what was
    sent is safe on its own, since no deletion in a plan depends on another.
    """
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    request_id = f"retention-{planned.policy}-{stamp}-{uuid.uuid4().hex[:6]}"
    sent = 0
    for chunk in batches(planned.deletions):
        try:
            producer.send_batch(planned.project_id, chunk, request_id)
        except Exception as exc:  # kombu/redis errors differ by version; all mean "not sent"
            raise EnqueueFailed(sent, exc) from None
        sent += len(chunk)
    return sent


class EnqueueFailed(RuntimeError):
    """The broker failed after ``sent`` IDs of a plan were enqueued."""

    def __init__(self, sent: int, cause: Exception) -> None:
        super().__init__(f"enqueue failed after {sent} IDs: {cause}")
        self.sent = sent


async def run_policy(client: Lister, producer: Producer, name: str, policy: Policy) -> RunResult:
    """One full run with its metrics and log lines; never raises for listing or broker failures."""
    ctx: dict[str, object] = {"policy": name, "project_id": policy.project_id}
    try:
        planned = await plan_policy(client, name, policy)
    except ListingError as exc:
        metrics.RETENTION_RUNS.labels(name, "list_failed").inc()
        log.error("listing failed after %d pages, nothing enqueued: %s", exc.pages, exc, extra={"ctx": ctx})
        return RunResult(name, "list_failed", None, 0, f"listing failed, nothing enqueued: {exc}")
    metrics.RETENTION_CANDIDATES.labels(name).inc(len(planned.decisions))
    for reason, count in planned.skipped.items():
        metrics.RETENTION_SKIPPED.labels(name, reason).inc(count)
    try:
        sent = await asyncio.to_thread(enqueue_plan, producer, planned)
    except EnqueueFailed as exc:
        metrics.RETENTION_ENQUEUED.labels(name).inc(exc.sent)
        metrics.RETENTION_RUNS.labels(name, "enqueue_failed").inc()
        log.error("%s", exc, extra={"ctx": ctx})
        return RunResult(name, "enqueue_failed", planned, exc.sent, str(exc))
    metrics.RETENTION_ENQUEUED.labels(name).inc(sent)
    metrics.RETENTION_RUNS.labels(name, "ok").inc()
    metrics.RETENTION_LAST_SUCCESS.labels(name).set(time.time())
    ctx.update(listed=planned.listed, candidates=len(planned.decisions), enqueued=sent)
    ctx.update({f"skipped_{reason}": n for reason, n in sorted(planned.skipped.items())})
    log.info("retention run done", extra={"ctx": ctx})
    return RunResult(name, "ok", planned, sent)


async def run_once(
    settings: Settings, policies: dict[str, Policy], enqueue: bool
) -> list[RunResult | tuple[str, Plan | ListingError]]:
    """``retention run`` (enqueue) or ``retention plan`` (plans or listing errors, nothing sent)."""
    redis_client = aioredis.Redis.from_url(settings.redis_url)
    try:
        async with new_session(settings) as session:
            source = lister(session, redis_client, settings)
            if not enqueue:
                out: list[RunResult | tuple[str, Plan | ListingError]] = []
                for name, policy in policies.items():
                    try:
                        out.append((name, await plan_policy(source, name, policy)))
                    except ListingError as exc:
                        out.append((name, exc))
                return out
            with Producer(settings.redis_url, settings.queue) as producer:
                return [await run_policy(source, producer, n, p) for n, p in policies.items()]
    finally:
        await redis_client.aclose()


async def _serve_metrics(_: web.Request) -> web.Response:
    return web.Response(body=generate_latest(metrics.REGISTRY), content_type="text/plain", charset="utf-8")


class _State:
    """Last attempt and success per policy in Redis; a Redis failure is logged and treated as unknown."""

    def __init__(self, url: str) -> None:
        self.redis = aioredis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)

    async def read(self, policy: str) -> tuple[float | None, float | None]:
        try:
            values = await self.redis.hmget(STATE_KEY.format(policy=policy), ["last_attempt", "last_success"])
        except redis.RedisError as exc:
            log.warning("cannot read the schedule state of %s: %s", policy, exc)
            return None, None
        attempt, success = (float(v) if v is not None else None for v in values)
        return attempt, success

    async def write(self, policy: str, **fields: float) -> None:
        try:
            await self.redis.hset(STATE_KEY.format(policy=policy), mapping=fields)
        except redis.RedisError as exc:
            log.warning("cannot store the schedule state of %s: %s", policy, exc)

    async def close(self) -> None:
        await self.redis.aclose()


def _moment(unix: float | None) -> datetime | None:
    return None if unix is None else datetime.fromtimestamp(unix, UTC)


async def beat(settings: Settings, policies: dict[str, Policy], stop: asyncio.Event) -> None:
    """Run every policy on its schedule until ``stop`` is set; serves /metrics meanwhile."""
    runner = web.AppRunner(web.Application(), access_log=None)
    runner.app.router.add_get("/metrics", _serve_metrics)
    await runner.setup()
    await web.TCPSite(runner, settings.metrics_host, settings.beat_metrics_port).start()
    port = runner.addresses[0][1]
    log.info("beat metrics on http://%s:%s/metrics", settings.metrics_host, port)
    state = _State(settings.redis_url)
    schedules = {name: policy.schedule() for name, policy in policies.items()}
    due: dict[str, datetime] = {}
    for name in policies:
        attempt, success = await state.read(name)
        if success is not None:
            metrics.RETENTION_LAST_SUCCESS.labels(name).set(success)
        due[name] = schedules[name].next_run(datetime.now(UTC), _moment(attempt))
        log.info("policy %s next runs at %s", name, due[name].isoformat(timespec="seconds"))
    try:
        async with new_session(settings) as session:
            client = lister(session, state.redis, settings)
            with Producer(settings.redis_url, settings.queue) as producer:
                while not stop.is_set():
                    for name in sorted(due, key=due.__getitem__):
                        if stop.is_set() or due[name] > datetime.now(UTC):
                            continue
                        started = time.time()
                        await state.write(name, last_attempt=started)
                        result = await run_policy(client, producer, name, policies[name])
                        if result.result == "ok":
                            await state.write(name, last_success=time.time())
                        due[name] = schedules[name].next_run(datetime.now(UTC), _moment(started))
                    wait = (min(due.values()) - datetime.now(UTC)).total_seconds()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=min(max(wait, 0.0), 60.0))
    finally:
        await state.close()
        await runner.cleanup()


def load(settings: Settings, only: str | None = None) -> dict[str, Policy]:
    """The policies of ``VBS_RETENTION_FILE`` (only ``only`` when given); PolicyError when there are none."""
    if settings.retention_file is None:
        raise PolicyError("VBS_RETENTION_FILE is not set: name a TOML file of [policies.NAME] tables")
    policies = load_policies(Path(settings.retention_file))
    if only is not None:
        if only not in policies:
            raise PolicyError(f"no policy {only!r} in {settings.retention_file} (has: {sorted(policies)})")
        policies = {only: policies[only]}
    if not policies:
        raise PolicyError(f"{settings.retention_file} defines no [policies.NAME] table")
    return policies


def command(settings: Settings, only: str | None, enqueue: bool, as_json: bool) -> int:
    """``retention plan`` / ``retention run``. Exit status 0, or 1 when a listing or the broker failed."""
    failed = False
    documents: list[dict[str, object]] = []
    for item in asyncio.run(run_once(settings, load(settings, only), enqueue)):
        if isinstance(item, RunResult):
            name, planned, error = item.policy, item.plan, item.error
        else:
            name, found = item
            planned, error = (found, None) if isinstance(found, Plan) else (None, f"listing failed: {found}")
        failed = failed or error is not None
        if as_json:
            document: dict[str, object] = planned.as_json() if planned else {"policy": name}
            if isinstance(item, RunResult):
                document.update(result=item.result, enqueued=item.enqueued)
            documents.append(document | ({"error": error} if error else {}))
            continue
        if planned is not None:
            print(table(planned))
        if isinstance(item, RunResult) and item.result != "list_failed":
            print(f"policy {name}: enqueued {item.enqueued} deletions")
        if error is not None:
            print(f"policy {name}: {error}", file=sys.stderr)
    if as_json:
        print(json.dumps(documents, indent=2))
    return 1 if failed else 0


def main(settings: Settings, policies: dict[str, Policy]) -> int:
    """``vbs-deleter beat``: serve until SIGTERM or SIGINT."""
    logs.configure(settings)
    log.info("beat started: %d policies, metrics on port %s", len(policies), settings.beat_metrics_port)

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await beat(settings, policies, stop)

    asyncio.run(serve())
    return 0
