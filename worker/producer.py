"""A small public API for Python producers: enqueue deletions without running a worker.

Producers in other languages follow worker/schemas/tasks.schema.json instead (see README).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice

from celery import Celery

from worker.contract import DELETE_BACKUP, DELETE_BACKUPS, MAX_BATCH


def batches(ids: Iterable[str], size: int = MAX_BATCH) -> Iterator[list[str]]:
    """Consecutive lists of at most ``size`` IDs (1 <= size <= 1000)."""
    if not 1 <= size <= MAX_BATCH:
        raise ValueError(f"batch size must be 1..{MAX_BATCH}, got {size}")
    iterator = iter(ids)
    while chunk := list(islice(iterator, size)):
        yield chunk


class Producer:
    """Sends contract tasks to ``queue`` on the Redis broker at ``redis_url`` (JSON serializer)."""

    def __init__(self, redis_url: str, queue: str = "vbs.deletions") -> None:
        self._app = Celery("vbs_deleter_producer", broker=redis_url, set_as_current=False)
        self._app.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True)
        self._queue = queue

    def delete_backup(self, project_id: str, backup_id: str, request_id: str | None = None) -> None:
        """Enqueue one ``vbs.delete_backup`` task."""
        kwargs: dict[str, object] = {"project_id": project_id, "backup_id": backup_id}
        if request_id is not None:
            kwargs["request_id"] = request_id
        self._app.send_task(DELETE_BACKUP, kwargs=kwargs, queue=self._queue)

    def delete_backups(
        self,
        project_id: str,
        backup_ids: Iterable[str],
        request_id: str | None = None,
        batch_size: int = MAX_BATCH,
    ) -> int:
        """Enqueue ``vbs.delete_backups`` tasks of at most ``batch_size`` IDs; returns the number of tasks."""
        sent = 0
        with self._app.producer_or_acquire() as producer:
            for chunk in batches(backup_ids, batch_size):
                kwargs: dict[str, object] = {"project_id": project_id, "backup_ids": chunk}
                if request_id is not None:
                    kwargs["request_id"] = request_id
                self._app.send_task(DELETE_BACKUPS, kwargs=kwargs, queue=self._queue, producer=producer)
                sent += 1
        return sent

    def close(self) -> None:
        """Release the broker connections."""
        self._app.close()
