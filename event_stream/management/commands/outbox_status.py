"""`python manage.py outbox_status`: the seed's monitoring queries as one readable report.

Sections: health, queue depth by event type, failed events with their last error, processing
rate (last minute, last hour), latency (processed_at - created_at: average and p99, last hour),
and the relays with their heartbeats. A database that does not answer: one line on stderr,
exit status 1.
"""

from __future__ import annotations

from django.db import DatabaseError

from event_stream.health import (
    COUNT_CAP,
    FAILED_SHOWN,
    PENDING_BY_TYPE_CAP,
    RELAY_ALIVE_SECONDS,
    StatusReport,
    status_report,
)
from event_stream.management.errors import database_unavailable
from event_stream.management.parsing import StrictFlagsCommand


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    return f"{value:.1f} s"


def _when(moment) -> str:
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S %Z")


def _one_line(text: str | None, width: int = 100) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[: width - 1] + "…"


def render(report: StatusReport) -> list[str]:
    h = report.health
    lines = [
        "Health",
        f"  status: {h.status} (queue_health: {h.queue_health})",
        f"  pending events: {h.unprocessed_events}"
        + (" (count capped)" if h.counts_capped else ""),
        f"  failed events: {h.failed_events}",
        f"  oldest pending: {_seconds(h.oldest_pending_age_seconds)}",
        f"  last processed at: {_when(h.last_processed_at)}",
        f"  relays alive: {h.relays_alive}",
        "",
        "Queue depth by event type"
        + (f" (the oldest {PENDING_BY_TYPE_CAP} pending)" if report.pending_by_type_capped else ""),
    ]
    lines += [f"  {t:<40} {n:>10}" for t, n in report.pending_by_type] or ["  (none pending)"]
    lines += ["", f"Failed events (latest {FAILED_SHOWN})"]
    lines += [
        f"  #{f['id']} {f['event_type']} entity {f['entity_id']} failed {_when(f['failed_at'])}"
        f" after {f['attempts']} attempt(s): {_one_line(f['last_error'])}"
        for f in report.failed
    ] or ["  (none)"]
    minute, hour = report.processed_last_minute, report.processed_last_hour
    # A count that reached the cap is a lower bound: "1000000+ (277.8+/s)".
    at_least = "+" if report.processed_counts_capped else ""
    minute_capped = "+" if minute >= COUNT_CAP else ""
    lines += [
        "",
        "Processing rate",
        f"  last minute: {minute}{minute_capped} ({minute / 60:.1f}{minute_capped}/s)",
        f"  last hour: {hour}{at_least} ({hour / 3600:.1f}{at_least}/s)",
        "",
        "Latency (processed_at - created_at, "
        + (
            f"the latest {report.latency_sample} events processed in the last hour)"
            if report.latency_sample < hour
            else "events processed in the last hour)"
        ),
        f"  average: {_seconds(report.latency_avg_seconds)}",
        f"  p99: {_seconds(report.latency_p99_seconds)}",
    ]
    lines += [f"  {t:<40} avg {_seconds(a)}" for t, a in report.latency_by_type]
    lines += ["", f"Relays (alive: heartbeat within {RELAY_ALIVE_SECONDS} s)"]
    lines += [
        f"  {r['hostname']}:{r['pid']} {'alive' if r['alive'] else 'GONE'}"
        f", last seen {_seconds(r['seen_seconds_ago'])} ago"
        f", started {_when(r['started_at'])}, processed {r['processed_count']}"
        f", failed {r['failed_count']}, memory {r['memory_mb']:.0f} MB, restarts {r['restarts']}"
        for r in report.relays
    ] or ["  (no relay has reported)"]
    return lines


class Command(StrictFlagsCommand):
    help = "Report the event stream's queue depth, failures, processing rate, latency and relays."

    def handle(self, *args, **options):
        try:
            report = status_report()
        except DatabaseError as exc:
            raise database_unavailable(exc) from exc
        for line in render(report):
            self.stdout.write(line)
