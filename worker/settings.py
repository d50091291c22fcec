"""One typed settings object, read from defaults, an optional TOML file and ``VBS_*`` environment variables.

Precedence: field defaults < the TOML file named by ``VBS_CONFIG`` < ``VBS_<NAME>`` environment variables.
An unknown key or an invalid value raises :class:`SettingsError` naming the setting, so a worker with a typo
in its configuration stops at start instead of running with a default the operator did not mean.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

ENV_PREFIX = "VBS_"
CONFIG_FILE_VARIABLE = "VBS_CONFIG"

ApiMode = Literal["cloudbackups", "native-v2", "native-v3"]


class SettingsError(ValueError):
    """A setting is unknown or invalid; the message names it as ``VBS_<NAME>``."""


class Settings(BaseModel):
    """Every knob of the worker. Durations are seconds, rates are requests per second."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Celery broker and shared-state store")
    queue: str = Field("vbs.deletions", min_length=1, description="Celery queue the tasks arrive on")
    endpoint: str = Field("http://127.0.0.1:8780", description="VBS base URL (scheme, host, optional port)")
    api: ApiMode = Field("cloudbackups", description="delete call: cloudbackups, native-v2 or native-v3")
    auth_token: SecretStr | None = Field(None, description="static token sent as X-Auth-Token")
    verify_tls: bool = Field(True, description="verify the endpoint's TLS certificate")

    concurrency: int = Field(64, ge=1, le=4096, description="HTTP requests in flight per worker process")
    connect_timeout: float = Field(5.0, gt=0, description="TCP/TLS connect timeout, seconds")
    read_timeout: float = Field(30.0, gt=0, description="timeout for each read of the answer, seconds")

    max_attempts: int = Field(5, ge=1, le=100, description="HTTP attempts per deletion for transient errors")
    retry_statuses: frozenset[int] = Field(
        frozenset({408, 503, 504}), description="HTTP statuses retried with backoff (comma-separated)"
    )
    backoff_base: float = Field(0.5, gt=0, description="first backoff ceiling, seconds (doubles per attempt)")
    backoff_max: float = Field(30.0, gt=0, description="largest backoff ceiling, seconds")
    retry_after_max: float = Field(30.0, gt=0, description="cap on an honoured Retry-After, seconds")
    max_throttle_waits: int = Field(10, ge=0, description="429s waited out per deletion before failing")

    rate_limit: float = Field(
        40.0, ge=0, description="requests/s shared by all workers on this Redis; 0 = off"
    )
    rate_burst: float = Field(10.0, ge=1, description="token bucket size, requests")
    poll_rate_limit: float = Field(
        0.0, ge=0, description="separate budget for job polls and lists; 0 = share"
    )
    ledger_ttl: int = Field(
        604800, ge=60, description="seconds a ledger record is kept after its last change"
    )
    visibility_timeout: int = Field(3600, ge=1, description="seconds before Redis redelivers an unacked task")
    heartbeat_interval: float = Field(10.0, gt=0, description="seconds between worker heartbeats (TTL: 3x)")
    shutdown_grace: float = Field(
        30.0, ge=0, description="seconds after SIGTERM before waiting deletions go back to the queue"
    )

    retention_file: str | None = Field(None, description="TOML file of retention policies ([policies.NAME])")
    beat_metrics_port: int = Field(
        9809, ge=0, le=65535, description="port of the beat process's /metrics; 0 picks a free one"
    )

    metrics_host: str = Field("0.0.0.0", description="address of the /metrics listener")
    metrics_port: int = Field(9808, ge=0, le=65535, description="port of /metrics; 0 picks a free one")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log threshold")
    log_format: Literal["text", "json"] = Field("text", description="text lines or one JSON object a line")

    @property
    def attempt_timeout(self) -> float:
        """Longest one HTTP attempt may take, seconds."""
        return self.connect_timeout + self.read_timeout

    def longest_unacked(self) -> float:
        """Upper bound, in seconds, on how long a task message stays unacknowledged.

        One deletion: its transient attempts with their backoffs, plus its throttle waits. A task may also
        queue behind the others this process has reserved (one per thread, up to 1000 IDs each) drawing
        from the shared rate; the bound assumes this process gets the whole rate limit. A redelivered claim
        is only taken over once its dead owner's heartbeat (3 intervals) has expired.
        """
        attempts = self.max_attempts * self.attempt_timeout + (self.max_attempts - 1) * self.backoff_max
        throttled = self.max_throttle_waits * (
            self.attempt_timeout + max(self.retry_after_max, self.backoff_max)
        )
        queued = self.concurrency * 1000 / self.rate_limit if self.rate_limit > 0 else 0.0
        return attempts + throttled + queued + 3 * self.heartbeat_interval

    def stop_timeout(self) -> float:
        """Upper bound, in seconds, from SIGTERM to the worker's exit: the grace, then one HTTP attempt
        already on the wire, then the shutdown of the engine (a few seconds). Orchestrators must wait longer.
        """
        return self.shutdown_grace + self.attempt_timeout + 10

    @model_validator(mode="after")
    def _visibility_covers_unacked_time(self) -> Settings:
        longest = self.longest_unacked()
        if self.visibility_timeout <= longest:
            raise ValueError(
                f"VBS_VISIBILITY_TIMEOUT ({self.visibility_timeout}s) must exceed the longest time a task "
                f"can stay unacknowledged ({longest:.0f}s from VBS_MAX_ATTEMPTS, VBS_CONNECT_TIMEOUT, "
                "VBS_READ_TIMEOUT, VBS_BACKOFF_MAX, VBS_MAX_THROTTLE_WAITS, VBS_RETRY_AFTER_MAX, "
                "VBS_CONCURRENCY, VBS_RATE_LIMIT, VBS_HEARTBEAT_INTERVAL): raise it or lower those"
            )
        return self

    @field_validator("retry_statuses", mode="before")
    @classmethod
    def _split_statuses(cls, value: object) -> object:
        """Accept ``"408,503,504"`` from the environment as well as a TOML list."""
        if isinstance(value, str):
            return frozenset(int(part) for part in value.split(",") if part.strip())
        return value

    @field_validator("retry_statuses")
    @classmethod
    def _statuses_are_http_errors(cls, value: frozenset[int]) -> frozenset[int]:
        bad = sorted(code for code in value if not 400 <= code <= 599 or code in (404, 429))
        if bad:
            raise ValueError(f"only 4xx/5xx other than 404 and 429 can be retried, got {bad}")
        return value

    @field_validator("endpoint")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ValueError(
                f"must be an http(s) base URL such as https://vbs.eu-de.otc.t-systems.com, got {value!r}"
            )
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if urlsplit(value).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value

    @field_validator("auth_token")
    @classmethod
    def _printable_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and any(ord(c) < 0x21 or ord(c) == 0x7F for c in value.get_secret_value()):
            raise ValueError("contains spaces or control characters (a header value cannot carry them)")
        return value

    @field_validator("auth_token", "retention_file", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        """An empty value means "not set" (a blank token sends no header, a blank file names none)."""
        return None if value == "" else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value


def env_name(field: str) -> str:
    """The environment variable that sets ``field``."""
    return ENV_PREFIX + field.upper()


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise SettingsError(f"{CONFIG_FILE_VARIABLE}: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SettingsError(f"{CONFIG_FILE_VARIABLE}: {path} is not a UTF-8 text file") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{CONFIG_FILE_VARIABLE}: {path} is not valid TOML: {exc}") from None


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from ``environ`` (default ``os.environ``); :class:`SettingsError` on any fault."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    config_file = environ.get(CONFIG_FILE_VARIABLE)
    if config_file:
        for key, value in _read_file(Path(config_file)).items():
            if key not in Settings.model_fields:
                raise SettingsError(
                    f"unknown setting {key!r} in {config_file} (environment: {env_name(key)})"
                )
            values[key] = value
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_FILE_VARIABLE:
            continue
        field = name[len(ENV_PREFIX) :].lower()
        if field not in Settings.model_fields:
            raise SettingsError(f"unknown setting {name}")
        values[field] = value
    try:
        return Settings(**values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{env_name(str(error['loc'][0])) + ': ' if error['loc'] else ''}{error['msg']}"
            for error in exc.errors()
        )
        raise SettingsError(f"invalid settings: {problems}") from None
