"""Settings: precedence, parsing, and errors that name the setting."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from worker.settings import Settings, SettingsError, load_settings

ROOT = Path(__file__).parent.parent


def test_defaults_file_matches_the_model() -> None:
    listed = tomllib.loads((ROOT / "config/default.toml").read_text())
    assert set(listed) == set(Settings.model_fields)
    defaults = Settings()
    for key, value in listed.items():
        expected = getattr(defaults, key)
        if key == "retry_statuses":
            value = frozenset(value)
        assert value == expected or (expected is None and value == ""), key


def test_every_setting_is_in_the_readme_table() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [
        f"VBS_{name.upper()}" for name in Settings.model_fields if f"`VBS_{name.upper()}`" not in readme
    ]
    assert missing == []


def test_env_wins_over_file(tmp_path: Path) -> None:
    config = tmp_path / "vbs.toml"
    config.write_text('concurrency = 8\napi = "native-v3"\nretry_statuses = [503]\n')
    settings = load_settings({"VBS_CONFIG": str(config), "VBS_CONCURRENCY": "16"})
    assert (settings.concurrency, settings.api, settings.retry_statuses) == (
        16,
        "native-v3",
        frozenset({503}),
    )


def test_env_lists_and_case() -> None:
    settings = load_settings({"VBS_RETRY_STATUSES": "408, 502", "VBS_LOG_LEVEL": "debug"})
    assert settings.retry_statuses == frozenset({408, 502})
    assert settings.log_level == "DEBUG"


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"VBS_CONCURENCY": "8"}, "VBS_CONCURENCY"),
        ({"VBS_CONCURRENCY": "lots"}, "VBS_CONCURRENCY"),
        ({"VBS_CONCURRENCY": "0"}, "VBS_CONCURRENCY"),
        ({"VBS_API": "v4"}, "VBS_API"),
        ({"VBS_RETRY_STATUSES": "404"}, "VBS_RETRY_STATUSES"),
        ({"VBS_RETRY_STATUSES": "abc"}, "VBS_RETRY_STATUSES"),
        ({"VBS_CONFIG": "/nonexistent/vbs.toml"}, "VBS_CONFIG"),
    ],
)
def test_bad_values_name_the_setting(environ: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        load_settings(environ)


def test_unknown_key_in_file(tmp_path: Path) -> None:
    config = tmp_path / "vbs.toml"
    config.write_text("concurency = 8\n")
    with pytest.raises(SettingsError, match="VBS_CONCURENCY"):
        load_settings({"VBS_CONFIG": str(config)})


def test_secret_is_masked_and_not_in_errors() -> None:
    settings = load_settings({"VBS_AUTH_TOKEN": "s3cr3t-token-value"})
    assert "s3cr3t" not in repr(settings)
    with pytest.raises(SettingsError) as caught:
        load_settings({"VBS_AUTH_TOKEN": "s3cr3t-token-value", "VBS_CONCURRENCY": "s3cr3t"})
    assert "s3cr3t" not in str(caught.value)


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"VBS_ENDPOINT": "notaurl"}, "VBS_ENDPOINT"),
        ({"VBS_ENDPOINT": "ftp://x"}, "VBS_ENDPOINT"),
        ({"VBS_ENDPOINT": ""}, "VBS_ENDPOINT"),
        ({"VBS_REDIS_URL": "garbage"}, "VBS_REDIS_URL"),
        ({"VBS_READ_TIMEOUT": "inf"}, "VBS_READ_TIMEOUT"),
        ({"VBS_RETRY_AFTER_MAX": "nan"}, "VBS_RETRY_AFTER_MAX"),
        ({"VBS_AUTH_TOKEN": "tok\r\nX-Evil: 1"}, "VBS_AUTH_TOKEN"),
        ({"VBS_CONFIG": "/bin/sh"}, "VBS_CONFIG"),
    ],
)
def test_values_that_cannot_work_are_refused(environ: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named) as caught:
        load_settings(environ)
    assert "X-Evil" not in str(caught.value)


def test_region_fills_both_endpoints_and_endpoint_wins() -> None:
    settings = load_settings({"VBS_REGION": "eu-de"})
    assert settings.endpoint == "https://vbs.eu-de.otc.t-systems.com"
    assert settings.iam_endpoint == "https://iam.eu-de.otc.t-systems.com/v3"
    settings = load_settings(
        {
            "VBS_REGION": "ap-southeast-1",
            "VBS_ENDPOINT": "https://vbs.example.test",
            "VBS_IAM_ENDPOINT_TEMPLATE": "https://iam.{region}.example.test/v3",
        }
    )
    assert settings.endpoint == "https://vbs.example.test"
    assert settings.iam_endpoint == "https://iam.ap-southeast-1.example.test/v3"
    assert load_settings({}).endpoint == "http://127.0.0.1:8780"  # neither: the local simulator


IAM = {"VBS_IAM_USER": "bob", "VBS_IAM_DOMAIN": "acme", "VBS_IAM_ENDPOINT": "https://iam.test/v3"}


@pytest.mark.parametrize(
    ("environ", "mode"),
    [
        ({}, "none"),
        ({"VBS_AUTH_TOKEN": "t"}, "token"),
        ({**IAM, "VBS_IAM_PASSWORD": "pw"}, "iam"),
        ({"VBS_ACCESS_KEY": "AK", "VBS_SECRET_KEY": "SK"}, "aksk"),
    ],
)
def test_auth_mode_follows_the_settings_given(environ: dict[str, str], mode: str) -> None:
    assert load_settings(environ).auth_mode == mode


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"VBS_AUTH_TOKEN": "t", "VBS_ACCESS_KEY": "AK"}, ["VBS_AUTH_TOKEN", "VBS_ACCESS_KEY"]),
        ({**IAM, "VBS_IAM_PASSWORD": "pw", "VBS_SECRET_KEY": "SK"}, ["VBS_IAM_PASSWORD", "VBS_SECRET_KEY"]),
        ({"VBS_ACCESS_KEY": "AK"}, ["VBS_ACCESS_KEY", "VBS_SECRET_KEY"]),
        ({"VBS_IAM_USER": "bob", "VBS_IAM_PASSWORD": "pw"}, ["VBS_IAM_DOMAIN", "VBS_IAM_ENDPOINT"]),
        ({"VBS_REGION": "EU DE"}, ["VBS_REGION"]),
        ({"VBS_REGION": "eu-de", "VBS_ENDPOINT_TEMPLATE": "https://vbs.test"}, ["VBS_ENDPOINT_TEMPLATE"]),
        ({"VBS_CA_BUNDLE": "/nonexistent/ca.pem"}, ["VBS_CA_BUNDLE"]),
    ],
)
def test_conflicting_or_incomplete_settings_name_them(environ: dict[str, str], named: list[str]) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(environ)
    assert all(name in str(caught.value) for name in named), str(caught.value)
    assert "pw" not in str(caught.value).replace("PASSWORD", "")


def test_ca_bundle_needs_verification_on() -> None:
    bundle = str(ROOT / "tests/data/localhost-test.pem")
    assert load_settings({"VBS_CA_BUNDLE": bundle}).ca_bundle == Path(bundle)
    with pytest.raises(SettingsError, match="VBS_CA_BUNDLE is set but VBS_VERIFY_TLS is false"):
        load_settings({"VBS_CA_BUNDLE": bundle, "VBS_VERIFY_TLS": "false"})


@pytest.mark.parametrize(
    ("content", "expected"), [("s3cr3t\n", "s3cr3t"), ("s3cr3t\r\n", "s3cr3t"), ("a b", "a b")]
)
def test_secret_from_file_drops_one_trailing_newline(tmp_path: Path, content: str, expected: str) -> None:
    secret = tmp_path / "sk"
    secret.write_bytes(content.encode())
    settings = load_settings({"VBS_ACCESS_KEY": "AK", "VBS_SECRET_KEY_FILE": str(secret)})
    assert settings.secret_key is not None and settings.secret_key.get_secret_value() == expected
    settings = load_settings({**IAM, "VBS_IAM_PASSWORD_FILE": str(secret)})
    assert settings.iam_password is not None and settings.iam_password.get_secret_value() == expected


def test_secret_file_errors_name_the_settings_and_not_the_secret(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("hunter2-secret\n")
    with pytest.raises(SettingsError) as caught:
        load_settings({**IAM, "VBS_IAM_PASSWORD": "hunter2-secret", "VBS_IAM_PASSWORD_FILE": str(secret)})
    assert "VBS_IAM_PASSWORD or VBS_IAM_PASSWORD_FILE, not both" in str(caught.value)
    assert "hunter2" not in str(caught.value)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(SettingsError, match=r"VBS_SECRET_KEY_FILE: .* is empty"):
        load_settings({"VBS_ACCESS_KEY": "AK", "VBS_SECRET_KEY_FILE": str(empty)})
    with pytest.raises(SettingsError, match="VBS_SECRET_KEY_FILE: cannot read"):
        load_settings({"VBS_ACCESS_KEY": "AK", "VBS_SECRET_KEY_FILE": str(tmp_path / "missing")})
