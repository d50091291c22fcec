"""Following an accepted deletion to its end: the poll schedule and the reading of polls (pure), and the
:func:`follow` coroutine.

In ``cloudbackups`` mode the delete answer carries a job ID, polled with ``GET /v1/{p}/jobs/{id}`` until
SUCCESS or FAIL. The native modes return no job: the backup is read until it answers 404. Polls go through
the caller's ``poll`` callable (the engine's attempt helper), so they share its concurrency slots, rate
limiting and request metrics. Durations are seconds on ``time.monotonic()``.
"""

from __future__ import annotations

import asyncio
import enum
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from worker import logs, metrics
from worker.outcome import Answer, retry_after_seconds
from worker.settings import Settings

log = logs.get("jobs")

_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
FAILED_BACKUP_STATES = frozenset({"error", "error_deleting"})  # a backup whose deletion did not go through


@dataclass(frozen=True, slots=True)
class JobResult:
    """How a followed deletion ended. ``status`` is a bounded label: success, fail, timeout or error."""

    status: str
    job_id: str | None  # None in native modes (the backup itself is read)
    polls: int  # reads made
    seconds: float  # from the accepted delete to the last read
    error_code: str | None = None  # the job's error_code on FAIL, or the read's error code on error
    fail_reason: str | None = None  # the job's fail_reason, the backup's fail_reason, or the read's message


class Poll(enum.Enum):
    """What one read says about the deletion."""

    DONE = "success"  # job SUCCESS, or the backup answers 404
    FAILED = "fail"  # job FAIL, or the backup is in an error state
    PENDING = "pending"  # still running, or a transient answer (timeout, 429, 408, 5xx): read again
    BROKEN = "error"  # a permanent error reading it (401, 403, unknown job...): stop following


def usable_job_id(job_id: str | None) -> bool:
    """True for a job ID that may go into a URL path, an exemplar and a label (1-64 of [A-Za-z0-9_-])."""
    return job_id is not None and _JOB_ID.fullmatch(job_id) is not None


def poll_delay(polls: int, first: float, ceiling: float) -> float:
    """Seconds to wait before read number ``polls + 1``: ``first * 2**polls``, at most ``ceiling``."""
    return min(ceiling, first * 2.0 ** min(polls, 60))


def judge(answer: Answer, by_job: bool) -> Poll:
    """Read one poll: a job answer (``by_job``) or a backup answer (native modes). No credentials (nothing
    sent) is broken; a 401 after which the auth has fresh credentials is read again."""
    if answer.auth_error is not None:
        return Poll.BROKEN
    if answer.auth_retry:
        return Poll.PENDING
    if answer.status == 0 or answer.status in (408, 429) or answer.status >= 500:
        return Poll.PENDING
    if by_job:
        if 200 <= answer.status < 300:
            return {"SUCCESS": Poll.DONE, "FAIL": Poll.FAILED}.get(answer.state or "", Poll.PENDING)
        return Poll.BROKEN
    if answer.status == 404:
        return Poll.DONE
    if 200 <= answer.status < 300:
        return Poll.FAILED if answer.state in FAILED_BACKUP_STATES else Poll.PENDING
    return Poll.BROKEN


async def follow(
    poll: Callable[[], Awaitable[Answer]],
    job_id: str | None,
    backup_id: str,
    settings: Settings,
    ctx: dict[str, object],
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> JobResult:
    """Poll until the deletion is done, failed, unreadable or past ``settings.job_deadline``.

    ``job_id`` None reads the backup (native modes). Waits follow :func:`poll_delay`, stretched to an
    answer's ``Retry-After`` (capped by ``settings.retry_after_max``) and cut at the deadline; ``sleep``
    does them (the engine's is cut short by the shutdown deadline, which ends the follow with its error).
    Counts the result in :data:`~worker.metrics.JOBS` and :data:`~worker.metrics.JOB_DURATION`, keeps
    the job in :data:`~worker.metrics.RECENT_JOBS` and logs the end with ``ctx``.
    """
    started = clock()
    deadline = started + settings.job_deadline
    if job_id is not None:
        metrics.RECENT_JOBS.record(job_id, backup_id, "running")
    polls = 0
    last: Answer | None = None
    verdict = Poll.PENDING
    while verdict is Poll.PENDING:
        remaining = deadline - clock()
        if remaining <= 0:
            break
        wait = poll_delay(polls, settings.job_poll_interval, settings.job_poll_max_interval)
        asked = retry_after_seconds(last.retry_after) if last is not None else None
        if asked is not None:
            wait = max(wait, min(asked, settings.retry_after_max))
        await sleep(min(wait, remaining))
        last = await poll()
        polls += 1
        if last.auth_retry:  # counted like the delete's own refresh, so every refreshed 401 shows
            metrics.RETRIES.labels("auth_refresh").inc()
        verdict = judge(last, by_job=job_id is not None)
    status = "timeout" if verdict is Poll.PENDING else verdict.value
    why = last if last is not None and verdict in (Poll.FAILED, Poll.BROKEN) else None
    result = JobResult(
        status=status,
        job_id=job_id,
        polls=polls,
        seconds=clock() - started,
        error_code=why.error_code if why is not None else None,
        fail_reason=why.message if why is not None else None,
    )
    metrics.JOBS.labels(status).inc()
    metrics.JOB_DURATION.labels(status).observe(result.seconds)
    if job_id is not None:
        metrics.RECENT_JOBS.record(job_id, backup_id, status)
    ctx.update(job_status=status, job_polls=polls, job_seconds=round(result.seconds, 3))
    if status == "success":
        log.info("deletion confirmed", extra={"ctx": ctx})
    else:
        ctx.update(error_code=result.error_code, error=result.fail_reason)
        log.warning("deletion not confirmed: job %s", status, extra={"ctx": ctx})
    return result
