"""Replay: put dead-lettered (failed) events back in the queue.

Used by `python manage.py outbox_replay` and the admin's "Replay failed events" action. A
replayed row is pending again: `processed_at` and `failed_at` cleared, `attempts` reset to 0,
`available_at` now; `last_error` stays, as the record of the last failure. Rows that are not
failed are never touched.

A replay works through its rows `REPLAY_CHUNK` at a time, each chunk one short UPDATE of its
own (in autocommit, its own transaction): a million failed rows are never one statement that
holds a million row locks and a transaction open for minutes (a Celery worker dead-lettering
another handler's failure of one of those rows would wait for all of it), and no more than one
chunk's ids is ever in memory. Rows dead-lettered after the replay started are left for the
next replay, so a replay always ends.

Per-entity order: a replayed event keeps its place (its id). The later events of its entity
that flowed while it was dead-lettered have been handled already, so it is handled after them;
one that a relay is handling right now is waited for (`_wait_for_their_entities_in_flight`), so
that the two never run at once.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Iterator

from django.db import connections, transaction
from django.db.models import Q
from django.db.models.functions import Now

from event_stream.models import Outbox

REPLAY_CHUNK = 10_000  # rows per UPDATE (and per transaction)


def failed_rows(
    ids: Iterable[int] | None = None,
    event_type: str | None = None,
    since: datetime.datetime | None = None,
    until: datetime.datetime | None = None,
    all: bool = False,
):
    """The failed rows a replay with these arguments would put back.

    `since`/`until` bound when the rows failed (`failed_at`, inclusive). Without `all=True`,
    at least one of ids, event_type, since or until is required.
    """
    ids = None if ids is None else list(ids)
    if not all and not ids and event_type is None and since is None and until is None:
        raise ValueError(
            "say which failed events to replay: ids, an event type, a time range, or all"
        )
    rows = Outbox.objects.failed()
    if ids:
        rows = rows.filter(id__in=ids)
    if event_type is not None:
        rows = rows.filter(event_type=event_type)
    if since is not None:
        rows = rows.filter(failed_at__gte=since)
    if until is not None:
        rows = rows.filter(failed_at__lte=until)
    return rows


def replay_failed(
    ids: Iterable[int] | None = None,
    event_type: str | None = None,
    since: datetime.datetime | None = None,
    until: datetime.datetime | None = None,
    all: bool = False,
    chunk_size: int = REPLAY_CHUNK,
) -> int:
    """Put the selected failed events back in the queue, `chunk_size` rows per UPDATE; return
    how many."""
    filters = {"event_type": event_type, "since": since, "until": until, "all": all}
    rows = failed_rows(ids=ids, **filters)  # validates the selection
    if ids is not None:
        chunks = _chunks_of_given_ids(list(ids), chunk_size, filters)
    else:
        chunks = _chunks_of_failed_ids(rows.filter(failed_at__lte=_database_now()), chunk_size)
    return sum(_put_back(chunk) for chunk in chunks)


def _database_now() -> datetime.datetime:
    # The database's clock, which wrote every failed_at; the app server's may differ.
    with connections[Outbox.objects.db].cursor() as cursor:
        cursor.execute("SELECT clock_timestamp()")
        return cursor.fetchone()[0]


def _chunks_of_given_ids(ids: list[int], chunk_size: int, filters: dict) -> Iterator[list[int]]:
    """The given ids, `chunk_size` at a time, kept to those that the filters select."""
    unique = sorted(set(ids))
    for start in range(0, len(unique), chunk_size):
        chunk = unique[start : start + chunk_size]
        yield list(failed_rows(ids=chunk, **filters).values_list("id", flat=True))


def _chunks_of_failed_ids(rows, chunk_size: int) -> Iterator[list[int]]:
    """Ids of `rows`, `chunk_size` at a time, walking the failed index in (failed_at, id) order.

    Each page starts after the last row of the one before (keyset): pages already replayed are
    never read again, however many there were.
    """
    after = None
    while True:
        page = rows
        if after is not None:
            last_failed_at, last_id = after
            page = rows.filter(failed_at__gte=last_failed_at).filter(
                Q(failed_at__gt=last_failed_at) | Q(id__gt=last_id)
            )
        keys = list(page.order_by("failed_at", "id").values_list("failed_at", "id")[:chunk_size])
        if not keys:
            return
        yield [row_id for _, row_id in keys]
        after = keys[-1]


def _put_back(ids: list[int]) -> int:
    """One chunk's UPDATE. It checks `failed_at` again: a row that another replay (or the admin)
    put back meanwhile may be claimed by a relay now, and must not be reset under it."""
    if not ids:
        return 0
    with transaction.atomic(using=Outbox.objects.db):
        _wait_for_their_entities_in_flight(ids)
        return Outbox.objects.filter(id__in=ids, failed_at__isnull=False).update(
            processed_at=None, failed_at=None, attempts=0, available_at=Now()
        )


# The pending events of the replayed rows' entities, locked in id order. A relay holds the rows
# of its batch locked until it has handled them: taking them waits for that batch to end. And a
# relay claims nothing that is locked: until this transaction commits, no other event of these
# entities can be claimed. The replayed event is an older one of its entity, which the relay's
# claim would not hold back for a later event in flight: without this wait the two would be
# handled at once.
_WAIT_FOR_ENTITIES_IN_FLIGHT = """
    SELECT pending.id FROM {outbox} AS pending
    WHERE pending.processed_at IS NULL AND pending.failed_at IS NULL
      AND pending.entity_id IN (
          SELECT replayed.entity_id FROM {outbox} AS replayed
          WHERE replayed.id = ANY(%s) AND replayed.entity_id IS NOT NULL)
    ORDER BY pending.id
    FOR UPDATE OF pending
"""


def _wait_for_their_entities_in_flight(ids: list[int]) -> None:
    outbox = connections[Outbox.objects.db].ops.quote_name(Outbox._meta.db_table)
    with connections[Outbox.objects.db].cursor() as cursor:
        cursor.execute(_WAIT_FOR_ENTITIES_IN_FLIGHT.format(outbox=outbox), [ids])
