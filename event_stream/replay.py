"""Replay: put dead-lettered (failed) events back in the queue.

Used by `python manage.py outbox_replay` and the admin's "Replay failed events" action. A
replayed row is pending again: `processed_at` and `failed_at` cleared, `attempts` reset to 0,
`available_at` now; `last_error` stays, as the record of the last failure. Rows that are not
failed are never touched.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable

from django.db.models.functions import Now

from event_stream.models import Outbox


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
) -> int:
    """Put the selected failed events back in the queue; return how many."""
    rows = failed_rows(ids=ids, event_type=event_type, since=since, until=until, all=all)
    return rows.update(processed_at=None, failed_at=None, attempts=0, available_at=Now())
