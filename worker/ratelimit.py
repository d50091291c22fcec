"""A global rate limit: one token bucket in Redis (``worker/lua/token_bucket.lua``) shared by every worker.

The bucket runs on Redis server time, so hosts with skewed clocks share one budget. Within a process,
waiters queue on one lock (FIFO) and the lock holder asks Redis for as many tokens as there are waiters
(at most ``_MAX_GRANT``), so a busy process needs far fewer than one Redis call per request. The script is
called with EVALSHA and reloaded on NOSCRIPT (redis-py's Script), so ``SCRIPT FLUSH`` and Redis restarts
only cost one reload; a restarted Redis starts with a full bucket.
"""

from __future__ import annotations

import asyncio
import time
from importlib.resources import files

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker import keys, logs, metrics

log = logs.get("ratelimit")
_SCRIPT = files("worker").joinpath("lua/token_bucket.lua").read_text()
_MAX_GRANT = 16  # tokens one call may take for local waiters; small against any useful rate
_REDIS_RETRY = 0.5  # seconds between tries while Redis does not answer


class RateLimiter:
    """``await acquire()`` returns once this process may send one request under the shared limit.

    ``rate`` is requests per second over all workers (0 disables the limiter); ``burst`` the bucket size.
    """

    def __init__(self, client: aioredis.Redis, name: str, rate: float, burst: float) -> None:
        self._key = keys.bucket(name)
        self._name = name
        self._rate = rate
        self._burst = max(1.0, burst)
        self._script = client.register_script(_SCRIPT)
        self._lock = asyncio.Lock()
        self._stash = 0  # tokens granted to this process and not yet used
        self._waiting = 0

    async def acquire(self) -> float:
        """Wait for one token; returns the seconds waited. Waits through Redis outages (fails closed)."""
        if self._rate <= 0:
            return 0.0
        started = time.monotonic()
        self._waiting += 1
        try:
            async with self._lock:
                while self._stash == 0:
                    granted, wait = await self._call(min(self._waiting, _MAX_GRANT), 0.0)
                    self._stash += granted
                    if not granted:
                        await asyncio.sleep(wait)
                self._stash -= 1
        finally:
            self._waiting -= 1
        waited = time.monotonic() - started
        metrics.RATE_LIMIT_WAIT.labels(self._name).observe(waited)
        return waited

    @property
    def enabled(self) -> bool:
        """False when the rate is 0: acquire() returns at once and pause() does nothing."""
        return self._rate > 0

    async def pause(self, seconds: float) -> None:
        """Empty the bucket and hold every worker for ``seconds`` (after a 429)."""
        if self._rate <= 0 or seconds <= 0:
            return
        self._stash = 0
        await self._call(0, seconds)
        metrics.RATE_LIMIT_PAUSES.labels(self._name).inc()

    async def _call(self, wanted: int, pause: float) -> tuple[int, float]:
        """One script call: (tokens granted, seconds until the next token)."""
        while True:
            try:
                granted, wait_us, level = await self._script(
                    keys=[self._key], args=[self._rate, self._burst, wanted, pause]
                )
                metrics.RATE_LIMIT_LEVEL.labels(self._name).set(float(level))
                return int(granted), int(wait_us) / 1_000_000
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                log.warning("rate limiter cannot reach Redis (%s); not sending until it answers", exc)
                await asyncio.sleep(_REDIS_RETRY)
