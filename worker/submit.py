"""``vbs-deleter submit``: read backup IDs, validate every line, skip duplicates, enqueue them in batches.

Input is plain lines (one backup ID a line, the project from ``--project``), CSV with a header naming a
``backup_id`` column and optionally a ``project_id`` column (so one file may mix projects), or JSON lines
(``{"backup_id": ..., "project_id"?: ...}``). Blank lines and lines starting with ``#`` are ignored.
IDs are lower-cased; a repeated (project, backup ID) pair is counted once and sent once.

Parsing (:func:`parse`) is pure; :func:`enqueue` does the I/O through :class:`worker.producer.Producer`.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal, TextIO

import redis

from worker import ledger
from worker.contract import MAX_BATCH, is_backup_id, is_project_id
from worker.producer import Producer, batches
from worker.progress import draw
from worker.settings import Settings

InputFormat = Literal["auto", "plain", "csv", "jsonl"]
FORMATS: tuple[InputFormat, ...] = ("auto", "plain", "csv", "jsonl")


@dataclass(frozen=True, slots=True)
class BadLine:
    """A refused input line: its 1-based number and why."""

    line: int
    reason: str


@dataclass
class Submission:
    """What a file held: valid IDs per project (first-seen order, no repeats), bad lines and counts."""

    ids: dict[str, dict[str, None]] = field(default_factory=dict)  # project -> ordered set of backup IDs
    bad: list[BadLine] = field(default_factory=list)
    records: int = 0  # non-blank, non-comment lines (data rows for CSV)
    duplicates: int = 0  # valid records repeating an earlier (project, backup ID)
    known: int = 0  # valid IDs skipped because the ledger already has them accepted or gone

    @property
    def valid(self) -> int:
        """Distinct (project, backup ID) pairs to send."""
        return sum(len(ids) for ids in self.ids.values())

    def add(self, line: int, project_id: str | None, backup_id: object) -> None:
        """Validate one record and keep it, or note it as a bad line."""
        if not isinstance(backup_id, str) or not backup_id.strip():
            self.bad.append(BadLine(line, "no backup_id"))
            return
        backup_id = backup_id.strip().lower()
        if not is_backup_id(backup_id):
            self.bad.append(BadLine(line, f"backup_id {_shown(backup_id)} is not a UUID (8-4-4-4-12 hex)"))
            return
        if not project_id:
            self.bad.append(BadLine(line, "no project: give --project or a project_id column/field"))
            return
        project_id = project_id.strip().lower()
        if not is_project_id(project_id):
            self.bad.append(BadLine(line, f"project_id {_shown(project_id)} is not 32 hex characters"))
            return
        seen = self.ids.setdefault(project_id, {})
        if backup_id in seen:
            self.duplicates += 1
        else:
            seen[backup_id] = None


def _shown(value: str) -> str:
    return repr(value if len(value) <= 60 else value[:60] + "...")


def _records(lines: Iterable[str]) -> Iterator[tuple[int, str]]:
    """(line number, stripped text) of every line that is neither blank nor a ``#`` comment."""
    for number, raw in enumerate(lines, start=1):
        text = raw.strip()
        if text and not text.startswith("#"):
            yield number, text


def detect_format(first: str) -> InputFormat:
    """The format of an input whose first record is ``first``: JSON lines, CSV (a header) or plain."""
    if first.startswith("{"):
        return "jsonl"
    if "backup_id" in (part.strip().lower() for part in first.split(",")):
        return "csv"
    return "plain"


def parse(lines: Iterable[str], project_id: str | None = None, fmt: InputFormat = "auto") -> Submission:
    """Read every line; ``project_id`` is the project of records that name none (pure)."""
    sub = Submission()
    records = _records(lines)
    first = next(records, None)
    if first is None:
        return sub
    if fmt == "auto":
        fmt = detect_format(first[1])
    if fmt == "csv":
        _parse_csv(sub, first, records, project_id)
        return sub
    _parse_one(sub, *first, project_id, fmt)
    for number, text in records:
        _parse_one(sub, number, text, project_id, fmt)
    return sub


def _parse_one(sub: Submission, number: int, text: str, project_id: str | None, fmt: InputFormat) -> None:
    sub.records += 1
    if fmt == "plain":
        sub.add(number, project_id, text)
        return
    try:
        record = json.loads(text)
    except ValueError:
        sub.bad.append(BadLine(number, "not valid JSON"))
        return
    if not isinstance(record, dict):
        sub.bad.append(BadLine(number, "a JSON line must be an object with backup_id"))
        return
    project = record.get("project_id", project_id)
    if project is not None and not isinstance(project, str):
        sub.bad.append(BadLine(number, "project_id must be a string"))
        return
    sub.add(number, project, record.get("backup_id"))


def _parse_csv(
    sub: Submission, header: tuple[int, str], records: Iterator[tuple[int, str]], project_id: str | None
) -> None:
    columns = [name.strip().lower() for name in next(csv.reader([header[1]]))]
    if "backup_id" not in columns:
        sub.bad.append(BadLine(header[0], "the CSV header names no backup_id column"))
        return
    id_at = columns.index("backup_id")
    project_at = columns.index("project_id") if "project_id" in columns else None
    for number, text in records:
        sub.records += 1
        row = next(csv.reader([text]))
        if len(row) != len(columns):
            sub.bad.append(BadLine(number, f"expected {len(columns)} CSV fields, got {len(row)}"))
            continue
        project = row[project_at].strip() if project_at is not None else ""
        sub.add(number, project or project_id, row[id_at])


def skip_known(sub: Submission, known: Callable[[str, list[str]], set[str]]) -> None:
    """Drop the IDs ``known(project_id, ids)`` reports as already accepted or gone; count them."""
    for project, ids in sub.ids.items():
        done = known(project, list(ids))
        for backup_id in done & ids.keys():
            del ids[backup_id]
            sub.known += 1


def ledger_known(redis_url: str) -> Callable[[str, list[str]], set[str]]:
    """Which of a project's IDs the ledger already has as accepted or gone (one pipelined read each)."""
    client = redis.Redis.from_url(redis_url, socket_timeout=10, socket_connect_timeout=5)
    return lambda project_id, ids: ledger.done_ids(client, project_id, ids)


@dataclass(frozen=True, slots=True)
class Sent:
    """What :func:`enqueue` put on the queue."""

    tasks: int
    ids: int
    seconds: float


class EnqueueError(RuntimeError):
    """The broker failed part-way; ``sent`` says what is on the queue already."""

    def __init__(self, sent: Sent, cause: Exception) -> None:
        super().__init__(f"enqueue failed after {sent.tasks} tasks ({sent.ids} IDs): {cause}")
        self.sent = sent


def enqueue(
    producer: Producer,
    sub: Submission,
    request_id: str | None,
    batch_size: int = MAX_BATCH,
    progress: Callable[[int], None] | None = None,
) -> Sent:
    """Send every project's IDs as ``vbs.delete_backups`` tasks; ``progress(ids_sent_so_far)`` per task."""
    started = time.perf_counter()
    tasks = sent = 0
    for project, ids in sub.ids.items():
        for chunk in batches(ids, batch_size):
            try:
                producer.send_batch(project, chunk, request_id)
            except Exception as exc:  # kombu/redis errors differ by version; all mean "not sent"
                raise EnqueueError(Sent(tasks, sent, time.perf_counter() - started), exc) from None
            tasks += 1
            sent += len(chunk)
            if progress is not None:
                progress(sent)
    return Sent(tasks, sent, time.perf_counter() - started)


def _open(source: str) -> TextIO:
    """The file, or stdin for ``-``, as UTF-8 text (a leading BOM, as Excel writes, is dropped);
    undecodable bytes become U+FFFD (and a bad line)."""
    if source == "-":
        return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8-sig", errors="replace")
    return open(source, encoding="utf-8-sig", errors="replace")


def run(
    settings: Settings,
    project_id: str | None,
    ids: list[str],
    source: str | None,
    fmt: InputFormat = "auto",
    strict: bool = False,
    dry_run: bool = False,
    batch_size: int = MAX_BATCH,
    request_id: str | None = None,
    max_shown: int = 100,
) -> int:
    """The submit command. Exit status: 0 all sent, 1 bad lines (valid ones sent unless strict),
    2 unusable input, 3 the broker failed part-way (the summary says how much was sent)."""
    if (source is None) == (not ids):
        print("vbs-deleter submit: give backup IDs as arguments or --file (not both)", file=sys.stderr)
        return 2
    try:
        if source is None:
            sub = parse(ids, project_id, fmt)
        else:
            with _open(source) as lines:
                sub = parse(lines, project_id, fmt)
    except OSError as exc:
        print(f"vbs-deleter submit: cannot read {source}: {exc.strerror}", file=sys.stderr)
        return 2
    for bad in sub.bad[:max_shown]:
        where = f"argument {bad.line}" if source is None else f"line {bad.line}"
        print(f"{where}: {bad.reason}", file=sys.stderr)
    if len(sub.bad) > max_shown:
        print(f"... and {len(sub.bad) - max_shown} more bad lines", file=sys.stderr)
    if strict and sub.bad:
        print(f"refused: {len(sub.bad)} bad lines and --strict: nothing enqueued", file=sys.stderr)
        return 1
    try:
        skip_known(sub, ledger_known(settings.redis_url))
    except redis.RedisError as exc:
        if not dry_run:
            print(f"vbs-deleter submit: cannot read the ledger at VBS_REDIS_URL: {exc}", file=sys.stderr)
            return 3
        print(f"dry run: ledger not read ({exc}); already-done IDs are counted as valid", file=sys.stderr)
    request_id = request_id or f"submit-{uuid.uuid4().hex[:12]}"
    tasks = sum(-(-len(ids) // batch_size) for ids in sub.ids.values())
    print(
        f"records {sub.records}, valid {sub.valid}, bad {len(sub.bad)}, duplicates {sub.duplicates}, "
        f"already done {sub.known}"
    )
    if dry_run:
        print(f"dry run: would enqueue {sub.valid} IDs in {tasks} tasks for {len(sub.ids)} project(s)")
        return 1 if sub.bad else 0
    started = time.monotonic()
    show = sys.stderr.isatty() and sub.valid > 0

    def progress(done: int) -> None:
        if show:
            draw(sys.stderr, done, sub.valid, started, " IDs/s")

    try:
        with Producer(settings.redis_url, settings.queue) as producer:
            sent = enqueue(producer, sub, request_id, batch_size, progress)
    except EnqueueError as exc:
        if show:
            sys.stderr.write("\n")
        print(f"vbs-deleter submit: {exc}; request_id {request_id}", file=sys.stderr)
        return 3
    if show:
        sys.stderr.write("\n")
    print(
        f"enqueued {sent.ids} IDs in {sent.tasks} tasks for {len(sub.ids)} project(s) to {settings.queue} "
        f"in {sent.seconds:.2f}s, request_id {request_id}"
    )
    return 1 if sub.bad else 0
