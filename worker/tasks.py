"""The Celery app and the gate in front of the engine: validate each message, hand it to the engine, ack.

Celery consumes the queue (connection, prefetch, reconnection, unacked restore), but our two tasks do not
go through Celery's request and pool machinery: :class:`GuardedConsumer` checks a message, dispatches it to
the engine's event loop and acknowledges it from the consumer's hub when its deletions are settled. That
keeps the per-message cost low (no Request, no pool thread) and keeps no thread per task. Up to
``settings.concurrency`` tasks are reserved at once (Celery's prefetch count). A task's eta is honoured by
waiting in the engine; an expired task is refused. Celery's revoke, ``inspect active`` and task events do
not see these tasks.
"""

from __future__ import annotations

import functools
import gc
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from celery import Celery, bootsteps, signals
from celery.worker.consumer import Consumer

from worker import broker, logs, metrics
from worker.contract import InvalidTask, envelope_problem, validate
from worker.engine import Engine, Settled
from worker.settings import Settings, load_settings

log = logs.get("tasks")


def make_app(settings: Settings) -> Celery:
    """A Celery app configured for the contract: JSON only, late acks, ``concurrency`` tasks reserved.

    The threads pool runs nothing of ours (see the module doc); it is chosen so nothing is ever forked."""
    app = Celery("vbs_deleter", broker=settings.redis_url, set_as_current=True)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_ignore_result=True,
        task_default_queue=settings.queue,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            # sweep for messages whose visibility expired every few seconds, not every ~100 s (kombu default)
            "unacked_restore_interval": min(10, max(1, settings.visibility_timeout // 5)),
            "unacked_restore_throttle": 1,
        },
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_pool="threads",
        worker_concurrency=settings.concurrency,  # the prefetch count: tasks reserved at once
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_consumer="worker.tasks:GuardedConsumer",
        broker_transport="worker.broker:GuardedTransport",
        enable_utc=True,
    )
    app.steps["worker"].add(SettleAtShutdown)
    return app


_consuming = threading.Event()  # set while the consumer's event loop runs on a live broker connection


class GuardedConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer with our own task handler: only well-formed JSON messages for our two tasks that
    pass contract validation reach the engine.

    Anything else (pickle or another content type, broken JSON, a body or headers Celery would choke on,
    other task names, workflows, bad arguments, an expired task) is counted, dead-lettered and
    acknowledged here, so a poison message can neither stop the worker nor hold a slot.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._acks = AckBatch(self.call_soon_ack, self.connection_errors)

    def create_task_handler(self, promise: Any = None) -> Any:
        def on_message(message: Any) -> None:
            try:
                headers, body = _open(message)
            except InvalidTask as problem:
                _refuse(message, problem)
                return
            task_name, task_id, (args, kwargs, _) = headers["task"], headers["id"], body
            try:
                request = validate(task_name, tuple(args), kwargs)
                not_before, expires = _schedule(headers)
            except InvalidTask as problem:
                _record_refusal("task", problem, task_name, task_id, kwargs)
                message.ack()
                return
            settled = functools.partial(self._settled, message, task_name, task_id, len(request.backup_ids))
            engine().dispatch(request, settled, not_before, expires)

        return on_message

    def _settled(self, message: Any, task_name: str, task_id: str, size: int, future: Settled) -> None:
        """In the engine's loop thread: ack the task (or requeue it if the shutdown deadline cut it short),
        from the consumer's hub thread."""
        try:
            outcomes = future.result()
        except BaseException as exc:  # the engine stopped under it: Redis redelivers the message
            log.warning("task left unacknowledged: %r", exc, extra={"ctx": {"task_id": task_id}})
            return
        if outcomes["expired"]:
            self.call_soon_ack(
                _refuse, message, InvalidTask("expired", "the task expired waiting for its eta")
            )
            return
        unfinished = outcomes["interrupted"]
        if unfinished:
            log.warning(
                "task returned to the queue at shutdown: %d of %d deletions unfinished",
                unfinished,
                size,
                extra={"ctx": {"task": task_name, "task_id": task_id}},
            )
            self.call_soon_ack(message.reject_log_error, log, self.connection_errors, requeue=True)
            return
        metrics.TASKS.labels(task_name).inc()
        self._acks.add(message)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        """kombu could not decode the body it was given (e.g. a bogus compression header)."""
        _refuse(message, InvalidTask("undecodable", f"{type(exc).__name__}: {str(exc)[:200]}"))

    def on_ready(self) -> None:
        """The event loop consumes on a live connection (called on every (re)connection): /healthz."""
        _consuming.set()
        super().on_ready()

    def on_close(self) -> None:
        _consuming.clear()
        super().on_close()


class AckBatch:
    """Acknowledgements added from any thread, sent from the consumer's hub thread: one Redis round trip
    per batch instead of one per message (kombu's ``Message.ack``). A batch that cannot be sent stays
    unacknowledged, and Redis redelivers it after the visibility timeout (the ledger skips what is done)."""

    def __init__(
        self, call_soon: Callable[[Callable[[], None]], object], errors: tuple[type[BaseException], ...]
    ) -> None:
        self._call_soon = call_soon
        self._errors = errors
        self._lock = threading.Lock()
        self._pending: list[Any] = []

    def add(self, message: Any) -> None:
        with self._lock:
            self._pending.append(message)
            first = len(self._pending) == 1
        if first:
            self._call_soon(self._flush)

    def _flush(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        by_channel: dict[Any, list[str]] = {}
        for message in batch:
            by_channel.setdefault(message.channel, []).append(message.delivery_tag)
        for channel, tags in by_channel.items():
            try:
                channel.qos.ack_many(tags)
            except self._errors as exc:
                log.error("%d acknowledgement(s) failed, redelivered later: %s", len(tags), exc)


class SettleAtShutdown(bootsteps.StartStopStep):  # type: ignore[misc]
    """Worker step stopped after the consumer and before the hub: wait for dispatched tasks to settle (the
    shutdown deadline bounds that), so their acks and requeues go out when the hub closes."""

    requires = {"celery.worker.components:Pool"}

    def stop(self, worker: Any) -> None:
        if _engine is not None and not _engine.wait_idle(settings.stop_timeout()):
            log.warning("shutdown: tasks still unsettled; Redis redelivers them after the visibility timeout")

    terminate = stop


def _refuse_unreadable(exc: Exception) -> None:
    """A queue item kombu could not turn into a message at all (see worker.broker): count and record it."""
    problem = InvalidTask(
        "malformed_message", f"unreadable queue item: {type(exc).__name__}: {str(exc)[:200]}"
    )
    _record_refusal("queue item", problem, "", None, {})


def _record_refusal(
    what: str, problem: InvalidTask, task_name: str, task_id: str | None, kwargs: dict[str, Any]
) -> None:
    """Count, log and dead-letter a refused task, message or queue item (``what`` names which)."""
    metrics.REJECTED_TASKS.labels(problem.reason).inc()
    log.warning("%s refused: %s", what, problem, extra={"ctx": {"task": task_name, "task_id": task_id}})
    engine().reject(task_name, task_id, kwargs, problem)


broker.on_unreadable = _refuse_unreadable


def _open(message: Any) -> tuple[dict[str, Any], list[Any]]:
    """The headers and decoded body of a well-formed message; raises :class:`InvalidTask` otherwise."""
    if message.content_type != "application/json":
        raise InvalidTask(
            "disallowed_content", f"content type {str(message.content_type)[:60]!r} is not JSON"
        )
    try:
        body = message.decode()
    except Exception as exc:
        raise InvalidTask("undecodable", f"body is not valid JSON: {str(exc)[:200]}") from None
    problem = envelope_problem(message.headers, body)
    if problem is not None:
        raise problem
    return message.headers, body


def _schedule(headers: dict[str, Any]) -> tuple[float, float]:
    """(Unix time a task may start, Unix time it expires), each 0 when not set. Raises ``expired`` past
    its ``expires``, and ``eta_too_far`` for an eta so far away that Redis would redeliver the task while
    it waits."""
    now = time.time()
    expires = _unix_time(headers.get("expires"))
    if expires and expires <= now:
        raise InvalidTask("expired", f"the task expired at {headers['expires']}")
    eta = _unix_time(headers.get("eta"))
    horizon = _eta_horizon
    if eta - now > horizon:
        raise InvalidTask(
            "eta_too_far",
            f"eta {headers['eta']} is {eta - now:.0f}s away, but a reserved task must be done within "
            f"{horizon:.0f}s (VBS_VISIBILITY_TIMEOUT minus the longest unacknowledged time) or Redis "
            "redelivers it: send it nearer its time, or raise VBS_VISIBILITY_TIMEOUT",
        )
    return eta, expires


def _unix_time(value: str | None) -> float:
    """An ISO 8601 header (checked by envelope_problem) as Unix seconds; naive times are UTC; None is 0."""
    if value is None:
        return 0.0
    when = datetime.fromisoformat(value)
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _refuse(message: Any, problem: InvalidTask) -> None:
    """Count, log and dead-letter a message Celery must not see, then acknowledge it."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    task_name, raw_id = str(headers.get("task", ""))[:80], headers.get("id")
    raw = message.body.decode("utf-8", "replace") if isinstance(message.body, bytes) else str(message.body)
    task_id = raw_id if isinstance(raw_id, str) else None
    _record_refusal("message", problem, task_name, task_id, {"body": raw[:2000]})
    message.ack()


settings = load_settings()
settings.check_delivery()  # also for `celery -A worker worker`
_eta_horizon = settings.visibility_timeout - settings.longest_unacked()  # seconds an eta may lie ahead
logs.configure(settings)
app = make_app(settings)

_engine: Engine | None = None
_engine_lock = threading.Lock()


def engine() -> Engine:
    """The process's engine, started on first use (so it is created after any fork, in its own process)."""
    global _engine
    with _engine_lock:
        if _engine is None:
            _engine = Engine(settings, consuming=_consuming.is_set)
            _engine.start()
        return _engine


@signals.worker_init.connect
def _start_engine(**_: Any) -> None:
    """Start the engine before consuming; a failure (metrics port taken) stops the worker.

    The pool is always ``threads``: the app's ``worker_pool`` setting wins over a ``-P`` option, so no
    loop or session is ever forked.
    """
    try:
        engine()
    except OSError as exc:
        raise SystemExit(
            f"vbs-deleter: cannot serve metrics on {settings.metrics_host}:{settings.metrics_port} "
            f"(VBS_METRICS_HOST, VBS_METRICS_PORT): {exc.strerror or exc}"
        ) from None
    _tune_gc()


GC_YOUNG_THRESHOLD = 10_000  # allocations between young collections (CPython's default: 700)


def _tune_gc() -> None:
    """Keep the cyclic garbage collector off the hot path: objects from imports and start-up are frozen
    (never scanned again), and young collections run every 10,000 allocations instead of 700. With
    thousands of follow-ups alive, the default settings cost about a third of the worker's CPU."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


@signals.worker_shutting_down.connect
def _arm_shutdown_deadline(how: str = "Warm", **_: Any) -> None:
    """On SIGTERM (warm) give running tasks VBS_SHUTDOWN_GRACE seconds; on a cold shutdown, none.
    Runs in a signal handler: reads the engine without taking the lock."""
    if _engine is not None:
        _engine.begin_shutdown(0.0 if how == "Cold" else settings.shutdown_grace)


@signals.worker_shutdown.connect
def _stop_engine(**_: Any) -> None:
    with _engine_lock:
        if _engine is not None:
            _engine.stop()
