"""AK/SK signing against the vendor's published test vector (vbs-api.md section 8)."""

from __future__ import annotations

import hashlib
from datetime import datetime

from worker.signing import EMPTY_BODY_SHA256, canonical_request, sign, signature

URL = (
    "https://service.region.example.com/v1/77b6a44cba5143ab91d13ab9a8ff44fd/vpcs"
    "?limit=2&marker=13551d6b-755d-4757-b956-536f674975c0"
)
SK = "MFyfvK41ba2giqM7Uio6PznpdUKGpownRZlmVmHc"
HEADERS = {
    "Content-Type": "application/json",
    "Host": "service.region.example.com",
    "X-Sdk-Date": "20191115T033655Z",
}
CANONICAL_SHA256 = "b25362e603ee30f4f25e7858e8a7160fd36e803bb2dfe206278659d71a9bcd7a"
SIGNATURE = "7be6668032f70418fcc22abc52071e57aff61b84a1d2381bb430d6870f4f6ebe"


def test_vendor_vector_canonical_request_and_signature() -> None:
    canonical = canonical_request("GET", URL, HEADERS)
    assert canonical.splitlines()[:3] == [
        "GET",
        "/v1/77b6a44cba5143ab91d13ab9a8ff44fd/vpcs/",
        "limit=2&marker=13551d6b-755d-4757-b956-536f674975c0",
    ]
    assert canonical.endswith("\ncontent-type;host;x-sdk-date\n" + EMPTY_BODY_SHA256)
    assert hashlib.sha256(canonical.encode()).hexdigest() == CANONICAL_SHA256
    assert signature(SK, "20191115T033655Z", canonical) == SIGNATURE


def test_sign_adds_date_host_and_authorization() -> None:
    headers = sign(
        "GET", URL, {"Content-Type": "application/json"}, "AKEXAMPLE", SK, datetime(2019, 11, 15, 3, 36, 55)
    )
    assert headers == {
        **HEADERS,
        "Authorization": "SDK-HMAC-SHA256 Access=AKEXAMPLE, SignedHeaders=content-type;host;x-sdk-date, "
        f"Signature={SIGNATURE}",
    }


def test_query_order_header_case_and_port_do_not_matter_but_content_does() -> None:
    now = datetime(2024, 1, 2, 3, 4, 5)
    one = sign("POST", "http://127.0.0.1:8780/v2/p/x?b=2&a=1", {"X-Project-Id": "p"}, "AK", SK, now)
    two = canonical_request(
        "post",
        "http://127.0.0.1:8780/v2/p/x?a=1&b=2",
        {k.lower(): v for k, v in one.items() if k != "Authorization"},
    )
    assert one["Host"] == "127.0.0.1:8780"
    assert one["Authorization"].endswith("Signature=" + signature(SK, one["X-Sdk-Date"], two))
    other = sign("POST", "http://127.0.0.1:8780/v2/q/x?a=1&b=2", {"X-Project-Id": "p"}, "AK", SK, now)
    assert other["Authorization"] != one["Authorization"]
