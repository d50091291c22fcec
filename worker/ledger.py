"""The ledger (one Redis hash per backup) and the dead-letter store.

Record states: ``queued`` (set by our producers), ``in_flight`` (claimed by a live worker), ``accepted``,
``already_gone``, ``failed``, ``rejected``. A backup that is accepted or already gone is never sent again;
one in flight in another live worker is left to it (its owner's heartbeat key proves it alive); anything
else may be claimed, which makes a redelivered task safe to repeat. Records expire after ``ttl`` seconds.

Dead letters are JSON entries in one hash, ordered by a sorted set; each says why: status, error code,
message, request ids and attempts. They are written before the task's message is acknowledged.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import asdict, dataclass
from importlib.resources import files
from typing import Any, cast

import redis
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from worker import keys
from worker.coalesce import Coalescer

_CLAIM = files("worker").joinpath("lua/ledger_claim.lua").read_text()
_ADOPT = files("worker").joinpath("lua/adopt_follow_ups.lua").read_text()
DONE_STATES = frozenset({"accepted", "already_gone"})
MAX_KWARGS_TEXT = 2000  # characters of a rejected task's kwargs kept in its dead letter


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Why a deletion (or a whole rejected task) ended up here. ``ts`` is Unix time in seconds."""

    kind: str  # "deletion" or "rejected_task"
    reason: str
    ts: float
    project_id: str | None = None
    backup_id: str | None = None
    status: int | None = None
    error_code: str | None = None
    message: str | None = None
    vbs_request_id: str | None = None
    request_id: str | None = None
    attempts: int = 0
    task_name: str | None = None
    task_id: str | None = None
    kwargs: str | None = None
    job_id: str | None = None  # the deletion's job, when it was accepted and its job failed or timed out

    @property
    def entry_id(self) -> str:
        """Stable id: one entry per backup (a later failure replaces it) or per rejected task."""
        if self.kind == "deletion":
            return f"{self.project_id}/{self.backup_id}"
        return f"task/{self.task_id}"


def kwargs_text(kwargs: Mapping[str, Any]) -> str:
    """A rejected task's kwargs as bounded JSON text for its dead letter."""
    text = json.dumps(kwargs, default=repr, sort_keys=True)
    return text if len(text) <= MAX_KWARGS_TEXT else text[:MAX_KWARGS_TEXT] + "...(truncated)"


def _fields(values: Mapping[str, object]) -> dict[str, str]:
    """Hash fields of a record update; None values are left out."""
    return {key: str(value) for key, value in values.items() if value is not None}


class Ledger:
    """Async access for the worker. ``owner`` identifies this worker process in claims and heartbeats."""

    def __init__(self, client: aioredis.Redis, ttl: int, owner: str, stale_after: float = 0.0) -> None:
        self._client = client
        self._ttl = ttl
        self.owner = owner
        self._stale_after = stale_after  # seconds before a follower not seen again is presumed dead
        self._claim = client.register_script(_CLAIM)
        self._adopt = client.register_script(_ADOPT)
        self._batch = Coalescer(client)

    async def heartbeat(self, ttl: int) -> None:
        """Prove this worker alive for ``ttl`` seconds."""
        await self._client.set(keys.heartbeat(self.owner), "1", ex=ttl)

    async def retire(self) -> None:
        """Drop the heartbeat at shutdown, so redelivered claims of this worker can be taken at once."""
        await self._client.delete(keys.heartbeat(self.owner))

    async def claim(self, project_id: str, backup_id: str, request_id: str | None) -> tuple[str, str]:
        """('claimed'|'done'|'busy', detail); see worker/lua/ledger_claim.lua. Pipelined with other calls."""
        args: list[str] = [
            self.owner,
            keys.heartbeat(""),
            str(self._ttl),
            request_id or "",
            project_id,
            backup_id,
        ]

        def add(pipe: Pipeline) -> int:
            pipe.scripts.add(self._claim)  # type: ignore[arg-type]  # the pipeline (re)loads it if needed
            pipe.evalsha(self._claim.sha, 1, keys.ledger(project_id, backup_id), *args)
            return 1

        ((verdict, detail),) = await self._batch.run(add)
        return _text(verdict), _text(detail)

    async def release(self, project_id: str, backup_id: str) -> None:
        """Give back a claim that was not worked on (shutdown): the record returns to ``queued``."""
        key = keys.ledger(project_id, backup_id)
        await self._batch.run(
            lambda pipe: bool(pipe.hset(key, mapping={"state": "queued", "owner": ""})) and 1
        )

    async def finish(
        self,
        project_id: str,
        backup_id: str,
        state: str,
        update: Mapping[str, object],
        dead_letter: DeadLetter | None = None,
        follow: str | None = None,
    ) -> None:
        """Record a state and the dead letter, if any (pipelined with other calls). ``follow``: "start"
        (accepted, its job followed by this worker from now), "park" (accepted, its job to be followed by
        whichever worker has a free slot first: see :meth:`adopt`) or "end" (the job ended)."""
        key = keys.ledger(project_id, backup_id)
        attempts = int(str(update.get("attempts", 0)))
        owner = self.owner if follow == "start" else ""
        now = time.time()
        fields = _fields({**update, "state": state, "owner": owner, "last_ts": f"{now:.6f}"})
        fields.pop("attempts", None)

        def add(pipe: Pipeline) -> int:
            pipe.hset(key, mapping=fields)
            pipe.expire(key, self._ttl)
            if attempts:
                pipe.hincrby(key, "attempts", attempts)
            if follow in ("start", "park"):  # parked: adoptable at once, in time order with dead followers'
                pipe.zadd(keys.FOLLOWING, {key: now if follow == "start" else now - self._stale_after})
            elif follow == "end":
                pipe.zrem(keys.FOLLOWING, key)
            count = 2 + bool(attempts) + (follow is not None)
            return count + (_add_dead_letter(pipe, dead_letter) if dead_letter is not None else 0)

        await self._batch.run(add)

    async def adopt(self, most: int, stale_before: float | None = None) -> list[dict[str, str]]:
        """Take over at most ``most`` follow-ups that are parked, or whose follower is dead (not seen since
        ``stale_before``, Unix seconds, default ``stale_after`` ago, and without a heartbeat); see
        worker/lua/adopt_follow_ups.lua. Returns their records' key, project_id, backup_id, job_id, status
        and request_id."""
        now = time.time()
        before = now - self._stale_after if stale_before is None else stale_before
        args = [keys.heartbeat(""), self.owner, str(most), f"{before:.6f}", f"{now:.6f}"]
        flat = [_text(v) for v in await self._adopt(keys=[keys.FOLLOWING], args=args)]
        names = ("key", "project_id", "backup_id", "job_id", "status", "request_id")
        return [dict(zip(names, flat[i : i + 6], strict=True)) for i in range(0, len(flat), 6)]

    async def reject(self, pairs: Iterable[tuple[str, str]], dead_letter: DeadLetter) -> None:
        """Record a rejected task: its dead letter, and state ``rejected`` for each well-formed backup ID."""
        now = f"{time.time():.6f}"
        fields = {"state": "rejected", "last_ts": now, "error": dead_letter.reason}
        chosen = list(pairs)

        def add(pipe: Pipeline) -> int:
            for project_id, backup_id in chosen:
                key = keys.ledger(project_id, backup_id)
                pipe.hset(key, mapping={**fields, "project_id": project_id, "backup_id": backup_id})
                pipe.hsetnx(key, "first_ts", now)
                pipe.expire(key, self._ttl)
            return 3 * len(chosen) + _add_dead_letter(pipe, dead_letter)

        await self._batch.run(add)

    async def dead_letter_count(self) -> int:
        """Entries in the dead-letter store."""
        return int(await cast(Awaitable[int], self._client.hlen(keys.DEAD_LETTERS)))


def _add_dead_letter(pipe: Any, letter: DeadLetter) -> int:
    """Queue the commands that store ``letter``; returns how many."""
    pipe.hset(keys.DEAD_LETTERS, letter.entry_id, json.dumps(asdict(letter)))
    pipe.zadd(keys.DEAD_LETTER_ORDER, {letter.entry_id: letter.ts})
    return 2


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# Synchronous access for the CLI and producers.


def read_record(client: redis.Redis, backup_id: str, project_id: str | None = None) -> list[dict[str, str]]:
    """Ledger records of ``backup_id`` (in every project unless ``project_id`` is given)."""
    if project_id is not None:
        found = [keys.ledger(project_id, backup_id)]
    else:
        found = sorted(_text(k) for k in client.scan_iter(match=keys.ledger("*", backup_id), count=1000))
    records = []
    for key in found:
        raw = cast(dict[bytes, bytes], client.hgetall(key))
        if raw:
            records.append({_text(k): _text(v) for k, v in raw.items()})
    return records


def done_ids(client: redis.Redis, project_id: str, backup_ids: Iterable[str]) -> set[str]:
    """Which of ``backup_ids`` the ledger already has as accepted or gone (one pipelined round trip)."""
    ids = list(backup_ids)
    with client.pipeline(transaction=False) as pipe:
        for backup_id in ids:
            pipe.hget(keys.ledger(project_id, backup_id), "state")
        states = pipe.execute()
    return {
        backup_id
        for backup_id, state in zip(ids, states, strict=True)
        if state and _text(state) in DONE_STATES
    }


def mark_queued(client: redis.Redis, project_id: str, backup_ids: Iterable[str], ttl: int) -> None:
    """Record ``queued`` for backups with no record yet (producers call this as they enqueue)."""
    now = f"{time.time():.6f}"
    with client.pipeline(transaction=False) as pipe:
        for backup_id in backup_ids:
            key = keys.ledger(project_id, backup_id)
            pipe.hsetnx(key, "state", "queued")
            pipe.hsetnx(key, "first_ts", now)
            pipe.hsetnx(key, "project_id", project_id)
            pipe.hsetnx(key, "backup_id", backup_id)
            pipe.expire(key, ttl)
        pipe.execute()


def dead_letters(client: redis.Redis) -> list[DeadLetter]:
    """Every dead letter, oldest first."""
    order = [_text(entry) for entry in cast(list[bytes], client.zrange(keys.DEAD_LETTER_ORDER, 0, -1))]
    raw = cast(list[bytes | None], client.hmget(keys.DEAD_LETTERS, order)) if order else []
    return [DeadLetter(**json.loads(item)) for item in raw if item]


def add_dead_letters(client: redis.Redis, letters: Iterable[DeadLetter]) -> None:
    """Store ``letters`` (again), e.g. after a replay could not be enqueued."""
    with client.pipeline(transaction=True) as pipe:
        for letter in letters:
            _add_dead_letter(pipe, letter)
        pipe.execute()


def remove_dead_letters(client: redis.Redis, entry_ids: Iterable[str]) -> int:
    """Delete the given entries; returns how many existed."""
    ids = list(entry_ids)
    if not ids:
        return 0
    with client.pipeline(transaction=True) as pipe:
        pipe.hdel(keys.DEAD_LETTERS, *ids)
        pipe.zrem(keys.DEAD_LETTER_ORDER, *ids)
        removed, _ = pipe.execute()
    return int(removed)


def purge_dead_letters(client: redis.Redis) -> int:
    """Delete every dead letter; returns how many there were."""
    with client.pipeline(transaction=True) as pipe:
        pipe.hlen(keys.DEAD_LETTERS)
        pipe.delete(keys.DEAD_LETTERS, keys.DEAD_LETTER_ORDER)
        count, _ = pipe.execute()
    return int(count)
