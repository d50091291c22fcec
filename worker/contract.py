"""The task contract that producers in any language depend on, and its validation (pure, no I/O).

Two Celery task names, JSON kwargs only:

* ``vbs.delete_backup``  ``{"project_id": str, "backup_id": str, "request_id"?: str}``
* ``vbs.delete_backups`` ``{"project_id": str, "backup_ids": [str, ...], "request_id"?: str}``

``project_id`` is 32 lowercase or uppercase hex characters, a backup ID is a UUID in its canonical
8-4-4-4-12 form, ``request_id`` has 1..128 printable ASCII characters, a batch holds 1..1000 IDs.
``worker/schemas/tasks.schema.json`` states the same rules for producers; a test keeps the two in step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

DELETE_BACKUP = "vbs.delete_backup"
DELETE_BACKUPS = "vbs.delete_backups"
MAX_BATCH = 1000
MAX_REQUEST_ID = 128

_PROJECT_ID = re.compile(r"[0-9a-fA-F]{32}")
_BACKUP_ID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_REQUEST_ID = re.compile(rf"[\x20-\x7e]{{1,{MAX_REQUEST_ID}}}")


class InvalidTask(ValueError):
    """A task that breaks the contract. ``reason`` is a short, bounded label for metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class DeletionRequest:
    """A validated task: one project, 1..1000 distinct backup IDs (order kept), an optional correlation id."""

    project_id: str
    backup_ids: tuple[str, ...]
    request_id: str | None


def is_project_id(value: str) -> bool:
    """True when ``value`` is a valid ``project_id`` (32 hex characters)."""
    return _PROJECT_ID.fullmatch(value) is not None


def is_backup_id(value: str) -> bool:
    """True when ``value`` is a valid backup ID (canonical 8-4-4-4-12 UUID)."""
    return _BACKUP_ID.fullmatch(value) is not None


def _check_string(name: str, value: object, pattern: re.Pattern[str]) -> str:
    if not isinstance(value, str):
        raise InvalidTask("wrong_type", f"{name} must be a string, got {type(value).__name__}")
    if not value:
        raise InvalidTask("empty_value", f"{name} is empty")
    if pattern.fullmatch(value) is None:
        shown = value if len(value) <= 80 else value[:80] + "..."
        raise InvalidTask("bad_format", f"{name} {shown!r} does not match {pattern.pattern}")
    return value


TASK_NAMES = frozenset({DELETE_BACKUP, DELETE_BACKUPS})
_LIMIT_TYPES = (int, float, type(None))
_EMBED_KEYS = frozenset({"callbacks", "errbacks", "chain", "chord"})


def envelope_problem(headers: object, body: object) -> InvalidTask | None:
    """Check a Celery protocol-2 message before Celery parses it; None when it is well formed.

    ``body`` is the decoded JSON: ``[args, kwargs, embed]`` with a list, a dict, and a dict (or null) whose
    workflow fields (callbacks, errbacks, chain, chord) are empty: this worker runs no workflows.
    """
    if not isinstance(headers, dict) or not isinstance(headers.get("id"), str) or not headers["id"]:
        return InvalidTask("malformed_message", "headers must carry a task 'id' string (Celery protocol 2)")
    task = headers.get("task")
    if task not in TASK_NAMES:
        return InvalidTask("unknown_task", f"no task named {str(task)[:80]!r}")
    limits = headers.get("timelimit")
    if limits is not None and not (
        isinstance(limits, list | tuple)
        and len(limits) == 2
        and all(isinstance(v, _LIMIT_TYPES) for v in limits)
    ):
        return InvalidTask("malformed_message", "header 'timelimit' must be [soft, hard] seconds or null")
    for name in ("eta", "expires"):
        when = headers.get(name)
        if when is not None and not _is_iso_time(when):
            return InvalidTask("malformed_message", f"header {name!r} must be an ISO 8601 time or null")
    if headers.get("retries") is not None and type(headers["retries"]) is not int:
        return InvalidTask("malformed_message", "header 'retries' must be an integer")
    if not (isinstance(body, list) and len(body) == 3):
        return InvalidTask("malformed_message", "body must be [args, kwargs, embed]")
    args, kwargs, embed = body
    if not isinstance(args, list) or not isinstance(kwargs, dict) or not isinstance(embed, dict | None):
        return InvalidTask("malformed_message", "body must be [list, object, object or null]")
    if embed and any(embed.get(key) for key in _EMBED_KEYS):
        return InvalidTask("malformed_message", "callbacks, errbacks, chains and chords are not supported")
    return None


def _is_iso_time(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def validate(task_name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> DeletionRequest:
    """Check one task's arguments against the contract; raise :class:`InvalidTask` on the first fault."""
    if args:
        raise InvalidTask(
            "positional_args", f"{task_name} takes keyword arguments only, got {len(args)} positional"
        )
    ids_key = {DELETE_BACKUP: "backup_id", DELETE_BACKUPS: "backup_ids"}.get(task_name)
    if ids_key is None:
        raise InvalidTask("unknown_task", f"no task named {task_name!r}")
    allowed = {"project_id", ids_key, "request_id"}
    extra = sorted(set(kwargs) - allowed)
    if extra:
        raise InvalidTask("extra_kwargs", f"{task_name} does not take {', '.join(extra)}")
    missing = sorted({"project_id", ids_key} - set(kwargs))
    if missing:
        raise InvalidTask("missing_kwargs", f"{task_name} needs {', '.join(missing)}")
    project_id = _check_string("project_id", kwargs["project_id"], _PROJECT_ID)
    request_id = kwargs.get("request_id")  # null means absent
    if request_id is not None:
        request_id = _check_string("request_id", request_id, _REQUEST_ID)
    if task_name == DELETE_BACKUP:
        backup_ids: tuple[str, ...] = (_check_string("backup_id", kwargs["backup_id"], _BACKUP_ID),)
    else:
        raw = kwargs["backup_ids"]
        if not isinstance(raw, list):
            raise InvalidTask("wrong_type", f"backup_ids must be a list, got {type(raw).__name__}")
        if not raw:
            raise InvalidTask("empty_value", "backup_ids is empty")
        if len(raw) > MAX_BATCH:
            raise InvalidTask("too_many_ids", f"backup_ids holds {len(raw)} IDs, at most {MAX_BATCH} allowed")
        checked = [_check_string(f"backup_ids[{i}]", value, _BACKUP_ID) for i, value in enumerate(raw)]
        backup_ids = tuple(dict.fromkeys(checked))
    return DeletionRequest(project_id=project_id, backup_ids=backup_ids, request_id=request_id)


def well_formed_pairs(kwargs: dict[str, Any]) -> list[tuple[str, str]]:
    """(project_id, backup_id) pairs of a rejected task whose IDs are well formed (for the ledger)."""
    project_id = kwargs.get("project_id")
    if not isinstance(project_id, str) or _PROJECT_ID.fullmatch(project_id) is None:
        return []
    raw = kwargs.get("backup_ids")
    candidates = raw[:MAX_BATCH] if isinstance(raw, list) else [kwargs.get("backup_id")]
    return [
        (project_id, value) for value in candidates if isinstance(value, str) and _BACKUP_ID.fullmatch(value)
    ]
