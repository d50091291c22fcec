"""The Celery app and the two tasks of the contract. Thin: validate, hand to the engine, record the result.

The worker runs one process with Celery's ``threads`` pool: task threads block on the engine's single
event loop, so metrics are plain in-process counters and no loop or session is ever forked.
"""

from __future__ import annotations

import threading
from typing import Any

from celery import Celery, signals
from celery.worker.consumer import Consumer

from worker import logs, metrics
from worker.contract import DELETE_BACKUP, DELETE_BACKUPS, InvalidTask, validate
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
        worker_consumer="worker.tasks:RecordingConsumer",
        enable_utc=True,
    )
    return app


class RecordingConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer, also counting the task messages whose body does not decode (broken JSON)."""

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        metrics.REJECTED_TASKS.labels("undecodable").inc()
        super().on_decode_error(message, exc)


@signals.task_unknown.connect
def _count_unknown_task(**_: Any) -> None:
    metrics.REJECTED_TASKS.labels("unknown_task").inc()


@signals.task_rejected.connect
def _count_refused_message(exc: Exception | None = None, **_: Any) -> None:
    """Celery refused a message: not a task message at all, or content it may not decode (pickle)."""
    metrics.REJECTED_TASKS.labels("unknown_message" if exc is None else "disallowed_content").inc()


settings = load_settings()
logs.configure(settings)
app = make_app(settings)

_engine: Engine | None = None
_engine_lock = threading.Lock()


def engine() -> Engine:
    """The process's engine, started on first use (so it is created after any fork, in its own process)."""
    global _engine
    with _engine_lock:
        if _engine is None:
            _engine = Engine(settings)
            _engine.start()
        return _engine


@signals.worker_init.connect
def _refuse_prefork(sender: Any = None, **_: Any) -> None:
    pool = getattr(sender, "pool_cls", None)
    name = pool if isinstance(pool, str) else getattr(pool, "__module__", "")
    if "prefork" in str(name):
        raise SystemExit(
            "vbs-deleter runs with the threads or solo pool (-P threads); prefork is not supported"
        )


@signals.worker_ready.connect
def _start_engine(**_: Any) -> None:
    engine()


@signals.worker_shutdown.connect
def _stop_engine(**_: Any) -> None:
    with _engine_lock:
        if _engine is not None:
            _engine.stop()


def handle(
    task_name: str, task_id: str | None, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> list[DeletionResult]:
    """Validate and run one task. A contract violation is logged, counted and dead-lettered, never raised."""
    try:
        request = validate(task_name, args, kwargs)
    except InvalidTask as exc:
        metrics.REJECTED_TASKS.labels(exc.reason).inc()
        log.warning("task rejected: %s", exc, extra={"ctx": {"task": task_name, "task_id": task_id}})
        engine().reject(task_name, task_id, kwargs, exc)
        return []
    return engine().run(request)


@app.task(name=DELETE_BACKUP, bind=True)
def delete_backup(self: Any, *args: Any, **kwargs: Any) -> None:
    """``vbs.delete_backup(project_id, backup_id, request_id=None)``; see worker/contract.py."""
    handle(DELETE_BACKUP, self.request.id, args, kwargs)


@app.task(name=DELETE_BACKUPS, bind=True)
def delete_backups(self: Any, *args: Any, **kwargs: Any) -> None:
    """``vbs.delete_backups(project_id, backup_ids, request_id=None)``; see worker/contract.py."""
    handle(DELETE_BACKUPS, self.request.id, args, kwargs)
