"""Parsing of VBS answers (three error shapes) and the delete routes per API mode."""

from __future__ import annotations

import pytest

from worker.vbs import delete_route, parse_answer

P, B = "0123456789abcdef0123456789abcdef", "70a599e0-31e7-49b7-b260-868f441e862b"


def test_routes_per_mode() -> None:
    assert delete_route("cloudbackups", P, B) == ("POST", f"/v2/{P}/cloudbackups/{B}")
    assert delete_route("native-v2", P, B) == ("DELETE", f"/v2/{P}/backups/{B}")
    assert delete_route("native-v3", P, B) == ("DELETE", f"/v3/{P}/backups/{B}")


def test_accepted_with_job_id() -> None:
    answer = parse_answer(200, {"X-Request-Id": "rq"}, b'{"job_id": "70a599e0-31e7-49b7-b260-868f441e862b"}')
    assert (answer.status, answer.job_id, answer.request_id) == (200, B, "rq")


def test_native_accepted_without_body() -> None:
    answer = parse_answer(202, {}, b"")
    assert (answer.status, answer.job_id, answer.error_code) == (202, None, None)


@pytest.mark.parametrize(
    ("status", "headers", "body", "code", "message", "request_id"),
    [
        (
            400,
            {},
            b'{"error": {"message": "used by an image", "code": "VolumeBackup.0113"}}',
            "VolumeBackup.0113",
            "used by an image",
            None,
        ),
        (
            404,
            {"X-Request-Id": "h1"},
            b'{"itemNotFound": {"message": "Backup x could not be found.", "code": 404}}',
            "itemNotFound",
            "Backup x could not be found.",
            "h1",
        ),
        (
            429,
            {"X-Request-Id": "h2"},
            b'{"error_code": "APIGW.0308", "error_msg": "throttled", "request_id": "b2"}',
            "APIGW.0308",
            "throttled",
            "b2",
        ),
        (
            401,
            {},
            b'{"error_code": "APIG.0301", "error_msg": "auth failed"}',
            "APIG.0301",
            "auth failed",
            None,
        ),
        (502, {"X-Request-Id": "h3"}, b"<html>bad gateway</html>", None, None, "h3"),
        (500, {}, b'["not", "an", "object"]', None, None, None),
        (503, {}, b"\xff\xfe", None, None, None),
    ],
)
def test_error_shapes(
    status: int,
    headers: dict[str, str],
    body: bytes,
    code: str | None,
    message: str | None,
    request_id: str | None,
) -> None:
    answer = parse_answer(status, headers, body)
    assert (answer.status, answer.error_code, answer.message, answer.request_id) == (
        status,
        code,
        message,
        request_id,
    )


def test_retry_after_header_is_kept() -> None:
    assert parse_answer(429, {"Retry-After": "2"}, b"").retry_after == "2"


def test_proxy_from_the_standard_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.transport import proxy_for

    for name in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert proxy_for("https://vbs.eu-de.otc.t-systems.com") is None
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert proxy_for("https://vbs.eu-de.otc.t-systems.com") == "http://proxy.internal:3128"
    monkeypatch.setenv("NO_PROXY", ".t-systems.com")
    assert proxy_for("https://vbs.eu-de.otc.t-systems.com") is None
