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
