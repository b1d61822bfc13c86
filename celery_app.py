"""The Celery app, configured from Django's settings (`CELERY_*`); broker from CELERY_BROKER_URL.

    celery -A celery_app worker
    celery -A celery_app beat        (django-celery-beat's DatabaseScheduler, from settings)

Celery's Django fixup calls `django.setup()` in the worker and in beat before the task modules
are imported, so the host's `AppConfig.ready()` has registered the application's handlers by
the time a task runs. Extra modules for a worker to import (test handlers, say) go on the
command line: `celery -A celery_app worker -I some.module`.

`CELERY_BROKER_TRANSPORT_OPTIONS`, a JSON object, is merged into the broker's transport options,
e.g. '{"visibility_timeout": 600}': with Redis, how long a task taken by a worker that died
stays invisible before it is delivered again (Celery's default: one hour).

The worker and beat check the OUTBOX_CELERY_* variables, OUTBOX_RETENTION_DAYS,
EVENT_STREAM_LOG_LEVEL and CELERY_BROKER_TRANSPORT_OPTIONS when they start, and refuse a bad one
with one line naming it, exit status 2.
"""

import os
import sys

from celery import Celery, signals

from event_stream.settings import (
    ConfigError,
    check_shared_variables,
    load_celery_settings,
    load_transport_options,
)

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "plane.settings")

app = Celery("event_stream")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["event_stream"])


def transport_options_from_env(environ) -> dict:
    """CELERY_BROKER_TRANSPORT_OPTIONS as a dict; ConfigError (a ValueError) when bad."""
    return load_transport_options(environ)


@app.on_after_configure.connect
def _apply_environment(sender, **kwargs):
    # Celery only logs what a receiver of this signal raises, and carries on: a bad value is
    # left out here, and refused at the start of the worker, beat and the relay instead.
    try:
        options = transport_options_from_env(os.environ)
    except ConfigError:
        options = {}
    if options:
        sender.conf.broker_transport_options = {
            **(sender.conf.broker_transport_options or {}),
            **options,
        }
    if sender.conf.broker_connection_retry_on_startup is None:
        # Celery 5's default, stated, which also silences its deprecation warning.
        sender.conf.broker_connection_retry_on_startup = True


@signals.celeryd_init.connect
def _check_worker_settings(sender=None, **kwargs):
    refuse_bad_settings("celery worker")


@signals.beat_init.connect
def _check_beat_settings(sender=None, **kwargs):
    refuse_bad_settings("celery beat")


def refuse_bad_settings(program: str, environ=None) -> None:
    """Exit with status 2 and one line naming the variable when a setting is bad.

    At start, not when a task first needs the value: a task failing on a bad setting would
    lose its event. SystemExit, because Celery catches and only logs an Exception raised by
    a signal receiver.
    """
    try:
        load_celery_settings(environ)
        check_shared_variables(environ)
    except ConfigError as exc:
        # The real stderr: beat has redirected sys.stderr into its log by now.
        print(f"{program}: {exc}", file=sys.__stderr__, flush=True)
        raise SystemExit(2) from None
