"""How requests to VBS are authenticated, behind one small interface.

An :class:`Auth` gives the headers for one request and hears how VBS answered them, so it can refresh a
rejected token or stop sending with a key whose signatures are rejected. Three implementations:
a static token, project-scoped IAM password tokens cached in Redis for the whole fleet, and AK/SK signing.
:func:`make_auth` picks one from the settings. Secrets stay inside the objects: never in a ``repr``, an
exception or a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

import aiohttp
import redis.asyncio as aioredis
from pydantic import SecretStr
from redis.exceptions import RedisError

from worker import iam, keys, logs, metrics
from worker.outcome import backoff_delay, retry_after_seconds
from worker.settings import Settings
from worker.signing import sign
from worker.transport import proxy_for

log = logs.get("auth")

MAX_SIGNATURE_REJECTIONS = 3  # consecutive 401s before AK/SK sending stops (the gateway locks at > 5)
AKSK_REJECTIONS_TTL = 300  # seconds the fleet remembers rejections of a key (the gateway's lockout)
IAM_LOCK_TTL = 30.0  # seconds the IAM lock lives without renewal (renewed before every IAM attempt)
IAM_POLL = 0.05  # seconds between looks at the shared cache while another worker asks IAM
IAM_REFUSED_HOLD = 300.0  # seconds nobody asks IAM again for a project after IAM refused the credentials
UNPROVEN_REFRESH_AFTER = 60.0  # a 401 on a never-accepted token younger than this does not refresh it
# compare-and-delete: remove KEYS[1] only while it still holds ARGV[1] (a lock we own, a token we saw fail)
_DELETE_IF_EQUAL = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
)
# renew a lock we own: PEXPIRE KEYS[1] ARGV[2] only while it holds ARGV[1]
_RENEW_IF_EQUAL = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then "
    "return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
)


class AuthError(Exception):
    """No credentials can be sent. ``reason`` is a bounded label; the message is safe to log."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # credentials_rejected, iam_refused or iam_unavailable (worth retrying)


class Auth(Protocol):
    """Authenticates requests to VBS. ``mode`` is a bounded label: none, token, iam or aksk."""

    mode: str

    async def headers(self, method: str, url: str, project_id: str) -> dict[str, str]:
        """Headers for one request to ``url`` for ``project_id``; :class:`AuthError` when none can be had."""
        ...

    def answered(self, project_id: str, sent: Mapping[str, str], status: int) -> bool:
        """Hear the status (0: no answer) of a request sent with ``sent`` = what :meth:`headers` gave.

        Called exactly once per :meth:`headers` result. True when the status is 401 and fresh credentials
        make one more attempt worthwhile.
        """
        ...


class StaticTokenAuth:
    """A fixed token sent as ``X-Auth-Token`` (``VBS_AUTH_TOKEN``); no token sends no header."""

    def __init__(self, token: SecretStr | None) -> None:
        self._headers = {"X-Auth-Token": token.get_secret_value()} if token is not None else {}
        self.mode = "token" if token is not None else "none"

    def __repr__(self) -> str:
        return "StaticTokenAuth(token=***)" if self._headers else "StaticTokenAuth(token=None)"

    async def headers(self, method: str, url: str, project_id: str) -> dict[str, str]:
        return dict(self._headers)

    def answered(self, project_id: str, sent: Mapping[str, str], status: int) -> bool:
        return False  # nothing to refresh


class AkSkAuth:
    """SDK-HMAC-SHA256 signed requests with ``X-Project-Id``.

    Until a signature has been accepted (any answer but 401, 429 or none), requests go one at a time, so
    a wrong key costs one rejection, not one per request in flight. Rejections are counted per access key
    in Redis (``keys.aksk_rejections``), so the whole fleet shares the count: after
    :data:`MAX_SIGNATURE_REJECTIONS` 401s in a row, sending stops for good (until restart) with an error
    naming the access key: the gateway locks a key for 5 minutes after more than 5 failures. Without
    Redis each process counts its own.
    """

    mode = "aksk"

    def __init__(
        self,
        access_key: str,
        secret_key: SecretStr,
        redis: aioredis.Redis | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._redis = redis
        self._access_key = access_key
        self._secret_key = secret_key
        self._clock = clock or (lambda: datetime.now(UTC))
        self._proven = False  # a signature of this key has been accepted since the last 401
        self._probe = asyncio.Lock()  # held by the one request in flight while not proven
        self._probe_headers: Mapping[str, str] | None = None
        self._rejections = 0  # consecutive 401s
        self._stopped: str | None = None  # why sending stopped

    def __repr__(self) -> str:
        return f"AkSkAuth(access_key={self._access_key}, secret_key=***)"

    def _check(self) -> None:
        if self._stopped is not None:
            raise AuthError("credentials_rejected", self._stopped)

    def _sign(self, method: str, url: str, project_id: str) -> dict[str, str]:
        base = {"Content-Type": "application/json", "X-Project-Id": project_id}
        return sign(method, url, base, self._access_key, self._secret_key.get_secret_value(), self._clock())

    async def headers(self, method: str, url: str, project_id: str) -> dict[str, str]:
        self._check()
        if self._proven:
            return self._sign(method, url, project_id)
        await self._probe.acquire()
        if not self._proven and self._stopped is None:
            await self._read_fleet_count()
        if self._proven or self._stopped is not None:
            self._probe.release()
            self._check()
            return self._sign(method, url, project_id)
        signed = self._sign(method, url, project_id)
        self._probe_headers = signed
        return signed

    def answered(self, project_id: str, sent: Mapping[str, str], status: int) -> bool:
        retry = False
        shared: Awaitable[None] | None = None
        if status == 401:
            self._proven = False
            self._rejections += 1
            self._stop_if_too_many()
            retry = self._stopped is None
            shared = self._count_rejection()
        elif status not in (0, 429):
            if self._rejections:
                shared = self._forget_rejections()
            self._proven, self._rejections = True, 0
        if sent is self._probe_headers:
            self._probe_headers = None
            if shared is None:
                self._probe.release()
            else:  # the next probe waits until the fleet's count is updated
                asyncio.get_running_loop().create_task(self._then_release(shared))
        elif shared is not None:
            asyncio.get_running_loop().create_task(self._then_release(shared, release=False))
        return retry

    def _stop_if_too_many(self) -> None:
        if self._rejections >= MAX_SIGNATURE_REJECTIONS and self._stopped is None:
            self._stopped = (
                f"AK/SK signatures of access key {self._access_key} were rejected {self._rejections} "
                "times in a row (all workers): stopped sending to avoid the gateway's 5-minute key lockout; "
                "check VBS_ACCESS_KEY / VBS_SECRET_KEY and the clock (X-Sdk-Date must be within 15 minutes), "
                "then restart the worker"
            )
            metrics.AUTH_BLOCKED.set(1)
            log.error("%s", self._stopped)

    async def _then_release(self, shared: Awaitable[None], release: bool = True) -> None:
        try:
            await shared
        finally:
            if release:
                self._probe.release()

    async def _count_rejection(self) -> None:
        """Add this rejection to the fleet's count; adopt the fleet's count if it is higher."""
        if self._redis is None:
            return
        key = keys.aksk_rejections(self._access_key)
        try:
            count = int(await self._redis.incr(key))
            await self._redis.expire(key, AKSK_REJECTIONS_TTL)
        except RedisError:
            return
        self._rejections = max(self._rejections, count)
        self._stop_if_too_many()

    async def _forget_rejections(self) -> None:
        if self._redis is not None:
            with contextlib.suppress(RedisError):
                await self._redis.delete(keys.aksk_rejections(self._access_key))

    async def _read_fleet_count(self) -> None:
        """Before probing, learn the rejections other workers saw (stop without sending if enough)."""
        if self._redis is None:
            return
        try:
            raw = await self._redis.get(keys.aksk_rejections(self._access_key))
        except RedisError:
            return
        self._rejections = max(self._rejections, int(raw or 0))
        self._stop_if_too_many()


@dataclass(slots=True)
class _Token:
    """One project's token as this process knows it; ``raw`` is its Redis value (for compare-and-delete)."""

    token: str = field(repr=False)
    raw: str = field(repr=False)
    expires_at: float  # unix seconds
    refresh_at: float  # unix seconds: fetch a new one from here on
    issued_at: float  # unix seconds, when IAM issued it (to any worker of the fleet)
    proven: bool = False  # VBS accepted it at least once
    rejected: bool = False  # VBS answered 401 to it: fetch a new one

    def fresh(self, now: float) -> bool:
        return not self.rejected and now < self.refresh_at

    def valid(self, now: float) -> bool:
        return not self.rejected and now < self.expires_at

    @classmethod
    def parse(cls, raw: str | bytes | None, now: float) -> _Token | None:
        if raw is None:
            return None
        text = raw.decode() if isinstance(raw, bytes) else raw
        try:
            data = json.loads(text)
            issued_at = float(data.get("issued_at", now))
            return cls(
                str(data["token"]), text, float(data["expires_at"]), float(data["refresh_at"]), issued_at
            )
        except (ValueError, KeyError, TypeError):
            return None


class IamTokenAuth:
    """Project-scoped IAM password tokens, one per project, shared by every worker on the same Redis.

    A token is fetched on first use and refreshed ahead of expiry (:func:`worker.iam.refresh_at`); while
    one request refreshes, the others keep the still-valid old token. In one process a lock per project
    and across processes a Redis lock (``keys.iam_lock``) make sure one IAM call serves everyone. IAM 429
    and 5xx are retried with backoff (``Retry-After`` honoured); a failure is remembered in Redis for a
    while (``keys.iam_failure``) so nobody hammers IAM. A 401 from VBS marks the token rejected: the next
    request fetches a new one. When Redis is unreachable each process asks IAM itself.
    """

    mode = "iam"

    def __init__(
        self,
        session: aiohttp.ClientSession,
        redis: aioredis.Redis,
        settings: Settings,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        remember_failures: bool = True,
    ) -> None:
        assert settings.iam_endpoint and settings.iam_user and settings.iam_domain and settings.iam_password
        self._session = session
        self._redis = redis
        self._settings = settings
        self._url = iam.token_url(settings.iam_endpoint)
        self._rng = rng or random.Random()
        self._clock = clock
        self._remember_failures = remember_failures  # off for probes: a typo must not block the fleet
        self._tokens: dict[str, _Token] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._owner = uuid.uuid4().hex
        self._delete_if_equal = redis.register_script(_DELETE_IF_EQUAL)
        self._renew_if_equal = redis.register_script(_RENEW_IF_EQUAL)

    def __repr__(self) -> str:
        return f"IamTokenAuth(url={self._url}, user={self._settings.iam_user}, password=***)"

    async def headers(self, method: str, url: str, project_id: str) -> dict[str, str]:
        return {"X-Auth-Token": await self.token(project_id)}

    def answered(self, project_id: str, sent: Mapping[str, str], status: int) -> bool:
        current = self._tokens.get(project_id)
        if current is None or current.token != sent.get("X-Auth-Token"):
            return status == 401  # an older token failed; the current one is another
        if status == 401:
            young = self._clock() - current.issued_at < UNPROVEN_REFRESH_AFTER
            if not current.proven and young:
                return False  # a brand-new token rejected: refreshing again would only hammer IAM
            current.rejected = True
            return True
        if status not in (0, 429):
            current.proven = True
        return False

    async def token(self, project_id: str) -> str:
        """A valid token for ``project_id``; :class:`AuthError` when IAM refuses or stays unavailable."""
        current = self._tokens.get(project_id)
        if current is not None and current.fresh(self._clock()):
            return current.token
        lock = self._locks.setdefault(project_id, asyncio.Lock())
        if current is not None and current.valid(self._clock()) and lock.locked():
            return current.token  # being refreshed; the old one still works
        async with lock:
            current = self._tokens.get(project_id)
            if current is not None and current.fresh(self._clock()):
                return current.token
            try:
                fresh = await self._shared(project_id, current)
            except RedisError as exc:
                log.warning(
                    "shared token cache unavailable (%s): asking IAM directly",
                    type(exc).__name__,
                    extra={"ctx": {"project_id": project_id}},
                )
                fresh = self._remember(await self._fetch(project_id, None))
            self._tokens[project_id] = fresh
            return fresh.token

    async def _shared(self, project_id: str, stale: _Token | None) -> _Token:
        """The project's token from Redis, or from IAM by whichever worker takes the lock first."""
        token_key, lock_key = keys.iam_token(project_id), keys.iam_lock(project_id)
        if stale is not None and stale.rejected:
            await self._delete_if_equal(keys=[token_key], args=[stale.raw])
        bad = stale.token if stale is not None and stale.rejected else None
        while True:
            now = self._clock()
            found = _Token.parse(await self._redis.get(token_key), now)
            usable = found is not None and found.token != bad
            if found is not None and usable and found.fresh(now):
                return found
            failure = await self._redis.get(keys.iam_failure(project_id))
            if failure is not None:
                reason = failure.decode() if isinstance(failure, bytes) else str(failure)
                raise AuthError(
                    reason, f"no IAM token for project {project_id}: IAM failed recently ({reason})"
                )
            if await self._redis.set(lock_key, self._owner, nx=True, px=int(IAM_LOCK_TTL * 1000)):
                try:
                    return await self._fetch_and_share(project_id, token_key, lock_key)
                finally:
                    await self._delete_if_equal(keys=[lock_key], args=[self._owner])
            if found is not None and usable and found.valid(now):
                return found  # another worker is refreshing; the old one still works
            await asyncio.sleep(IAM_POLL)

    async def _fetch_and_share(self, project_id: str, token_key: str, lock_key: str) -> _Token:
        try:
            issued = await self._fetch(project_id, lock_key)
        except AuthError as exc:
            if self._remember_failures:
                hold = IAM_REFUSED_HOLD if exc.reason == "iam_refused" else self._settings.backoff_max
                await self._redis.set(keys.iam_failure(project_id), exc.reason, px=int(hold * 1000))
            raise
        token = self._remember(issued)
        if token.expires_at > self._clock():
            await self._redis.set(token_key, token.raw, pxat=int(token.expires_at * 1000))
        return token

    def _remember(self, issued: iam.IssuedToken) -> _Token:
        now = self._clock()
        refresh = iam.refresh_at(now, issued.expires_at, self._settings.iam_refresh_before)
        raw = json.dumps(
            {"token": issued.token, "expires_at": issued.expires_at, "refresh_at": refresh, "issued_at": now}
        )
        return _Token(issued.token, raw, issued.expires_at, refresh, now)

    async def _fetch(self, project_id: str, lock_key: str | None) -> iam.IssuedToken:
        """Ask IAM, retrying 429 (``max_throttle_waits`` times) and 5xx / no answer (``max_attempts``)."""
        settings = self._settings
        assert settings.iam_user and settings.iam_password and settings.iam_domain
        body = iam.token_request(
            settings.iam_user, settings.iam_password.get_secret_value(), settings.iam_domain, project_id
        )
        ctx: dict[str, object] = {"project_id": project_id}
        transient = throttled = 0
        while True:
            retry_after: str | None = None
            try:
                # no redirects: the password must never be resent to another host
                async with self._session.post(
                    self._url, json=body, allow_redirects=False, proxy=proxy_for(self._url)
                ) as response:
                    answer = await response.content.read(iam.MAX_ANSWER)
                    issued = iam.read_token_answer(response.status, response.headers, answer)
                metrics.IAM_TOKEN_REQUESTS.labels("issued").inc()
                log.info("IAM token issued, expires %s", _utc(issued.expires_at), extra={"ctx": ctx})
                return issued
            except iam.IamError as exc:
                metrics.IAM_TOKEN_REQUESTS.labels(exc.result).inc()
                if not exc.retryable:
                    log.error("IAM refused the token: %s", exc, extra={"ctx": ctx})
                    raise AuthError(
                        "iam_refused", f"IAM refused a token for project {project_id}: {exc}"
                    ) from None
                problem, retry_after = str(exc), exc.retry_after
                if exc.result == "throttled":
                    throttled += 1
                else:
                    transient += 1
            except (TimeoutError, aiohttp.ClientError) as exc:
                metrics.IAM_TOKEN_REQUESTS.labels("transport_error").inc()
                problem = f"no answer from IAM ({type(exc).__name__})"
                transient += 1
            if transient >= settings.max_attempts or throttled > settings.max_throttle_waits:
                log.error("IAM unavailable, giving up for now: %s", problem, extra={"ctx": ctx})
                raise AuthError("iam_unavailable", f"no IAM token for project {project_id}: {problem}")
            wait = backoff_delay(
                transient + throttled, settings.backoff_base, settings.backoff_max, self._rng
            )
            asked = retry_after_seconds(retry_after)
            wait = min(asked, settings.retry_after_max) if asked is not None else wait
            log.warning("IAM token request failed (%s); retrying in %.2fs", problem, wait, extra={"ctx": ctx})
            if lock_key is not None:
                ttl = int((IAM_LOCK_TTL + wait) * 1000)
                await self._renew_if_equal(keys=[lock_key], args=[self._owner, ttl])
            await asyncio.sleep(wait)


def _utc(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds")


def make_auth(
    settings: Settings,
    session: aiohttp.ClientSession,
    redis: aioredis.Redis,
    rng: random.Random | None = None,
    remember_failures: bool = True,
) -> Auth:
    """The auth the settings choose (see :attr:`Settings.auth_mode`); create it inside the engine's loop.

    ``remember_failures=False`` (probes such as check-config) keeps an IAM refusal out of the shared cache.
    """
    mode = settings.auth_mode
    if mode == "iam":
        return IamTokenAuth(session, redis, settings, rng, remember_failures=remember_failures)
    if mode == "aksk":
        assert settings.access_key is not None and settings.secret_key is not None
        return AkSkAuth(settings.access_key, settings.secret_key, redis)
    return StaticTokenAuth(settings.auth_token)
