"""``vbs-deleter check-config`` against the private Redis and the simulator: verdicts, exit codes, masking."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.conftest import PROJECT, Sim
from worker import checks, processes

TOKEN = "tok-0123456789-secret"


def run(environ: dict[str, str], project: str | None = PROJECT) -> tuple[int, str]:
    out = io.StringIO()
    status = checks.run(project, environ, out)
    return status, out.getvalue()


def verdicts(text: str) -> dict[str, str]:
    """check name -> ok/FAIL from the verdict lines."""
    found = {}
    for line in text.splitlines():
        word, _, rest = line.partition("  ")
        if word.strip() in ("ok", "FAIL") and rest.split():
            found[rest.split()[0]] = word.strip()
    return found


def test_mask_url() -> None:
    assert checks.mask_url("redis://:hunter2@redis:6379/0") == "redis://:***@redis:6379/0"
    assert checks.mask_url("rediss://app:hunter2@r.example:6380/1") == "rediss://app:***@r.example:6380/1"
    assert checks.mask_url("redis://redis:6379/0") == "redis://redis:6379/0"


def test_all_checks_pass_and_secrets_stay_masked(start_sim: Callable[..., Sim], redis_url: str) -> None:
    sim = start_sim("--token", TOKEN)
    status, text = run({"VBS_REDIS_URL": redis_url, "VBS_ENDPOINT": sim.url, "VBS_AUTH_TOKEN": TOKEN})
    assert status == checks.OK, text
    assert verdicts(text) == {"settings": "ok", "redis": "ok", "endpoint": "ok", "credentials": "ok"}
    assert TOKEN not in text
    assert "VBS_AUTH_TOKEN           = *** (set)" in text
    assert "VBS_ENDPOINT" in text and "(env)" in text and "(default)" in text
    assert sim.stats()["requests"]["list"] == 1  # exactly one harmless call


def test_refused_credentials_exit_5(start_sim: Callable[..., Sim], redis_url: str) -> None:
    sim = start_sim("--token", TOKEN)
    status, text = run({"VBS_REDIS_URL": redis_url, "VBS_ENDPOINT": sim.url, "VBS_AUTH_TOKEN": "wrong-token"})
    assert status == checks.BAD_CREDENTIALS
    assert verdicts(text)["credentials"] == "FAIL" and "HTTP 401" in text
    assert "wrong-token" not in text


def test_without_project_only_the_endpoint_is_reached(start_sim: Callable[..., Sim], redis_url: str) -> None:
    sim = start_sim("--token", TOKEN)
    status, text = run({"VBS_REDIS_URL": redis_url, "VBS_ENDPOINT": sim.url}, project=None)
    assert status == checks.OK
    assert "not checked: give --project" in text


def test_unreachable_redis_and_endpoint(redis_url: str) -> None:
    dead = processes.free_port()
    environ = {"VBS_REDIS_URL": f"redis://:pw@127.0.0.1:{dead}/0", "VBS_ENDPOINT": f"http://127.0.0.1:{dead}"}
    status, text = run(environ)
    assert status == checks.NO_REDIS  # the first failure wins
    assert verdicts(text) == {"settings": "ok", "redis": "FAIL", "endpoint": "FAIL"}
    assert ":pw@" not in text and ":***@" in text
    status, text = run({"VBS_REDIS_URL": redis_url, "VBS_ENDPOINT": f"http://127.0.0.1:{dead}"})
    assert status == checks.NO_ENDPOINT


def test_wrong_endpoint_is_an_endpoint_failure(sim: Sim, redis_url: str) -> None:
    status, text = run({"VBS_REDIS_URL": redis_url, "VBS_ENDPOINT": sim.url + "/not-vbs"})
    assert status == checks.NO_ENDPOINT and "gave HTTP 404" in text
    status, text = run({"VBS_REDIS_URL": redis_url, "VBS_ENDPOINT": redis_url.replace("redis", "http", 1)})
    assert status == checks.NO_ENDPOINT  # Redis is no HTTP server


def test_invalid_settings_and_policy_file(redis_url: str, tmp_path: Path) -> None:
    status, text = run({"VBS_CONCURRENCY": "0"})
    assert status == checks.BAD_SETTINGS and "VBS_CONCURRENCY" in text
    policies = tmp_path / "retention.toml"
    policies.write_text('[policies.old]\nproject_id = "nope"\nkeep_days = 30\nevery = "1d"\n')
    status, text = run({"VBS_REDIS_URL": redis_url, "VBS_RETENTION_FILE": str(policies)}, project=None)
    assert status == checks.BAD_SETTINGS
    assert verdicts(text)["retention"] == "FAIL"


def test_cli_exit_status_and_bad_project() -> None:
    env = {**os.environ, "VBS_MAX_ATTEMPTS": "-1"}
    command = [sys.executable, "-m", "worker.cli", "check-config"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == checks.BAD_SETTINGS and "VBS_MAX_ATTEMPTS" in done.stdout
    done = subprocess.run([*command, "--project", "x"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "32 hex" in done.stderr


def test_wrong_iam_password_exits_5_and_blocks_nobody(start_sim: Callable[..., Sim], redis_url: str) -> None:
    import redis

    from worker import keys

    sim = start_sim("--iam-user", "deleter", "--iam-password", "right-Pw-1", "--iam-domain", "dom")
    environ = {
        "VBS_REDIS_URL": redis_url,
        "VBS_ENDPOINT": sim.url,
        "VBS_IAM_ENDPOINT": sim.url + "/v3",
        "VBS_IAM_USER": "deleter",
        "VBS_IAM_DOMAIN": "dom",
        "VBS_IAM_PASSWORD": "typo-Pw-2",
    }
    status, text = run(environ)
    assert status == checks.BAD_CREDENTIALS, text
    assert verdicts(text)["credentials"] == "FAIL" and "typo-Pw-2" not in text
    assert redis.Redis.from_url(redis_url).exists(keys.iam_failure(PROJECT)) == 0  # workers are not held back
