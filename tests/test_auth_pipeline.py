"""Auth end to end: real worker processes, the private Redis and the simulator's IAM and gateway."""

from __future__ import annotations

import math
import os
import secrets
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable

import pytest
import redis

from tests.conftest import PROJECT, Sim, Worker
from worker import keys
from worker.processes import wait_until
from worker.producer import Producer
from worker.scrape import by_label

DELETIONS = "vbs_deleter_deletions_total"
PROJECTS = [PROJECT, "1" * 32, "2" * 32]


def iam_env(sim: Sim, password: str) -> dict[str, str]:
    return {
        "VBS_IAM_ENDPOINT": sim.url + "/v3",
        "VBS_IAM_USER": "bob",
        "VBS_IAM_PASSWORD": password,
        "VBS_IAM_DOMAIN": "acme",
    }


def iam_sim(start_sim: Callable[..., Sim], password: str, *options: str) -> Sim:
    return start_sim("--iam-user", "bob", "--iam-password", password, "--iam-domain", "acme", *options)


def test_short_lived_tokens_for_three_projects_during_a_long_run(
    start_sim: Callable[..., Sim], start_worker: Callable[..., Worker], producer: Producer
) -> None:
    lifetime = 1.5
    sim = iam_sim(start_sim, "pw-1", "--token-lifetime", str(lifetime), "--latency", "0.1")
    ids = {project: sim.seed(100, project=project) for project in PROJECTS}
    worker = start_worker(sim, VBS_CONCURRENCY="4", **iam_env(sim, "pw-1"))
    for start in range(0, 100, 10):  # interleaved, so every project is busy for the whole run
        for project, project_ids in ids.items():
            producer.delete_backups(project, project_ids[start : start + 10])
    samples = worker.wait_for_deletions(300, timeout=120)
    assert by_label(samples, DELETIONS, "outcome") == {"accepted": 300}
    stats, auth = sim.stats(), sim.auth()
    run = stats["request_times"]["last"] - stats["request_times"]["first"]
    assert run > 3 * lifetime, run  # the run spans several lifetimes
    assert auth["rejected"].get("APIG.0301", 0) == 0  # never a token of another project
    for project in PROJECTS:  # a token per lifetime (used until 9/10 of it), plus 401-driven refreshes
        issued = auth["iam"]["issued"][project]
        assert math.floor(run / lifetime) <= issued <= math.ceil(run / (0.9 * lifetime)) + 1, (run, issued)
    assert sum(auth["iam"]["issued"].values()) == auth["iam"]["requests"]
    refreshes = by_label(samples, "vbs_deleter_retries_total", "reason").get("auth_refresh", 0)
    assert refreshes == auth["rejected"].get("APIG.0307", 0)
    assert by_label(samples, "vbs_deleter_iam_token_requests_total", "result") == {
        "issued": auth["iam"]["requests"]
    }


def test_revoked_token_mid_run_is_refreshed_once_without_failures(
    start_sim: Callable[..., Sim], start_worker: Callable[..., Worker], producer: Producer
) -> None:
    sim = iam_sim(start_sim, "pw-2", "--latency", "0.05")
    ids = sim.seed(200)
    worker = start_worker(sim, VBS_CONCURRENCY="4", **iam_env(sim, "pw-2"))
    producer.delete_backups(PROJECT, ids, batch_size=20)
    wait_until(lambda: worker.count(DELETIONS) >= 50, 60, "50 deletions")
    assert sim.revoke(PROJECT) == 1
    samples = worker.wait_for_deletions(200, timeout=120)
    assert by_label(samples, DELETIONS, "outcome") == {"accepted": 200}
    auth = sim.auth()
    assert auth["iam"]["issued"] == {PROJECT: 2}
    rejected = auth["rejected"]["APIG.0307"]  # the requests in flight with the revoked token
    assert 1 <= rejected <= 4
    assert by_label(samples, "vbs_deleter_retries_total", "reason") == {"auth_refresh": rejected}
    assert by_label(samples, "vbs_deleter_auth_failures_total", "mode") == {"iam": rejected}


def test_aksk_signed_deletions(
    start_sim: Callable[..., Sim], start_worker: Callable[..., Worker], producer: Producer
) -> None:
    sim = start_sim("--access-key", "AK1", "--secret-key", "sk-3")
    ids = sim.seed(50)
    worker = start_worker(sim, VBS_ACCESS_KEY="AK1", VBS_SECRET_KEY="sk-3")
    producer.delete_backups(PROJECT, ids)
    assert by_label(worker.wait_for_deletions(50), DELETIONS, "outcome") == {"accepted": 50}
    assert sim.auth()["signature_failures"] == 0


def test_wrong_secret_key_stops_sending_before_the_lockout(
    start_sim: Callable[..., Sim], start_worker: Callable[..., Worker], producer: Producer
) -> None:
    sim = start_sim("--access-key", "AK1", "--secret-key", "sk-4")
    ids = sim.seed(200)
    worker = start_worker(sim, VBS_ACCESS_KEY="AK1", VBS_SECRET_KEY="sk-wrong")
    producer.delete_backups(PROJECT, ids[:100])
    producer.delete_backups(PROJECT, ids[100:])
    samples = worker.wait_for_deletions(200, timeout=60)
    assert by_label(samples, DELETIONS, "outcome") == {"failed": 200}
    auth = sim.auth()
    assert auth["signature_failures"] == 3 and auth["key_locks"] == 0  # the gateway locks after > 5
    # three 401s: the third stops sending; that deletion fails with the gateway's code, every other
    # one (those retried after a 401, and the rest) without a request, for rejected credentials
    assert by_label(samples, "vbs_deleter_deletion_failures_total", "error_code") == {
        "APIGW.0301": 1,
        "auth.credentials_rejected": 199,
    }
    assert worker.count("vbs_deleter_auth_blocked") == 1
    assert "stopped sending to avoid the gateway's 5-minute key lockout" in worker.log()
    assert sim.stats()["requests"]["delete"] == 3


def redis_dump(url: str) -> str:
    """Every key and value in Redis as text, except the values of the IAM token cache (secret by design)."""
    client = redis.Redis.from_url(url)
    parts: list[bytes] = []
    for key in client.scan_iter():
        parts.append(key)
        if key.decode().startswith(keys.iam_token("")):
            continue
        kind = client.type(key).decode()
        if kind == "string":
            parts.append(client.get(key) or b"")
        elif kind == "list":
            parts.extend(client.lrange(key, 0, -1))
        elif kind == "hash":
            parts.extend(item for pair in client.hgetall(key).items() for item in pair)
        elif kind in ("set", "zset"):
            parts.extend(client.smembers(key) if kind == "set" else client.zrange(key, 0, -1))
    client.close()
    return "\n".join(part.decode(errors="replace") for part in parts)


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``vbs-deleter *args`` with ``env`` added to this environment."""
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )


def cli_output(env: dict[str, str], *args: str) -> str:
    result = run_cli(env, *args)
    return result.stdout + result.stderr


@pytest.mark.parametrize("mode", ["token", "iam", "aksk"])
def test_no_secret_or_prefix_of_one_in_any_output(
    mode: str,
    start_sim: Callable[..., Sim],
    start_worker: Callable[..., Worker],
    producer: Producer,
    redis_url: str,
) -> None:
    secret = f"{mode}-{secrets.token_urlsafe(24)}"
    faults = ("--fault-rate", "0.2", "--seed", "7")
    if mode == "token":
        sim, env = start_sim("--token", secret, *faults), {"VBS_AUTH_TOKEN": secret}
    elif mode == "iam":
        sim = iam_sim(start_sim, secret, *faults)
        env = iam_env(sim, secret)
    else:
        sim = start_sim("--access-key", "AK1", "--secret-key", secret, *faults)
        env = {"VBS_ACCESS_KEY": "AK1", "VBS_SECRET_KEY": secret}
    ids = sim.seed(20) + sim.seed(backups=[{"undeletable": True}])
    worker = start_worker(sim, VBS_LOG_LEVEL="DEBUG", **env)
    producer.delete_backups(PROJECT, [*ids[:10], str(uuid.uuid4())], request_id="hygiene")
    worker.wait_for_deletions(11)
    if mode == "iam":
        sim.revoke()  # the next requests are refused and refresh the token
    producer.delete_backups(PROJECT, ids[10:], request_id="hygiene")
    samples = worker.wait_for_deletions(22)
    assert by_label(samples, DELETIONS, "outcome") == {"accepted": 20, "already_gone": 1, "failed": 1}
    with urllib.request.urlopen(worker.child.url + "/metrics", timeout=5) as response:
        metrics_text = response.read().decode()
    looked_for = [secret]
    if mode == "iam":
        looked_for += [entry["token"] for entry in sim.auth()["tokens"]]
        assert len(looked_for) == 3 and redis.Redis.from_url(redis_url).exists(keys.iam_token(PROJECT))
    outputs = {
        "worker log": worker.log(),
        "metrics": metrics_text,
        "redis": redis_dump(redis_url),
        "simulator log": sim.child.log_text(),
        "help": cli_output(env, "--help")
        + cli_output(env, "worker", "--help")
        + cli_output(env, "simulate", "--help"),
        "bad setting": cli_output({**env, "VBS_REDIS_URL": redis_url, "VBS_CONCURRENCY": secret}, "worker"),
    }
    assert "VBS_CONCURRENCY" in outputs["bad setting"]
    for value in looked_for:
        prefix = value[:12] if value.startswith(mode) else value[:16]  # tokens share a 6-character stem
        leaks = [where for where, text in outputs.items() if prefix in text]
        assert leaks == [], f"a prefix of a secret appears in {leaks}"


def test_conflicting_auth_settings_stop_the_worker_at_start(redis_url: str) -> None:
    env = {
        "VBS_REDIS_URL": redis_url,
        "VBS_AUTH_TOKEN": "tok-5",
        "VBS_ACCESS_KEY": "AK",
        "VBS_SECRET_KEY": "sk-5",
    }
    result = run_cli(env, "worker")
    assert result.returncode == 2
    assert "these settings conflict: VBS_AUTH_TOKEN, VBS_ACCESS_KEY, VBS_SECRET_KEY" in result.stderr
    assert "tok-5" not in result.stderr and "sk-5" not in result.stderr
