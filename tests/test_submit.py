"""``vbs-deleter submit``: parsing rules (pure) and what lands in a real Redis queue."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from tests.conftest import PROJECT, Sim, Worker
from worker import keys
from worker.scrape import by_label
from worker.submit import BadLine, detect_format, parse

OTHER = "fedcba9876543210fedcba9876543210"


def ids(n: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(n)]


def queued(redis_url: str, queue: str) -> list[tuple[str, list[Any], dict[str, Any]]]:
    """(task name, args, kwargs) of every message on ``queue``, oldest first."""
    raw = redis.Redis.from_url(redis_url).lrange(queue, 0, -1)
    out = []
    for item in reversed(raw):  # kombu LPUSHes and workers BRPOP: the tail is the oldest
        message = json.loads(item)
        assert message["content-type"] == "application/json"
        args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        out.append((message["headers"]["task"], args, kwargs))
    return out


def run_submit(
    redis_url: str, queue: str, *argv: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", "submit", *argv],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "VBS_REDIS_URL": redis_url, "VBS_QUEUE": queue},
    )


# --- parsing (pure) ---


def test_plain_lines_with_blanks_comments_duplicates_and_bad_lines() -> None:
    a, b = ids(2)
    sub = parse(["# export", a, "", f"  {b.upper()}  ", a, "not-an-id", b], PROJECT)
    assert sub.ids == {PROJECT: {a: None, b: None}}
    assert (sub.records, sub.valid, sub.duplicates) == (5, 2, 2)
    assert sub.bad == [BadLine(6, "backup_id 'not-an-id' is not a UUID (8-4-4-4-12 hex)")]


def test_plain_lines_need_a_project() -> None:
    sub = parse(ids(1), None)
    assert sub.valid == 0
    assert sub.bad == [BadLine(1, "no project: give --project or a project_id column/field")]


def test_csv_mixes_projects_and_reports_bad_rows() -> None:
    a, b, c = ids(3)
    lines = [
        "project_id,backup_id",
        f"{PROJECT},{a}",
        f"{OTHER.upper()},{b}",
        f"{PROJECT},{a}",
        f"{PROJECT}",
        f"xyz,{c}",
        f",{c}",
    ]
    sub = parse(lines, None)
    assert sub.ids == {PROJECT: {a: None}, OTHER: {b: None}}
    assert (sub.records, sub.duplicates) == (6, 1)
    assert sub.bad == [
        BadLine(5, "expected 2 CSV fields, got 1"),
        BadLine(6, "project_id 'xyz' is not 32 hex characters"),
        BadLine(7, "no project: give --project or a project_id column/field"),
    ]


def test_csv_without_project_column_uses_the_default_and_ignores_extra_columns() -> None:
    a = ids(1)[0]
    sub = parse(["name,backup_id", f"autobk_1,{a}"], PROJECT)
    assert sub.ids == {PROJECT: {a: None}} and sub.bad == []


def test_json_lines() -> None:
    a, b = ids(2)
    lines = [
        json.dumps({"backup_id": a}),
        json.dumps({"backup_id": b, "project_id": OTHER, "name": "x"}),
        "{broken",
        "[1, 2]",
        json.dumps({"project_id": PROJECT}),
        json.dumps({"backup_id": a, "project_id": 5}),
    ]
    sub = parse(lines, PROJECT)
    assert sub.ids == {PROJECT: {a: None}, OTHER: {b: None}}
    assert sub.bad == [
        BadLine(3, "not valid JSON"),
        BadLine(4, "a JSON line must be an object with backup_id"),
        BadLine(5, "no backup_id"),
        BadLine(6, "project_id must be a string"),
    ]


def test_format_detection() -> None:
    assert detect_format('{"backup_id": "x"}') == "jsonl"
    assert detect_format("project_id, Backup_ID") == "csv"
    assert detect_format("backup_id") == "csv"
    assert detect_format(ids(1)[0]) == "plain"


# --- the command against a real Redis ---


def test_mixed_project_csv_is_enqueued_per_project_in_batches(
    redis_url: str, queue: str, tmp_path: Path
) -> None:
    mine, theirs = ids(5), ids(2)
    rows = [f"{PROJECT},{i}" for i in mine] + [f"{OTHER},{i}" for i in theirs] + [f"{PROJECT},{mine[0]}"]
    path = tmp_path / "ids.csv"
    path.write_text("project_id,backup_id\n" + "\n".join(rows) + "\nbad,line\n")
    result = run_submit(redis_url, queue, "--file", str(path), "--batch-size", "2", "--request-id", "t-1")
    assert result.returncode == 1, result.stderr  # one bad line; the valid ones went in
    assert "line 10: backup_id 'line' is not a UUID" in result.stderr
    assert "records 9, valid 7, bad 1, duplicates 1" in result.stdout
    assert "enqueued 7 IDs in 4 tasks for 2 project(s)" in result.stdout
    tasks = queued(redis_url, queue)
    assert [(name, args) for name, args, _ in tasks] == [("vbs.delete_backups", [])] * 4
    assert [kw["backup_ids"] for _, _, kw in tasks] == [mine[:2], mine[2:4], mine[4:], theirs]
    assert [kw["project_id"] for _, _, kw in tasks] == [PROJECT] * 3 + [OTHER]
    assert {kw["request_id"] for _, _, kw in tasks} == {"t-1"}


def test_stdin_and_arguments(redis_url: str, queue: str) -> None:
    piped = ids(3)
    result = run_submit(redis_url, queue, "--project", PROJECT, "--file", "-", stdin="\n".join(piped) + "\n")
    assert result.returncode == 0, result.stderr
    given = ids(2)
    result = run_submit(redis_url, queue, "--project", PROJECT, *given)
    assert result.returncode == 0, result.stderr
    assert [kw["backup_ids"] for _, _, kw in queued(redis_url, queue)] == [piped, given]


def test_strict_refuses_the_whole_file(redis_url: str, queue: str) -> None:
    lines = [*ids(3), "nope"]
    result = run_submit(
        redis_url, queue, "--project", PROJECT, "--file", "-", "--strict", stdin="\n".join(lines)
    )
    assert result.returncode == 1
    assert "line 4: backup_id 'nope' is not a UUID" in result.stderr
    assert "nothing enqueued" in result.stderr
    assert redis.Redis.from_url(redis_url).llen(queue) == 0


def test_dry_run_sends_nothing(redis_url: str, queue: str) -> None:
    result = run_submit(redis_url, queue, "--project", PROJECT, "--dry-run", *ids(1500))
    assert result.returncode == 0, result.stderr
    assert "dry run: would enqueue 1500 IDs in 2 tasks for 1 project(s)" in result.stdout
    assert redis.Redis.from_url(redis_url).llen(queue) == 0


def test_unusable_input(redis_url: str, queue: str, tmp_path: Path) -> None:
    assert run_submit(redis_url, queue, "--project", PROJECT).returncode == 2
    missing = run_submit(redis_url, queue, "--file", str(tmp_path / "absent.txt"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    bytes_file = tmp_path / "binary.txt"
    good = ids(1)[0]
    bytes_file.write_bytes(good.encode() + b"\n\xff\xfe\n")
    result = run_submit(redis_url, queue, "--project", PROJECT, "--file", str(bytes_file))
    assert result.returncode == 1 and "line 2: backup_id" in result.stderr
    assert [kw["backup_ids"] for _, _, kw in queued(redis_url, queue)] == [[good]]


def test_broker_down_is_reported(queue: str) -> None:
    from worker.processes import free_port

    result = run_submit(f"redis://127.0.0.1:{free_port()}/0", queue, "--project", PROJECT, *ids(2))
    assert result.returncode == 3
    assert "cannot read the ledger at VBS_REDIS_URL" in result.stderr


def test_ids_the_ledger_has_as_done_are_skipped_and_counted(redis_url: str, queue: str) -> None:
    done, gone, queued_before, fresh = ids(4)
    client = redis.Redis.from_url(redis_url)
    for backup_id, state in ((done, "accepted"), (gone, "already_gone"), (queued_before, "queued")):
        client.hset(keys.ledger(PROJECT, backup_id), mapping={"state": state})
    result = run_submit(redis_url, queue, "--project", PROJECT, done, gone, queued_before, fresh)
    assert result.returncode == 0, result.stderr
    assert "records 4, valid 2, bad 0, duplicates 0, already done 2" in result.stdout
    assert [kw["backup_ids"] for _, _, kw in queued(redis_url, queue)] == [[queued_before, fresh]]


def test_100k_ids_from_a_file(redis_url: str, queue: str, tmp_path: Path) -> None:
    sent = ids(100_000)
    path = tmp_path / "ids.txt"
    path.write_text("\n".join([*sent, sent[0], sent[1]]) + "\n")
    result = run_submit(redis_url, queue, "--project", PROJECT, "--file", str(path))
    assert result.returncode == 0, result.stderr
    assert "records 100002, valid 100000, bad 0, duplicates 2" in result.stdout
    tasks = queued(redis_url, queue)
    assert len(tasks) == 100
    assert all(len(kw["backup_ids"]) == 1000 for _, _, kw in tasks)
    assert [i for _, _, kw in tasks for i in kw["backup_ids"]] == sent


def test_submitted_tasks_are_done_by_the_worker(
    sim: Sim, start_worker: Callable[..., Worker], redis_url: str, queue: str
) -> None:
    seeded = sim.seed(4)
    worker = start_worker(sim)
    result = run_submit(redis_url, queue, "--project", PROJECT, "--batch-size", "3", *seeded, ids(1)[0])
    assert result.returncode == 0, result.stderr
    outcomes = by_label(worker.wait_for_deletions(5), "vbs_deleter_deletions_total", "outcome")
    assert outcomes == {"accepted": 4, "already_gone": 1}


def test_csv_written_by_excel_with_a_byte_order_mark(tmp_path: Path) -> None:
    from worker.submit import _open

    backup = str(uuid.uuid4())
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbfproject_id,backup_id\r\n" + f"{OTHER},{backup}\r\n".encode())
    with _open(str(path)) as handle:
        submission = parse(handle, project_id=PROJECT)
    assert submission.ids == {OTHER: {backup: None}} and submission.bad == []
