"""The Celery app and the two tasks of the contract. Thin: validate, hand to the engine, record the result.

The worker runs one process with Celery's ``threads`` pool: task threads block on the engine's single
event loop, so metrics are plain in-process counters and no loop or session is ever forked.
"""

from __future__ import annotations

import threading
from typing import Any

from celery import Celery, signals
from celery.exceptions import Reject
from celery.worker.consumer import Consumer

from worker import broker, logs, metrics
from worker.contract import DELETE_BACKUP, DELETE_BACKUPS, InvalidTask, envelope_problem, validate
from worker.engine import DeletionResult, Engine
from worker.settings import Settings, load_settings

log = logs.get("tasks")


def make_app(settings: Settings) -> Celery:
    """A Celery app configured for the contract: JSON only, late acks, small prefetch, threads pool."""
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
        worker_concurrency=settings.concurrency,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_consumer="worker.tasks:GuardedConsumer",
        broker_transport="worker.broker:GuardedTransport",
        enable_utc=True,
    )
    return app


_consuming = threading.Event()  # set while the consumer's event loop runs on a live broker connection


class GuardedConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer behind a gate: only well-formed JSON messages for our two tasks reach Celery.

    Anything else (pickle or another content type, broken JSON, a body or headers Celery would choke on,
    other task names, workflows) is counted, dead-lettered and acknowledged here, so a poison message can
    neither stop the worker nor hold a thread.
    """

    def create_task_handler(self, promise: Any = None) -> Any:
        handler = super().create_task_handler() if promise is None else super().create_task_handler(promise)

        def guarded(message: Any) -> Any:
            problem = _message_problem(message)
            if problem is None:
                try:
                    return handler(message)
                except Exception as exc:  # Celery could not take the message apart
                    problem = InvalidTask("malformed_message", f"{type(exc).__name__}: {str(exc)[:200]}")
            _refuse(message, problem)
            return None

        return guarded

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


def _message_problem(message: Any) -> InvalidTask | None:
    if message.content_type != "application/json":
        return InvalidTask(
            "disallowed_content", f"content type {str(message.content_type)[:60]!r} is not JSON"
        )
    try:
        body = message.decode()
    except Exception as exc:
        return InvalidTask("undecodable", f"body is not valid JSON: {str(exc)[:200]}")
    return envelope_problem(message.headers, body)


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


def handle(
    task_name: str, task_id: str | None, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> list[DeletionResult]:
    """Validate and run one task. A contract violation is logged, counted and dead-lettered, never raised.
    A task cut short by the shutdown deadline raises Reject(requeue=True): its message goes back whole."""
    try:
        request = validate(task_name, args, kwargs)
    except InvalidTask as exc:
        _record_refusal("task", exc, task_name, task_id, kwargs)
        return []
    results = engine().run(request)
    unfinished = sum(1 for result in results if result.outcome == "interrupted")
    if unfinished:
        log.warning(
            "task returned to the queue at shutdown: %d of %d deletions unfinished",
            unfinished,
            len(results),
            extra={"ctx": {"task": task_name, "task_id": task_id, "request_id": request.request_id}},
        )
        raise Reject("shutdown deadline", requeue=True)  # un-acked; the ledger skips what is done
    metrics.TASKS.labels(task_name).inc()
    return results


@app.task(name=DELETE_BACKUP, bind=True)
def delete_backup(self: Any, *args: Any, **kwargs: Any) -> None:
    """``vbs.delete_backup(project_id, backup_id, request_id=None)``; see worker/contract.py."""
    handle(DELETE_BACKUP, self.request.id, args, kwargs)


@app.task(name=DELETE_BACKUPS, bind=True)
def delete_backups(self: Any, *args: Any, **kwargs: Any) -> None:
    """``vbs.delete_backups(project_id, backup_ids, request_id=None)``; see worker/contract.py."""
    handle(DELETE_BACKUPS, self.request.id, args, kwargs)
