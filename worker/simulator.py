"""Local VBS server for the demo, the tests and benchmarks (stdlib + aiohttp only, no other worker imports).

Serves the delete (cloudbackups and native), show, list and job routes described in
/work/shared/vbs-api.md, with injectable faults, ghost deletions, throttling, token checks and asynchronous
deletion jobs, an IAM token route (project-scoped tokens with a set lifetime, early revocation), AK/SK
signature checks with the gateway's key lockout, plus admin routes under ``/_sim/`` (seed, stats, config,
reset, iam/revoke, auth). Durations are seconds on
time.monotonic(); timestamps are naive UTC strings. All state lives in one ``_State`` stored in the app;
due jobs are finalised lazily (``_State.settle``) whenever their project is read or written, so no
background task runs. Where the vendor documents no error code, the code used is the simulator's choice
and is marked as such.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import heapq
import hmac
import itertools
import math
import random
import re
import secrets
import signal
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, NamedTuple
from urllib.parse import parse_qsl, quote, unquote, urlencode

from aiohttp import web
from aiohttp.typedefs import Handler

TIME_FORMAT: Final = "%Y-%m-%dT%H:%M:%S.%f"
# Host of next/self links, deliberately not the simulator's: clients must reuse only the query string.
FOREIGN_HOST: Final = "https://vbs-internal.example.invalid:8443"
MAX_PAGE: Final = 1000
DELETABLE: Final = frozenset({"available", "error"})
STATUSES: Final = DELETABLE | {"creating", "restoring", "deleting", "error_restoring", "error_deleting"}
JOB_FAIL_CODE: Final = "VolumeBackup.0101"
JOB_FAIL_REASON: Final = "deleting the backup failed (simulated)"
KINDS: Final = ("delete", "job", "list", "show")
SIGNATURE_SKEW: Final = 15 * 60.0  # seconds an X-Sdk-Date may be off
LOCKOUT_AFTER: Final = 5  # a key is locked after more than this many consecutive signature failures
LOCKOUT: Final = 300.0  # seconds a locked key stays locked
_AUTHORIZATION: Final = re.compile(
    r"SDK-HMAC-SHA256 Access=([^,\s]+), SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})"
)


@dataclass
class SimConfig:
    """Live behaviour of the simulator. Rates are fractions in 0..1, times are seconds, 0 disables."""

    latency: float = 0.0  # added to every API answer
    fault_rate: float = 0.0  # share of delete requests answered with a transient fault, nothing done
    fault_statuses: tuple[int, ...] = (408, 503, 504)  # fault status, chosen uniformly
    ghost_rate: float = 0.0  # share of accepted deletes that are carried out but answered 504
    rate_limit: float = 0.0  # requests/second over all API routes
    rate_burst: float = 0.0  # token bucket size; 0 means max(1, rate_limit)
    retry_after: float | None = None  # Retry-After seconds sent with 429 (rounded up), None = no header
    job_duration: float = 0.0  # INIT until half of it, RUNNING until all of it, then SUCCESS or FAIL
    job_fail_rate: float = 0.0  # share of accepted cloudbackups deletions whose job ends FAIL
    token: str | None = None  # a static X-Auth-Token accepted (and, when set, auth is required)
    iam_user: str | None = None  # IAM user name the token route expects (None: any)
    iam_password: str | None = None  # enables the IAM token route; its tokens are then required
    iam_domain: str | None = None  # IAM domain name the token route expects (None: any)
    token_lifetime: float = 86400.0  # seconds an issued IAM token is valid
    iam_fault_rate: float = 0.0  # share of IAM token requests answered with a fault
    iam_fault_statuses: tuple[int, ...] = (429, 503)  # IAM fault status, chosen uniformly
    access_key: str | None = None  # AK whose signatures are accepted (with secret_key); auth required
    secret_key: str | None = None
    auto_create: bool = False  # a never-seeded ID exists (available) on its first delete
    seed: int | None = None  # seed of the one random.Random behind all injected behaviour
    list_fail_after_pages: int | None = None  # list pages with index >= this answer 500


_FIELDS: Final = frozenset(f.name for f in dataclasses.fields(SimConfig))


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_config(config: SimConfig) -> None:
    """Raise ValueError naming the first invalid field."""
    for name in ("fault_rate", "ghost_rate", "job_fail_rate"):
        value = getattr(config, name)
        if not (_is_number(value) and 0 <= value <= 1):
            raise ValueError(f"{name} must be a number in 0..1")
    for name in ("latency", "rate_limit", "job_duration"):
        value = getattr(config, name)
        if not (_is_number(value) and value >= 0):
            raise ValueError(f"{name} must be a number >= 0")
    if not (_is_number(config.rate_burst) and (config.rate_burst == 0 or config.rate_burst >= 1)):
        raise ValueError("rate_burst must be 0 or a number >= 1")
    codes = config.fault_statuses
    if not (isinstance(codes, tuple) and codes and all(_is_int(c) and 400 <= c <= 599 for c in codes)):
        raise ValueError("fault_statuses must be a non-empty list of HTTP error statuses (400..599)")
    if config.retry_after is not None and not (_is_number(config.retry_after) and config.retry_after >= 0):
        raise ValueError("retry_after must be null or a number >= 0")
    for name in ("token", "iam_user", "iam_password", "iam_domain", "access_key", "secret_key"):
        value = getattr(config, name)
        if value is not None and not (isinstance(value, str) and value):
            raise ValueError(f"{name} must be null or a non-empty string")
    if (config.access_key is None) != (config.secret_key is None):
        raise ValueError("access_key and secret_key go together")
    if not (_is_number(config.token_lifetime) and config.token_lifetime > 0):
        raise ValueError("token_lifetime must be a number > 0")
    if not (_is_number(config.iam_fault_rate) and 0 <= config.iam_fault_rate <= 1):
        raise ValueError("iam_fault_rate must be a number in 0..1")
    codes = config.iam_fault_statuses
    if not (isinstance(codes, tuple) and codes and all(_is_int(c) and 400 <= c <= 599 for c in codes)):
        raise ValueError("iam_fault_statuses must be a non-empty list of HTTP error statuses (400..599)")
    if not isinstance(config.auto_create, bool):
        raise ValueError("auto_create must be a boolean")
    if config.seed is not None and not _is_int(config.seed):
        raise ValueError("seed must be null or an integer")
    pages = config.list_fail_after_pages
    if pages is not None and not (_is_int(pages) and pages >= 0):
        raise ValueError("list_fail_after_pages must be null or an integer >= 0")


def _utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _fmt(moment: datetime) -> str:
    return moment.strftime(TIME_FORMAT)


@dataclass
class _Backup:
    """One backup; ``parent_id`` and ``undeletable`` are internal (never rendered by the API)."""

    id: str
    name: str
    description: str
    status: str
    volume_id: str
    size: int  # GB
    created_at: datetime  # naive UTC
    updated_at: datetime  # naive UTC
    parent_id: str | None
    undeletable: bool
    fail_reason: str | None = None
    snapshot_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    availability_zone: str = "eu-de-01"


@dataclass
class _Job:
    """A deletion in progress. ``begun`` and ``due`` are monotonic seconds; ``due`` = begun + duration."""

    id: str
    project_id: str
    backup_id: str
    begun: float
    due: float
    begun_at: datetime  # naive UTC wall clock at acceptance
    ended_at: datetime  # naive UTC wall clock at ``due``
    fails: bool

    def status(self, now: float) -> str:
        """INIT, RUNNING after half the duration, SUCCESS or FAIL from ``due`` on."""
        if now >= self.due:
            return "FAIL" if self.fails else "SUCCESS"
        return "RUNNING" if now >= (self.begun + self.due) / 2 else "INIT"


@dataclass
class _Project:
    """Backups of one project, the index of incremental children and the heap of unsettled jobs."""

    backups: dict[str, _Backup] = field(default_factory=dict)
    children: dict[str, set[str]] = field(default_factory=dict)  # parent id -> ids naming it as parent
    seen: set[str] = field(default_factory=set)  # every id ever present here (auto_create applies once)
    due: list[tuple[float, int, _Job]] = field(default_factory=list)  # heap on (due, sequence)

    def add(self, backup: _Backup) -> None:
        self.backups[backup.id] = backup
        self.seen.add(backup.id)
        if backup.parent_id is not None:
            self.children.setdefault(backup.parent_id, set()).add(backup.id)

    def remove(self, backup: _Backup) -> None:
        del self.backups[backup.id]
        if backup.parent_id is not None:
            siblings = self.children[backup.parent_id]
            siblings.discard(backup.id)
            if not siblings:
                del self.children[backup.parent_id]

    def has_dependants(self, backup: _Backup) -> bool:
        """True when another present backup of the same volume names this one as its parent."""
        kids = self.children.get(backup.id, ())
        return any(self.backups[kid].volume_id == backup.volume_id for kid in kids)


@dataclass
class _Stats:
    """Counters kept up to date per request (O(1) each). Backup IDs are assumed unique across projects."""

    accepted: int = 0
    removed: int = 0
    deleted_more_than_once: int = 0
    max_accepted_per_backup: int = 0
    faults_injected: int = 0
    ghosts_injected: int = 0
    requests: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    statuses: dict[str, int] = field(default_factory=dict)
    accepted_per_backup: dict[str, int] = field(default_factory=dict)
    iam_requests: int = 0
    iam_faults: int = 0
    iam_issued: dict[str, int] = field(default_factory=dict)  # project id -> tokens issued
    auth_rejected: dict[str, int] = field(default_factory=dict)  # gateway 401s by error code
    signature_failures: int = 0
    key_locks: int = 0  # times the access key was locked
    first: float | None = None  # unix time of the first API request
    last: float | None = None


class _Refusal(NamedTuple):
    """Why a delete is refused; ``{id}`` in the messages is replaced by the backup ID."""

    status: int
    code: str  # VBS shape
    message: str  # VBS shape
    native_message: str  # native shape (Cinder's wording)


_MISSING: Final = _Refusal(
    404, "VolumeBackup.0110", "backup {id} not found", "Backup {id} could not be found."
)
_IMAGE: Final = _Refusal(
    400, "VolumeBackup.0113", "backup was used to create an image", "Invalid backup: used to create an image."
)
# The vendor documents no code for "status does not allow deletion": VolumeBackup.0106 is our choice, as is
# VolumeBackup.0107 for a backup with dependants.
_STATUS: Final = _Refusal(
    400,
    "VolumeBackup.0106",
    "backup status does not allow deletion",
    "Invalid backup: status must be available or error.",
)
_CHAIN: Final = _Refusal(
    400,
    "VolumeBackup.0107",
    "backup has dependent backups",
    "Invalid backup: Incremental backups exist for this backup.",
)
_COUNT_KEYS: Final = frozenset(
    {"project_id", "count", "status", "name_prefix", "volume_id", "age_days", "size"}
)
_SPEC_KEYS: Final = frozenset(
    {"id", "name", "status", "volume_id", "created_at", "age_days", "parent_id"}
) | {"undeletable", "description", "size"}


def _parse_time(text: str) -> datetime:
    """ISO 8601 (zone optional, naive means UTC) to naive UTC."""
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo is None else moment.astimezone(UTC).replace(tzinfo=None)


def _backup_from_spec(spec: object, now: datetime) -> _Backup:
    """Validate one seed entry (see the seed route) and build its backup; ValueError on bad input."""
    if not isinstance(spec, dict):
        raise ValueError("each backup must be a JSON object")
    unknown = spec.keys() - _SPEC_KEYS
    if unknown:
        raise ValueError(f"unknown backup fields: {sorted(unknown)}")
    for key in ("id", "name", "volume_id", "parent_id", "description", "created_at"):
        if key in spec and not isinstance(spec[key], str):
            raise ValueError(f"{key} must be a string")
    status = spec.get("status", "available")
    if status not in STATUSES:
        raise ValueError(f"status must be one of {sorted(STATUSES)}")
    size = spec.get("size", 10)
    if not (_is_int(size) and size >= 1):
        raise ValueError("size must be an integer >= 1 (GB)")
    undeletable = spec.get("undeletable", False)
    if not isinstance(undeletable, bool):
        raise ValueError("undeletable must be a boolean")
    if "created_at" in spec and "age_days" in spec:
        raise ValueError("give created_at or age_days, not both")
    if "created_at" in spec:
        created = _parse_time(spec["created_at"])
    else:
        age = spec.get("age_days", 0)
        if not (_is_number(age) and age >= 0):
            raise ValueError("age_days must be a number >= 0")
        created = now - timedelta(days=age)
    backup_id = spec.get("id") or str(uuid.uuid4())
    return _Backup(
        id=backup_id,
        name=spec.get("name", f"sim_{backup_id[:8]}"),
        description=spec.get("description", ""),
        status=status,
        volume_id=spec.get("volume_id") or str(uuid.uuid4()),
        size=size,
        created_at=created,
        updated_at=created,
        parent_id=spec.get("parent_id"),
        undeletable=undeletable,
    )


def _render(project: _Project, backup: _Backup, self_href: str) -> dict[str, Any]:
    """The API view of a backup (VBS list/show fields)."""
    return {
        "id": backup.id,
        "name": backup.name,
        "description": backup.description,
        "status": backup.status,
        "volume_id": backup.volume_id,
        "snapshot_id": backup.snapshot_id,
        "size": backup.size,
        "created_at": _fmt(backup.created_at),
        "updated_at": _fmt(backup.updated_at),
        "data_timestamp": _fmt(backup.created_at),
        "availability_zone": backup.availability_zone,
        "fail_reason": backup.fail_reason,
        "has_dependent_backups": project.has_dependants(backup),
        "is_incremental": backup.parent_id is not None,
        "links": [{"href": self_href, "rel": "self"}],
    }


@dataclass
class _IssuedToken:
    """An IAM token the simulator issued. ``expires_at`` is unix time (IAM speaks wall-clock UTC)."""

    project_id: str
    expires_at: float
    revoked: bool = False


def _canonical_request(
    method: str, raw_path: str, raw_query: str, headers: dict[str, str], body: bytes
) -> str:
    """SDK-HMAC-SHA256 canonical request (vbs-api.md section 8), written apart from the worker's signer."""
    segments = [quote(unquote(segment), safe="~") for segment in raw_path.split("/")]
    path = "/".join(segments) + ("" if raw_path.endswith("/") else "/")
    pairs = sorted(parse_qsl(raw_query, keep_blank_values=True))
    query = "&".join(f"{quote(k, safe='~')}={quote(v, safe='~')}" for k, v in pairs)
    names = sorted(headers)
    lines = "".join(f"{name}:{headers[name].strip()}\n" for name in names)
    return f"{method}\n{path}\n{query}\n{lines}\n{';'.join(names)}\n{hashlib.sha256(body).hexdigest()}"


def _signature(secret_key: str, sdk_date: str, canonical: str) -> str:
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    message = f"SDK-HMAC-SHA256\n{sdk_date}\n{digest}"
    return hmac.new(secret_key.encode(), message.encode(), hashlib.sha256).hexdigest()


class _State:
    """Everything the simulator knows, one per app. ``config`` is the caller's object, updated live."""

    rng: random.Random
    projects: dict[str, _Project]
    jobs: dict[str, _Job]  # cloudbackups jobs by id
    stats: _Stats
    tokens: float | None  # token bucket level, None = full
    stamp: float  # monotonic time of the last bucket update
    issued: dict[str, _IssuedToken]  # IAM tokens by token value
    failures_in_a_row: int  # consecutive signature failures of the access key
    locked_until: float  # monotonic time the access key is locked until
    _sequence: itertools.count[int]  # tie-breaker for the job heaps

    def __init__(self, config: SimConfig) -> None:
        _check_config(config)
        self.config = config
        self.reset()

    def reset(self) -> None:
        """Forget all backups, jobs and counters; reseed the random source."""
        self.rng = random.Random(self.config.seed)
        self.projects = {}
        self.jobs = {}
        self.stats = _Stats()
        self.tokens = None
        self.stamp = 0.0
        self.issued = {}
        self.failures_in_a_row = 0
        self.locked_until = 0.0
        self._sequence = itertools.count()

    @property
    def auth_required(self) -> bool:
        config = self.config
        return config.token is not None or config.iam_password is not None or config.access_key is not None

    def reject(self, code: str, message: str, request_id: str) -> web.Response:
        self.stats.auth_rejected[code] = self.stats.auth_rejected.get(code, 0) + 1
        return _gateway_error(401, code, message, request_id)

    async def authenticate(self, request: web.Request, request_id: str) -> web.Response | None:
        """None when the request carries a valid static token, IAM token for its project or signature."""
        project_id = request.match_info.get("project_id")
        if request.headers.get("Authorization", "").startswith("SDK-HMAC-SHA256"):
            return await self.check_signature(request, project_id, request_id)
        given = request.headers.get("X-Auth-Token", "")
        if self.config.token is not None and hmac.compare_digest(given.encode(), self.config.token.encode()):
            return None
        issued = self.issued.get(given)
        if issued is None:
            return self.reject("APIG.0301", "Incorrect IAM authentication information", request_id)
        if issued.revoked or time.time() >= issued.expires_at:
            return self.reject("APIG.0307", "The token must be updated", request_id)
        if project_id is not None and issued.project_id != project_id:
            message = "Incorrect IAM authentication information: the token is scoped to another project"
            return self.reject("APIG.0301", message, request_id)
        return None

    async def check_signature(
        self, request: web.Request, project_id: str | None, request_id: str
    ) -> web.Response | None:
        """Verify an SDK-HMAC-SHA256 signature; more than LOCKOUT_AFTER failures in a row lock the key."""
        now, config = time.monotonic(), self.config
        match = _AUTHORIZATION.fullmatch(request.headers["Authorization"])
        if match and match[1] == config.access_key and now < self.locked_until:
            message = "The access key is locked after repeated signature failures (simulator's code)"
            return self.reject("APIGW.0305", message, request_id)
        problem = self.signature_problem(request, match, project_id, await request.read())
        if problem is None:
            self.failures_in_a_row = 0
            return None
        self.stats.signature_failures += 1
        self.failures_in_a_row += 1
        if self.failures_in_a_row > LOCKOUT_AFTER:
            self.locked_until, self.failures_in_a_row = now + LOCKOUT, 0
            self.stats.key_locks += 1
        return self.reject("APIGW.0301", f"Incorrect IAM authentication information: {problem}", request_id)

    def signature_problem(
        self, request: web.Request, match: re.Match[str] | None, project_id: str | None, body: bytes
    ) -> str | None:
        config = self.config
        if match is None:
            return "malformed Authorization header"
        if config.access_key is None or config.secret_key is None or match[1] != config.access_key:
            return "unknown access key"
        names = match[2].split(";")
        if "host" not in names or "x-sdk-date" not in names or any(n not in request.headers for n in names):
            return "signed headers must include host and x-sdk-date and all be present"
        try:
            signed_at = datetime.strptime(request.headers["X-Sdk-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        except ValueError:
            return "malformed X-Sdk-Date"
        if abs((datetime.now(UTC) - signed_at).total_seconds()) > SIGNATURE_SKEW:
            return "X-Sdk-Date is more than 15 minutes off"
        if project_id is not None and request.headers.get("X-Project-Id", project_id) != project_id:
            return "X-Project-Id does not match the project in the path"
        headers = {name: request.headers[name] for name in names}
        canonical = _canonical_request(
            request.method, request.url.raw_path, request.url.raw_query_string, headers, body
        )
        if not hmac.compare_digest(_signature(config.secret_key, headers["x-sdk-date"], canonical), match[3]):
            return "verify aksk signature fail"
        return None

    def issue_token(self, body: object) -> tuple[int, dict[str, Any], str | None]:
        """The IAM password-token flow: (status, body, token or None). Keystone-shaped errors."""
        config = self.config
        try:
            if not isinstance(body, dict):
                raise TypeError("not an object")
            identity, scope = body["auth"]["identity"], body["auth"]["scope"]
            user = identity["password"]["user"]
            name, password, domain = user["name"], user["password"], user["domain"]["name"]
            project_id = scope["project"]["id"]
            if identity["methods"] != ["password"] or not all(
                isinstance(v, str) and v for v in (name, password, domain, project_id)
            ):
                raise TypeError("not a password request")
        except (KeyError, TypeError):
            invalid = {"code": 400, "message": "Invalid request body", "title": "Bad Request"}
            return 400, {"error": invalid}, None
        if config.iam_password is None:
            raise RuntimeError("the IAM route is only served with iam_password set")
        if (
            not hmac.compare_digest(password.encode(), config.iam_password.encode())
            or config.iam_user not in (None, name)
            or config.iam_domain not in (None, domain)
        ):
            wrong = {"code": 401, "message": "The username or password is wrong.", "title": "Unauthorized"}
            return 401, {"error": wrong}, None
        token = "MIIsim" + secrets.token_urlsafe(48)
        issued_at = datetime.now(UTC)
        expires_at = issued_at + timedelta(seconds=config.token_lifetime)
        self.issued[token] = _IssuedToken(project_id, expires_at.timestamp())
        self.stats.iam_issued[project_id] = self.stats.iam_issued.get(project_id, 0) + 1
        stamp = "%Y-%m-%dT%H:%M:%S.%fZ"
        answer = {
            "token": {
                "methods": ["password"],
                "issued_at": issued_at.strftime(stamp),
                "expires_at": expires_at.strftime(stamp),
                "project": {"id": project_id, "name": f"sim_{project_id[:8]}", "domain": {"name": domain}},
                "user": {"name": name, "domain": {"name": domain}},
            }
        }
        return 201, answer, token

    def admit(self, now: float) -> bool:
        """Take one token from the bucket (refilled at rate_limit per second); False when none is left."""
        rate = self.config.rate_limit
        if not rate:
            return True
        burst = self.config.rate_burst or max(1.0, rate)
        tokens = burst if self.tokens is None else min(burst, self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        admitted = tokens >= 1
        self.tokens = tokens - 1 if admitted else tokens
        return admitted

    def note_request(self, route_name: str | None) -> None:
        now = time.time()
        self.stats.first = now if self.stats.first is None else self.stats.first
        self.stats.last = now
        kind = (route_name or "").partition(":")[0]
        if kind in self.stats.requests:
            self.stats.requests[kind] += 1

    def note_answer(self, status: int) -> None:
        key = str(status)
        self.stats.statuses[key] = self.stats.statuses.get(key, 0) + 1

    def settle(self, project: _Project, now: float) -> None:
        """Finalise the project's jobs due by ``now``: SUCCESS removes the backup, FAIL marks it "error"."""
        while project.due and project.due[0][0] <= now:
            job = heapq.heappop(project.due)[2]
            backup = project.backups[job.backup_id]  # a deleting backup cannot be removed or re-seeded
            if job.fails:
                backup.status, backup.fail_reason, backup.updated_at = "error", JOB_FAIL_REASON, job.ended_at
            else:
                project.remove(backup)
                self.stats.removed += 1

    def settled(self, project_id: str, now: float) -> _Project:
        """The project with its due jobs finalised; an unknown project gives a fresh, unregistered one."""
        project = self.projects.get(project_id)
        if project is None:
            return _Project()
        self.settle(project, now)
        return project

    def refusal(self, project_id: str, project: _Project, backup_id: str) -> _Refusal | None:
        """Why the backup cannot be deleted now, or None; auto_create adds a never-seen ID here."""
        backup = project.backups.get(backup_id)
        if backup is None:
            if not self.config.auto_create or backup_id in project.seen:
                return _MISSING
            backup = _backup_from_spec({"id": backup_id}, _utcnow())
            self.projects.setdefault(project_id, project).add(backup)
        if backup.undeletable:
            return _IMAGE
        if backup.status not in DELETABLE:
            return _STATUS
        if project.has_dependants(backup):
            return _CHAIN
        return None

    def accept(self, project_id: str, project: _Project, backup_id: str, now: float, cloud: bool) -> _Job:
        """Start deleting a deletable backup: status "deleting", a job due after job_duration, counters."""
        backup = project.backups[backup_id]
        duration = self.config.job_duration
        fails = cloud and self.config.job_fail_rate > 0 and self.rng.random() < self.config.job_fail_rate
        wall = _utcnow()
        job = _Job(
            id=str(uuid.uuid4()),
            project_id=project_id,
            backup_id=backup_id,
            begun=now,
            due=now + duration,
            begun_at=wall,
            ended_at=wall + timedelta(seconds=duration),
            fails=fails,
        )
        backup.status, backup.fail_reason, backup.updated_at = "deleting", None, wall
        heapq.heappush(project.due, (job.due, next(self._sequence), job))
        if cloud:
            self.jobs[job.id] = job
        stats = self.stats
        stats.accepted += 1
        times = stats.accepted_per_backup[backup_id] = stats.accepted_per_backup.get(backup_id, 0) + 1
        if times == 2:
            stats.deleted_more_than_once += 1
        stats.max_accepted_per_backup = max(stats.max_accepted_per_backup, times)
        self.settle(project, now)  # job_duration 0: done on acceptance
        return job

    def seed(self, body: object) -> list[str]:
        """Add backups from a seed body (see the seed route); all or nothing, ValueError on bad input."""
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object")
        project_id = body.get("project_id")
        if not (isinstance(project_id, str) and project_id):
            raise ValueError("project_id must be a non-empty string")
        if "backups" in body:
            if body.keys() - {"project_id", "backups"}:
                raise ValueError("with backups, only project_id may be given")
            specs = body["backups"]
            if not isinstance(specs, list):
                raise ValueError("backups must be a list")
        else:
            unknown = body.keys() - _COUNT_KEYS
            if unknown:
                raise ValueError(f"unknown seed fields: {sorted(unknown)}")
            count, age = body.get("count"), body.get("age_days", 0)
            prefix = body.get("name_prefix", "autobk_")
            if not (isinstance(count, int) and not isinstance(count, bool) and count >= 0):
                raise ValueError("count must be an integer >= 0")
            if not isinstance(prefix, str) or not (_is_number(age) and age >= 0):
                raise ValueError("name_prefix must be a string and age_days a number >= 0")
            common = {key: body[key] for key in ("status", "volume_id", "size") if key in body}
            # one second apart, newest first, so a listing returns them in seed order
            specs = [{"name": f"{prefix}{i:06d}", "age_days": age + i / 86400} | common for i in range(count)]
        now = _utcnow()
        backups = [_backup_from_spec(spec, now) for spec in specs]
        project = self.projects.get(project_id, _Project())
        ids = [backup.id for backup in backups]
        if len(set(ids)) != len(ids) or any(backup_id in project.backups for backup_id in ids):
            raise ValueError("backup ids must be unique and not present in the project")
        for backup in backups:
            project.add(backup)
        self.projects[project_id] = project
        return ids

    def update(self, changes: object) -> None:
        """Apply a subset of SimConfig fields to the live config; all or nothing, ValueError on bad input."""
        if not isinstance(changes, dict):
            raise ValueError("body must be a JSON object")
        unknown = changes.keys() - _FIELDS
        if unknown:
            raise ValueError(f"unknown config fields: {sorted(unknown)}")
        for name in ("fault_statuses", "iam_fault_statuses"):
            if isinstance(changes.get(name), list):
                changes[name] = tuple(changes[name])
        candidate = dataclasses.replace(self.config, **changes)
        _check_config(candidate)
        for name in changes:
            setattr(self.config, name, getattr(candidate, name))
        if changes.keys() & {"rate_limit", "rate_burst"}:
            self.tokens = None  # a new bucket starts full
        if "seed" in changes:
            self.rng = random.Random(self.config.seed)

    def effective(self) -> dict[str, Any]:
        """The live config as JSON, token masked."""
        view = dataclasses.asdict(self.config)
        view["fault_statuses"] = list(self.config.fault_statuses)
        for name in ("token", "iam_password", "secret_key"):
            view[name] = None if view[name] is None else "***"
        view["iam_fault_statuses"] = list(self.config.iam_fault_statuses)
        return view

    def auth_snapshot(self) -> dict[str, Any]:
        """The document of GET /_sim/auth: IAM and gateway auth counters, and every IAM token issued."""
        stats = self.stats
        return {
            "iam": {
                "requests": stats.iam_requests,
                "faults": stats.iam_faults,
                "issued": dict(stats.iam_issued),
            },
            "rejected": dict(stats.auth_rejected),
            "signature_failures": stats.signature_failures,
            "key_locks": stats.key_locks,
            "tokens": [{"token": t, "project_id": i.project_id} for t, i in self.issued.items()],
        }

    def snapshot(self, detail: bool) -> dict[str, Any]:
        """The stats document of GET /_sim/stats (settles every project first)."""
        now = time.monotonic()
        for project in self.projects.values():
            self.settle(project, now)
        stats = self.stats
        view: dict[str, Any] = {
            "accepted": stats.accepted,
            "removed": stats.removed,
            "deleted_more_than_once": stats.deleted_more_than_once,
            "max_accepted_per_backup": stats.max_accepted_per_backup,
            "requests": dict(stats.requests),
            "statuses": dict(stats.statuses),
            "faults_injected": stats.faults_injected,
            "ghosts_injected": stats.ghosts_injected,
            "remaining": {pid: len(project.backups) for pid, project in self.projects.items()},
            "request_times": {"first": stats.first, "last": stats.last},
        }
        if detail:
            view["accepted_per_backup"] = dict(stats.accepted_per_backup)
        return view


_STATE: Final = web.AppKey("vbs_simulator_state", _State)


def _vbs_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def _native_error(status: int, message: str) -> web.Response:
    fault = "itemNotFound" if status == 404 else "badRequest"
    return web.json_response({fault: {"message": message, "code": status}}, status=status)


def _gateway_error(status: int, code: str, message: str, request_id: str) -> web.Response:
    body = {"error_code": code, "error_msg": message, "request_id": request_id}
    return web.json_response(body, status=status)


def _fault(status: int) -> web.Response:
    return _vbs_error(status, "VolumeBackup.0900", f"service unavailable (simulated fault {status})")


def _self_href(request: web.Request, *parts: str) -> str:
    """A link on the foreign host with the request's API version, e.g. .../v3/<project>/backups/<id>."""
    version = request.path.split("/", 2)[1]
    return "/".join([FOREIGN_HOST, version, *(quote(part, safe="") for part in parts)])


@web.middleware
async def _gateway(request: web.Request, handler: Handler) -> web.StreamResponse:
    """API gateway behaviour for non-admin routes: throttle, check the token, add latency, tag and count."""
    if request.path.startswith("/_sim/") or request.match_info.route.name == "iam":
        return await handler(request)
    state = request.app[_STATE]
    config = state.config
    request_id = uuid.uuid4().hex
    state.note_request(request.match_info.route.name)
    response: web.StreamResponse | None = None
    if not state.admit(time.monotonic()):
        response = _gateway_error(429, "APIGW.0308", "The throttling threshold has been reached", request_id)
        if config.retry_after is not None:
            response.headers["Retry-After"] = str(math.ceil(config.retry_after))
    elif state.auth_required:
        response = await state.authenticate(request, request_id)
    if config.latency:
        await asyncio.sleep(config.latency)
    if response is None:
        try:
            response = await handler(request)
        except web.HTTPException:  # no route for this method and path: the gateway knows no such API
            message = "The API does not exist or has not been published in the environment"
            response = _gateway_error(404, "APIGW.0101", message, request_id)
    response.headers["X-Request-Id"] = request_id
    state.note_answer(response.status)
    return response


async def _delete(request: web.Request, cloud: bool) -> web.Response:
    """Shared delete flow: fault injection, refusal checks, acceptance, ghost injection."""
    state = request.app[_STATE]
    config = state.config
    if config.fault_rate > 0 and state.rng.random() < config.fault_rate:
        state.stats.faults_injected += 1
        return _fault(state.rng.choice(config.fault_statuses))
    project_id, backup_id = request.match_info["project_id"], request.match_info["backup_id"]
    now = time.monotonic()
    project = state.settled(project_id, now)
    refusal = state.refusal(project_id, project, backup_id)
    if refusal is not None:
        status, code, message, native_message = refusal
        if cloud:
            return _vbs_error(status, code, message.format(id=backup_id))
        return _native_error(status, native_message.format(id=backup_id))
    job = state.accept(project_id, project, backup_id, now, cloud)
    if config.ghost_rate > 0 and state.rng.random() < config.ghost_rate:
        state.stats.ghosts_injected += 1
        return _fault(504)
    return web.json_response({"job_id": job.id}) if cloud else web.Response(status=202)


async def _delete_cloud(request: web.Request) -> web.Response:
    """POST /v2/{project_id}/cloudbackups/{backup_id}: 200 {"job_id"}; errors in the VBS shape."""
    return await _delete(request, cloud=True)


async def _delete_native(request: web.Request) -> web.Response:
    """DELETE /v2|v3/{project_id}/backups/{backup_id}: 202 without body; errors in the native shape."""
    return await _delete(request, cloud=False)


async def _show(request: web.Request) -> web.Response:
    """GET /v2|v3/{project_id}/backups/{backup_id}: 200 {"backup"} or a native 404."""
    project_id, backup_id = request.match_info["project_id"], request.match_info["backup_id"]
    project = request.app[_STATE].settled(project_id, time.monotonic())
    backup = project.backups.get(backup_id)
    if backup is None:
        return _native_error(404, _MISSING.native_message.format(id=backup_id))
    href = _self_href(request, project_id, "backups", backup_id)
    return web.json_response({"backup": _render(project, backup, href)})


async def _list(request: web.Request) -> web.Response:
    """GET /v2|v3/{project_id}/backups/detail: filtered page, created_at desc (then id desc), next link."""
    state = request.app[_STATE]
    project_id, query = request.match_info["project_id"], request.query
    try:
        limit, offset = min(int(query.get("limit", MAX_PAGE)), MAX_PAGE), int(query.get("offset", 0))
    except ValueError:
        limit, offset = 0, 0
    if limit < 1 or offset < 0:
        return _native_error(400, "Invalid input: limit must be an integer >= 1 and offset an integer >= 0.")
    pages = state.config.list_fail_after_pages
    if pages is not None and offset // limit >= pages:
        return _vbs_error(500, "VolumeBackup.0103", "querying backups failed (simulated fault)")
    filters = {key: query[key] for key in ("name", "status", "volume_id") if key in query}
    project = state.settled(project_id, time.monotonic())
    rows = [b for b in project.backups.values() if all(getattr(b, k) == v for k, v in filters.items())]
    rows.sort(key=lambda b: (b.created_at, b.id), reverse=True)
    page = rows[offset : offset + limit]
    body: dict[str, Any] = {
        "backups": [_render(project, b, _self_href(request, project_id, "backups", b.id)) for b in page]
    }
    if offset + limit < len(rows):
        next_query = urlencode({"limit": limit, "offset": offset + limit, **filters})
        href = f"{_self_href(request, project_id, 'backups', 'detail')}?{next_query}"
        body["backups_links"] = [{"rel": "next", "href": href}]
    return web.json_response(body)


async def _job(request: web.Request) -> web.Response:
    """GET /v1/{project_id}/jobs/{job_id}; an unknown or foreign job: 404 VolumeBackup.0111 (our choice).

    ``job_type`` bksDeleteBackup is a guess (undocumented); times are naive UTC like the backups'.
    """
    state = request.app[_STATE]
    project_id, job_id = request.match_info["project_id"], request.match_info["job_id"]
    job = state.jobs.get(job_id)
    if job is None or job.project_id != project_id:
        return _vbs_error(404, "VolumeBackup.0111", "job not found")
    now = time.monotonic()
    state.settled(project_id, now)
    status = job.status(now)
    failed = status == "FAIL"
    return web.json_response(
        {
            "status": status,
            "job_id": job.id,
            "job_type": "bksDeleteBackup",
            "entities": {"backup_id": job.backup_id},
            "begin_time": _fmt(job.begun_at),
            "end_time": _fmt(job.ended_at) if status in ("SUCCESS", "FAIL") else None,
            "error_code": JOB_FAIL_CODE if failed else None,
            "fail_reason": JOB_FAIL_REASON if failed else None,
            "sub_jobs": [],
        }
    )


async def _iam_tokens(request: web.Request) -> web.Response:
    """POST /v3/auth/tokens (IAM, not behind the VBS gateway): 201 with X-Subject-Token, or an error.

    404 unless iam_password is set; iam_fault_rate answers 429 (IAM.0012) or 5xx without issuing.
    """
    state = request.app[_STATE]
    config = state.config
    state.stats.iam_requests += 1
    if config.iam_password is None:
        return web.json_response(
            {"error": {"code": 404, "message": "IAM is not simulated", "title": "Not Found"}}, status=404
        )
    if config.iam_fault_rate > 0 and state.rng.random() < config.iam_fault_rate:
        state.stats.iam_faults += 1
        status = state.rng.choice(config.iam_fault_statuses)
        code = "IAM.0012" if status == 429 else "IAM.0001"  # IAM.0001 for 5xx is the simulator's choice
        return web.json_response(
            {"error_code": code, "error_msg": f"simulated IAM fault {status}"}, status=status
        )
    try:
        body = await request.json()
    except ValueError:
        body = None
    status, answer, token = state.issue_token(body)
    response = web.json_response(answer, status=status)
    if token is not None:
        response.headers["X-Subject-Token"] = token
    return response


async def _admin_revoke(request: web.Request) -> web.Response:
    """POST /_sim/iam/revoke {"project_id"?}: revoke the live IAM tokens (of that project): {"revoked": n}."""
    body = await request.json() if request.can_read_body else {}
    project_id = body.get("project_id") if isinstance(body, dict) else None
    revoked = 0
    for issued in request.app[_STATE].issued.values():
        if not issued.revoked and project_id in (None, issued.project_id):
            issued.revoked, revoked = True, revoked + 1
    return web.json_response({"revoked": revoked})


async def _admin_auth(request: web.Request) -> web.Response:
    """GET /_sim/auth: IAM requests and tokens issued per project, gateway 401s by code, signature failures,
    key locks, and every IAM token issued with its project (so tests can look for leaks)."""
    return web.json_response(request.app[_STATE].auth_snapshot())


async def _admin_seed(request: web.Request) -> web.Response:
    """POST /_sim/seed {"project_id", "count", "status"?, "name_prefix"?, "volume_id"?, "age_days"?, "size"?}
    or {"project_id", "backups": [{"id"?, "name"?, "status"?, "volume_id"?, "created_at"? | "age_days"?,
    "parent_id"?, "undeletable"?, "description"?, "size"?}]}: 200 {"ids"} or 400 {"error"}."""
    try:
        ids = request.app[_STATE].seed(await request.json())
    except ValueError as exc:
        return web.json_response({"error": str(exc)}, status=400)
    return web.json_response({"ids": ids})


async def _admin_stats(request: web.Request) -> web.Response:
    """GET /_sim/stats[?detail=1]."""
    return web.json_response(request.app[_STATE].snapshot(detail=request.query.get("detail") == "1"))


async def _admin_config(request: web.Request) -> web.Response:
    """POST /_sim/config {field: value, ...}: the effective config, or 400 {"error"}."""
    state = request.app[_STATE]
    try:
        state.update(await request.json())
    except ValueError as exc:
        return web.json_response({"error": str(exc)}, status=400)
    return web.json_response(state.effective())


async def _admin_reset(request: web.Request) -> web.Response:
    """POST /_sim/reset: forget every backup, job and counter."""
    request.app[_STATE].reset()
    return web.json_response({"reset": True})


def make_app(config: SimConfig) -> web.Application:
    """The simulator app; ValueError if config is invalid. ``config`` stays live (see /_sim/config)."""
    app = web.Application(middlewares=[_gateway])
    app[_STATE] = _State(config)
    router = app.router
    router.add_post("/v2/{project_id}/cloudbackups/{backup_id}", _delete_cloud, name="delete:cloud")
    for version in ("v2", "v3"):
        router.add_get(f"/{version}/{{project_id}}/backups/detail", _list, name=f"list:{version}")
        one = f"/{version}/{{project_id}}/backups/{{backup_id}}"
        router.add_get(one, _show, name=f"show:{version}")
        router.add_delete(one, _delete_native, name=f"delete:{version}")
    router.add_get("/v1/{project_id}/jobs/{job_id}", _job, name="job")
    router.add_post("/_sim/seed", _admin_seed)
    router.add_get("/_sim/stats", _admin_stats)
    router.add_post("/_sim/config", _admin_config)
    router.add_post("/_sim/reset", _admin_reset)
    router.add_post("/_sim/iam/revoke", _admin_revoke)
    router.add_get("/_sim/auth", _admin_auth)
    router.add_post("/v3/auth/tokens", _iam_tokens, name="iam")
    return app


async def start(config: SimConfig, host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, int]:
    """Serve the simulator; returns the runner (``cleanup()`` stops it) and the bound port (0 = any free)."""
    runner = web.AppRunner(make_app(config))
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner, int(runner.addresses[0][1])


def _statuses(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("expected comma-separated HTTP statuses, e.g. 408,503,504") from None


def _parser() -> argparse.ArgumentParser:
    d = SimConfig()
    p = argparse.ArgumentParser(prog="vbs-deleter simulate", description="Local VBS simulator.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8780, help="0 picks a free port")
    p.add_argument("--latency", type=float, default=d.latency, help="seconds added to every API answer")
    p.add_argument("--fault-rate", type=float, default=d.fault_rate, help="share of deletes given a fault")
    p.add_argument("--fault-statuses", type=_statuses, default=d.fault_statuses, help="e.g. 408,503,504")
    p.add_argument("--ghost-rate", type=float, default=d.ghost_rate, help="share of done deletes that 504")
    p.add_argument("--rate-limit", type=float, default=d.rate_limit, help="requests/second, 0 = unlimited")
    p.add_argument("--rate-burst", type=float, default=d.rate_burst, help="bucket size, 0 = max(1, rate)")
    p.add_argument("--retry-after", type=float, default=d.retry_after, help="Retry-After seconds on 429")
    p.add_argument("--job-duration", type=float, default=d.job_duration, help="seconds a deletion job takes")
    p.add_argument("--job-fail-rate", type=float, default=d.job_fail_rate, help="share of jobs ending FAIL")
    p.add_argument("--token", default=d.token, help="required X-Auth-Token (never printed)")
    p.add_argument("--iam-user", default=d.iam_user, help="IAM user the token route expects (default: any)")
    p.add_argument("--iam-password", default=d.iam_password, help="enables IAM tokens (never printed)")
    p.add_argument("--iam-domain", default=d.iam_domain, help="IAM domain expected (default: any)")
    p.add_argument("--token-lifetime", type=float, default=d.token_lifetime, help="IAM token life, seconds")
    p.add_argument("--iam-fault-rate", type=float, default=d.iam_fault_rate, help="share of IAM faults")
    p.add_argument("--iam-fault-statuses", type=_statuses, default=d.iam_fault_statuses, help="e.g. 429,503")
    p.add_argument("--access-key", default=d.access_key, help="AK whose signatures are accepted")
    p.add_argument("--secret-key", default=d.secret_key, help="its SK (never printed)")
    p.add_argument("--auto-create", action="store_true", help="unknown IDs exist on their first delete")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed for injected behaviour")
    p.add_argument("--list-fail-after-pages", type=int, default=d.list_fail_after_pages)
    p.add_argument("--seed-backups", type=int, default=0, metavar="N", help="create N available backups")
    p.add_argument("--project", help="project of --seed-backups")
    return p


async def _serve(config: SimConfig, host: str, port: int, seed_backups: int, project: str | None) -> None:
    runner, bound = await start(config, host, port)
    try:
        if seed_backups:
            runner.app[_STATE].seed({"project_id": project, "count": seed_backups})
            print(f"seeded {seed_backups} backups in project {project}", flush=True)
        print(f"simulator listening on http://{host}:{bound}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: serve until SIGINT/SIGTERM, then return 0."""
    parser = _parser()
    args = parser.parse_args(argv)
    config = SimConfig(**{name: getattr(args, name) for name in _FIELDS})
    try:
        _check_config(config)
    except ValueError as exc:
        parser.error(str(exc))
    if args.seed_backups < 0 or (args.seed_backups and not args.project):
        parser.error("--seed-backups needs N >= 0 and --project")
    asyncio.run(_serve(config, args.host, args.port, args.seed_backups, args.project))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
