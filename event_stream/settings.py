"""The relay's settings: defaults, environment variables, flags, and their validation.

A flag beats a variable beats the default. Every value is checked when the relay starts; a bad
one raises `ConfigError` with one line naming the flag or variable, which the command turns into
exit status 2.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any


class ConfigError(ValueError):
    """A setting has a value the relay cannot run with."""


@dataclass(frozen=True)
class Option:
    field: str
    flag: str
    env: str
    parse: Callable[[str], Any]
    check: Callable[[Any], bool]
    rule: str  # how a valid value looks, for the error message
    help: str


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


OPTIONS: tuple[Option, ...] = (
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
           _float, lambda v: 0 < v <= 300, "a number of seconds above 0",
           "How often the relay records that it is alive (default: 5)"),
    Option("synchronous_commit", "--synchronous-commit", "OUTBOX_POLLER_SYNCHRONOUS_COMMIT",
           _bool, lambda v: True, "true or false",
           "Wait for the disk when recording each batch; off, a database crash may hand the "
           "last moment's events out again (default: false)"),
)  # fmt: skip

OPTIONS_BY_FIELD = {o.field: o for o in OPTIONS}


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
        for f in fields(self):
            option = OPTIONS_BY_FIELD[f.name]
            value = getattr(self, f.name)
            if isinstance(value, bool) != (f.type == "bool") or not option.check(value):
                raise ConfigError(f"{_names(f.name)}: must be {option.rule}, got {value!r}")
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
    option = OPTIONS_BY_FIELD[field]
    return f"{option.flag} / {option.env}"


def load_settings(
    flags: Mapping[str, str | None] | None = None, environ: Mapping[str, str] | None = None
) -> RelaySettings:
    """Settings from flags (by field name, raw text or None when not given), then environment.

    Raises ConfigError naming the flag or variable whose value is bad.
    """
    flags = flags or {}
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for option in OPTIONS:
        raw, source = flags.get(option.field), option.flag
        if raw is None:
            raw, source = environ.get(option.env), option.env
        if raw is None or (source == option.env and raw.strip() == ""):
            continue
        values[option.field] = _parse(option, source, raw)
    return RelaySettings(**values)


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
