"""Django system checks: a bad OUTBOX_* variable is reported by `manage.py check` and at the
start of every management command (relay, worker setup, migrate), with an id to silence it."""

from __future__ import annotations

from django.core.checks import Error, register
from django.core.exceptions import ImproperlyConfigured

from event_stream.settings import ConfigError, load_settings


@register()
def check_relay_settings(app_configs=None, **kwargs):
    try:
        load_settings({})
    except ConfigError as exc:
        return [Error(str(exc), id="event_stream.E001")]
    return []


@register()
def check_celery_settings(app_configs=None, **kwargs):
    from event_stream.tasks import task_settings

    try:
        task_settings()
    except ImproperlyConfigured as exc:
        return [Error(str(exc), id="event_stream.E002")]
    return []
