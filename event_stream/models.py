"""The outbox table and the relays' heartbeats."""

from __future__ import annotations

from django.db import models
from django.db.models import Q
from django.db.models.functions import Now

from event_stream.capture import outbox_notify_trigger
from event_stream.events import make_event_data

PENDING = Q(processed_at__isnull=True, failed_at__isnull=True)


class JSONTextField(models.JSONField):
    """A JSONField stored as PostgreSQL `json` (the text as written), not `jsonb`.

    The outbox's payload is written once by a trigger and read once by the relay, never queried
    inside. As `json`, the trigger writes the text it built (building the payload as jsonb cost
    twice as much: 19 against 10 us a row) and the relay reads it back as is (rendering jsonb as
    text was 40% of a 1000-row claim's server time). Values and JSON types are the same.
    """

    def db_type(self, connection) -> str:
        return "json"

    def from_db_value(self, value, expression, connection):
        # psycopg decodes `json` itself (Django registers a text loader for `jsonb` only).
        if value is None or not isinstance(value, str):
            return value
        return super().from_db_value(value, expression, connection)


class OutboxQuerySet(models.QuerySet):
    def pending(self):
        """Waiting to be handled: neither processed nor dead-lettered."""
        return self.filter(PENDING)

    def processed(self):
        return self.filter(processed_at__isnull=False)

    def failed(self):
        """Dead-lettered: attempts exhausted, or malformed. Replay puts them back."""
        return self.filter(failed_at__isnull=False)


class Outbox(models.Model):
    """One captured change, written by a trigger in the writer's transaction.

    The seed's columns and index names, plus what retries, dead-lettering and ordering need.
    Database defaults (`db_default`) let triggers and hand-written SQL insert just the event.
    """

    id = models.BigAutoField(primary_key=True)
    event_id = models.UUIDField(db_default=models.Func(function="gen_random_uuid"))
    event_type = models.CharField(max_length=255)
    entity_type = models.CharField(max_length=255)
    # Events of one entity are handled in order. Null only for hand-written rows; those have
    # no entity to order by and are handled independently.
    entity_id = models.UUIDField(null=True, blank=True)
    payload = JSONTextField()
    processed_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(db_default=Now())
    # Retries: how often handling was tried, when the next try may start, and why it failed.
    # Not a PositiveSmallIntegerField: its CHECK constraint is set up again by every statement
    # that inserts into the outbox, a measurable part of a single-row write's capture cost.
    attempts = models.SmallIntegerField(db_default=0)
    available_at = models.DateTimeField(db_default=Now())
    last_error = models.TextField(null=True, blank=True)
    # Dead letter: set when the attempts ran out or the row cannot be handled at all.
    failed_at = models.DateTimeField(null=True, blank=True)

    objects = OutboxQuerySet.as_manager()

    class Meta:
        db_table = "outbox"
        indexes = [
            # The relay's claim scans pending rows in id order. No index on the entity: every
            # captured change would pay for it; the ordered claim finds blockers by that scan.
            models.Index(fields=["id"], name="outbox_unprocessed_idx", condition=PENDING),
            # Cleanup, processing rate and latency reports.
            models.Index(
                fields=["processed_at"],
                name="outbox_processed_idx",
                condition=Q(processed_at__isnull=False),
            ),
            models.Index(
                fields=["failed_at"], name="outbox_failed_idx", condition=Q(failed_at__isnull=False)
            ),
        ]
        triggers = [outbox_notify_trigger()]

    def __str__(self) -> str:
        return f"{self.event_type} #{self.id}"

    def event_data(self) -> dict:
        """The event_data dict a handler gets for this row (see events.make_event_data)."""
        return make_event_data(
            id=self.id,
            event_id=self.event_id,
            event_type=self.event_type,
            entity_type=self.entity_type,
            entity_id=self.entity_id,
            payload=self.payload,
            created_at=self.created_at,
            attempts=self.attempts,
        )

    @property
    def state(self) -> str:
        if self.failed_at is not None:
            return "failed"
        if self.processed_at is not None:
            return "processed"
        return "pending"


class RelayHeartbeat(models.Model):
    """One row per running relay process, refreshed while it runs.

    Health and `outbox_status` count a relay as alive while `last_seen_at` is recent.
    """

    relay_id = models.UUIDField(primary_key=True)
    hostname = models.CharField(max_length=255)
    pid = models.IntegerField()
    started_at = models.DateTimeField()
    last_seen_at = models.DateTimeField()
    processed_count = models.BigIntegerField(default=0)
    failed_count = models.BigIntegerField(default=0)
    memory_mb = models.FloatField(default=0)
    restarts = models.IntegerField(default=0)

    class Meta:
        db_table = "outbox_relay"

    def __str__(self) -> str:
        return f"relay {self.hostname}:{self.pid}"


class QueueCheck(models.Model):
    """What beat's minute-by-minute queue-depth check saw (`event_stream.check_queue_depth`)."""

    STATUSES = [("healthy", "healthy"), ("warning", "warning"), ("critical", "critical")]

    checked_at = models.DateTimeField(db_default=Now(), db_index=True)
    pending = models.BigIntegerField()
    failed = models.BigIntegerField()
    oldest_pending_age_seconds = models.FloatField(null=True, blank=True)
    status = models.CharField(max_length=16, choices=STATUSES)

    class Meta:
        db_table = "outbox_queue_check"
        ordering = ["-checked_at"]

    def __str__(self) -> str:
        return f"{self.status} at {self.checked_at:%Y-%m-%d %H:%M:%S}: {self.pending} pending"
