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
# outbox_status reads a bounded number of rows whatever the outbox holds: the seed's queries
# (a GROUP BY over every pending row, an average over every processed one) read millions on a
# busy outbox. Pending events are counted by type among the oldest PENDING_BY_TYPE_CAP; the
# processing counts stop at COUNT_CAP; latency is measured on the LATENCY_SAMPLE events
# processed last in the hour (at 1,000 events/s, the last 100 s).
PENDING_BY_TYPE_CAP = 100_000
LATENCY_SAMPLE = 100_000


@dataclass(frozen=True)
class StatusReport:
    health: HealthReport
    pending_by_type: list[tuple[str, int]]  # among the oldest PENDING_BY_TYPE_CAP pending
    pending_by_type_capped: bool
    failed: list[dict]  # the latest failed events: id, event_type, entity_id, failed_at, ...
    processed_last_minute: int  # both stop at COUNT_CAP
    processed_last_hour: int
    processed_counts_capped: bool
    latency_sample: int  # the events the latency figures come from (at most LATENCY_SAMPLE)
    latency_avg_seconds: float | None  # processed_at - created_at, events processed last hour
    latency_p99_seconds: float | None
    latency_by_type: list[tuple[str, float]]
    relays: list[dict]  # every heartbeat row, with `alive` and `seen_seconds_ago`


def _rows(cursor, sql: str, params=None) -> list[tuple]:
    cursor.execute(sql, params or {})
    return cursor.fetchall()


_OUTBOX = Outbox._meta.db_table
_PENDING = "processed_at IS NULL AND failed_at IS NULL"
_PROCESSED_SINCE = "processed_at > now() - interval '{}' AND failed_at IS NULL"

# The oldest pending rows, in id order on the pending index, then grouped.
PENDING_BY_TYPE_SQL = f"""
    SELECT event_type, count(*) FROM (
        SELECT event_type FROM {_OUTBOX} WHERE {_PENDING} ORDER BY id LIMIT %(cap)s
    ) AS oldest
    GROUP BY event_type ORDER BY count(*) DESC, event_type
"""

FAILED_SQL = f"""
    SELECT id, event_type, entity_id, failed_at, attempts, last_error FROM {_OUTBOX}
    WHERE failed_at IS NOT NULL ORDER BY failed_at DESC, id DESC LIMIT %(n)s
"""

PROCESSED_COUNTS_SQL = f"""
    SELECT
        (SELECT count(*) FROM (SELECT 1 FROM {_OUTBOX}
                               WHERE {_PROCESSED_SINCE.format("1 minute")} LIMIT %(cap)s) AS m),
        (SELECT count(*) FROM (SELECT 1 FROM {_OUTBOX}
                               WHERE {_PROCESSED_SINCE.format("1 hour")} LIMIT %(cap)s) AS h)
"""

# The latest events processed in the hour, walked backwards on the processed index; one row
# for all of them (event_type NULL), then one per type.
LATENCY_SQL = f"""
    WITH latest AS MATERIALIZED (
        SELECT event_type, extract(epoch FROM processed_at - created_at) AS seconds
        FROM {_OUTBOX} WHERE {_PROCESSED_SINCE.format("1 hour")}
        ORDER BY processed_at DESC LIMIT %(sample)s
    )
    SELECT event_type, count(*), avg(seconds),
           percentile_cont(0.99) WITHIN GROUP (ORDER BY seconds)
    FROM latest GROUP BY GROUPING SETS ((), (event_type))
    ORDER BY event_type NULLS FIRST
"""

# Alive and age by the database's clock, which wrote last_seen_at (health counts the live
# relays the same way); the clock of the host running the command may be off.
RELAYS_SQL = f"""
    SELECT relay_id::text, hostname, pid, started_at, last_seen_at, processed_count,
           failed_count, memory_mb, restarts,
           last_seen_at > now() - make_interval(secs => %(alive)s),
           extract(epoch FROM now() - last_seen_at)::float8
    FROM {RelayHeartbeat._meta.db_table} ORDER BY last_seen_at DESC
"""
RELAY_COLUMNS = (
    "relay_id", "hostname", "pid", "started_at", "last_seen_at", "processed_count",
    "failed_count", "memory_mb", "restarts", "alive", "seen_seconds_ago",
)  # fmt: skip
FAILED_COLUMNS = ("id", "event_type", "entity_id", "failed_at", "attempts", "last_error")


def status_report(using: str = "default") -> StatusReport:
    health = collect(using)
    with connections[using].cursor() as cursor:
        by_type = _rows(cursor, PENDING_BY_TYPE_SQL, {"cap": PENDING_BY_TYPE_CAP})
        failed = _rows(cursor, FAILED_SQL, {"n": FAILED_SHOWN})
        ((last_minute, last_hour),) = _rows(cursor, PROCESSED_COUNTS_SQL, {"cap": COUNT_CAP})
        latency = _rows(cursor, LATENCY_SQL, {"sample": LATENCY_SAMPLE})
        relays = _rows(cursor, RELAYS_SQL, {"alive": RELAY_ALIVE_SECONDS})
    (_, sample, avg, p99), *per_type = latency
    return StatusReport(
        health=health,
        pending_by_type=[(t, n) for t, n in by_type],
        pending_by_type_capped=sum(n for _, n in by_type) >= PENDING_BY_TYPE_CAP,
        failed=[dict(zip(FAILED_COLUMNS, row, strict=True)) for row in failed],
        processed_last_minute=last_minute,
        processed_last_hour=last_hour,
        processed_counts_capped=last_hour >= COUNT_CAP,
        latency_sample=sample,
        latency_avg_seconds=None if avg is None else float(avg),
        latency_p99_seconds=None if p99 is None else float(p99),
        latency_by_type=[(t, float(a)) for t, _, a, _ in per_type],
        relays=[dict(zip(RELAY_COLUMNS, row, strict=True)) for row in relays],
    )
