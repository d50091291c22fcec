"""AK/SK request signing, SDK-HMAC-SHA256 (vbs-api.md section 8). Pure functions, no I/O.

:func:`sign` returns the headers to send: the caller's headers plus ``X-Sdk-Date``, ``Host`` and
``Authorization``; every header given to it is signed, so send exactly those.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from datetime import UTC, datetime
from urllib.parse import parse_qsl, quote, urlsplit

ALGORITHM = "SDK-HMAC-SHA256"
DATE_FORMAT = "%Y%m%dT%H%M%SZ"
EMPTY_BODY_SHA256 = hashlib.sha256(b"").hexdigest()


def _encode(text: str) -> str:
    """Percent-encode everything but unreserved characters (RFC 3986), as the vendor's SDKs do."""
    return quote(text, safe="~")


def canonical_request(method: str, url: str, headers: Mapping[str, str], body: bytes = b"") -> str:
    """The canonical request of step 2; ``headers`` are the signed headers (names in any case)."""
    parts = urlsplit(url)
    path = "/".join(_encode(segment) for segment in parts.path.split("/"))
    if not path.endswith("/"):
        path += "/"
    query = "&".join(
        f"{_encode(key)}={_encode(value)}"
        for key, value in sorted(parse_qsl(parts.query, keep_blank_values=True))
    )
    lowered = sorted((name.lower(), value.strip()) for name, value in headers.items())
    canonical_headers = "".join(f"{name}:{value}\n" for name, value in lowered)
    signed = ";".join(name for name, _ in lowered)
    return "\n".join(
        [method.upper(), path, query, canonical_headers, signed, hashlib.sha256(body).hexdigest()]
    )


def signature(secret_key: str, sdk_date: str, canonical: str) -> str:
    """Hex HMAC-SHA256 of the string to sign (step 3 and 4)."""
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    string_to_sign = f"{ALGORITHM}\n{sdk_date}\n{digest}"
    return hmac.new(secret_key.encode(), string_to_sign.encode(), hashlib.sha256).hexdigest()


def sign(
    method: str,
    url: str,
    headers: Mapping[str, str],
    access_key: str,
    secret_key: str,
    now: datetime | None = None,
    body: bytes = b"",
) -> dict[str, str]:
    """Headers for one signed request: ``headers`` + ``X-Sdk-Date`` (``now``, default UTC now), ``Host``
    (from ``url`` unless given) and ``Authorization``."""
    signed = dict(headers)
    signed["X-Sdk-Date"] = (now or datetime.now(UTC)).strftime(DATE_FORMAT)
    if not any(name.lower() == "host" for name in signed):
        signed["Host"] = urlsplit(url).netloc.rpartition("@")[2]
    canonical = canonical_request(method, url, signed, body)
    names = ";".join(sorted(name.lower() for name in signed))
    sig = signature(secret_key, signed["X-Sdk-Date"], canonical)
    signed["Authorization"] = f"{ALGORITHM} Access={access_key}, SignedHeaders={names}, Signature={sig}"
    return signed
