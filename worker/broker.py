"""kombu's Redis transport with two changes: a queue item it cannot even read does not kill the worker,
and acknowledgements can go out many in one round trip (:meth:`BatchQoS.ack_many`).

kombu decodes each item it pops (JSON envelope, properties, delivery info) before Celery's consumer sees
a message; a malformed item raises there and Celery stops with "Unrecoverable error". Here such an item,
already popped and so beyond saving, is reported to :data:`on_unreadable` (counted, logged and
dead-lettered by the worker) and consuming goes on.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cached_property
from importlib.resources import files
from queue import Empty
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import loads

_RESERVE = files("worker").joinpath("lua/reserve_messages.lua").read_text()
RESERVE_MAX = 32  # messages taken in the round trip after each BRPOP (the prefetch count may allow fewer)


def _ignore(exc: Exception) -> None:
    """Until the worker installs its handler."""


on_unreadable: Callable[[Exception], None] = _ignore  # set by worker.tasks


class UnreadableItem(ValueError):
    """A queue item that is not a kombu message envelope."""


def envelope_shape_problem(item: object) -> str | None:
    """Why a decoded queue item cannot be a kombu message, or None (pure)."""
    if not isinstance(item, dict):
        return f"item is {type(item).__name__}, not a message envelope"
    properties = item.get("properties")
    if not isinstance(properties, dict) or not isinstance(properties.get("delivery_tag"), str):
        return "envelope properties lack a delivery_tag"
    info = properties.get("delivery_info")
    if not isinstance(info, dict) or "exchange" not in info or "routing_key" not in info:
        return "envelope properties lack delivery_info (exchange, routing_key)"
    if not isinstance(item.get("headers", {}), dict) or not isinstance(item.get("body"), str):
        return "envelope headers must be an object and body a string"
    return None


class BatchQoS(kombu_redis.QoS):
    """kombu's Redis QoS, plus acknowledging many messages in one round trip, and not recording again the
    messages that :meth:`GuardedChannel._reserve_more` recorded as unacknowledged already."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self.reserved: set[str] = set()  # delivery tags in the unacked hash, not yet delivered

    def append(self, message: Any, delivery_tag: str) -> None:
        if delivery_tag in self.reserved:
            self.reserved.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)  # type: ignore[no-untyped-call]
        else:
            super().append(message, delivery_tag)  # type: ignore[no-untyped-call]

    def ack_many(self, tags: list[str]) -> None:
        """What ``ack`` does for each of ``tags``: drop them from the unacked hash and index, then from the
        delivered set, with one pipeline."""
        with self.pipe_or_acquire() as pipe:
            for tag in tags:
                self._remove_from_indices(tag, pipe)  # type: ignore[no-untyped-call]
            pipe.execute()
        for tag in tags:
            virtual.QoS.ack(self, tag)  # type: ignore[no-untyped-call]


class GuardedChannel(kombu_redis.Channel):
    QoS = BatchQoS

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        """kombu builds a new redis client (about 0.1 ms of CPU) on every call, twice per message; one
        per channel serves them all (a redis-py client is thread-safe, its connections come from the
        channel's pool, and a reconnection makes a new channel)."""
        yield client or self._shared_client

    @cached_property
    def _shared_client(self) -> Any:
        return self._create_client()  # type: ignore[no-untyped-call]

    @cached_property
    def _reserve(self) -> Any:
        return self._shared_client.register_script(_RESERVE)

    def _brpop_read(self, **options: Any) -> Any:
        """kombu's read of one BRPOP answer, guarded; then up to RESERVE_MAX more messages that the
        prefetch count allows, popped and recorded unacknowledged in one atomic round trip."""
        self._guarded(functools.partial(super()._brpop_read, **options))
        for queue in self.active_queues:
            self._reserve_more(queue)
        return True

    def _guarded(self, read: Callable[[], object]) -> None:
        try:
            read()
        except (Empty, *self.connection_errors):
            raise
        except Exception as exc:  # the item was popped and cannot be read: report it, go on
            on_unreadable(exc)

    def _deliver_raw(self, item: bytes, queue: str) -> None:
        self.connection._deliver(loads(item.decode()), queue)  # type: ignore[no-untyped-call]

    def _reserve_more(self, queue: str) -> None:
        qos = self.qos
        count = min(RESERVE_MAX, qos.can_consume_max_estimate() or 0)
        if count <= 0:
            return
        keys = [self._q_for_pri(queue, 0), self.unacked_key, self.unacked_index_key]  # type: ignore[no-untyped-call]
        replies = self._reserve(keys=keys, args=[count, time.time()])
        for item, raw_tag in zip(replies[::2], replies[1::2], strict=True):
            tag = raw_tag.decode()
            if tag:
                qos.reserved.add(tag)
            try:
                self._guarded(functools.partial(self._deliver_raw, item, queue))
            finally:
                if tag in qos.reserved:  # refused before kombu took it in: not unacknowledged after all
                    qos.reserved.discard(tag)
                    qos._remove_from_indices(tag).execute()


class GuardedTransport(kombu_redis.Transport):
    """Use as Celery's ``broker_transport``: ``worker.broker:GuardedTransport``."""

    Channel = GuardedChannel

    def _deliver(self, message: Any, queue: str) -> None:
        problem = envelope_shape_problem(message)
        if problem is not None:
            raise UnreadableItem(problem)
        super()._deliver(message, queue)  # type: ignore[no-untyped-call]
