"""Celery tasks: running a handler in a worker, and beat's cleanup and queue-depth check.

`event_stream.run_handler(handler_name, event_data)` is what the relay publishes (see
`celery_dispatch`) for each event and handler dispatched to Celery. The name is looked up in the
application's handler registry, never imported: a message naming anything else (an import path
such as "os.system" included) runs nothing. A failing handler is retried with exponential
backoff and jitter; when the retries run out, the outbox row is dead-lettered (`failed_at`,
`last_error`, and the runs in `attempts`) so that health, `outbox_status` and the admin show it
and `outbox_replay` can put it back.

Nothing is dropped on the way: a task whose worker keeps dying is dead-lettered after as many
runs (see `_out_of_runs`); a retry the broker does not take dead-letters the row; a task the
worker cannot run (a handler it does not have, event_data that is not an event) dead-letters
the row it names (`_refuse`); a dead letter the database does not take keeps the message
(`_keep_for_later`).

The OUTBOX_CELERY_* variables and OUTBOX_RETENTION_DAYS, their defaults and their rules, are
`event_stream.settings.CELERY_OPTIONS`. They are read each time a task runs, never at import.
"""

from __future__ import annotations

import asyncio
import datetime
import inspect
import logging
import random
from typing import NoReturn

from celery import shared_task
from celery.exceptions import Reject
from django.db import DatabaseError, connection, transaction
from django.db.models import SmallIntegerField, Value
from django.db.models.functions import Greatest, Now
from django.utils import timezone

from event_stream.celery_dispatch import TASK_NAME
from event_stream.database import storable
from event_stream.dispatch import RetryPolicy
from event_stream.events import SEED_FIELDS
from event_stream.handlers import registry
from event_stream.settings import CelerySettings, load_celery_settings

logger = logging.getLogger("event_stream.celery")

CLEANUP_TASK_NAME = "event_stream.cleanup_processed"
QUEUE_CHECK_TASK_NAME = "event_stream.check_queue_depth"
CLEANUP_CHUNK_SIZE = 10_000  # ids per DELETE
MAX_ERROR_LENGTH = 4_000
MAX_ATTEMPTS = 32_767  # the top of `attempts`, a smallint


# -- running handlers -----------------------------------------------------------------------


@shared_task(
    name=TASK_NAME,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
    max_retries=None,  # bounded below, by OUTBOX_CELERY_MAX_RETRIES read at run time
)
def run_handler(self, handler_name, event_data):
    """Run the registered handler `handler_name` on `event_data` (the dict inline handlers get)."""
    handler = registry.get(handler_name) if isinstance(handler_name, str) else None
    if handler is None:
        _refuse(
            self,
            event_data,
            f"{handler_name!r} is not a registered handler",
            f"{_label(handler_name)}: NotRegistered: no handler of this name in the worker "
            f"(not deployed there yet, or no longer); nothing was run",
        )
        return
    missing = _missing_fields(event_data)
    if missing:
        _refuse(
            self,
            event_data,
            f"event_data is not an event (it lacks {', '.join(missing)})",
            f"{handler.name}: MalformedEvent: event_data lacks {', '.join(missing)}; "
            f"nothing was run",
        )
        return

    # The settings are read only where a run needs them: a first delivery that succeeds,
    # the common case, reads none.
    if _redelivered(self.request) and _out_of_runs(
        self, handler, event_data, load_celery_settings()
    ):
        return
    try:
        _call(handler.func, event_data)
    except Exception as exc:
        _retry_or_dead_letter(self, handler, event_data, exc, load_celery_settings())


# A task the worker cannot run is not acked away: the relay marked its row processed when it
# published it, so the event would be lost. Its row is dead-lettered instead (`failed_at`, with
# why), for `outbox_replay` to send it again: after a rolling deploy has given every worker the
# handler, or to a relay that builds the event right. Nothing was run, so `attempts` is left
# as it is.


def _refuse(task, event_data, why: str, error: str) -> None:
    """Run nothing; dead-letter the row `event_data` names with `error`, or, when it names
    none, log `why` and let the message go."""
    outbox_id = _outbox_id(event_data)
    if outbox_id is None:
        # No integer id: a forged or garbled message. There is no row to mark, and keeping the
        # message would only bring it back to the same end: logging it is all there is to do.
        logger.error("rejected task %s: %s; nothing was run", task.request.id, why)
        return
    logger.error(
        "rejected task %s: %s; nothing was run; dead-lettered event %s for outbox_replay",
        task.request.id,
        why,
        outbox_id,
    )
    _dead_letter(task, outbox_id, error, 0, load_celery_settings())


def _label(handler_name) -> str:
    """The handler name as last_error starts with it: as given, or its repr if not a string."""
    return handler_name if isinstance(handler_name, str) else repr(handler_name)


def _outbox_id(event_data) -> int | None:
    """The outbox row id `event_data` carries, if it is an integer."""
    outbox_id = event_data.get("id") if isinstance(event_data, dict) else None
    if isinstance(outbox_id, int) and not isinstance(outbox_id, bool):
        return outbox_id
    return None


def _missing_fields(event_data) -> list[str]:
    """The SEED_FIELDS that `event_data` lacks ("id" too when its id is not an integer)."""
    if not isinstance(event_data, dict):
        return list(SEED_FIELDS)
    missing = [name for name in SEED_FIELDS if name not in event_data]
    if "id" not in missing and _outbox_id(event_data) is None:
        missing.insert(0, "id")
    return missing


# A message that comes back without a retry (`redelivered`: its worker died or lost the broker
# before acking it) does not raise `request.retries`: Celery alone would run it forever. Such
# runs are counted in the row's `attempts`, in one UPDATE per redelivery, before the handler
# runs again. Only redeliveries pay for it: a first delivery and a retry (a new message) write
# nothing. Kombu flags a redelivery on Redis (restored after the visibility timeout or requeued
# by reject_on_worker_lost) and RabbitMQ alike. The count is per row, shared by the row's
# handlers, and also counts a message restored before it ever started (a worker stopping with
# it prefetched): it errs towards dead-lettering early, which replay undoes, never towards
# running without end.


def _redelivered(request) -> bool:
    return bool((request.delivery_info or {}).get("redelivered"))


def _out_of_runs(task, handler, event_data: dict, settings: CelerySettings) -> bool:
    """Count this redelivery; when the task has had all its runs, dead-letter it and say so."""
    try:
        lost = count_redelivery(event_data["id"], event_data.get("attempts"))
    except DatabaseError as exc:
        logger.error(
            "could not count the redelivery of task %s; keeping it for later: %s",
            task.request.id,
            exc,
        )
        _keep_for_later(task, exc, settings)
    if lost is None:
        return False  # the row is gone (cleaned up): nothing to count on or to dead-letter
    runs = (task.request.retries or 0) + lost + 1
    if runs <= settings.max_retries + 1:
        return False
    error = (
        f"{handler.name}: WorkerLost: delivered again {lost} time(s) without finishing "
        f"(its worker died or lost the broker); not run again"
    )
    logger.error("task %s: %s; dead-lettered event %s", task.request.id, error, event_data["id"])
    # This delivery does not run: the runs were the earlier ones.
    _dead_letter(task, event_data["id"], error, runs - 1, settings)
    return True


def count_redelivery(outbox_id: int, attempts_when_published) -> int | None:
    """Add one to the row's `attempts`; return the runs lost since the relay published the
    event (`attempts` then is in its event_data), or None if the row is gone."""
    from event_stream.models import Outbox

    table = connection.ops.quote_name(Outbox._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            # LEAST: a smallint column; past its top the count has long done its job.
            f"UPDATE {table} SET attempts = LEAST(attempts + 1, {MAX_ATTEMPTS}) WHERE id = %s "
            f"RETURNING attempts",
            [outbox_id],
        )
        row = cursor.fetchone()
    if row is None:
        return None
    published = attempts_when_published if isinstance(attempts_when_published, int) else 0
    return max(row[0] - published, 1)


def _retry_or_dead_letter(task, handler, event_data: dict, exc: Exception, settings) -> None:
    """After the handler raised `exc`: publish a retry, or dead-letter the row. Never drops the
    event: what cannot be recorded keeps the message (`_keep_for_later`)."""
    error = f"{handler.name}: {type(exc).__name__}: {exc}"
    retries = task.request.retries or 0
    if retries >= settings.max_retries:
        logger.error(
            "handler %s failed on event %s (%s) after %d attempt(s); dead-lettered: %s",
            handler.name,
            event_data["id"],
            event_data.get("event_type"),
            retries + 1,
            error,
        )
        _dead_letter(task, event_data["id"], error, retries + 1, settings)
        raise exc
    delay = retry_delay(settings, retries)
    logger.warning(
        "handler %s failed on event %s (%s), attempt %d; retrying in %.1fs: %s",
        handler.name,
        event_data["id"],
        event_data.get("event_type"),
        retries + 1,
        delay,
        error,
    )
    try:
        raise task.retry(exc=exc, countdown=delay) from exc
    except Reject as unpublished:
        # Celery's word for "the broker did not take the retry": it would ack this message and
        # the event would be gone. Dead-letter it instead: the failure is then on record, in
        # PostgreSQL, and replay sends it again once the broker is back. (Requeueing would hand
        # the message back to the broker that just failed us, at once and without a backoff.)
        error = f"{error} (its retry could not be published: {unpublished.reason!r})"
        logger.error(
            "task %s: %s; dead-lettered event %s", task.request.id, error, event_data["id"]
        )
        _dead_letter(task, event_data["id"], error, retries + 1, settings)
        raise exc from None


def _dead_letter(task, outbox_id: int, error: str, runs: int, settings: CelerySettings) -> None:
    """record_failure, or keep the message when the database cannot take it."""
    try:
        record_failure(outbox_id, error, runs)
    except DatabaseError as exc:
        logger.error(
            "could not dead-letter event %s (task %s); keeping the task to record it later: %s",
            outbox_id,
            task.request.id,
            exc,
        )
        _keep_for_later(task, exc, settings)


def _keep_for_later(task, exc: Exception, settings: CelerySettings) -> NoReturn:
    """Send the task again after a backoff, so that the message outlives this failure.

    The next run tries the handler again (at least once allows it) and, failing, the record.
    When even that cannot be published, reject the message back to its queue: the broker keeps
    it (or, unreachable, redelivers the unacked message itself).
    """
    delay = retry_delay(settings, task.request.retries or 0)
    try:
        raise task.retry(exc=exc, countdown=delay) from exc
    except Reject as unpublished:
        raise Reject(unpublished.reason, requeue=True) from exc


def retry_delay(settings: CelerySettings, retries: int, rand=random.random) -> float:
    """Delay before retry number `retries + 1`: half to all of base * 2^retries, capped.

    The relay's backoff: Celery counts retries from 0 where the policy counts attempts from 1.
    """
    policy = RetryPolicy(
        settings.max_retries + 1, settings.retry_backoff, settings.retry_backoff_max
    )
    return policy.delay(retries + 1, rand)


def _call(func, event_data) -> None:
    result = func(event_data)
    if inspect.isawaitable(result):
        asyncio.run(_await(result))


async def _await(awaitable):
    return await awaitable


def record_failure(outbox_id: int, error: str, runs: int = 0) -> bool:
    """Dead-letter one outbox row after its Celery handler gave up; False if the row is gone.

    `runs`: how many times the task ran the handler. The relay's `attempts` knows nothing of
    them (a row is published once), and status would show "after 0 attempt(s)": the row keeps
    the greater count (the relay's tries, or the redeliveries `count_redelivery` added).
    """
    from event_stream.models import Outbox

    # Stored as the relay stores its errors: a NUL that PostgreSQL refuses would fail the
    # record on every run, and the task would be kept for later (`_dead_letter`) for ever.
    (storable_error,) = storable([error[:MAX_ERROR_LENGTH]])
    runs_so_far = Value(min(runs, MAX_ATTEMPTS), output_field=SmallIntegerField())
    updated = Outbox.objects.filter(id=outbox_id).update(
        failed_at=Now(), last_error=storable_error, attempts=Greatest("attempts", runs_so_far)
    )
    if not updated:
        logger.warning("outbox row %s is gone; its failure was not recorded", outbox_id)
    return bool(updated)


# -- beat: cleanup ----------------------------------------------------------------------------


@shared_task(name=CLEANUP_TASK_NAME, ignore_result=True)
def cleanup_processed(retention_days: int | None = None, chunk_size: int = CLEANUP_CHUNK_SIZE):
    """Delete processed rows older than the retention, `chunk_size` ids per DELETE.

    Never touches pending or failed rows. Returns the number of rows deleted. Then VACUUM
    ANALYZE the outbox, as the seed's table maintenance does, so that the next events take the
    freed space at once (the outbox keeps its pages, see migration 0008) and the claim plans
    on the table's new size.
    """
    from event_stream.models import Outbox

    days = retention_days if retention_days is not None else load_celery_settings().retention_days
    cutoff = timezone.now() - datetime.timedelta(days=days)
    old = Outbox.objects.filter(
        processed_at__isnull=False, failed_at__isnull=True, processed_at__lt=cutoff
    )
    deleted = 0
    while True:
        with transaction.atomic():
            ids = list(old.order_by("processed_at").values_list("id", flat=True)[:chunk_size])
            if not ids:
                break
            # The filter again: a row replayed since the SELECT is kept.
            count, _ = old.filter(id__in=ids).delete()
        deleted += count
        if len(ids) < chunk_size:
            break
    logger.info("cleanup: deleted %d processed event(s) older than %d day(s)", deleted, days)
    if deleted:
        vacuum_outbox()
    return deleted


def vacuum_outbox() -> None:
    """VACUUM ANALYZE the outbox; only outside a transaction, where PostgreSQL allows it.

    SKIP_LOCKED: when another VACUUM (autovacuum, say) holds the table, that one does the work;
    waiting for it would hold the cleanup up for as long as it runs.
    """
    from event_stream.models import Outbox

    if connection.in_atomic_block:
        logger.warning("cleanup: not vacuuming the outbox: called inside a transaction")
        return
    table = connection.ops.quote_name(Outbox._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(f"VACUUM (ANALYZE, SKIP_LOCKED) {table}")


# -- beat: queue depth ------------------------------------------------------------------------


@shared_task(name=QUEUE_CHECK_TASK_NAME, ignore_result=True)
def check_queue_depth():
    """Record the queue depth, and log a warning (from 1,000 pending) or error (from 5,000), the
    thresholds of health (`event_stream.health`)."""
    from event_stream.health import collect
    from event_stream.models import QueueCheck

    report = collect()
    check = QueueCheck.objects.create(
        pending=report.unprocessed_events,
        failed=report.failed_events,
        oldest_pending_age_seconds=report.oldest_pending_age_seconds,
        status=report.status,
    )
    message = "queue depth: %d pending, %d failed, oldest pending %s s: %s"
    args = (report.unprocessed_events, report.failed_events, report.oldest_pending_age_seconds)
    if report.status == "critical":
        logger.error(message, *args, report.status)
    elif report.status == "warning":
        logger.warning(message, *args, report.status)
    else:
        logger.info(message, *args, report.status)
    return check.pk
