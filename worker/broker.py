"""kombu's Redis transport with one change: a queue item it cannot even read does not kill the worker.

kombu decodes each item it pops (JSON envelope, properties, delivery info) before Celery's consumer sees
a message; a malformed item raises there and Celery stops with "Unrecoverable error". Here such an item,
already popped and so beyond saving, is reported to :data:`on_unreadable` (counted, logged and
dead-lettered by the worker) and consuming goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from queue import Empty
from typing import Any

from kombu.transport import redis as kombu_redis


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


class GuardedChannel(kombu_redis.Channel):
    def _brpop_read(self, **options: Any) -> Any:
        try:
            return super()._brpop_read(**options)  # type: ignore[no-untyped-call]
        except UnreadableItem as exc:
            on_unreadable(exc)
            return True
        except (Empty, *self.connection_errors):
            raise
        except Exception as exc:  # the item was popped and cannot be read: report it, go on
            on_unreadable(exc)
            return True


class GuardedTransport(kombu_redis.Transport):
    """Use as Celery's ``broker_transport``: ``worker.broker:GuardedTransport``."""

    Channel = GuardedChannel

    def _deliver(self, message: Any, queue: str) -> None:
        problem = envelope_shape_problem(message)
        if problem is not None:
            raise UnreadableItem(problem)
        super()._deliver(message, queue)  # type: ignore[no-untyped-call]
