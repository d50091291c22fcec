"""Coalesce concurrent Redis operations into pipelines: many deletions, few round trips.

Each caller adds its commands to the pipeline being built and awaits its own replies. One flush runs at a
time; while it is on the wire, new operations gather for the next one, so batching costs no waiting when
the worker is idle and saves most round trips when it is busy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

MAX_OPERATIONS = 512  # operations per pipeline

Adder = Callable[[Pipeline], int]  # queues an operation's commands on the pipeline; returns how many


class Coalescer:
    """``await run(add)`` queues ``add``'s commands in a shared pipeline and returns their replies."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._waiting: list[tuple[Adder, asyncio.Future[list[Any]]]] = []
        self._flushing = False

    async def run(self, add: Adder) -> list[Any]:
        """The replies of ``add``'s commands, in order. Raises what the pipeline raised (e.g. no Redis)."""
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._waiting.append((add, future))
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[:MAX_OPERATIONS], self._waiting[MAX_OPERATIONS:]
                pipe = self._client.pipeline(transaction=False)
                counts = [add(pipe) for add, _ in batch]
                try:
                    replies = await pipe.execute(raise_on_error=False)
                except Exception as exc:  # the whole round trip failed: every caller sees it
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                start = 0
                for (_, future), count in zip(batch, counts, strict=True):
                    mine = replies[start : start + count]
                    start += count
                    failed = next((reply for reply in mine if isinstance(reply, Exception)), None)
                    if future.done():
                        continue
                    if failed is not None:
                        future.set_exception(failed)
                    else:
                        future.set_result(mine)
        finally:
            self._flushing = False
