"""IAM password tokens on the wire (vbs-api.md section 7): the request, the answer, the refresh time. Pure.

The token comes back in the ``X-Subject-Token`` header of a 201; ``token.expires_at`` (UTC, ``Z``) in the
body. Times here are unix seconds.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

REFRESH_SHARE = 0.1  # refresh at the latest when 1/10 of a token's lifetime is left
MAX_ANSWER = 1024 * 1024  # bytes of a token answer read at most (the catalog is not asked for)


class IamError(Exception):
    """IAM gave no token. ``result`` is a bounded label; the message holds IAM's code and text, no secret."""

    def __init__(self, result: str, message: str, retry_after: str | None = None) -> None:
        super().__init__(message)
        self.result = result  # throttled, server_error, refused or malformed
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.result in ("throttled", "server_error")


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A project-scoped token and when it expires (unix seconds). The token never shows in a repr."""

    token: str = field(repr=False)
    expires_at: float


def token_url(iam_endpoint: str) -> str:
    """``POST`` target for tokens: ``{iam_endpoint}/auth/tokens``, adding ``/v3`` when it is missing;
    ``nocatalog=true`` keeps the service catalog out of the answer."""
    base = iam_endpoint.rstrip("/")
    return (base if base.endswith("/v3") else base + "/v3") + "/auth/tokens?nocatalog=true"


def token_request(user: str, password: str, domain: str, project_id: str) -> dict[str, Any]:
    """The password-method request body for a token scoped to ``project_id``."""
    return {
        "auth": {
            "identity": {
                "methods": ["password"],
                "password": {"user": {"name": user, "password": password, "domain": {"name": domain}}},
            },
            "scope": {"project": {"id": project_id}},
        }
    }


def _error_text(body: bytes) -> str:
    """IAM's code and message from ``{"error": {"code", "message"}}`` or ``{"error_code", "error_msg"}``."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return "no error details"
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        data = {"error_code": data["error"].get("code"), "error_msg": data["error"].get("message")}
    if not isinstance(data, dict):
        return "no error details"
    return f"{data.get('error_code')}: {str(data.get('error_msg'))[:200]}"


def read_token_answer(status: int, headers: Mapping[str, str], body: bytes) -> IssuedToken:
    """The token of a 201 (or 200) answer; :class:`IamError` for anything else."""
    if status in (200, 201):
        token = headers.get("X-Subject-Token")
        try:
            expires = json.loads(body)["token"]["expires_at"]
            moment = datetime.fromisoformat(expires)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise IamError("malformed", f"IAM answered {status} without token.expires_at") from None
        if not token:
            raise IamError("malformed", f"IAM answered {status} without an X-Subject-Token header")
        moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment
        return IssuedToken(token, moment.timestamp())
    result = "throttled" if status == 429 else "server_error" if status >= 500 else "refused"
    message = f"IAM answered {status} ({_error_text(body)})"
    raise IamError(result, message, headers.get("Retry-After"))


def refresh_at(received_at: float, expires_at: float, refresh_before: float) -> float:
    """When to fetch the next token: ``refresh_before`` seconds ahead of expiry, but at most 1/10 of the
    lifetime (seen from ``received_at``) ahead, so short-lived tokens are used most of their life."""
    lifetime = max(0.0, expires_at - received_at)
    return expires_at - min(refresh_before, lifetime * REFRESH_SHARE)
