"""A relay process that dispatches to Celery: `python -m tests.integration.relay_celery_process`.

It runs the production service (`OutboxEventService`, whose `make_publisher` builds the
`CeleryPublisher`) with a registry of its own, built from the environment:

  RELAY_CELERY_QUEUE          the queue the relay publishes to, set as the Celery app's route
                              for `event_stream.run_handler` (as a deployment routes it)
  RELAY_CELERY_HANDLERS       JSON {handler name: [patterns]}: handlers the worker knows (those
                              of `celery_worker_handlers`, or `test.fails_until_fixed` below),
                              registered with dispatch="celery"
  RELAY_INLINE_PATTERNS       JSON [patterns] of an inline handler, `relay.inline`, that records
                              the event_data it gets, as the worker's test handlers do
  EVENT_STREAM_TEST_RECORD_DIR  where the records go (`<handler>.<event_id>.jsonl`)
  CELERY_BROKER_URL           the broker, as in production; OUTBOX_POLLER_* as usual

The worker imports this module too (`-I`), for `test.fails_until_fixed`: it fails until the test
writes the file `<event_id>.fixed` in the record directory (the bug is fixed), so a dead-lettered
event can be replayed and then succeed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from event_stream.handlers import registry as app_registry
from tests.integration.celery_worker_handlers import PATTERNS, trace_path

QUEUE_ENV = "RELAY_CELERY_QUEUE"
CELERY_HANDLERS_ENV = "RELAY_CELERY_HANDLERS"
INLINE_PATTERNS_ENV = "RELAY_INLINE_PATTERNS"
RECORD_DIR_ENV = "EVENT_STREAM_TEST_RECORD_DIR"
INLINE_NAME = "relay.inline"
FAILS_UNTIL_FIXED = "test.fails_until_fixed"


def _record(handler: str, event_data: dict) -> None:
    path = trace_path(Path(os.environ[RECORD_DIR_ENV]), handler, event_data["event_id"])
    with path.open("a") as f:
        f.write(json.dumps(event_data) + "\n")


def fixed_marker(record_dir: Path, event_id: str) -> Path:
    return record_dir / f"{event_id}.fixed"


def fails_until_fixed(event_data):
    _record(FAILS_UNTIL_FIXED, event_data)
    if not fixed_marker(Path(os.environ[RECORD_DIR_ENV]), event_data["event_id"]).exists():
        raise RuntimeError("not fixed yet")


def record_inline(event_data):
    _record(INLINE_NAME, event_data)


# For the worker (and looked up by name by the relay below).
app_registry.add(fails_until_fixed, PATTERNS, name=FAILS_UNTIL_FIXED, dispatch="celery")


def main() -> int:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "plane.settings")
    import django

    django.setup()
    # The test.* handlers of celery_worker_handlers are registered: imported above.
    from celery_app import app
    from event_stream.celery_dispatch import TASK_NAME
    from event_stream.handlers import HandlerRegistry
    from event_stream.service import OutboxEventService
    from event_stream.settings import load_settings

    # The publisher follows the app's routes (CeleryPublisher(queue=None)), as in production.
    app.conf.task_routes = {TASK_NAME: {"queue": os.environ[QUEUE_ENV]}}

    registry = HandlerRegistry()
    for name, patterns in json.loads(os.environ.get(CELERY_HANDLERS_ENV) or "{}").items():
        known = app_registry.get(name)
        if known is None:
            raise SystemExit(f"{name!r} is not a handler the worker knows")
        registry.add(known.func, patterns, name=name, dispatch="celery")
    inline_patterns = json.loads(os.environ.get(INLINE_PATTERNS_ENV) or "[]")
    if inline_patterns:
        registry.add(record_inline, inline_patterns, name=INLINE_NAME)
    print(f"relay ready pid={os.getpid()}", flush=True)
    return OutboxEventService(load_settings(), registry=registry).start()


if __name__ == "__main__":
    sys.exit(main())
