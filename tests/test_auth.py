"""IAM token cache and AK/SK auth against the real simulator (in-process, loopback) and the private Redis."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from pydantic import SecretStr

from tests.test_simulator import OTHER, P
from worker.auth import AkSkAuth, AuthError, IamTokenAuth, make_auth
from worker.processes import free_port
from worker.settings import Settings
from worker.simulator import SimConfig, start
from worker.transport import new_session
from worker.vbs import VbsClient

PASSWORD = "pw-Secret-1"


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=60))


@contextlib.asynccontextmanager
async def simulator(**config: Any) -> AsyncIterator[str]:
    runner, port = await start(SimConfig(**config))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def iam_settings(sim_url: str, redis_url: str, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "endpoint": sim_url,
        "redis_url": redis_url,
        "iam_endpoint": sim_url + "/v3",
        "iam_user": "bob",
        "iam_password": PASSWORD,
        "iam_domain": "acme",
        "max_attempts": 3,
        "backoff_base": 0.01,
        "backoff_max": 0.05,
    }
    return Settings(**(values | extra))


async def admin(sim_url: str, path: str, body: object | None = None) -> Any:
    """An admin route of the in-process simulator (a blocking client would stall its loop)."""
    async with aiohttp.ClientSession() as session:
        method = "GET" if body is None else "POST"
        async with session.request(method, sim_url + path, json=body) as response:
            return await response.json()


async def auth_stats(sim_url: str) -> dict[str, Any]:
    return dict(await admin(sim_url, "/_sim/auth"))


class Clock:
    """Wall clock plus an offset the test moves forward (the worker's view of time only)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@contextlib.asynccontextmanager
async def iam_auths(
    settings: Settings, count: int = 1, clock: Clock | None = None
) -> AsyncIterator[list[IamTokenAuth]]:
    """``count`` independent auths, each with its own session and Redis client, like separate workers."""
    async with contextlib.AsyncExitStack() as stack:
        auths = []
        for _ in range(count):
            session = await stack.enter_async_context(new_session(settings))
            client: aioredis.Redis = aioredis.Redis.from_url(settings.redis_url)
            stack.push_async_callback(client.aclose)
            auths.append(IamTokenAuth(session, client, settings, clock=clock or Clock()))
        yield auths


def test_concurrent_first_use_across_workers_makes_one_iam_call(redis_url: str) -> None:
    async def test() -> None:
        async with (
            simulator(iam_password=PASSWORD) as sim,
            iam_auths(iam_settings(sim, redis_url), 3) as auths,
        ):
            tokens = await asyncio.gather(*(auths[i % 3].token(P) for i in range(60)))
            assert len(set(tokens)) == 1
            assert (await auth_stats(sim))["iam"]["issued"] == {P: 1}
            other = await asyncio.gather(*(auth.token(OTHER) for auth in auths))
            assert len(set(other)) == 1 and other[0] != tokens[0]
            assert (await auth_stats(sim))["iam"] == {"requests": 2, "faults": 0, "issued": {P: 1, OTHER: 1}}

    run(test)


def test_refreshed_ahead_of_expiry_while_the_old_token_keeps_working(redis_url: str) -> None:
    async def test() -> None:
        clock = Clock()
        async with (
            simulator(iam_password=PASSWORD, token_lifetime=1000) as sim,
            iam_auths(iam_settings(sim, redis_url, iam_refresh_before=50), clock=clock) as [auth],
        ):
            first = await auth.token(P)
            clock.offset = 940  # 60 s left; refreshed 50 s ahead (min of refresh_before, 1/10 of the life)
            assert await auth.token(P) == first
            clock.offset = 955  # 45 s left: refresh
            second = await auth.token(P)
            assert second != first and (await auth_stats(sim))["iam"]["issued"] == {P: 2}
            assert await auth.token(P) == second

    run(test)


def test_a_401_refreshes_once_however_many_requests_saw_it(redis_url: str) -> None:
    async def test() -> None:
        async with (
            simulator(iam_password=PASSWORD) as sim,
            iam_auths(iam_settings(sim, redis_url), 2) as auths,
        ):
            old = await auths[0].token(P)
            assert await auths[1].token(P) == old
            sent = {"X-Auth-Token": old}
            assert auths[0].answered(P, sent, 401) is False  # never accepted yet: no refresh loop
            for auth in auths:
                assert auth.answered(P, sent, 200) is False
            assert all([auth.answered(P, sent, 401) for auth in auths for _ in range(20)])
            fresh = await asyncio.gather(*(auths[i % 2].token(P) for i in range(40)))
            assert len(set(fresh)) == 1 and fresh[0] != old
            assert (await auth_stats(sim))["iam"]["issued"] == {P: 2}

    run(test)


def test_an_old_shared_token_revoked_is_refreshed_by_a_worker_that_never_used_it(redis_url: str) -> None:
    """ "Brand new" means recently issued by IAM, not recently read from the shared cache."""

    async def test() -> None:
        clock = Clock()
        async with (
            simulator(iam_password=PASSWORD) as sim,
            iam_auths(iam_settings(sim, redis_url), 1, clock=clock) as [first],
            iam_auths(iam_settings(sim, redis_url), 1, clock=clock) as [late],
        ):
            old = await first.token(P)
            clock.offset = 600  # ten minutes later a new worker reads the same token from Redis
            assert await late.token(P) == old
            assert late.answered(P, {"X-Auth-Token": old}, 401) is True  # revoked: refresh and retry
            assert await late.token(P) != old
            assert (await auth_stats(sim))["iam"]["issued"] == {P: 2}

    run(test)


def test_iam_faults_are_retried_with_backoff_then_remembered(redis_url: str) -> None:
    async def test() -> None:
        async with (
            simulator(iam_password=PASSWORD, iam_fault_rate=1.0, iam_fault_statuses=(503,)) as sim,
            iam_auths(iam_settings(sim, redis_url), 2) as auths,
        ):
            results = await asyncio.gather(*(auth.token(P) for auth in auths * 5), return_exceptions=True)
            assert {type(r) for r in results} == {AuthError}
            assert {r.reason for r in results if isinstance(r, AuthError)} == {"iam_unavailable"}
            requests = (await auth_stats(sim))["iam"]["requests"]
            assert requests == 3  # one of the ten asked, max_attempts times; the others waited for it
            await admin(sim, "/_sim/config", {"iam_fault_rate": 0.0})
            with pytest.raises(AuthError, match="IAM failed recently"):
                await auths[1].token(P)
            assert (await auth_stats(sim))["iam"]["requests"] == requests
            await asyncio.sleep(0.1)  # the failure is remembered for backoff_max (0.05 s)
            assert await auths[1].token(P)

    run(test)


def test_wrong_password_is_refused_once_and_not_asked_again(redis_url: str) -> None:
    async def test() -> None:
        async with (
            simulator(iam_password="the-real-one") as sim,
            iam_auths(iam_settings(sim, redis_url)) as [auth],
        ):
            with pytest.raises(AuthError) as caught:
                await auth.token(P)
            assert caught.value.reason == "iam_refused" and "401" in str(caught.value)
            assert PASSWORD not in str(caught.value) and PASSWORD not in repr(auth)
            with pytest.raises(AuthError):
                await auth.token(P)
            assert (await auth_stats(sim))["iam"]["requests"] == 1

    run(test)


def test_without_redis_each_worker_asks_iam_itself() -> None:
    async def test() -> None:
        dead = f"redis://127.0.0.1:{free_port()}/0"
        async with simulator(iam_password=PASSWORD) as sim, iam_auths(iam_settings(sim, dead)) as [auth]:
            token = await auth.token(P)
            assert await auth.token(P) == token and (await auth_stats(sim))["iam"]["issued"] == {P: 1}

    run(test)


async def delete_many(settings: Settings, sim: str, ids: list[str]) -> list[int]:
    """One "worker": its own session, Redis client and auth."""
    async with new_session(settings) as session:
        auth = make_auth(settings, session, aioredis.Redis.from_url(settings.redis_url))
        assert isinstance(auth, AkSkAuth)
        client = VbsClient(session, settings, auth)
        answers = await asyncio.gather(*(client.delete(P, backup_id) for backup_id in ids))
        return [a.status if a.auth_error is None else -1 for a in answers]


def test_aksk_right_key_signs_every_request_in_flight(redis_url: str) -> None:
    async def test() -> None:
        async with simulator(access_key="AK1", secret_key="sk-Secret-1") as sim:
            ids = (await admin(sim, "/_sim/seed", {"project_id": P, "count": 30}))["ids"]
            settings = Settings(
                endpoint=sim, redis_url=redis_url, access_key="AK1", secret_key=SecretStr("sk-Secret-1")
            )
            assert await delete_many(settings, sim, ids) == [200] * 30

    run(test)


def test_aksk_wrong_key_stops_sending_after_a_few_rejections(redis_url: str) -> None:
    async def test() -> None:
        async with simulator(access_key="AK1", secret_key="sk-Secret-1") as sim:
            ids = (await admin(sim, "/_sim/seed", {"project_id": P, "count": 40}))["ids"]
            settings = Settings(
                endpoint=sim, redis_url=redis_url, access_key="AK1", secret_key=SecretStr("sk-wrong")
            )
            statuses = await delete_many(settings, sim, ids)
            assert statuses.count(401) == 3 and statuses.count(-1) == 37
            assert (await auth_stats(sim))["signature_failures"] == 3
            assert (await auth_stats(sim))["key_locks"] == 0

    run(test)


def test_aksk_wrong_key_in_three_workers_costs_three_rejections_in_all(redis_url: str) -> None:
    """The count is the fleet's: the gateway's lockout (more than 5 failures) is never reached."""

    async def test() -> None:
        async with simulator(access_key="AK2", secret_key="sk-Secret-2") as sim:
            ids = (await admin(sim, "/_sim/seed", {"project_id": P, "count": 90}))["ids"]
            settings = Settings(
                endpoint=sim, redis_url=redis_url, access_key="AK2", secret_key=SecretStr("sk-wrong")
            )
            results = await asyncio.gather(*(delete_many(settings, sim, ids[i::3]) for i in range(3)))
            statuses = [status for worker in results for status in worker]
            assert statuses.count(401) == 3 and statuses.count(-1) == 87
            assert (await auth_stats(sim))["signature_failures"] == 3

    run(test)
