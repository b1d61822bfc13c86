"""The event stream's settings: defaults, environment variables, flags, and their validation.

Two tables of options, one parser. The relay's (`RELAY_OPTIONS`, `load_settings`): a flag beats
a variable beats the default, and every value is checked when the relay starts. The Celery
side's (`CELERY_OPTIONS`, `load_celery_settings`): variables only, read by the worker when a task
runs and by beat's cleanup, and checked when the worker and beat start (celery_app.py). Both
check the variables they share, EVENT_STREAM_LOG_LEVEL and CELERY_BROKER_TRANSPORT_OPTIONS
(`check_shared_variables`). A bad value raises `ConfigError` with one line naming the flag or
variable; the relay's command, the worker and beat turn it into exit status 2, the system
checks into an error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from django.core.exceptions import ImproperlyConfigured


class ConfigError(ImproperlyConfigured, ValueError):
    """A setting has a value the relay or the Celery side cannot run with.

    An ImproperlyConfigured, what Django code (the worker, beat) expects of a bad setting; a
    ValueError, what the relay's callers catch.
    """


@dataclass(frozen=True)
class Option:
    field: str
    flag: str | None  # None: a variable only; the Celery side has no command line
    env: str
    parse: Callable[[str], Any]
    check: Callable[[Any], bool]
    rule: str  # how a valid value looks, for the error message
    help: str

    @property
    def names(self) -> str:
        """Every name a user may have set this option by, for an error message."""
        return f"{self.flag} / {self.env}" if self.flag else self.env


def _int(text: str) -> int:
    return int(text.strip())


def _float(text: str) -> float:
    value = float(text.strip())
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError("not finite")
    return value


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("not a boolean")


# Health and outbox_status count a relay as alive while its last heartbeat is younger than
# RELAY_ALIVE_SECONDS. One fixed window for every relay, so the interval is bounded instead: the
# window spans at least three heartbeats, and a relay is never shown gone for one late write.
RELAY_ALIVE_SECONDS = 30
HEARTBEAT_INTERVAL_MAX = RELAY_ALIVE_SECONDS / 3

RELAY_OPTIONS: tuple[Option, ...] = (
    Option("batch_size", "--batch-size", "OUTBOX_POLLER_BATCH_SIZE", _int,
           lambda v: 1 <= v <= 10_000, "an integer from 1 to 10000",
           "Number of events to process per batch (default: 250)"),
    Option("interval_min", "--interval-min", "OUTBOX_POLLER_INTERVAL_MIN", _float,
           lambda v: 0 < v <= 3600, "a number of seconds above 0",
           "Minimum polling interval in seconds (default: 0.25)"),
    Option("interval_max", "--interval-max", "OUTBOX_POLLER_INTERVAL_MAX", _float,
           lambda v: 0 < v <= 3600, "a number of seconds above 0",
           "Maximum polling interval in seconds (default: 2.0)"),
    Option("memory_limit_mb", "--memory-limit", "OUTBOX_POLLER_MEMORY_LIMIT_MB", _int,
           lambda v: v >= 1, "a whole number of MB, at least 1",
           "Memory limit in MB before restart (default: 500)"),
    Option("memory_check_interval", "--memory-check-interval",
           "OUTBOX_POLLER_MEMORY_CHECK_INTERVAL", _float,
           lambda v: 0 < v <= 86_400, "a number of seconds above 0",
           "Memory check interval in seconds (default: 30)"),
    Option("max_attempts", "--max-attempts", "OUTBOX_POLLER_MAX_ATTEMPTS", _int,
           lambda v: 1 <= v <= 1000, "an integer from 1 to 1000",
           "Attempts before a failing event is dead-lettered (default: 10)"),
    Option("retry_base_delay", "--retry-base-delay", "OUTBOX_POLLER_RETRY_BASE_DELAY", _float,
           lambda v: 0 <= v <= 86_400, "a number of seconds, 0 or more",
           "First retry delay in seconds; doubles per attempt, with jitter (default: 1.0)"),
    Option("retry_max_delay", "--retry-max-delay", "OUTBOX_POLLER_RETRY_MAX_DELAY", _float,
           lambda v: 0 <= v <= 86_400 * 7, "a number of seconds, 0 or more",
           "Longest retry delay in seconds (default: 300)"),
    Option("ordered", "--ordered", "OUTBOX_POLLER_ORDERED", _bool,
           lambda v: True, "true or false",
           "Handle each entity's events in commit order (default: true)"),
    Option("shutdown_timeout", "--shutdown-timeout", "OUTBOX_POLLER_SHUTDOWN_TIMEOUT", _float,
           lambda v: 0 < v <= 3600, "a number of seconds above 0",
           "Longest wait for the batch in flight on SIGTERM/SIGINT (default: 30)"),
    Option("heartbeat_interval", "--heartbeat-interval", "OUTBOX_POLLER_HEARTBEAT_INTERVAL",
           _float, lambda v: 0 < v <= HEARTBEAT_INTERVAL_MAX,
           f"a number of seconds above 0, at most {HEARTBEAT_INTERVAL_MAX:g} (health and "
           f"outbox_status count a relay as gone after {RELAY_ALIVE_SECONDS} s without one)",
           f"How often the relay records that it is alive, at most every "
           f"{HEARTBEAT_INTERVAL_MAX:g} s (default: 5)"),
    Option("synchronous_commit", "--synchronous-commit", "OUTBOX_POLLER_SYNCHRONOUS_COMMIT",
           _bool, lambda v: True, "true or false",
           "Wait for the disk when recording each batch; off, a database crash may hand the "
           "last moment's events out again (default: false)"),
)  # fmt: skip

RELAY_OPTIONS_BY_FIELD = {o.field: o for o in RELAY_OPTIONS}


@dataclass(frozen=True)
class RelaySettings:
    batch_size: int = 250
    interval_min: float = 0.25
    interval_max: float = 2.0
    memory_limit_mb: int = 500
    memory_check_interval: float = 30.0
    max_attempts: int = 10
    retry_base_delay: float = 1.0
    retry_max_delay: float = 300.0
    ordered: bool = True
    shutdown_timeout: float = 30.0
    heartbeat_interval: float = 5.0
    synchronous_commit: bool = False

    def __post_init__(self) -> None:
        _check_fields(self, RELAY_OPTIONS_BY_FIELD)
        if self.interval_min > self.interval_max:
            raise ConfigError(
                f"{_names('interval_min')} ({self.interval_min}) must not exceed "
                f"{_names('interval_max')} ({self.interval_max})"
            )
        if self.retry_base_delay > self.retry_max_delay:
            raise ConfigError(
                f"{_names('retry_base_delay')} ({self.retry_base_delay}) must not exceed "
                f"{_names('retry_max_delay')} ({self.retry_max_delay})"
            )


def _names(field: str) -> str:
    return RELAY_OPTIONS_BY_FIELD[field].names


CELERY_OPTIONS: tuple[Option, ...] = (
    Option("max_retries", None, "OUTBOX_CELERY_MAX_RETRIES", _int,
           lambda v: v >= 0, "an integer, 0 or more",
           "Retries of a failing handler after its first try (default: 5)"),
    Option("retry_backoff", None, "OUTBOX_CELERY_RETRY_BACKOFF", _float,
           lambda v: v >= 0, "a number of seconds, 0 or more",
           "First retry delay in seconds; doubles per retry, with jitter (default: 2)"),
    Option("retry_backoff_max", None, "OUTBOX_CELERY_RETRY_BACKOFF_MAX", _float,
           lambda v: v >= 0, "a number of seconds, 0 or more",
           "Longest retry delay in seconds; with Redis, keep it below the broker's "
           "visibility timeout, or a delayed retry is delivered twice (default: 600)"),
    Option("retention_days", None, "OUTBOX_RETENTION_DAYS", _int,
           lambda v: v >= 1, "a whole number of days, at least 1",
           "Beat's cleanup deletes processed rows older than this (default: 7)"),
)  # fmt: skip

CELERY_OPTIONS_BY_FIELD = {o.field: o for o in CELERY_OPTIONS}


@dataclass(frozen=True)
class CelerySettings:
    max_retries: int = 5
    retry_backoff: float = 2.0
    retry_backoff_max: float = 600.0
    retention_days: int = 7

    def __post_init__(self) -> None:
        _check_fields(self, CELERY_OPTIONS_BY_FIELD)


def _check_fields(settings: Any, options_by_field: Mapping[str, Option]) -> None:
    """Fail fast on a value given in code, by the rules that text from outside is held to."""
    for f in fields(settings):
        option = options_by_field[f.name]
        value = getattr(settings, f.name)
        # True is an int to Python; only a bool field may hold one.
        if isinstance(value, bool) != (f.type == "bool") or not option.check(value):
            raise ConfigError(f"{option.names}: must be {option.rule}, got {value!r}")


def load_settings(
    flags: Mapping[str, str | None] | None = None, environ: Mapping[str, str] | None = None
) -> RelaySettings:
    """The relay's settings from flags (by field name, raw text or None when not given), then
    the environment (by default os.environ, read now). The variables the relay shares with
    the Celery side (`check_shared_variables`) are checked too.

    Raises ConfigError naming the flag or variable whose value is bad.
    """
    environ = os.environ if environ is None else environ
    settings = RelaySettings(**_given_values(RELAY_OPTIONS, flags or {}, environ))
    check_shared_variables(environ)
    return settings


def load_celery_settings(environ: Mapping[str, str] | None = None) -> CelerySettings:
    """The Celery side's settings from the environment (by default os.environ, read now: a
    task calls this each time it runs).

    Raises ConfigError naming the variable whose value is bad.
    """
    environ = os.environ if environ is None else environ
    return CelerySettings(**_given_values(CELERY_OPTIONS, {}, environ))


def _given_values(
    options: tuple[Option, ...], flags: Mapping[str, str | None], environ: Mapping[str, str]
) -> dict[str, Any]:
    """Parsed and checked values by field, for the options given by flag or variable; the
    others are left out, so the dataclass's default applies. A blank variable counts as unset.
    """
    values: dict[str, Any] = {}
    for option in options:
        raw, source = flags.get(option.field), option.flag
        if raw is None:
            raw, source = environ.get(option.env), option.env
        if raw is None or (source == option.env and raw.strip() == ""):
            continue
        values[option.field] = _parse(option, source, raw)
    return values


def _parse(option: Option, source: str, raw: Any) -> Any:
    if not isinstance(raw, str):
        raw = str(raw)
    try:
        value = option.parse(raw)
    except ValueError:
        raise ConfigError(f"{source}: must be {option.rule}, got {raw!r}") from None
    if not option.check(value):
        raise ConfigError(f"{source}: must be {option.rule}, got {raw!r}")
    return value


# -- variables shared by the relay, the worker and beat ---------------------------------------

LOG_LEVEL_ENV = "EVENT_STREAM_LOG_LEVEL"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEFAULT_LOG_LEVEL = "INFO"
TRANSPORT_OPTIONS_ENV = "CELERY_BROKER_TRANSPORT_OPTIONS"


def load_log_level(environ: Mapping[str, str] | None = None) -> str:
    """EVENT_STREAM_LOG_LEVEL, in capitals ("debug" is DEBUG); INFO when unset or blank."""
    environ = os.environ if environ is None else environ
    raw = environ.get(LOG_LEVEL_ENV, "")
    level = raw.strip().upper() or DEFAULT_LOG_LEVEL
    if level not in LOG_LEVELS:
        rule = ", ".join(LOG_LEVELS)
        raise ConfigError(f"{LOG_LEVEL_ENV}: must be one of {rule} (any case), got {raw!r}")
    return level


def lenient_log_level(environ: Mapping[str, str] | None = None) -> str:
    """The level for Django's LOGGING: a bad value falls back to INFO there, because Django
    would die on it with a traceback before any command could name it; the relay, the worker,
    beat and `manage.py check` report it in one line instead (`check_shared_variables`)."""
    try:
        return load_log_level(environ)
    except ConfigError:
        return DEFAULT_LOG_LEVEL


def load_transport_options(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """CELERY_BROKER_TRANSPORT_OPTIONS, a JSON object merged into the broker's transport
    options (e.g. '{"visibility_timeout": 600}'); {} when unset or blank."""
    environ = os.environ if environ is None else environ
    raw = environ.get(TRANSPORT_OPTIONS_ENV, "")
    if not raw.strip():
        return {}
    try:
        options = json.loads(raw)
    except ValueError:
        options = None
    if not isinstance(options, dict):
        raise ConfigError(f"{TRANSPORT_OPTIONS_ENV}: must be a JSON object, got {raw!r}")
    return options


def check_shared_variables(environ: Mapping[str, str] | None = None) -> None:
    """Raise ConfigError naming EVENT_STREAM_LOG_LEVEL or CELERY_BROKER_TRANSPORT_OPTIONS when
    its value is bad. Django and Celery read both where an error is only logged or becomes a
    traceback; whatever starts a relay, a worker or beat calls this first."""
    load_log_level(environ)
    load_transport_options(environ)
