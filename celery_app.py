"""The Celery app, configured from Django's settings (`CELERY_*`); broker from CELERY_BROKER_URL.

    celery -A celery_app worker
    celery -A celery_app beat        (django-celery-beat's DatabaseScheduler, from settings)

Celery's Django fixup calls `django.setup()` in the worker and in beat before the task modules
are imported, so the host's `AppConfig.ready()` has registered the application's handlers by
the time a task runs. Extra modules for a worker to import (test handlers, say) go on the
command line: `celery -A celery_app worker -I some.module`.

Beat's queue-depth check goes to a queue of its own, `event_stream.checks` (see `declare_queues`);
a worker started without -Q consumes it along with the default queue, `celery`. A worker given
its queues with -Q must be given this one too.

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
from kombu import Exchange, Queue

from event_stream.settings import (
    ConfigError,
    check_shared_variables,
    load_celery_settings,
    load_transport_options,
)

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "plane.settings")

CHECKS_QUEUE = "event_stream.checks"
# The name of event_stream.tasks.check_queue_depth, which this module does not import (the
# worker imports the task modules itself); tests/integration/test_beat.py fails if they differ.
QUEUE_CHECK_TASK_NAME = "event_stream.check_queue_depth"

app = Celery("event_stream")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["event_stream"])


@app.on_after_configure.connect
def _apply_environment(sender, **kwargs):
    # Celery only logs what a receiver of this signal raises, and carries on: a bad value is
    # left out here, and refused at the start of the worker, beat and the relay instead.
    try:
        options = load_transport_options(os.environ)
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
    declare_queues(sender.conf)


def declare_queues(conf) -> None:
    """Give beat's queue-depth check a queue of its own, beside the default queue.

    On the default queue the check waited behind every handler task already there, and expired
    unrun (its schedule's expiry, a minute: a late check is superseded by the next) whenever
    the backlog was more than a minute deep: exactly when it had something to report. A
    priority cannot put it first: Redis serves the relay's messages, which have none, before
    any with one, and RabbitMQ needs x-max-priority declared on a queue that already exists.
    On its own queue it runs at the worker's next free slot: a worker takes from its queues in
    turn. A worker started without -Q, as the README starts it, consumes every queue declared
    here, so no command needs to change. A host that declares its own `task_queues` keeps
    them, and the check stays on the default queue.
    """
    if conf.task_queues is not None:
        return
    default = conf.task_default_queue
    conf.task_queues = (
        # The default queue, declared as Celery declares it when no queues are set.
        Queue(
            default,
            Exchange(conf.task_default_exchange, conf.task_default_exchange_type),
            routing_key=conf.task_default_routing_key,
        ),
        Queue(CHECKS_QUEUE, Exchange(CHECKS_QUEUE), routing_key=CHECKS_QUEUE),
    )
    check_route = {QUEUE_CHECK_TASK_NAME: {"queue": CHECKS_QUEUE}}
    conf.task_routes = (*_as_routers(conf.task_routes), check_route)  # the host's routes first


def _as_routers(routes) -> tuple:
    """`task_routes` as a tuple of routers (Celery takes one router, or a list of them)."""
    if routes is None:
        return ()
    return tuple(routes) if isinstance(routes, list | tuple) else (routes,)


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
