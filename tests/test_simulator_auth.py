"""The simulator's IAM token route and gateway auth: project-scoped tokens, expiry, revocation, AK/SK."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp

from tests.test_signing import CANONICAL_SHA256, HEADERS, SIGNATURE, SK, URL
from tests.test_simulator import OTHER, P, aio, call, cloud, seed, served
from worker.iam import token_request
from worker.signing import sign
from worker.simulator import _canonical_request, _signature

IAM = {"iam_user": "bob", "iam_password": "pw-Secret-1", "iam_domain": "acme"}


async def get_token(
    s: aiohttp.ClientSession, project: str = P, password: str = "pw-Secret-1"
) -> tuple[int, Any, Any]:
    return await call(s, "POST", "/v3/auth/tokens", json=token_request("bob", password, "acme", project))


async def auth_stats(s: aiohttp.ClientSession) -> dict[str, Any]:
    status, body, _ = await call(s, "GET", "/_sim/auth")
    assert status == 200
    result: dict[str, Any] = body
    return result


def test_simulator_canonical_request_matches_the_vendor_vector() -> None:
    path, _, query = URL.partition("example.com")[2].partition("?")
    canonical = _canonical_request("GET", path, query, {k.lower(): v for k, v in HEADERS.items()}, b"")
    assert hashlib.sha256(canonical.encode()).hexdigest() == CANONICAL_SHA256
    assert _signature(SK, HEADERS["X-Sdk-Date"], canonical) == SIGNATURE


@aio
async def test_iam_token_is_project_scoped_and_expires() -> None:
    async with served(token_lifetime=0.5, **IAM) as s:
        [bid, other] = await seed(s, {"project_id": P, "count": 2})
        status, body, headers = await get_token(s)
        assert status == 201 and headers["X-Subject-Token"].startswith("MIIsim")
        expires = datetime.fromisoformat(body["token"]["expires_at"])
        assert body["token"]["expires_at"].endswith("Z") and body["token"]["project"]["id"] == P
        assert timedelta(0) < expires - datetime.now(UTC) <= timedelta(seconds=0.5)
        token = {"X-Auth-Token": headers["X-Subject-Token"]}
        status, wrong, _ = await call(s, "POST", cloud(bid, OTHER), headers=token)
        assert (status, wrong["error_code"]) == (401, "APIG.0301") and "another project" in wrong["error_msg"]
        assert (await call(s, "POST", cloud(bid), headers=token))[0] == 200
        await asyncio.sleep(0.6)
        status, expired, _ = await call(s, "POST", cloud(other), headers=token)
        assert (status, expired["error_code"]) == (401, "APIG.0307")
        assert (await call(s, "POST", cloud(other)))[0] == 401  # no token at all
        result = await auth_stats(s)
        assert result["iam"] == {"requests": 1, "faults": 0, "issued": {P: 1}}
        assert result["rejected"] == {"APIG.0301": 2, "APIG.0307": 1}


@aio
async def test_iam_wrong_password_bad_body_revocation_and_faults() -> None:
    async with served(**IAM) as s:
        status, body, headers = await get_token(s, password="nope")
        assert status == 401 and body["error"]["code"] == 401 and "X-Subject-Token" not in headers
        assert (await call(s, "POST", "/v3/auth/tokens", json={"auth": []}))[0] == 400
        [bid] = await seed(s, {"project_id": P, "count": 1})
        tokens = [(await get_token(s, project))[2]["X-Subject-Token"] for project in (P, P, OTHER)]
        assert (await call(s, "POST", "/_sim/iam/revoke", json={"project_id": P}))[1] == {"revoked": 2}
        for token in tokens[:2]:
            status, body, _ = await call(s, "POST", cloud(bid), headers={"X-Auth-Token": token})
            assert (status, body["error_code"]) == (401, "APIG.0307")
        listed = (await auth_stats(s))["tokens"]
        assert [(t["token"], t["project_id"]) for t in listed] == list(
            zip(tokens, [P, P, OTHER], strict=True)
        )
        config = (
            await call(s, "POST", "/_sim/config", json={"iam_fault_rate": 1.0, "iam_fault_statuses": [429]})
        )[1]
        assert config["iam_password"] == "***" and config["iam_fault_statuses"] == [429]
        status, body, _ = await get_token(s)
        assert (status, body["error_code"]) == (429, "IAM.0012")
        assert (await auth_stats(s))["iam"]["faults"] == 1


@aio
async def test_iam_route_is_off_without_a_password() -> None:
    async with served() as s:
        assert (await get_token(s))[0] == 404


def signed(method: str, url: str, project: str, secret: str = "sk-Secret-1", **kw: Any) -> dict[str, str]:
    return sign(
        method, url, {"Content-Type": "application/json", "X-Project-Id": project}, "AK1", secret, **kw
    )


@aio
async def test_signatures_are_verified_and_repeated_failures_lock_the_key() -> None:
    async with served(access_key="AK1", secret_key="sk-Secret-1") as s:
        ids = await seed(s, {"project_id": P, "count": 3})
        base = str(s._base_url)
        url = base + cloud(ids[0])
        assert (await call(s, "POST", cloud(ids[0]), headers=signed("POST", url, P)))[0] == 200
        status, body, _ = await call(
            s, "POST", cloud(ids[1]), headers=signed("POST", url, P)
        )  # signed other path
        assert (status, body["error_code"]) == (401, "APIGW.0301") and "signature" in body["error_msg"]
        old = datetime.now(UTC) - timedelta(minutes=16)
        url1 = base + cloud(ids[1])
        status, body, _ = await call(s, "POST", cloud(ids[1]), headers=signed("POST", url1, P, now=old))
        assert status == 401 and "15 minutes" in body["error_msg"]
        headers = signed("POST", base + cloud(ids[1], OTHER), OTHER) | {"X-Project-Id": OTHER}
        assert (await call(s, "POST", cloud(ids[1]), headers=headers))[0] == 401
        for _ in range(3):  # 6 failures in a row: locked
            assert (await call(s, "POST", cloud(ids[1]), headers=signed("POST", url1, P, "bad")))[0] == 401
        status, body, _ = await call(s, "POST", cloud(ids[1]), headers=signed("POST", url1, P))
        assert (status, body["error_code"]) == (401, "APIGW.0305")
        result = await auth_stats(s)
        assert (result["signature_failures"], result["key_locks"], result["rejected"]["APIGW.0305"]) == (
            6,
            1,
            1,
        )
