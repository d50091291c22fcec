"""The IAM wire format (pure): token URL, request body, reading answers, refresh time."""

from __future__ import annotations

import pytest

from worker.iam import IamError, read_token_answer, refresh_at, token_request, token_url


@pytest.mark.parametrize(
    ("endpoint", "url"),
    [
        (
            "https://iam.eu-de.otc.t-systems.com/v3",
            "https://iam.eu-de.otc.t-systems.com/v3/auth/tokens?nocatalog=true",
        ),
        (
            "https://iam.eu-de.otc.t-systems.com/v3/",
            "https://iam.eu-de.otc.t-systems.com/v3/auth/tokens?nocatalog=true",
        ),
        ("https://iam.example.test", "https://iam.example.test/v3/auth/tokens?nocatalog=true"),
    ],
)
def test_token_url(endpoint: str, url: str) -> None:
    assert token_url(endpoint) == url


def test_request_body_is_project_scoped_password_auth() -> None:
    body = token_request("bob", "pw", "acme", "p1")
    assert body["auth"]["identity"] == {
        "methods": ["password"],
        "password": {"user": {"name": "bob", "password": "pw", "domain": {"name": "acme"}}},
    }
    assert body["auth"]["scope"] == {"project": {"id": "p1"}}


def test_issued_token_and_its_expiry() -> None:
    body = b'{"token": {"expires_at": "2024-01-02T03:04:05.000000Z"}}'
    issued = read_token_answer(201, {"X-Subject-Token": "MIItok"}, body)
    assert (issued.token, issued.expires_at) == ("MIItok", 1704164645.0)
    assert "MIItok" not in repr(issued)


@pytest.mark.parametrize(
    ("status", "headers", "body", "result", "text"),
    [
        (201, {}, b'{"token": {"expires_at": "2024-01-02T03:04:05Z"}}', "malformed", "X-Subject-Token"),
        (201, {"X-Subject-Token": "t"}, b"{}", "malformed", "expires_at"),
        (
            429,
            {"Retry-After": "3"},
            b'{"error_code": "IAM.0012", "error_msg": "slow down"}',
            "throttled",
            "IAM.0012",
        ),
        (503, {}, b"<html>", "server_error", "503"),
        (
            401,
            {},
            b'{"error": {"code": 401, "message": "The username or password is wrong."}}',
            "refused",
            "wrong",
        ),
    ],
)
def test_answers_without_a_token(
    status: int, headers: dict[str, str], body: bytes, result: str, text: str
) -> None:
    with pytest.raises(IamError, match=text) as caught:
        read_token_answer(status, headers, body)
    assert caught.value.result == result
    assert caught.value.retryable is (result in ("throttled", "server_error"))
    assert caught.value.retry_after == headers.get("Retry-After")


def test_refresh_ahead_by_the_setting_or_a_tenth_of_the_lifetime() -> None:
    day = 86400.0
    assert refresh_at(0.0, day, 3600.0) == day - 3600.0  # 24 h token: an hour ahead
    assert refresh_at(0.0, 10.0, 3600.0) == 9.0  # short-lived token: used for 9/10 of its life
    assert refresh_at(100.0, 50.0, 3600.0) == 50.0  # already expired on arrival (clock skew): now
