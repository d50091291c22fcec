"""One typed settings object, read from defaults, an optional TOML file and ``VBS_*`` environment variables.

Precedence: field defaults < the TOML file named by ``VBS_CONFIG`` < ``VBS_<NAME>`` environment variables.
An unknown key or an invalid value raises :class:`SettingsError` naming the setting, so a worker with a typo
in its configuration stops at start instead of running with a default the operator did not mean.
"""

from __future__ import annotations

import os
import re
import ssl
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
AuthMode = Literal["none", "token", "iam", "aksk"]

SIMULATOR_ENDPOINT = "http://127.0.0.1:8780"
_REGION = re.compile(r"[a-z0-9]+(-[a-z0-9]+)+")
# secret setting -> the setting naming a file that holds it (a mounted Kubernetes secret, say)
SECRET_FILES: dict[str, str] = {"iam_password": "iam_password_file", "secret_key": "secret_key_file"}
_OPTIONAL = (
    "auth_token",
    "region",
    "iam_endpoint",
    "iam_user",
    "iam_password",
    "iam_password_file",
    "iam_domain",
    "access_key",
    "secret_key",
    "secret_key_file",
    "ca_bundle",
)


class SettingsError(ValueError):
    """A setting is unknown or invalid; the message names it as ``VBS_<NAME>``."""


class Settings(BaseModel):
    """Every knob of the worker. Durations are seconds, rates are requests per second."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Celery broker and shared-state store")
    queue: str = Field("vbs.deletions", min_length=1, description="Celery queue the tasks arrive on")
    endpoint: str = Field(
        SIMULATOR_ENDPOINT,
        description="VBS base URL (scheme, host, optional port); default: from region, else the simulator",
    )
    region: str | None = Field(None, description="region filling the endpoint templates, e.g. eu-de")
    endpoint_template: str = Field(
        "https://vbs.{region}.otc.t-systems.com", description="VBS base URL for a region ({region})"
    )
    api: ApiMode = Field("cloudbackups", description="delete call: cloudbackups, native-v2 or native-v3")
    auth_token: SecretStr | None = Field(None, description="static token sent as X-Auth-Token")
    iam_endpoint: str | None = Field(None, description="IAM identity v3 URL; default: from region")
    iam_endpoint_template: str = Field(
        "https://iam.{region}.otc.t-systems.com/v3", description="IAM v3 URL for a region ({region})"
    )
    iam_user: str | None = Field(None, description="IAM user name for password tokens")
    iam_password: SecretStr | None = Field(None, description="IAM password of iam_user")
    iam_password_file: Path | None = Field(None, description="file holding the IAM password")
    iam_domain: str | None = Field(None, description="IAM domain (account) name of iam_user")
    iam_refresh_before: float = Field(
        3600.0, gt=0, description="refresh a token this long before it expires (at most 1/10 of its life), s"
    )
    access_key: str | None = Field(None, description="AK of AK/SK request signing")
    secret_key: SecretStr | None = Field(None, description="SK of AK/SK request signing")
    secret_key_file: Path | None = Field(None, description="file holding the SK")
    verify_tls: bool = Field(True, description="verify the endpoint's TLS certificate")
    ca_bundle: Path | None = Field(None, description="PEM file of CA certificates to trust instead")

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

    follow_jobs: bool = Field(
        True,
        description="follow accepted deletions to the end: poll the job (cloudbackups) or read the backup "
        "until 404 (native modes)",
    )
    job_poll_interval: float = Field(1.0, gt=0, description="first wait before polling a job, seconds")
    job_poll_max_interval: float = Field(
        15.0, gt=0, description="largest wait between polls of one job, seconds (doubles per poll)"
    )
    job_deadline: float = Field(
        900.0, gt=0, description="seconds a deletion job may take before it counts as failed (job_timeout)"
    )
    max_following: int = Field(
        10000,
        ge=1,
        le=1_000_000,
        description="deletions followed to their end at once per worker process; more are parked in Redis",
    )
    recent_jobs: int = Field(
        50, ge=0, le=1000, description="job IDs kept as vbs_deleter_recent_job_info series (last N)"
    )

    metrics_host: str = Field("0.0.0.0", description="address of the /metrics, /healthz and /readyz listener")
    metrics_port: int = Field(9808, ge=0, le=65535, description="port of /metrics; 0 picks a free one")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log threshold")
    log_format: Literal["text", "json"] = Field("text", description="text lines or one JSON object a line")

    @property
    def attempt_timeout(self) -> float:
        """Longest one HTTP attempt may take, seconds."""
        return self.connect_timeout + self.read_timeout

    def longest_unacked(self) -> float:
        """Upper bound, in seconds, on how long a task message stays unacknowledged.

        One deletion: its transient attempts with their backoffs and its throttle waits; its job follow-up
        runs after the task is acknowledged (parked in Redis when no follow slot is free). A task may also
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

    def check_delivery(self) -> None:
        """Refuse to consume when Redis could redeliver a task still being worked on (worker start only).

        Raises :class:`SettingsError` naming the settings involved.
        """
        longest = self.longest_unacked()
        if self.visibility_timeout <= longest:
            raise SettingsError(
                f"VBS_VISIBILITY_TIMEOUT ({self.visibility_timeout}s) must exceed the longest time a task "
                f"can stay unacknowledged ({longest:.0f}s from VBS_MAX_ATTEMPTS, VBS_CONNECT_TIMEOUT, "
                "VBS_READ_TIMEOUT, VBS_BACKOFF_MAX, VBS_MAX_THROTTLE_WAITS, VBS_RETRY_AFTER_MAX, "
                "VBS_CONCURRENCY, VBS_RATE_LIMIT, VBS_HEARTBEAT_INTERVAL): "
                "raise it or lower those"
            )

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

    @field_validator("endpoint", "iam_endpoint")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
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

    @field_validator(*_OPTIONAL, "retention_file", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        """An empty value means "not set" (a blank token sends no header, a blank file names none)."""
        return None if value == "" else value

    @model_validator(mode="before")
    @classmethod
    def _resolve(cls, data: Any) -> Any:
        """Read secrets from their files and fill the endpoints from the region (before field checks)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for secret, file_field in SECRET_FILES.items():
            if data.get(file_field) in (None, ""):
                continue
            if data.get(secret) not in (None, ""):
                raise ValueError(f"set {env_name(secret)} or {env_name(file_field)}, not both")
            data[secret] = _read_secret(file_field, Path(str(data[file_field])))
        region = data.get("region")
        if region in (None, ""):
            return data
        if not (isinstance(region, str) and _REGION.fullmatch(region)):
            raise ValueError(f"{env_name('region')} must look like eu-de or ap-southeast-1")
        for target, template in (
            ("endpoint", "endpoint_template"),
            ("iam_endpoint", "iam_endpoint_template"),
        ):
            if data.get(target) in (None, ""):
                pattern = str(data.get(template) or cls.model_fields[template].default)
                if "{region}" not in pattern:
                    raise ValueError(f"{env_name(template)} must contain {{region}}")
                data[target] = pattern.replace("{region}", region)
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        """One auth mode at most, complete; a CA bundle that loads and is used."""
        self._choose_auth()
        if self.ca_bundle is not None:
            if not self.verify_tls:
                raise ValueError(f"{env_name('ca_bundle')} is set but {env_name('verify_tls')} is false")
            try:
                ssl.create_default_context(cafile=str(self.ca_bundle))
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"{env_name('ca_bundle')}: cannot load {self.ca_bundle}: {exc}") from None
        return self

    @property
    def auth_mode(self) -> AuthMode:
        """Which auth the set settings choose: static token, IAM password tokens, AK/SK, or none."""
        return self._choose_auth()

    def _choose_auth(self) -> AuthMode:
        """The auth mode; ValueError naming the settings when they conflict or are incomplete."""
        iam = {"iam_user": self.iam_user, "iam_password": self.iam_password, "iam_domain": self.iam_domain}
        aksk = {"access_key": self.access_key, "secret_key": self.secret_key}
        chosen = {
            mode: [env_name(name) for name, value in fields.items() if value is not None]
            for mode, fields in (("token", {"auth_token": self.auth_token}), ("iam", iam), ("aksk", aksk))
        }
        given = {mode: names for mode, names in chosen.items() if names}
        if len(given) > 1:
            clash = ", ".join(name for names in given.values() for name in names)
            raise ValueError(f"choose one way to authenticate; these settings conflict: {clash}")
        if not given:
            return "none"
        mode, names = next(iter(given.items()))
        needed = {"token": ["auth_token"], "iam": list(iam), "aksk": list(aksk)}[mode]
        missing = [env_name(name) for name in needed if env_name(name) not in names]
        if mode == "iam" and self.iam_endpoint is None:
            missing.append(f"{env_name('iam_endpoint')} (or {env_name('region')})")
        if missing:
            raise ValueError(f"{', '.join(names)} also need{'s' * (len(names) == 1)} {', '.join(missing)}")
        return mode  # type: ignore[return-value]

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value


def env_name(field: str) -> str:
    """The environment variable that sets ``field``."""
    return ENV_PREFIX + field.upper()


def _read_secret(file_field: str, path: Path) -> str:
    """A secret from a file, without the one trailing newline a mounted secret or an editor adds."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ValueError(f"{env_name(file_field)}: cannot read {path}: {reason}") from None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise ValueError(f"{env_name(file_field)}: {path} is empty")
    return text


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
            f"{env_name(str(error['loc'][0]))}: {error['msg']}"
            if error["loc"]
            else str(error["msg"]).removeprefix("Value error, ")
            for error in exc.errors()
        )
        raise SettingsError(f"invalid settings: {problems}") from None
