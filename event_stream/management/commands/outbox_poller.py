"""`python manage.py outbox_poller`: parse and validate the flags, then run the relay."""

from __future__ import annotations

import sys

from django.core.management.base import CommandError

from event_stream.management.parsing import StrictFlagsCommand
from event_stream.service import OutboxEventService
from event_stream.settings import RELAY_OPTIONS, ConfigError, load_settings


class Command(StrictFlagsCommand):
    help = "Relay outbox events to their handlers (inline or Celery) until SIGTERM/SIGINT."
    # The relay validates its own settings and reports a bad one in one line, exit status 2.
    requires_system_checks = []

    def add_arguments(self, parser):
        # Values stay text here: load_settings validates them and names the culprit.
        for option in RELAY_OPTIONS:
            parser.add_argument(option.flag, dest=option.field, default=None, metavar="VALUE",
                                help=f"{option.help} [env {option.env}]")  # fmt: skip

    def handle(self, *args, **options):
        try:
            settings = load_settings({o.field: options.get(o.field) for o in RELAY_OPTIONS})
        except ConfigError as exc:
            raise CommandError(str(exc), returncode=2) from None
        status = OutboxEventService(settings).start()
        if status:
            sys.exit(status)
