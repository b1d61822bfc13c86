"""`python manage.py outbox_replay`: put failed (dead-lettered) events back in the queue.

    outbox_replay --id 42 --id 43
    outbox_replay --type issue.updated --since 2025-01-01T00:00 --until 2025-01-02
    outbox_replay --all

Filters combine (AND); --since/--until bound when the events failed. Bad input: one line on
stderr and exit status 2.
"""

from __future__ import annotations

import datetime

from django.core.management.base import CommandError
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from event_stream.management.parsing import StrictFlagsCommand
from event_stream.replay import replay_failed


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
        count = replay_failed(
            ids=ids or None, event_type=event_type, since=since, until=until, all=options["all"]
        )
        self.stdout.write(f"replayed {count} failed event(s)")
