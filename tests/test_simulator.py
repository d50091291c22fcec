"""Tests of the local VBS simulator against a real loopback server (asyncio.run per test, no plugins)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from worker.simulator import TIME_FORMAT, SimConfig, main, make_app, start

P = "0123456789abcdef0123456789abcdef"
OTHER = "fedcba9876543210fedcba9876543210"
ROOT = Path(__file__).resolve().parent.parent


def aio(test: Callable[[], Awaitable[None]]) -> Callable[[], None]:
    """Run an async test function in its own event loop."""

    @functools.wraps(test)
    def run() -> None:
        asyncio.run(asyncio.wait_for(test(), timeout=30))

    return run


@contextlib.asynccontextmanager
async def served(**config: Any) -> AsyncIterator[aiohttp.ClientSession]:
    """A simulator on a free loopback port and a session whose base URL points at it."""
    runner, port = await start(SimConfig(**config))
    try:
        async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}") as session:
            yield session
    finally:
        await runner.cleanup()


async def call(session: aiohttp.ClientSession, method: str, path: str, **kw: Any) -> tuple[int, Any, Any]:
    """Status, JSON body (None when empty) and headers of one request."""
    async with session.request(method, path, **kw) as response:
        raw = await response.read()
        return response.status, (await response.json() if raw else None), response.headers


async def seed(session: aiohttp.ClientSession, body: dict[str, Any]) -> list[str]:
    status, data, _ = await call(session, "POST", "/_sim/seed", json=body)
    assert status == 200, data
    ids: list[str] = data["ids"]
    return ids


async def stats(session: aiohttp.ClientSession, detail: bool = False) -> dict[str, Any]:
    status, data, _ = await call(session, "GET", "/_sim/stats" + ("?detail=1" if detail else ""))
    assert status == 200
    result: dict[str, Any] = data
    return result


def cloud(backup_id: str, project: str = P) -> str:
    return f"/v2/{project}/cloudbackups/{backup_id}"


@aio
async def test_cloudbackups_job_lifecycle_and_second_delete() -> None:
    async with served(job_duration=0.2) as s:
        [bid] = await seed(s, {"project_id": P, "count": 1})
        status, body, headers = await call(s, "POST", cloud(bid))
        accepted = time.monotonic()
        assert status == 200 and set(body) == {"job_id"} and len(headers["X-Request-Id"]) == 32
        job_url = f"/v1/{P}/jobs/{body['job_id']}"
        _, job, _ = await call(s, "GET", job_url)
        assert job["status"] == "INIT" and job["end_time"] is None and job["error_code"] is None
        assert job["job_type"] == "bksDeleteBackup" and job["entities"] == {"backup_id": bid}
        assert job["sub_jobs"] == [] and job["fail_reason"] is None
        datetime.strptime(job["begin_time"], TIME_FORMAT)
        _, shown, _ = await call(s, "GET", f"/v3/{P}/backups/{bid}")
        assert shown["backup"]["status"] == "deleting"
        status, again, _ = await call(s, "POST", cloud(bid))
        assert (status, again["error"]["code"]) == (400, "VolumeBackup.0106")
        await asyncio.sleep(accepted + 0.13 - time.monotonic())
        assert (await call(s, "GET", job_url))[1]["status"] == "RUNNING"
        await asyncio.sleep(accepted + 0.25 - time.monotonic())
        _, job, _ = await call(s, "GET", job_url)
        assert job["status"] == "SUCCESS" and job["end_time"] is not None
        assert (await call(s, "GET", f"/v3/{P}/backups/{bid}"))[0] == 404
        status, gone, _ = await call(s, "POST", cloud(bid))
        assert status == 404
        assert gone == {"error": {"code": "VolumeBackup.0110", "message": f"backup {bid} not found"}}
        assert (await stats(s))["accepted"] == 1 and (await stats(s))["removed"] == 1


@aio
async def test_refusals_undeletable_status_never_existed_and_chain() -> None:
    async with served() as s:
        await seed(
            s,
            {
                "project_id": P,
                "backups": [
                    {"id": "img", "undeletable": True},
                    {"id": "busy", "status": "creating"},
                    {"id": "base", "volume_id": "vol-1"},
                    {"id": "incr", "volume_id": "vol-1", "parent_id": "base"},
                    {"id": "stray", "volume_id": "vol-2", "parent_id": "base"},
                    {"id": "broken", "status": "error"},
                ],
            },
        )
        status, body, _ = await call(s, "POST", cloud("img"))
        assert (status, body["error"]["code"]) == (400, "VolumeBackup.0113")
        status, body, _ = await call(s, "POST", cloud("busy"))
        assert (status, body["error"]["code"]) == (400, "VolumeBackup.0106")
        status, body, _ = await call(s, "POST", cloud("never"))
        assert (status, body["error"]["code"]) == (404, "VolumeBackup.0110")
        _, base, _ = await call(s, "GET", f"/v3/{P}/backups/base")
        _, incr, _ = await call(s, "GET", f"/v2/{P}/backups/incr")
        assert base["backup"]["has_dependent_backups"] is True and base["backup"]["is_incremental"] is False
        assert incr["backup"]["is_incremental"] is True and incr["backup"]["has_dependent_backups"] is False
        assert "parent_id" not in base["backup"] and "undeletable" not in base["backup"]
        status, body, _ = await call(s, "POST", cloud("base"))
        assert (status, body["error"]["code"]) == (400, "VolumeBackup.0107")
        status, body, _ = await call(s, "DELETE", f"/v3/{P}/backups/base")
        assert status == 400 and body["badRequest"]["code"] == 400
        assert (await call(s, "POST", cloud("incr")))[0] == 200
        _, base, _ = await call(s, "GET", f"/v3/{P}/backups/base")
        assert base["backup"]["has_dependent_backups"] is False  # the stray child is of another volume
        assert (await call(s, "POST", cloud("base")))[0] == 200
        assert (await call(s, "POST", cloud("broken")))[0] == 200


@aio
async def test_native_delete_and_native_404() -> None:
    async with served(job_duration=0.1) as s:
        [bid] = await seed(s, {"project_id": P, "count": 1})
        async with s.delete(f"/v3/{P}/backups/{bid}") as response:
            assert response.status == 202 and await response.read() == b""
        assert (await call(s, "GET", f"/v3/{P}/backups/{bid}"))[1]["backup"]["status"] == "deleting"
        await asyncio.sleep(0.12)
        status, body, _ = await call(s, "GET", f"/v3/{P}/backups/{bid}")
        assert status == 404
        assert body == {"itemNotFound": {"message": f"Backup {bid} could not be found.", "code": 404}}
        status, body, _ = await call(s, "DELETE", f"/v2/{P}/backups/{bid}")
        assert status == 404 and body["itemNotFound"]["code"] == 404
        assert (await stats(s))["requests"] == {"delete": 2, "job": 0, "list": 0, "show": 2}


@aio
async def test_fault_rate_one_gives_only_transient_faults_and_deletes_nothing() -> None:
    async with served(fault_rate=1.0, seed=3) as s:
        ids = await seed(s, {"project_id": P, "count": 30})
        answers = [await call(s, "POST", cloud(bid)) for bid in ids]
        assert {status for status, _, _ in answers} == {408, 503, 504}
        assert {body["error"]["code"] for _, body, _ in answers} == {"VolumeBackup.0900"}
        native = await call(s, "DELETE", f"/v3/{P}/backups/{ids[0]}")
        assert native[0] in (408, 503, 504) and native[1]["error"]["code"] == "VolumeBackup.0900"
        result = await stats(s)
        assert (result["accepted"], result["removed"], result["faults_injected"]) == (0, 0, 31)
        assert result["remaining"] == {P: 30}


@aio
async def test_faults_are_reproducible_with_a_seed() -> None:
    sequences = []
    for _ in range(2):
        async with served(fault_rate=0.5, seed=42, auto_create=True) as s:
            sequences.append([(await call(s, "POST", cloud(f"b{i}")))[0] for i in range(40)])
    assert sequences[0] == sequences[1] and 200 in sequences[0] and len(set(sequences[0])) > 1


@aio
async def test_ghost_deletes_answer_504_but_happen() -> None:
    async with served(ghost_rate=1.0) as s:
        [bid] = await seed(s, {"project_id": P, "count": 1})
        status, body, _ = await call(s, "POST", cloud(bid))
        assert status == 504 and body["error"]["code"] == "VolumeBackup.0900"
        assert (await call(s, "POST", cloud(bid)))[0] == 404
        result = await stats(s, detail=True)
        assert (result["accepted"], result["removed"], result["ghosts_injected"]) == (1, 1, 1)
        assert result["accepted_per_backup"] == {bid: 1} and result["remaining"] == {P: 0}


@aio
async def test_rate_limit_token_bucket() -> None:
    async with served(auto_create=True) as s:
        paths = [f"/v3/{P}/backups/b{i}" for i in range(30)]
        await asyncio.gather(*(call(s, "GET", path) for path in paths))  # open 30 keep-alive connections
        await call(s, "POST", "/_sim/config", json={"rate_limit": 10, "rate_burst": 10, "retry_after": 1.5})
        answers = await asyncio.gather(*(call(s, "GET", path) for path in paths))
        statuses = Counter(status for status, _, _ in answers)
        assert statuses == {404: 10, 429: 20}
        throttled = [(body, headers) for status, body, headers in answers if status == 429]
        for body, headers in throttled:
            assert body["error_code"] == "APIGW.0308"
            assert body["error_msg"] == "The throttling threshold has been reached"
            assert body["request_id"] == headers["X-Request-Id"] and headers["Retry-After"] == "2"
        await asyncio.sleep(0.15)  # 1.5 tokens back
        assert (await call(s, "GET", paths[0]))[0] == 404
        await call(s, "POST", "/_sim/config", json={"retry_after": None})
        answers = await asyncio.gather(*(call(s, "GET", path) for path in paths[:5]))
        assert [status for status, _, _ in answers].count(429) >= 4
        assert not any("Retry-After" in headers for _, _, headers in answers)
        assert (await call(s, "GET", "/_sim/stats"))[0] == 200  # admin routes are never throttled


@aio
async def test_token_check() -> None:
    async with served(token="s3cret") as s:
        for headers in ({}, {"X-Auth-Token": "wrong"}):
            status, body, answer_headers = await call(s, "POST", cloud("x"), headers=headers)
            assert status == 401
            assert body == {
                "error_code": "APIG.0301",
                "error_msg": "Incorrect IAM authentication information",
                "request_id": answer_headers["X-Request-Id"],
            }
        assert (await call(s, "POST", cloud("x"), headers={"X-Auth-Token": "s3cret"}))[0] == 404
        _, config, _ = await call(s, "POST", "/_sim/config", json={})
        assert config["token"] == "***"
        assert (await stats(s))["statuses"] == {"401": 2, "404": 1}


@aio
async def test_list_paging_filters_and_list_faults() -> None:
    async with served() as s:
        ids = await seed(s, {"project_id": P, "count": 2500})
        pages: list[list[dict[str, Any]]] = []
        path: str | None = f"/v3/{P}/backups/detail"
        while path is not None:
            status, body, _ = await call(s, "GET", path)
            assert status == 200
            pages.append(body["backups"])
            links = body.get("backups_links", [])
            path = None
            if links:
                href = urlsplit(links[0]["href"])
                assert links[0]["rel"] == "next"
                assert (href.hostname, href.port) == ("vbs-internal.example.invalid", 8443)
                path = f"/v3/{P}/backups/detail?{href.query}"
        assert [len(page) for page in pages] == [1000, 1000, 500]
        listed = [b["id"] for page in pages for b in page]
        assert listed == ids  # seeded one second apart, newest first
        stamps = [b["created_at"] for page in pages for b in page]
        assert stamps == sorted(stamps, reverse=True)
        _, clamped, _ = await call(s, "GET", f"/v2/{P}/backups/detail?limit=5000")
        assert len(clamped["backups"]) == 1000
        assert clamped["backups_links"][0]["href"].endswith(f"/v2/{P}/backups/detail?limit=1000&offset=1000")
        status, body, _ = await call(s, "GET", f"/v3/{P}/backups/detail?limit=0")
        assert status == 400 and body["badRequest"]["code"] == 400

        await seed(
            s,
            {
                "project_id": OTHER,
                "backups": [
                    {"id": "e1", "status": "error", "name": "autobk_a", "volume_id": "v1", "age_days": 1},
                    {"id": "e2", "status": "error", "name": "autobk_b", "volume_id": "v1", "age_days": 2},
                    {"id": "a1", "name": "autobk_a", "volume_id": "v2", "created_at": "2024-01-01T00:00:00"},
                ],
            },
        )
        base = f"/v3/{OTHER}/backups/detail"

        async def listed_ids(query: str) -> list[str]:
            return [b["id"] for b in (await call(s, "GET", f"{base}?{query}"))[1]["backups"]]

        assert await listed_ids("status=error") == ["e1", "e2"]
        assert await listed_ids("name=autobk_a") == ["e1", "a1"]
        assert await listed_ids("volume_id=v1&name=autobk_b") == ["e2"]
        _, body, _ = await call(s, "GET", f"{base}?status=error&limit=1")
        assert urlsplit(body["backups_links"][0]["href"]).query == "limit=1&offset=1&status=error"
        _, body, _ = await call(s, "GET", f"{base}?limit=1&offset=1&status=error")
        assert [b["id"] for b in body["backups"]] == ["e2"] and "backups_links" not in body

        await call(s, "POST", "/_sim/config", json={"list_fail_after_pages": 1})
        assert (await call(s, "GET", f"/v3/{P}/backups/detail"))[0] == 200
        status, body, _ = await call(s, "GET", f"/v3/{P}/backups/detail?limit=1000&offset=1000")
        assert (status, body["error"]["code"]) == (500, "VolumeBackup.0103")


@aio
async def test_job_of_another_project_and_unknown_job() -> None:
    async with served() as s:
        [bid] = await seed(s, {"project_id": P, "count": 1})
        _, body, _ = await call(s, "POST", cloud(bid))
        assert (await call(s, "GET", f"/v1/{P}/jobs/{body['job_id']}"))[1]["status"] == "SUCCESS"
        status, other, _ = await call(s, "GET", f"/v1/{OTHER}/jobs/{body['job_id']}")
        assert status == 404 and other == {"error": {"code": "VolumeBackup.0111", "message": "job not found"}}
        assert (await call(s, "GET", f"/v1/{P}/jobs/nope"))[0] == 404


@aio
async def test_job_failure_leaves_backup_in_error_and_deletable() -> None:
    async with served(job_fail_rate=1.0) as s:
        [bid] = await seed(s, {"project_id": P, "count": 1})
        for _ in range(2):
            _, body, _ = await call(s, "POST", cloud(bid))
            _, job, _ = await call(s, "GET", f"/v1/{P}/jobs/{body['job_id']}")
            assert job["status"] == "FAIL" and job["error_code"] == "VolumeBackup.0101" and job["fail_reason"]
            assert job["end_time"] is not None
            _, shown, _ = await call(s, "GET", f"/v3/{P}/backups/{bid}")
            assert shown["backup"]["status"] == "error" and shown["backup"]["fail_reason"]
        await call(s, "POST", "/_sim/config", json={"job_fail_rate": 0})
        assert (await call(s, "POST", cloud(bid)))[0] == 200
        result = await stats(s)
        assert (result["accepted"], result["removed"]) == (3, 1)
        assert (result["deleted_more_than_once"], result["max_accepted_per_backup"]) == (1, 3)


@aio
async def test_stats_are_exact_and_reset_clears_them() -> None:
    async with served() as s:
        a, b, _ = await seed(s, {"project_id": P, "count": 3})
        before = time.time()
        _, job, _ = await call(s, "POST", cloud(a))
        await call(s, "POST", cloud(a))
        await call(s, "DELETE", f"/v3/{P}/backups/{b}")
        await call(s, "POST", cloud("never"))
        await call(s, "GET", f"/v3/{P}/backups/detail")
        await call(s, "GET", f"/v3/{P}/backups/{b}")
        await call(s, "GET", f"/v1/{P}/jobs/{job['job_id']}")
        await call(s, "GET", f"/v1/{P}/jobs/nope")
        status, body, headers = await call(s, "GET", "/v9/no/such/route")
        assert (status, body["error_code"]) == (404, "APIGW.0101") and "X-Request-Id" in headers
        result = await stats(s, detail=True)
        times = result.pop("request_times")
        assert before <= times["first"] <= times["last"] <= time.time()
        assert result == {
            "accepted": 2,
            "removed": 2,
            "deleted_more_than_once": 0,
            "max_accepted_per_backup": 1,
            "requests": {"delete": 4, "job": 2, "list": 1, "show": 1},
            "statuses": {"200": 3, "202": 1, "404": 5},
            "faults_injected": 0,
            "ghosts_injected": 0,
            "remaining": {P: 1},
            "accepted_per_backup": {a: 1, b: 1},
        }
        assert (await call(s, "POST", "/_sim/reset"))[0] == 200
        result = await stats(s)
        assert result["accepted"] == 0 and result["remaining"] == {} and result["statuses"] == {}
        assert result["request_times"] == {"first": None, "last": None}


@aio
async def test_config_updates_live_and_rejects_bad_input() -> None:
    async with served() as s:
        ids = await seed(s, {"project_id": P, "count": 2})
        faulty = {"fault_rate": 1.0, "fault_statuses": [503]}
        status, config, _ = await call(s, "POST", "/_sim/config", json=faulty)
        assert status == 200 and config["fault_rate"] == 1.0 and config["fault_statuses"] == [503]
        assert config["token"] is None
        assert (await call(s, "POST", cloud(ids[0])))[0] == 503
        await call(s, "POST", "/_sim/config", json={"fault_rate": 0.0})
        assert (await call(s, "POST", cloud(ids[0])))[0] == 200
        bad_bodies: list[Any] = [
            {"nope": 1},
            {"fault_rate": 2},
            {"fault_statuses": []},
            {"latency": "x"},
            [1],
        ]
        for bad in bad_bodies:
            status, body, _ = await call(s, "POST", "/_sim/config", json=bad)
            assert status == 400 and body["error"]
        _, config, _ = await call(s, "POST", "/_sim/config", json={})
        assert config["fault_statuses"] == [503] and config["fault_rate"] == 0.0


@aio
async def test_seed_validation_and_timestamps() -> None:
    async with served() as s:
        bad_bodies: list[Any] = [
            {"project_id": 1, "count": 1},
            {"project_id": P, "count": -1},
            {"project_id": P, "count": 1, "colour": "red"},
            {"project_id": P, "backups": [{"id": "x", "shape": "round"}]},
            {"project_id": P, "backups": [{"status": "melting"}]},
            {"project_id": P, "backups": [{"created_at": "2024-01-01T00:00:00", "age_days": 1}]},
            {"project_id": P, "backups": [{"id": "d"}, {"id": "d"}]},
            {"project_id": P, "backups": [{"created_at": "yesterday"}]},
        ]
        for body in bad_bodies:
            status, answer, _ = await call(s, "POST", "/_sim/seed", json=body)
            assert status == 400 and answer["error"], body
        await seed(s, {"project_id": P, "backups": [{"id": "old", "age_days": 10, "size": 40}]})
        fixed_spec = {"id": "fixed", "created_at": "2024-05-06T07:08:09+02:00"}
        await seed(s, {"project_id": P, "backups": [fixed_spec]})
        again = {"project_id": P, "backups": [{"id": "old"}]}
        assert (await call(s, "POST", "/_sim/seed", json=again))[0] == 400  # already present
        _, old, _ = await call(s, "GET", f"/v3/{P}/backups/old")
        created = datetime.strptime(old["backup"]["created_at"], TIME_FORMAT)
        assert abs(datetime.now(UTC).replace(tzinfo=None) - timedelta(days=10) - created) < timedelta(
            minutes=1
        )
        assert old["backup"]["size"] == 40 and old["backup"]["status"] == "available"
        _, fixed, _ = await call(s, "GET", f"/v3/{P}/backups/fixed")
        assert fixed["backup"]["created_at"] == "2024-05-06T05:08:09.000000"


@aio
async def test_auto_create_and_latency() -> None:
    async with served(auto_create=True, latency=0.2) as s:
        started = time.monotonic()
        assert (await call(s, "POST", cloud("bench-1")))[0] == 200
        assert time.monotonic() - started >= 0.2
        assert (await call(s, "POST", cloud("bench-1")))[0] == 404
        started = time.monotonic()
        assert (await stats(s))["remaining"] == {P: 0}
        assert time.monotonic() - started < 0.2  # admin routes get no latency


def test_invalid_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="fault_rate"):
        make_app(SimConfig(fault_rate=1.5))
    with pytest.raises(SystemExit):
        main(["--ghost-rate", "-1"])
    with pytest.raises(SystemExit):
        main(["--seed-backups", "3"])


def test_cli_serves_seeds_and_stops_on_sigterm() -> None:
    args = ["--port", "0", "--seed-backups", "3", "--project", P, "--token", "top-secret-token"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.simulator", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        seeded, listening = proc.stdout.readline(), proc.stdout.readline()
        assert seeded == f"seeded 3 backups in project {P}\n"
        assert listening.startswith("simulator listening on http://127.0.0.1:")
        base = listening.split()[-1]

        async def listed() -> int:
            async with aiohttp.ClientSession() as session:
                url = f"{base}/v3/{P}/backups/detail"
                async with session.get(url, headers={"X-Auth-Token": "top-secret-token"}) as response:
                    assert response.status == 200
                    return len((await response.json())["backups"])

        assert asyncio.run(listed()) == 3
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0
        assert "top-secret-token" not in seeded + listening + out + err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
