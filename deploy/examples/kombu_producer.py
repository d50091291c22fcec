"""Enqueue VBS deletions without importing vbs-deleter: plain kombu, Celery message protocol 2, JSON.

Usage: python kombu_producer.py REDIS_URL QUEUE PROJECT_ID BACKUP_ID [BACKUP_ID ...]
The kwargs follow worker/schemas/tasks.schema.json; at most 1000 IDs per vbs.delete_backups task.
"""

import sys
import uuid

from kombu import Connection, Exchange, Producer, Queue


def publish(redis_url: str, queue: str, project_id: str, backup_ids: list[str], request_id: str) -> None:
    exchange = Exchange(queue)
    with Connection(redis_url) as conn:
        producer = Producer(conn)
        for start in range(0, len(backup_ids), 1000):
            kwargs = {
                "project_id": project_id,
                "backup_ids": backup_ids[start : start + 1000],
                "request_id": request_id,
            }
            task_id = str(uuid.uuid4())
            producer.publish(
                [[], kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}],
                exchange=exchange,
                routing_key=queue,
                serializer="json",
                headers={"lang": "py", "task": "vbs.delete_backups", "id": task_id, "root_id": task_id},
                declare=[
                    Queue(queue, exchange, routing_key=queue)
                ],  # a message to an undeclared queue is lost
            )


if __name__ == "__main__":
    url, queue_name, project, *ids = sys.argv[1:]
    publish(url, queue_name, project, ids, request_id=f"kombu-example-{uuid.uuid4().hex[:8]}")
