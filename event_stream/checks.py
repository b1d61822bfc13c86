"""Django system checks: a bad OUTBOX_* variable is reported by `manage.py check` and at the
start of every management command (relay, worker setup, migrate), with an id to silence it."""

from __future__ import annotations

from collections.abc import Callable

from django.core.checks import Error, register

from event_stream.settings import ConfigError, load_celery_settings, load_settings


@register()
def check_relay_settings(app_configs=None, **kwargs):
    return _errors_of(load_settings, "event_stream.E001")


@register()
def check_celery_settings(app_configs=None, **kwargs):
    return _errors_of(load_celery_settings, "event_stream.E002")


def _errors_of(load: Callable[[], object], check_id: str) -> list[Error]:
    try:
        load()
    except ConfigError as exc:
        return [Error(str(exc), id=check_id)]
    return []
