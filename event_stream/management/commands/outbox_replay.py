"""`python manage.py outbox_replay`: put failed (dead-lettered) events back in the queue.

    outbox_replay --id 42 --id 43
    outbox_replay --type issue.updated --since 2025-01-01T00:00 --until 2025-01-02
    outbox_replay --all

Filters combine (AND); --since/--until bound when the events failed. Bad input: one line on
stderr and exit status 2. An --id that was not replayed (no such event, not failed, or left out
by another filter) is named on stderr, and the exit status is 1; so is a database that does
not answer.
"""

from __future__ import annotations

import datetime

from django.core.management.base import CommandError
from django.db import DatabaseError
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from event_stream.management.errors import database_unavailable
from event_stream.management.parsing import StrictFlagsCommand
from event_stream.models import Outbox
from event_stream.replay import failed_rows, replay_failed


def _bad(message: str) -> CommandError:
    return CommandError(message, returncode=2)


def parse_moment(flag: str, text: str) -> datetime.datetime:
    """An ISO 8601 date or date-time; naive values are in the project's time zone."""
    text = text.strip()
    try:
        moment = parse_datetime(text)
        if moment is None:
            day = parse_date(text)
            if day is not None:
                moment = datetime.datetime.combine(day, datetime.time())
    except ValueError:
        moment = None
    if moment is None:
        raise _bad(f"{flag}: not an ISO 8601 date or date-time: {text!r}")
    if timezone.is_naive(moment):
        moment = timezone.make_aware(moment)
    return moment


def parse_id(text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        value = 0
    if value < 1:
        raise _bad(f"--id: must be a positive integer, got {text!r}")
    return value


class Command(StrictFlagsCommand):
    help = "Put failed outbox events back in the queue (processed_at/failed_at cleared)."

    def add_arguments(self, parser):
        # Values stay text here, validated below, so a bad one gets one clear line.
        parser.add_argument(
            "--id",
            dest="ids",
            action="append",
            default=[],
            metavar="N",
            help="replay the failed event with this outbox id (repeatable)",
        )
        parser.add_argument("--all", action="store_true", help="replay every failed event")
        parser.add_argument(
            "--type", dest="event_type", metavar="T", help="only failed events of this event type"
        )
        parser.add_argument(
            "--since", metavar="ISO", help="only events that failed at or after this date/time"
        )
        parser.add_argument("--until", metavar="ISO",
                            help="only events that failed at or before this date/time")  # fmt: skip

    def handle(self, *args, **options):
        ids = [parse_id(i) for i in options["ids"]]
        since = parse_moment("--since", options["since"]) if options["since"] else None
        until = parse_moment("--until", options["until"]) if options["until"] else None
        event_type = options["event_type"]
        if event_type is not None and not event_type.strip():
            raise _bad("--type: must not be empty")
        if since and until and since > until:
            raise _bad("--since must not be after --until")
        if options["all"] and (ids or event_type or since or until):
            raise _bad("--all replays every failed event: combine it with no other filter")
        if not (options["all"] or ids or event_type or since or until):
            raise _bad("say what to replay: --id N, --type T, --since/--until ISO, or --all")
        filters = {"event_type": event_type, "since": since, "until": until}
        try:
            # Looked up before the replay, which makes the replayed rows pending like others.
            left_out = not_selected(ids, filters) if ids else {}
            count = replay_failed(ids=ids or None, all=options["all"], **filters)
        except DatabaseError as exc:
            raise database_unavailable(exc) from exc
        self.stdout.write(f"replayed {count} failed event(s)")
        if left_out:
            raise CommandError(f"not replayed: {describe(left_out)}", returncode=1)


def not_selected(ids: list[int], filters: dict) -> dict[int, str]:
    """The given ids the replay will not put back, each with why (its state, or "no such
    event"); the ids of a command line are few, so one lookup is enough."""
    selected = set(failed_rows(ids=ids, **filters).values_list("id", flat=True))
    rows = Outbox.objects.filter(id__in=set(ids) - selected)
    found = {row.id: row.state for row in rows.only("processed_at", "failed_at")}
    return {i: found.get(i, "no such event") for i in sorted(set(ids) - selected)}


def describe(left_out: dict[int, str]) -> str:
    why = {"failed": "failed, but not selected by --type/--since/--until"}
    return ", ".join(f"#{i} ({why.get(state, state)})" for i, state in left_out.items())
