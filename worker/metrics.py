"""Every Prometheus metric of the worker, defined in one place. Labels are bounded by construction.

Label values come from small fixed sets (outcomes, reasons, operations) or are passed through
:func:`bounded_code` / :func:`status_label`, so a misbehaving server cannot create unbounded series.
"""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "vbs_deleter"
_CODE = re.compile(r"[A-Za-z][A-Za-z0-9_.]{0,39}")
MAX_CODES = 100  # distinct error-code label values per process
_seen_codes: set[str] = set()

REGISTRY = CollectorRegistry(auto_describe=True)

HTTP_REQUESTS = Counter(
    f"{PREFIX}_http_requests",
    "HTTP attempts to VBS by operation and answer status (status 'none' when no answer arrived).",
    ["operation", "status"],
    registry=REGISTRY,
)
REQUEST_DURATION = Histogram(
    f"{PREFIX}_http_request_duration_seconds",
    "Time from sending a request to VBS to reading its whole answer, seconds.",
    ["operation"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=REGISTRY,
)
IN_FLIGHT = Gauge(
    f"{PREFIX}_http_requests_in_flight", "Requests to VBS sent and not yet answered.", registry=REGISTRY
)
DELETIONS = Counter(
    f"{PREFIX}_deletions",
    "Deletions finished, by outcome: accepted, already_gone, failed, or duplicate (not sent again).",
    ["outcome"],
    registry=REGISTRY,
)
FAILURES = Counter(
    f"{PREFIX}_deletion_failures",
    "Failed deletions by the last HTTP status ('none' when no answer) and VBS error code ('none' if absent).",
    ["status", "error_code"],
    registry=REGISTRY,
)
RETRIES = Counter(
    f"{PREFIX}_retries",
    "Attempts repeated after a transient error or throttling, by reason (status_503, timeout, throttled...).",
    ["reason"],
    registry=REGISTRY,
)
REJECTED_TASKS = Counter(
    f"{PREFIX}_rejected_tasks",
    "Tasks refused by contract validation, by reason; no HTTP call was made for them.",
    ["reason"],
    registry=REGISTRY,
)
IAM_TOKEN_REQUESTS = Counter(
    f"{PREFIX}_iam_token_requests",
    "Token requests to IAM by result: issued, throttled, server_error, transport_error, refused, malformed.",
    ["result"],
    registry=REGISTRY,
)
AUTH_FAILURES = Counter(
    f"{PREFIX}_auth_failures",
    "401 answers from VBS by auth mode (token, iam, aksk, none).",
    ["mode"],
    registry=REGISTRY,
)
AUTH_BLOCKED = Gauge(
    f"{PREFIX}_auth_blocked",
    "1 while sending is stopped because the AK/SK signatures were rejected repeatedly, else 0.",
    registry=REGISTRY,
)

RETENTION_CANDIDATES = Counter(
    f"{PREFIX}_retention_candidates",
    "Backups a retention policy run found expired (enqueued plus skipped), by policy.",
    ["policy"],
    registry=REGISTRY,
)
RETENTION_ENQUEUED = Counter(
    f"{PREFIX}_retention_enqueued",
    "Backups a retention policy run put on the deletion queue, by policy.",
    ["policy"],
    registry=REGISTRY,
)
RETENTION_SKIPPED = Counter(
    f"{PREFIX}_retention_skipped",
    "Expired backups a retention run did not enqueue, by policy and reason (keep_newest, has_dependants, "
    "waiting_for_dependants, cap, unparseable).",
    ["policy", "reason"],
    registry=REGISTRY,
)
RETENTION_RUNS = Counter(
    f"{PREFIX}_retention_runs",
    "Retention policy runs by result: ok, list_failed (nothing enqueued), enqueue_failed.",
    ["policy", "result"],
    registry=REGISTRY,
)
RETENTION_LAST_SUCCESS = Gauge(
    f"{PREFIX}_retention_last_success_timestamp_seconds",
    "Unix time at which the policy's last successful run ended, seconds.",
    ["policy"],
    registry=REGISTRY,
)


def status_label(status: int) -> str:
    """HTTP status as a label; 0 (no answer) becomes 'none'."""
    return str(status) if 100 <= status <= 599 else "none"


def bounded_code(code: str | None) -> str:
    """An error code as a label: the first ``MAX_CODES`` plausible codes are kept, others are 'other'."""
    if code is None:
        return "none"
    if code in _seen_codes:
        return code
    if _CODE.fullmatch(code) and len(_seen_codes) < MAX_CODES:
        _seen_codes.add(code)
        return code
    return "other"


RATE_LIMIT_WAIT = Histogram(
    f"{PREFIX}_rate_limit_wait_seconds",
    "Time a request waited for a token of the shared rate limit, seconds.",
    ["bucket"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=REGISTRY,
)
RATE_LIMIT_LEVEL = Gauge(
    f"{PREFIX}_rate_limit_tokens",
    "Tokens left in the shared bucket at this worker's last call (bucket size is VBS_RATE_BURST).",
    ["bucket"],
    registry=REGISTRY,
)
RATE_LIMIT_PAUSES = Counter(
    f"{PREFIX}_rate_limit_pauses",
    "Times this worker paused the shared bucket for every worker after a 429.",
    ["bucket"],
    registry=REGISTRY,
)
