"""Pure decisions: classification of answers, backoff and Retry-After."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from worker.outcome import Answer, Decision, Verdict, backoff_delay, classify, retry_after_seconds, retry_wait

RETRIED = frozenset({408, 503, 504})


@pytest.mark.parametrize(
    ("answer", "verdict", "reason"),
    [
        (Answer(200, job_id="j"), Verdict.ACCEPTED, "accepted"),
        (Answer(202), Verdict.ACCEPTED, "accepted"),
        (Answer(404), Verdict.GONE, "already_gone"),
        (Answer(404, error_code="VolumeBackup.0110"), Verdict.GONE, "already_gone"),
        (Answer(404, error_code="itemNotFound"), Verdict.GONE, "already_gone"),
        (Answer(404, error_code="APIGW.0101"), Verdict.FAILED, "no_such_route"),
        (Answer(307), Verdict.FAILED, "status_307"),
        (Answer(429), Verdict.THROTTLED, "throttled"),
        (Answer(408), Verdict.RETRY, "status_408"),
        (Answer(503), Verdict.RETRY, "status_503"),
        (Answer(504), Verdict.RETRY, "status_504"),
        (Answer(0, transport_error="timeout"), Verdict.RETRY, "timeout"),
        (Answer(0, transport_error="disconnect"), Verdict.RETRY, "disconnect"),
        (Answer(0), Verdict.RETRY, "connection"),
        (Answer(400, error_code="VolumeBackup.0113"), Verdict.FAILED, "status_400"),
        (Answer(401), Verdict.FAILED, "status_401"),
        (Answer(500), Verdict.FAILED, "status_500"),
        (Answer(502), Verdict.FAILED, "status_502"),
    ],
)
def test_classify(answer: Answer, verdict: Verdict, reason: str) -> None:
    decision = classify(answer, RETRIED)
    assert (decision.verdict, decision.reason) == (verdict, reason)


def test_retried_set_is_a_setting() -> None:
    assert classify(Answer(502), frozenset({502})).verdict is Verdict.RETRY
    assert classify(Answer(503), frozenset({502})).verdict is Verdict.FAILED


def test_backoff_is_full_jitter_under_an_exponential_ceiling() -> None:
    rng = random.Random(1)
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (10, 30.0)]:
        delays = [backoff_delay(attempt, 0.5, 30.0, rng) for _ in range(2000)]
        assert min(delays) >= 0.0 and max(delays) <= ceiling
        assert max(delays) > 0.9 * ceiling and min(delays) < 0.1 * ceiling


def test_retry_after_seconds_and_http_date() -> None:
    now = datetime(2026, 12, 3, 12, 0, 0, tzinfo=UTC)
    assert retry_after_seconds("7", now) == 7.0
    assert retry_after_seconds(" 2.5 ", now) == 2.5
    assert retry_after_seconds("-3", now) == 0.0
    assert retry_after_seconds("Thu, 03 Dec 2026 12:00:30 GMT", now) == 30.0
    assert retry_after_seconds("Thu, 03 Dec 2026 11:00:00 GMT", now) == 0.0
    assert retry_after_seconds("soon", now) is None
    assert retry_after_seconds(None, now) is None
    assert retry_after_seconds("", now) is None


def test_retry_wait_caps_retry_after_and_falls_back_to_backoff() -> None:
    rng = random.Random(2)
    assert retry_wait(Answer(429, retry_after="3"), 1, 0.5, 30, 60, rng) == 3.0
    assert retry_wait(Answer(503, retry_after="3600"), 1, 0.5, 30, 60, rng) == 60.0
    assert 0.0 <= retry_wait(Answer(429, retry_after="0"), 3, 0.5, 30, 60, rng) <= 2.0  # 0 means: back off
    assert 0.0 <= retry_wait(Answer(503), 2, 0.5, 30, 60, rng) <= 1.0


def test_missing_credentials_fail_unless_iam_is_only_unavailable() -> None:
    retry = frozenset({503})
    assert classify(Answer(status=0, auth_error="iam_unavailable"), retry) == Decision(
        Verdict.RETRY, "auth_iam_unavailable"
    )
    for reason in ("iam_refused", "credentials_rejected"):
        assert classify(Answer(status=0, auth_error=reason), retry) == Decision(
            Verdict.FAILED, f"auth_{reason}"
        )
    assert classify(Answer(status=401, auth_retry=True), retry) == Decision(Verdict.FAILED, "status_401")
