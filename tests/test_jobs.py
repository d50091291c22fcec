"""Pure parts of job follow-up and the custom collectors: poll schedule, reading polls, parsing the reads."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from worker.jobs import Poll, judge, poll_delay, usable_job_id
from worker.metrics import QUEUE_MESSAGES, ReadAtScrape, RecentJobs
from worker.outcome import Answer
from worker.vbs import parse_backup_answer, parse_job_answer

JOB = "70a599e0-31e7-49b7-b260-868f441e862b"


def test_poll_delay_doubles_up_to_the_ceiling() -> None:
    assert [poll_delay(n, 0.5, 3.0) for n in range(6)] == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    assert poll_delay(10_000, 1.0, 15.0) == 15.0


@pytest.mark.parametrize(
    ("job_id", "usable"),
    [
        (JOB, True),
        ("a", True),
        ("", False),
        (None, False),
        ("../x", False),
        ("a/b", False),
        ("x" * 65, False),
    ],
)
def test_usable_job_id(job_id: str | None, usable: bool) -> None:
    assert usable_job_id(job_id) is usable


@pytest.mark.parametrize(
    ("answer", "poll"),
    [
        (Answer(200, state="SUCCESS"), Poll.DONE),
        (Answer(200, state="FAIL", error_code="VolumeBackup.0101"), Poll.FAILED),
        (Answer(200, state="RUNNING"), Poll.PENDING),
        (Answer(200, state="INIT"), Poll.PENDING),
        (Answer(200), Poll.PENDING),
        (Answer(0, transport_error="timeout"), Poll.PENDING),
        (Answer(429), Poll.PENDING),
        (Answer(503), Poll.PENDING),
        (Answer(404, error_code="VolumeBackup.0111"), Poll.BROKEN),
        (Answer(401, error_code="APIG.0301"), Poll.BROKEN),
    ],
)
def test_judge_job_reads(answer: Answer, poll: Poll) -> None:
    assert judge(answer, by_job=True) is poll


@pytest.mark.parametrize(
    ("answer", "poll"),
    [
        (Answer(404, error_code="itemNotFound"), Poll.DONE),
        (Answer(200, state="deleting"), Poll.PENDING),
        (Answer(200, state="error_deleting"), Poll.FAILED),
        (Answer(200, state="error"), Poll.FAILED),
        (Answer(504), Poll.PENDING),
        (Answer(403), Poll.BROKEN),
    ],
)
def test_judge_backup_reads(answer: Answer, poll: Poll) -> None:
    assert judge(answer, by_job=False) is poll


def test_parse_job_answers() -> None:
    body = (
        b'{"status": "FAIL", "job_id": "%s", "error_code": "VolumeBackup.0101", "fail_reason": "busy",'
        b' "entities": {"backup_id": "b"}, "sub_jobs": []}' % JOB.encode()
    )
    failed = parse_job_answer(200, {"X-Request-Id": "rq"}, body)
    assert (failed.state, failed.error_code, failed.message, failed.request_id) == (
        "FAIL",
        "VolumeBackup.0101",
        "busy",
        "rq",
    )
    running = parse_job_answer(200, {}, b'{"status": "RUNNING", "error_code": null, "fail_reason": null}')
    assert (running.state, running.error_code, running.message) == ("RUNNING", None, None)
    missing = parse_job_answer(404, {}, b'{"error": {"code": "VolumeBackup.0111", "message": "no job"}}')
    assert (missing.state, missing.error_code) == (None, "VolumeBackup.0111")
    assert parse_job_answer(200, {}, b"not json").state is None


def test_parse_backup_answers() -> None:
    shown = parse_backup_answer(200, {}, b'{"backup": {"status": "error", "fail_reason": "disk"}}')
    assert (shown.state, shown.message) == ("error", "disk")
    gone = parse_backup_answer(404, {}, b'{"itemNotFound": {"code": 404, "message": "gone"}}')
    assert (gone.status, gone.state, gone.error_code) == (404, None, "itemNotFound")
    assert parse_backup_answer(200, {}, b'{"backup": "odd"}').state is None


def _exposed(collector: RecentJobs | ReadAtScrape) -> list[str]:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return [line for line in text.splitlines() if not line.startswith("#")]


def test_recent_jobs_keep_the_last_n_in_place() -> None:
    recent = RecentJobs(capacity=2)
    recent.record("j1", "b1", "running")
    recent.record("j2", "b2", "running")
    recent.record("j1", "b1", "success")  # an update keeps its place
    assert _exposed(recent) == [
        'vbs_deleter_recent_job_info{backup_id="b1",job_id="j1",status="success"} 1.0',
        'vbs_deleter_recent_job_info{backup_id="b2",job_id="j2",status="running"} 1.0',
    ]
    recent.record("j3", "b3", "fail")
    assert [line.split("job_id=")[1][:4] for line in _exposed(recent)] == ['"j2"', '"j3"']
    recent.resize(0)
    assert _exposed(recent) == []


def test_read_at_scrape_gauges_are_absent_until_set() -> None:
    gauges = ReadAtScrape()
    assert _exposed(gauges) == []
    gauges.set(QUEUE_MESSAGES, 7, {"queue": "q"})
    assert _exposed(gauges) == ['vbs_deleter_queue_messages{queue="q"} 7.0']
    gauges.clear(QUEUE_MESSAGES)
    assert _exposed(gauges) == []
    with pytest.raises(KeyError):
        gauges.set("vbs_deleter_unknown", 1)
