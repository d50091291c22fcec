"""A small public API for Python producers: enqueue deletions without running a worker.

``Producer(redis_url, queue)`` sends contract tasks (Celery protocol 2, JSON) and is a context manager.
Producers in other languages follow worker/schemas/tasks.schema.json instead (see README).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from types import TracebackType

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
    """Sends contract tasks to ``queue`` on the Redis broker at ``redis_url`` (JSON serializer).

    The IDs are not validated here: the worker does that and refuses a bad task as a whole, so callers
    that take IDs from people should check them first (``worker.contract.is_backup_id``).
    """

    def __init__(self, redis_url: str, queue: str = "vbs.deletions") -> None:
        self._app = Celery("vbs_deleter_producer", broker=redis_url, set_as_current=False)
        self._app.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True)
        self._queue = queue

    def __enter__(self) -> Producer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _send(self, name: str, kwargs: dict[str, object], request_id: str | None) -> str:
        if request_id is not None:
            kwargs["request_id"] = request_id
        return str(self._app.send_task(name, kwargs=kwargs, queue=self._queue).id)

    def delete_backup(self, project_id: str, backup_id: str, request_id: str | None = None) -> str:
        """Enqueue one ``vbs.delete_backup`` task; returns its task id."""
        return self._send(DELETE_BACKUP, {"project_id": project_id, "backup_id": backup_id}, request_id)

    def send_batch(self, project_id: str, backup_ids: list[str], request_id: str | None = None) -> str:
        """Enqueue one ``vbs.delete_backups`` task of 1..1000 IDs; returns its task id."""
        if not 1 <= len(backup_ids) <= MAX_BATCH:
            raise ValueError(f"a batch holds 1..{MAX_BATCH} IDs, got {len(backup_ids)}")
        return self._send(DELETE_BACKUPS, {"project_id": project_id, "backup_ids": backup_ids}, request_id)

    def delete_backups(
        self,
        project_id: str,
        backup_ids: Iterable[str],
        request_id: str | None = None,
        batch_size: int = MAX_BATCH,
    ) -> int:
        """Enqueue ``vbs.delete_backups`` tasks of at most ``batch_size`` IDs; returns the number of tasks."""
        return sum(
            1 for chunk in batches(backup_ids, batch_size) if self.send_batch(project_id, chunk, request_id)
        )

    def close(self) -> None:
        """Release the broker connections."""
        self._app.close()
