"""The task contract: validation rules, and the JSON Schema that producers use agrees with them."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from worker.contract import DELETE_BACKUP, DELETE_BACKUPS, InvalidTask, envelope_problem, validate

SCHEMA = json.loads((Path(__file__).parent.parent / "worker/schemas/tasks.schema.json").read_text())


def schema_for(task: str) -> dict[str, Any]:
    """The schema of one task's kwargs, with the shared definitions it refers to."""
    return {"$ref": f"#/$defs/{task}", "$defs": SCHEMA["$defs"]}


PROJECT = "0123456789abcdef0123456789abcdef"
BACKUP = "70a599e0-31e7-49b7-b260-868f441e862b"

GOOD: list[tuple[str, dict[str, Any]]] = [
    (DELETE_BACKUP, {"project_id": PROJECT, "backup_id": BACKUP}),
    (DELETE_BACKUP, {"project_id": PROJECT.upper(), "backup_id": BACKUP.upper(), "request_id": "r-1 ok"}),
    (DELETE_BACKUPS, {"project_id": PROJECT, "backup_ids": [BACKUP]}),
    (DELETE_BACKUPS, {"project_id": PROJECT, "backup_ids": [str(uuid.uuid4()) for _ in range(1000)]}),
    (DELETE_BACKUPS, {"project_id": PROJECT, "backup_ids": [BACKUP], "request_id": "x" * 128}),
    (DELETE_BACKUP, {"project_id": PROJECT, "backup_id": BACKUP, "request_id": None}),
]

BAD: list[tuple[str, dict[str, Any], str]] = [
    (DELETE_BACKUP, {"backup_id": BACKUP}, "missing_kwargs"),
    (DELETE_BACKUP, {"project_id": PROJECT}, "missing_kwargs"),
    (DELETE_BACKUP, {"project_id": PROJECT, "backup_id": BACKUP, "force": True}, "extra_kwargs"),
    (DELETE_BACKUP, {"project_id": PROJECT, "backup_ids": [BACKUP]}, "extra_kwargs"),
    (DELETE_BACKUP, {"project_id": 12345, "backup_id": BACKUP}, "wrong_type"),
    (DELETE_BACKUP, {"project_id": PROJECT, "backup_id": None}, "wrong_type"),
    (DELETE_BACKUP, {"project_id": "", "backup_id": BACKUP}, "empty_value"),
    (DELETE_BACKUP, {"project_id": PROJECT, "backup_id": "../../v3/x/backups"}, "bad_format"),
    (DELETE_BACKUP, {"project_id": PROJECT[:-1] + "/", "backup_id": BACKUP}, "bad_format"),
    (DELETE_BACKUP, {"project_id": PROJECT + "0", "backup_id": BACKUP}, "bad_format"),
    (DELETE_BACKUP, {"project_id": PROJECT, "backup_id": BACKUP + "?x=1"}, "bad_format"),
    (DELETE_BACKUP, {"project_id": PROJECT, "backup_id": BACKUP.replace("-", "")}, "bad_format"),
    (DELETE_BACKUP, {"project_id": PROJECT, "backup_id": "a" * 10_000}, "bad_format"),
    (DELETE_BACKUP, {"project_id": PROJECT, "backup_id": BACKUP, "request_id": "x" * 129}, "bad_format"),
    (DELETE_BACKUP, {"project_id": PROJECT, "backup_id": BACKUP, "request_id": "line\nbreak"}, "bad_format"),
    (DELETE_BACKUP, {"project_id": PROJECT, "backup_id": BACKUP, "request_id": ""}, "empty_value"),
    (DELETE_BACKUP, {"project_id": PROJECT, "backup_id": BACKUP, "request_id": 7}, "wrong_type"),
    (DELETE_BACKUPS, {"project_id": PROJECT, "backup_ids": BACKUP}, "wrong_type"),
    (DELETE_BACKUPS, {"project_id": PROJECT, "backup_ids": []}, "empty_value"),
    (DELETE_BACKUPS, {"project_id": PROJECT, "backup_ids": [BACKUP] * 1001}, "too_many_ids"),
    (DELETE_BACKUPS, {"project_id": PROJECT, "backup_ids": [BACKUP, "nope"]}, "bad_format"),
    (DELETE_BACKUPS, {"project_id": PROJECT, "backup_ids": [BACKUP, 5]}, "wrong_type"),
]


@pytest.mark.parametrize(("task", "kwargs"), GOOD)
def test_good_tasks_pass_both_checks(task: str, kwargs: dict[str, Any]) -> None:
    request = validate(task, (), kwargs)
    assert request.project_id == kwargs["project_id"]
    assert request.request_id == kwargs.get("request_id")
    jsonschema.validate(kwargs, schema_for(task))
    jsonschema.validate(kwargs, SCHEMA)


@pytest.mark.parametrize(("task", "kwargs", "reason"), BAD)
def test_bad_tasks_fail_both_checks(task: str, kwargs: dict[str, Any], reason: str) -> None:
    with pytest.raises(InvalidTask) as caught:
        validate(task, (), kwargs)
    assert caught.value.reason == reason
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(kwargs, schema_for(task))


def test_positional_args_and_unknown_task_are_rejected() -> None:
    with pytest.raises(InvalidTask) as caught:
        validate(DELETE_BACKUP, (PROJECT, BACKUP), {})
    assert caught.value.reason == "positional_args"
    with pytest.raises(InvalidTask) as caught:
        validate("vbs.purge_everything", (), {"project_id": PROJECT})
    assert caught.value.reason == "unknown_task"


def test_batch_keeps_order_and_drops_repeated_ids() -> None:
    other = str(uuid.uuid4())
    request = validate(DELETE_BACKUPS, (), {"project_id": PROJECT, "backup_ids": [BACKUP, other, BACKUP]})
    assert request.backup_ids == (BACKUP, other)


def test_long_bad_values_are_shortened_in_the_message() -> None:
    with pytest.raises(InvalidTask) as caught:
        validate(DELETE_BACKUP, (), {"project_id": PROJECT, "backup_id": "z" * 5000})
    assert len(str(caught.value)) < 300


EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
HEADERS = {"task": DELETE_BACKUP, "id": "t1", "lang": "py"}


@pytest.mark.parametrize(
    ("headers", "body", "reason"),
    [
        ({"task": DELETE_BACKUP}, [[], {}, EMBED], "malformed_message"),
        (None, [[], {}, EMBED], "malformed_message"),
        ({**HEADERS, "task": "celery.chord_unlock"}, [[], {}, EMBED], "unknown_task"),
        ({**HEADERS, "timelimit": "garbage"}, [[], {}, EMBED], "malformed_message"),
        ({**HEADERS, "eta": "not-a-date"}, [[], {}, EMBED], "malformed_message"),
        ({**HEADERS, "expires": 12345}, [[], {}, EMBED], "malformed_message"),
        ({**HEADERS, "retries": "3"}, [[], {}, EMBED], "malformed_message"),
        (HEADERS, [[], {}], "malformed_message"),
        (HEADERS, [[], {}, EMBED, 4], "malformed_message"),
        (HEADERS, None, "malformed_message"),
        (HEADERS, 12345, "malformed_message"),
        (HEADERS, "hello", "malformed_message"),
        (HEADERS, {"project_id": PROJECT, "backup_id": BACKUP}, "malformed_message"),
        (HEADERS, [[], None, EMBED], "malformed_message"),
        (HEADERS, [[], [1, 2], EMBED], "malformed_message"),
        (HEADERS, [[], {}, "notadict"], "malformed_message"),
        (HEADERS, [[], {}, {**EMBED, "callbacks": "x"}], "malformed_message"),
    ],
)
def test_envelope_problems(headers: Any, body: Any, reason: str) -> None:
    problem = envelope_problem(headers, body)
    assert problem is not None and problem.reason == reason


def test_good_envelopes() -> None:
    assert envelope_problem(HEADERS, [[], {"project_id": PROJECT}, EMBED]) is None
    assert envelope_problem({**HEADERS, "timelimit": [None, None]}, [[], {}, None]) is None
    assert (
        envelope_problem({**HEADERS, "eta": "2026-12-03T12:00:00+00:00", "retries": 0}, [[], {}, None])
        is None
    )
