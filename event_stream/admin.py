"""Admin: the outbox (read-only, with a "Replay failed events" action), heartbeats, checks."""

from __future__ import annotations

import uuid
from functools import cached_property

from django.contrib import admin, messages
from django.core.paginator import Paginator
from django.db.models import Q

from event_stream.models import PENDING, Outbox, QueueCheck, RelayHeartbeat
from event_stream.replay import replay_failed


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


# The changelist counts at most this many rows: Django's paginator counts every matching row
# for its page links, a COUNT(*) that takes seconds on an outbox of millions. Past the cap it
# shows this many (page 2,000 at 100 a page); filters and the search narrow further.
CHANGELIST_COUNT_CAP = 200_000
# The event type filter offers the types among this many latest rows: a DISTINCT over the whole
# outbox would read all of it at every page view (no index has event_type first).
EVENT_TYPES_FROM_LATEST = 10_000


class CappedCountPaginator(Paginator):
    """A paginator whose count stops at CHANGELIST_COUNT_CAP (a COUNT over a LIMIT)."""

    @cached_property
    def count(self) -> int:
        return self.object_list.order_by()[:CHANGELIST_COUNT_CAP].count()


class RecentEventTypeFilter(admin.SimpleListFilter):
    """Event types seen among the latest rows, plus the one asked for (any type works in the
    URL): cheap on a large outbox, read backwards along its primary key."""

    title = "event type"
    parameter_name = "event_type"

    def lookups(self, request, model_admin):
        latest = Outbox.objects.order_by("-id").values("id")[:EVENT_TYPES_FROM_LATEST]
        types = set(
            Outbox.objects.filter(id__in=latest).values_list("event_type", flat=True).distinct()
        )
        if self.value():
            types.add(self.value())
        return [(t, t) for t in sorted(types)]

    def queryset(self, request, queryset):
        return queryset if self.value() is None else queryset.filter(event_type=self.value())


class StateFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    STATES = {
        "pending": PENDING,
        "processed": Q(processed_at__isnull=False, failed_at__isnull=True),
        "failed": Q(failed_at__isnull=False),
    }

    def lookups(self, request, model_admin):
        return [(state, state) for state in self.STATES]

    def queryset(self, request, queryset):
        condition = self.STATES.get(self.value())
        return queryset if condition is None else queryset.filter(condition)


@admin.register(Outbox)
class OutboxAdmin(ReadOnlyAdmin):
    list_display = [
        "id",
        "event_type",
        "entity_id",
        "state",
        "attempts",
        "created_at",
        "processed_at",
        "failed_at",
        "short_error",
    ]
    list_filter = [StateFilter, RecentEventTypeFilter]
    search_fields = ["entity_id"]  # exact UUID, see get_search_results
    search_help_text = "An entity id (UUID), exactly."
    ordering = ["-id"]
    show_full_result_count = False  # no second COUNT(*) over a large table
    paginator = CappedCountPaginator
    actions = ["replay_failed_events"]
    readonly_fields = [f.name for f in Outbox._meta.fields]

    @admin.display(description="state")
    def state(self, obj: Outbox) -> str:
        return obj.state

    @admin.display(description="last error")
    def short_error(self, obj: Outbox) -> str:
        error = obj.last_error or ""
        return error if len(error) <= 80 else error[:79] + "…"

    def get_search_results(self, request, queryset, search_term):
        term = search_term.strip()
        if not term:
            return queryset, False
        try:
            entity_id = uuid.UUID(term)
        except ValueError:
            return queryset.none(), False
        return queryset.filter(entity_id=entity_id), False

    def has_replay_permission(self, request) -> bool:
        return request.user.has_perm("event_stream.change_outbox")

    @admin.action(description="Replay failed events", permissions=["replay"])
    def replay_failed_events(self, request, queryset):
        # Counted before the replay: the selection may be a filter (state=failed) that the
        # replayed rows leave, so a count after it would miss them.
        selected = queryset.count()
        ids = list(queryset.filter(failed_at__isnull=False).values_list("id", flat=True))
        count = replay_failed(ids=ids) if ids else 0
        skipped = selected - count
        message = f"{count} failed event(s) put back in the queue."
        if skipped:
            message += f" {skipped} selected event(s) were not failed and were left alone."
        self.message_user(request, message, messages.SUCCESS if count else messages.WARNING)


@admin.register(RelayHeartbeat)
class RelayHeartbeatAdmin(ReadOnlyAdmin):
    list_display = [
        "hostname",
        "pid",
        "relay_id",
        "started_at",
        "last_seen_at",
        "processed_count",
        "failed_count",
        "memory_mb",
        "restarts",
    ]
    ordering = ["-last_seen_at"]


@admin.register(QueueCheck)
class QueueCheckAdmin(ReadOnlyAdmin):
    list_display = ["checked_at", "status", "pending", "failed", "oldest_pending_age_seconds"]
    list_filter = ["status"]
    date_hierarchy = "checked_at"
