"""The event stream's health: queue depth against the seed's thresholds, failures, live relays.

One query, on the outbox's partial indexes. `status` is the seed's health endpoint's: `healthy`
below 1,000 pending events, `warning` from 1,000, `critical` from 5,000 (`queue_health` is
`critical` then, `ok` otherwise). Counts stop at `COUNT_CAP`, so a huge backlog cannot make the
health check slow; `counts_capped` says when a count reached it.
"""

from __future__ import annotations

import datetime
from dataclasses import asdict, dataclass

from django.db import connections
from django.utils import timezone

from event_stream.models import Outbox, RelayHeartbeat
from event_stream.settings import RELAY_ALIVE_SECONDS

# The seed's endpoint code: `'healthy' if unprocessed_count < 1000 else 'warning'`, and `critical`
# from 5000 (its alerting table says "> 1,000"; the endpoint is what users call).
WARNING_THRESHOLD = 1_000  # pending events from this on: warning
CRITICAL_THRESHOLD = 5_000  # pending events from this on: critical
# RELAY_ALIVE_SECONDS (30): a relay whose heartbeat is older counts as gone. It lives with the
# heartbeat interval's bound (at most a third of it) in event_stream.settings.
COUNT_CAP = 1_000_000  # counts stop here


def status_for(pending: int) -> str:
    if pending >= CRITICAL_THRESHOLD:
        return "critical"
    if pending >= WARNING_THRESHOLD:
        return "warning"
    return "healthy"


@dataclass(frozen=True)
class HealthReport:
    status: str  # healthy | warning | critical
    unprocessed_events: int
    last_processed_at: datetime.datetime | None
    queue_health: str  # ok | critical
    failed_events: int
    oldest_pending_age_seconds: float | None
    relays_alive: int
    counts_capped: bool

    def as_json(self) -> dict:
        # `last_processed_at` stays a datetime: JsonResponse's encoder writes it as the seed's
        # endpoint does (ISO 8601, milliseconds, `Z` for UTC).
        return asdict(self)


def _sql() -> str:
    outbox = Outbox._meta.db_table
    relay = RelayHeartbeat._meta.db_table
    pending = "processed_at IS NULL AND failed_at IS NULL"
    return f"""
        SELECT
            (SELECT count(*) FROM (SELECT 1 FROM {outbox} WHERE {pending} LIMIT %(cap)s) AS p),
            (SELECT count(*) FROM (SELECT 1 FROM {outbox} WHERE failed_at IS NOT NULL
                                   LIMIT %(cap)s) AS f),
            (SELECT max(processed_at) FROM {outbox} WHERE processed_at IS NOT NULL),
            (SELECT extract(epoch FROM now() - created_at) FROM {outbox} WHERE {pending}
             ORDER BY id LIMIT 1),
            (SELECT count(*) FROM {relay}
             WHERE last_seen_at > now() - make_interval(secs => %(alive)s))
    """


def collect(using: str = "default") -> HealthReport:
    """Measure the event stream's health now (one query)."""
    with connections[using].cursor() as cursor:
        cursor.execute(_sql(), {"cap": COUNT_CAP, "alive": RELAY_ALIVE_SECONDS})
        pending, failed, last_processed_at, oldest_age, relays = cursor.fetchone()
    status = status_for(pending)
    return HealthReport(
        status=status,
        unprocessed_events=pending,
        last_processed_at=last_processed_at,
        queue_health="critical" if status == "critical" else "ok",
        failed_events=failed,
        # The oldest pending event is the one with the lowest id (ids follow insertion).
        oldest_pending_age_seconds=None if oldest_age is None else round(float(oldest_age), 3),
        relays_alive=relays,
        counts_capped=pending >= COUNT_CAP or failed >= COUNT_CAP,
    )


# -- outbox_status: the seed's monitoring queries, as one report ------------------------------

FAILED_SHOWN = 20  # failed events listed in the report


@dataclass(frozen=True)
class StatusReport:
    health: HealthReport
    pending_by_type: list[tuple[str, int]]
    failed: list[dict]  # the latest failed events: id, event_type, entity_id, failed_at, ...
    processed_last_minute: int
    processed_last_hour: int
    latency_avg_seconds: float | None  # processed_at - created_at, events processed last hour
    latency_p99_seconds: float | None
    latency_by_type: list[tuple[str, float]]
    relays: list[dict]  # every heartbeat row, with `alive`


def _rows(cursor, sql: str, params=None) -> list[tuple]:
    cursor.execute(sql, params or {})
    return cursor.fetchall()


def status_report(using: str = "default") -> StatusReport:
    outbox = Outbox._meta.db_table
    pending = "processed_at IS NULL AND failed_at IS NULL"
    recent = "processed_at > now() - interval '1 hour' AND failed_at IS NULL"
    latency = "extract(epoch FROM processed_at - created_at)"
    health = collect(using)
    with connections[using].cursor() as cursor:
        by_type = _rows(
            cursor,
            f"SELECT event_type, count(*) FROM {outbox} WHERE {pending} "
            f"GROUP BY event_type ORDER BY count(*) DESC, event_type",
        )
        failed = _rows(
            cursor,
            f"SELECT id, event_type, entity_id, failed_at, attempts, last_error FROM {outbox} "
            f"WHERE failed_at IS NOT NULL ORDER BY failed_at DESC, id DESC LIMIT %(n)s",
            {"n": FAILED_SHOWN},
        )
        ((last_minute, last_hour, avg, p99),) = _rows(
            cursor,
            f"SELECT count(*) FILTER (WHERE processed_at > now() - interval '1 minute'), "
            f"count(*), avg({latency}), "
            f"percentile_cont(0.99) WITHIN GROUP (ORDER BY {latency}) "
            f"FROM {outbox} WHERE {recent}",
        )
        latency_by_type = _rows(
            cursor,
            f"SELECT event_type, avg({latency}) FROM {outbox} WHERE {recent} "
            f"GROUP BY event_type ORDER BY event_type",
        )
    alive_since = timezone.now() - datetime.timedelta(seconds=RELAY_ALIVE_SECONDS)
    relays = [
        {
            "relay_id": str(r.relay_id),
            "hostname": r.hostname,
            "pid": r.pid,
            "started_at": r.started_at,
            "last_seen_at": r.last_seen_at,
            "alive": r.last_seen_at > alive_since,
            "processed_count": r.processed_count,
            "failed_count": r.failed_count,
            "memory_mb": r.memory_mb,
            "restarts": r.restarts,
        }
        for r in RelayHeartbeat.objects.using(using).order_by("-last_seen_at")
    ]
    columns = ("id", "event_type", "entity_id", "failed_at", "attempts", "last_error")
    return StatusReport(
        health=health,
        pending_by_type=[(t, n) for t, n in by_type],
        failed=[dict(zip(columns, row, strict=True)) for row in failed],
        processed_last_minute=last_minute,
        processed_last_hour=last_hour,
        latency_avg_seconds=None if avg is None else float(avg),
        latency_p99_seconds=None if p99 is None else float(p99),
        latency_by_type=[(t, float(a)) for t, a in latency_by_type],
        relays=relays,
    )
