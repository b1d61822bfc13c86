"""`outbox_status`: the seed's monitoring queries as one report."""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from django.core.management import call_command
from django.utils import timezone

from event_stream import health
from event_stream.health import status_report
from event_stream.models import Outbox, RelayHeartbeat

pytestmark = pytest.mark.django_db


def add(n, event_type="issue.updated", **fields):
    Outbox.objects.bulk_create(
        Outbox(event_type=event_type, entity_type="issue", payload={"p": 1}, **fields)
        for _ in range(n)
    )


@pytest.fixture
def activity():
    now = timezone.now()
    add(3, "issue.updated")
    add(1, "cycle.created")
    # processed: 2 within the last minute (0.5 s latency), 4 earlier in the hour (2 s)
    add(
        2,
        created_at=now - datetime.timedelta(seconds=10.5),
        processed_at=now - datetime.timedelta(seconds=10),
    )
    add(
        4,
        created_at=now - datetime.timedelta(minutes=30, seconds=2),
        processed_at=now - datetime.timedelta(minutes=30),
    )
    add(
        5,
        created_at=now - datetime.timedelta(hours=3),
        processed_at=now - datetime.timedelta(hours=2),
    )
    add(
        1,
        failed_at=now,
        attempts=10,
        last_error="search.index: TimeoutError: search took\ntoo long",
    )
    for age, host in [(2, "relay-a"), (300, "relay-b")]:
        RelayHeartbeat.objects.create(
            relay_id=uuid.uuid4(),
            hostname=host,
            pid=42,
            started_at=now - datetime.timedelta(hours=1),
            last_seen_at=now - datetime.timedelta(seconds=age),
            processed_count=12,
            memory_mb=80.5,
        )


def test_the_report(activity):
    report = status_report()
    assert report.pending_by_type == [("issue.updated", 3), ("cycle.created", 1)]
    assert report.processed_last_minute == 2
    assert report.processed_last_hour == 6
    assert report.latency_avg_seconds == pytest.approx((2 * 0.5 + 4 * 2) / 6, abs=0.01)
    assert report.latency_p99_seconds == pytest.approx(2, abs=0.01)
    assert [f["last_error"] for f in report.failed] == [
        "search.index: TimeoutError: search took\ntoo long"
    ]
    assert [(r["hostname"], r["alive"]) for r in report.relays] == [
        ("relay-a", True),
        ("relay-b", False),
    ]


def test_the_command_prints_every_section(activity, capsys):
    call_command("outbox_status")
    out = capsys.readouterr().out
    for section in [
        "Health",
        "Queue depth by event type",
        "Failed events",
        "Processing rate",
        "Latency",
        "Relays",
    ]:
        assert f"\n{section}" in f"\n{out}", section
    assert "status: healthy" in out
    assert "issue.updated" in out and "cycle.created" in out
    assert "search.index: TimeoutError: search took too long" in out  # on one line
    assert "last minute: 2" in out and "last hour: 6" in out
    assert "p99: 2.0 s" in out
    assert "relay-a:42 alive" in out and "relay-b:42 GONE" in out
    assert "{'p': 1}" not in out


def test_an_empty_outbox(capsys):
    call_command("outbox_status")
    out = capsys.readouterr().out
    assert "(none pending)" in out and "(no relay has reported)" in out


def test_a_large_outbox_is_read_only_in_part(activity, monkeypatch):
    """Given caps smaller than the activity, the report reads (and says it read) only part."""
    monkeypatch.setattr(health, "PENDING_BY_TYPE_CAP", 2)
    monkeypatch.setattr(health, "COUNT_CAP", 4)
    monkeypatch.setattr(health, "LATENCY_SAMPLE", 3)
    report = status_report()
    # the two oldest pending events are the first two issue.updated ones
    assert (report.pending_by_type, report.pending_by_type_capped) == ([("issue.updated", 2)], True)
    assert (report.processed_last_minute, report.processed_last_hour) == (2, 4)
    assert report.processed_counts_capped
    # the latest 3 processed: the two of the last minute (0.5 s) and one at 2 s
    assert report.latency_sample == 3
    assert report.latency_avg_seconds == pytest.approx((0.5 + 0.5 + 2) / 3, abs=0.01)


def test_relays_are_alive_by_the_database_clock(activity, monkeypatch, capsys):
    """The host running the command has a clock an hour ahead: relay-a, seen 2 s ago by the
    database's clock, is still alive, as health counts it."""
    skewed = timezone.now() + datetime.timedelta(hours=1)
    monkeypatch.setattr(timezone, "now", lambda: skewed)
    report = status_report()
    assert report.health.relays_alive == 1
    assert [(r["hostname"], r["alive"]) for r in report.relays] == [
        ("relay-a", True),
        ("relay-b", False),
    ]
    call_command("outbox_status")
    out = capsys.readouterr().out
    assert "relay-a:42 alive, last seen 2.0 s ago" in out


@pytest.mark.django_db(False)
def test_a_database_that_does_not_answer_is_one_line_and_exit_status_1():
    result = run_against_a_closed_port("outbox_status")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("CommandError: database unavailable: "), result.stderr


def run_against_a_closed_port(*argv: str) -> subprocess.CompletedProcess:
    """`manage.py <argv>` with DATABASE_URL naming a port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "DATABASE_URL": f"postgres://postgres@127.0.0.1:{port}/nothing"}
    return subprocess.run(
        [sys.executable, "manage.py", *argv],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
