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
"""

import json
import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "plane.settings")

app = Celery("event_stream")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["event_stream"])


def transport_options_from_env(environ) -> dict:
    raw = environ.get("CELERY_BROKER_TRANSPORT_OPTIONS", "").strip()
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except ValueError:
        options = None
    if not isinstance(options, dict):
        raise ValueError(f"CELERY_BROKER_TRANSPORT_OPTIONS: must be a JSON object, got {raw!r}")
    return options


@app.on_after_configure.connect
def _apply_environment(sender, **kwargs):
    options = transport_options_from_env(os.environ)
    if options:
        sender.conf.broker_transport_options = {
            **(sender.conf.broker_transport_options or {}),
            **options,
        }
    if sender.conf.broker_connection_retry_on_startup is None:
        # Celery 5's default, stated, which also silences its deprecation warning.
        sender.conf.broker_connection_retry_on_startup = True
