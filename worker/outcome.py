"""Pure decisions: what an answer from VBS means for a deletion, and how long to wait before retrying.

No I/O here; the engine feeds answers in and acts on the verdicts.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime


class Verdict(enum.Enum):
    """What to do after one delete attempt."""

    ACCEPTED = "accepted"  # 2xx: the deletion is under way (cloudbackups mode carries a job_id)
    GONE = "already_gone"  # 404: the backup does not exist (a retry after a lost answer looks the same)
    RETRY = "retry"  # transient: wait with backoff, then try again while attempts remain
    THROTTLED = "throttled"  # 429: wait for Retry-After or a backoff, then try again
    FAILED = "failed"  # permanent: do not try again


@dataclass(frozen=True, slots=True)
class Answer:
    """One HTTP attempt as the client saw it. ``status`` is 0 when no HTTP answer arrived."""

    status: int
    job_id: str | None = None
    error_code: str | None = None
    message: str | None = None
    request_id: str | None = None
    retry_after: str | None = None  # raw Retry-After header
    transport_error: str | None = None  # "timeout", "connection" or "disconnect" when status == 0
    auth_error: str | None = None  # nothing was sent, no credentials (worker.auth.AuthError.reason)
    auth_retry: bool = False  # a 401 after which the auth has fresh credentials: worth one more attempt
    state: str | None = None  # from a 2xx read: the job's status (INIT, RUNNING, ...) or the backup's


@dataclass(frozen=True, slots=True)
class Decision:
    """A verdict and the bounded label that explains it (used as a metric label)."""

    verdict: Verdict
    reason: str


def classify(answer: Answer, retry_statuses: frozenset[int]) -> Decision:
    """Map one attempt to a decision. Transport errors are always retryable: the ledger makes repeats safe.

    Missing credentials fail the deletion, except while IAM is unavailable (retried like a 503).
    """
    if answer.auth_error is not None:
        verdict = Verdict.RETRY if answer.auth_error == "iam_unavailable" else Verdict.FAILED
        return Decision(verdict, f"auth_{answer.auth_error}")
    if answer.status == 0:
        return Decision(Verdict.RETRY, answer.transport_error or "connection")
    if 200 <= answer.status < 300:
        return Decision(Verdict.ACCEPTED, "accepted")
    if answer.status == 404:
        if answer.error_code and answer.error_code.startswith("APIG"):
            return Decision(Verdict.FAILED, "no_such_route")  # the gateway knows no such API: misconfigured
        return Decision(Verdict.GONE, "already_gone")
    if answer.status == 429:
        return Decision(Verdict.THROTTLED, "throttled")
    if answer.status in retry_statuses:
        return Decision(Verdict.RETRY, f"status_{answer.status}")
    return Decision(Verdict.FAILED, f"status_{answer.status}")


def backoff_delay(attempt: int, base: float, ceiling: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(ceiling, base * 2**(attempt-1))] seconds.

    ``attempt`` counts the failed attempts so far (1 after the first failure).
    """
    return rng.uniform(0.0, min(ceiling, base * 2 ** max(0, attempt - 1)))


def retry_after_seconds(header: str | None, now: datetime | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or HTTP date); None if absent or unusable.

    Negative or past values mean "now" (0.0).
    """
    if header is None or not header.strip():
        return None
    value = header.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now = now or datetime.now(UTC)
    return max(0.0, (when - now).total_seconds())


def retry_wait(
    answer: Answer, attempt: int, base: float, ceiling: float, retry_after_cap: float, rng: random.Random
) -> float:
    """Seconds before the next attempt: the server's Retry-After (capped) if positive, else backoff."""
    asked = retry_after_seconds(answer.retry_after)
    if asked:
        return min(asked, retry_after_cap)
    return backoff_delay(attempt, base, ceiling, rng)
