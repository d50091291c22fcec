"""The baseline: what a user would write without vbs-deleter.

A Celery prefork worker whose task deletes one backup with ``requests``, retrying 408/503/504 with
Celery's own retry. Run: ``celery -A bench.baseline worker`` with BASELINE_REDIS_URL, BASELINE_ENDPOINT,
BASELINE_QUEUE set; enqueue ``baseline.delete(project_id, backup_id)``.
"""

import os

import requests
from celery import Celery

app = Celery("baseline", broker=os.environ.get("BASELINE_REDIS_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_default_queue=os.environ.get("BASELINE_QUEUE", "baseline"),
    worker_hijack_root_logger=False,
)
ENDPOINT = os.environ.get("BASELINE_ENDPOINT", "http://127.0.0.1:8780")


class Transient(Exception):
    """408, 503 or 504: worth another try."""


@app.task(
    name="baseline.delete",
    autoretry_for=(Transient, requests.ConnectionError),
    retry_backoff=True,
    max_retries=5,
)
def delete(project_id: str, backup_id: str) -> int:
    response = requests.post(f"{ENDPOINT}/v2/{project_id}/cloudbackups/{backup_id}", timeout=30)
    if response.status_code in (408, 503, 504):
        raise Transient(response.status_code)
    return response.status_code
