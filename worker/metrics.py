"""Every Prometheus metric of the worker, defined in one place. Labels are bounded by construction.

Label values come from small fixed sets (outcomes, reasons, operations) or are passed through
:func:`bounded_code` / :func:`status_label`, so a misbehaving server cannot create unbounded series.
Backup and job IDs never become labels of counters: they travel as exemplars (OpenMetrics exposition) and
in :data:`RECENT_JOBS`, which holds at most ``VBS_RECENT_JOBS`` series. Each worker process has its own
registry and serves it on its own port (no multiprocess mode; see the README).
"""

from __future__ import annotations

import platform
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from worker import __version__

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
FOLLOWING = Gauge(
    f"{PREFIX}_follow_ups_in_progress",
    "Accepted deletions being followed to their end (their tasks are acknowledged already).",
    registry=REGISTRY,
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
TASKS = Counter(
    f"{PREFIX}_tasks",
    "Valid task messages whose deletions all finished, by task name (the backlog drains at this rate).",
    ["task"],
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


JOBS = Counter(
    f"{PREFIX}_jobs",
    "Followed deletions by final status: success, fail (the job ended FAIL or the backup went to error), "
    "timeout (still running at VBS_JOB_DEADLINE) or error (the job could not be read).",
    ["status"],
    registry=REGISTRY,
)
JOB_DURATION = Histogram(
    f"{PREFIX}_job_duration_seconds",
    "Time from an accepted delete to the job's final status, seconds.",
    ["status"],
    buckets=(0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0),
    registry=REGISTRY,
)
BUILD_INFO = Gauge(
    f"{PREFIX}_build_info",
    "Always 1; the labels say which worker version runs on which Python.",
    ["version", "python_version"],
    registry=REGISTRY,
)
BUILD_INFO.labels(__version__, platform.python_version()).set(1)


class RecentJobs(Collector):
    """The last ``capacity`` job IDs with their status, as ``vbs_deleter_recent_job_info`` series of value 1.

    Statuses: ``running`` while followed, ``accepted`` when not followed, then the final status of
    :data:`JOBS`. A job keeps its place when its status changes; the oldest is dropped beyond capacity.
    """

    NAME = f"{PREFIX}_recent_job_info"

    def __init__(self, capacity: int = 50) -> None:
        self._capacity = capacity
        self._jobs: OrderedDict[str, tuple[str, str]] = OrderedDict()  # job_id -> (backup_id, status)
        self._lock = threading.Lock()

    def resize(self, capacity: int) -> None:
        """Keep at most ``capacity`` jobs from now on (0 exports none)."""
        with self._lock:
            self._capacity = capacity
            self._trim()

    def record(self, job_id: str, backup_id: str, status: str) -> None:
        """Add a job or update its status."""
        with self._lock:
            self._jobs[job_id] = (backup_id, status)
            self._trim()

    def _trim(self) -> None:
        while len(self._jobs) > self._capacity:
            self._jobs.popitem(last=False)

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            self.NAME,
            "The last VBS_RECENT_JOBS deletion jobs, value 1, with job_id, backup_id and status.",
            labels=["job_id", "backup_id", "status"],
        )
        with self._lock:
            for job_id, (backup_id, status) in self._jobs.items():
                family.add_metric([job_id, backup_id, status], 1.0)
        yield family


class ReadAtScrape(Collector):
    """Gauges set by their sources just before each scrape (see worker/http_server.py), mostly from Redis.

    A gauge is absent until its source has set it, and again after a failed read, so a dashboard shows
    "no data" rather than a stale number.
    """

    HELP: Mapping[str, str] = {
        f"{PREFIX}_queue_messages": "Task messages waiting in the Redis list of the queue (LLEN at scrape).",
        f"{PREFIX}_dead_letters": "Entries in the dead-letter store (read at scrape).",
    }

    def __init__(self) -> None:
        self._values: dict[str, tuple[dict[str, str], float]] = {}
        self._lock = threading.Lock()

    def set(self, name: str, value: float, labels: Mapping[str, str] | None = None) -> None:
        """Set gauge ``name`` (a key of :attr:`HELP`)."""
        if name not in self.HELP:
            raise KeyError(name)
        with self._lock:
            self._values[name] = (dict(labels or {}), float(value))

    def clear(self, name: str) -> None:
        """Drop gauge ``name`` until it is set again (its source could not be read)."""
        with self._lock:
            self._values.pop(name, None)

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            values = dict(self._values)
        for name, (labels, value) in sorted(values.items()):
            family = GaugeMetricFamily(name, self.HELP[name], labels=sorted(labels))
            family.add_metric([labels[key] for key in sorted(labels)], value)
            yield family


QUEUE_MESSAGES = f"{PREFIX}_queue_messages"
DEAD_LETTERS = f"{PREFIX}_dead_letters"
RECENT_JOBS = RecentJobs()
READ_AT_SCRAPE = ReadAtScrape()
REGISTRY.register(RECENT_JOBS)
REGISTRY.register(READ_AT_SCRAPE)


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
RATE_LIMIT_RATE = Gauge(
    f"{PREFIX}_rate_limit_per_second",
    "The shared rate of each bucket over all workers (VBS_RATE_LIMIT, VBS_POLL_RATE_LIMIT), requests/second.",
    ["bucket"],
    registry=REGISTRY,
)


def set_rate_limits(rate_limit: float, poll_rate_limit: float) -> None:
    """Export the configured rates; a bucket that is off (0) is left out (utilisation is undefined)."""
    for bucket, rate in (("delete", rate_limit), ("poll", poll_rate_limit)):
        if rate > 0:
            RATE_LIMIT_RATE.labels(bucket).set(rate)
