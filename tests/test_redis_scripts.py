"""The Lua scripts and the ledger against a real Redis (the private test server)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import redis
import redis.asyncio as aioredis

from worker import keys
from worker.ledger import DeadLetter, Ledger, dead_letters, done_ids, mark_queued, read_record
from worker.ratelimit import RateLimiter

P = "0123456789abcdef0123456789abcdef"
B1, B2 = "70a599e0-31e7-49b7-b260-868f441e862b", "80a599e0-31e7-49b7-b260-868f441e862b"


def test_token_bucket_grants_burst_then_paces_and_pauses(redis_url: str) -> None:
    async def scenario() -> None:
        client = aioredis.Redis.from_url(redis_url)
        limiter = RateLimiter(client, "t", rate=10, burst=5)
        assert await limiter._call(10, 0.0) == (5, 0.0)  # a full bucket gives its burst, no more
        granted, wait = await limiter._call(1, 0.0)
        assert granted == 0 and 0.05 < wait <= 0.1  # next token in under 1/rate seconds
        await client.script_flush()  # NOSCRIPT is handled by reloading
        started = time.monotonic()
        for _ in range(5):
            await limiter.acquire()
        assert 0.35 < time.monotonic() - started < 1.5  # five tokens at 10/s after the burst is gone
        await limiter.pause(1.0)
        granted, wait = await limiter._call(1, 0.0)
        assert granted == 0 and 0.8 < wait <= 1.0  # everyone sees the pause
        await client.aclose()

    asyncio.run(scenario())


def test_disabled_limiter_never_touches_redis() -> None:
    async def scenario() -> None:
        client = aioredis.Redis.from_url("redis://127.0.0.1:1/0")  # nothing listens there
        assert await RateLimiter(client, "off", rate=0, burst=1).acquire() == 0.0
        await client.aclose()

    asyncio.run(scenario())


def test_claims_done_busy_and_dead_owner(redis_url: str) -> None:
    async def scenario() -> None:
        client = aioredis.Redis.from_url(redis_url)
        alive, dead = Ledger(client, 3600, "alive"), Ledger(client, 3600, "dead")
        await alive.heartbeat(30)
        assert await alive.claim(P, B1, "req") == ("claimed", "")
        assert await dead.claim(P, B1, None) == ("busy", "alive")
        assert await alive.claim(P, B1, None) == ("busy", "alive")  # a concurrent duplicate in this worker
        await alive.finish(P, B1, "accepted", {"attempts": 2, "status": 200, "job_id": "j1"})
        assert await dead.claim(P, B1, None) == ("done", "accepted")
        assert await dead.claim(P, B2, None) == ("claimed", "")  # "dead" never sent a heartbeat
        assert await alive.claim(P, B2, None) == ("claimed", "in_flight")  # taken over from the dead owner
        letter = DeadLetter(
            kind="deletion", reason="status_400", ts=1.0, project_id=P, backup_id=B2, status=400
        )
        await alive.finish(P, B2, "failed", {"attempts": 1, "status": 400}, letter)
        assert await alive.dead_letter_count() == 1
        await client.aclose()

    asyncio.run(scenario())
    sync = redis.Redis.from_url(redis_url)
    (record,) = read_record(sync, B1)
    assert (record["state"], record["attempts"], record["job_id"], record["request_id"]) == (
        "accepted",
        "2",
        "j1",
        "req",
    )
    assert sync.ttl(keys.ledger(P, B1)) > 3500
    assert done_ids(sync, P, [B1, B2, "90a599e0-31e7-49b7-b260-868f441e862b"]) == {B1}
    assert [(d.backup_id, d.status) for d in dead_letters(sync)] == [(B2, 400)]
    mark_queued(sync, P, [B1, "90a599e0-31e7-49b7-b260-868f441e862b"], ttl=60)
    assert read_record(sync, B1, P)[0]["state"] == "accepted"  # queued never overwrites a record
    assert read_record(sync, "90a599e0-31e7-49b7-b260-868f441e862b", P)[0]["state"] == "queued"


def test_reserve_script_pops_and_records_in_kombus_format(redis_url: str) -> None:
    """reserve_messages.lua: pops at most N items; readable envelopes land in the unacked hash exactly as
    kombu writes them ([message, exchange, routing_key], the message verbatim) and in its index."""
    from worker.broker import _RESERVE

    client = redis.Redis.from_url(redis_url)
    queue, unacked, index = "t.reserve", "t.unacked", "t.unacked_index"
    client.delete(queue, unacked, index)
    good = [
        json.dumps(
            {
                "body": "e30=",
                "headers": {"stamped_headers": [], "timelimit": [None, None]},
                "properties": {
                    "delivery_tag": f"tag-{n}",
                    "delivery_info": {"exchange": "", "routing_key": "t.reserve"},
                },
            }
        )
        for n in range(9)
    ]
    junk = "not json"
    client.lpush(queue, good[0], junk, *good[1:])  # RPOP takes them in this order
    script = client.register_script(_RESERVE)
    replies = script(keys=[queue, unacked, index], args=[3, 1234.5])
    assert [r.decode() for r in replies] == [good[0], "tag-0", junk, "", good[1], "tag-1"]
    assert client.llen(queue) == 7  # at most 3 popped
    taken = [len(script(keys=[queue, unacked, index], args=[32, 1.0])) // 2 for _ in range(4)]
    assert taken == [3, 2, 1, 0]  # half of those queued, rounded down: the last one is left to BRPOP
    assert client.llen(queue) == 1
    assert json.loads(client.hget(unacked, "tag-0") or b"") == [json.loads(good[0]), "", "t.reserve"]
    assert client.hget(unacked, "tag-0") == f'[{good[0]},"","t.reserve"]'.encode()  # verbatim
    assert client.zscore(index, "tag-0") == client.zscore(index, "tag-1") == 1234.5
    assert client.hlen(unacked) == 8  # the junk item is not recorded
    assert script(keys=["t.empty", unacked, index], args=[5, 1.0]) == []
    client.delete(queue, unacked, index)


def test_adopt_takes_only_pending_follow_ups_of_dead_workers(redis_url: str) -> None:
    async def scenario() -> None:
        client = aioredis.Redis.from_url(redis_url)
        await client.delete(keys.FOLLOWING)
        records = {
            "dead": {"state": "accepted", "job_status": "pending", "owner": "w-dead", "job_id": "j1"},
            "alive": {"state": "accepted", "job_status": "pending", "owner": "w-alive", "job_id": "j2"},
            "done": {"state": "accepted", "job_status": "success", "owner": "", "job_id": "j3"},
            "parked": {"state": "accepted", "job_status": "pending", "owner": "", "job_id": "j4"},
        }
        backups = {name: str(uuid.uuid4()) for name in records}
        for name, fields in records.items():
            key = keys.ledger(P, backups[name])
            await client.hset(
                key, mapping={**fields, "project_id": P, "backup_id": backups[name], "status": "200"}
            )
            await client.zadd(keys.FOLLOWING, {key: 150.0 if name == "parked" else 100.0})
        await client.set(keys.heartbeat("w-alive"), "1", ex=30)
        ledger = Ledger(client, 3600, "w-new")
        assert await ledger.adopt(10, stale_before=50.0) == []  # nothing is stale yet
        adopted = await ledger.adopt(1, stale_before=time.time())  # the oldest first: the dead worker's
        assert adopted == [
            {
                "key": keys.ledger(P, backups["dead"]),
                "project_id": P,
                "backup_id": backups["dead"],
                "job_id": "j1",
                "status": "200",
                "request_id": "",
            }
        ]
        assert await client.hget(keys.ledger(P, backups["dead"]), "owner") == b"w-new"
        await client.set(keys.heartbeat("w-new"), "1", ex=30)  # the adopter is alive
        assert [r["job_id"] for r in await ledger.adopt(10, stale_before=time.time())] == ["j4"]  # parked
        members = {m.decode() for m in await client.zrange(keys.FOLLOWING, 0, -1)}
        assert members == {keys.ledger(P, backups[n]) for n in ("dead", "alive", "parked")}  # done dropped
        await client.delete(
            keys.FOLLOWING,
            keys.heartbeat("w-alive"),
            keys.heartbeat("w-new"),
            *(keys.ledger(P, b) for b in backups.values()),
        )
        await client.aclose()

    asyncio.run(scenario())
