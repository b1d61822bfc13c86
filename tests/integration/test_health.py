"""The health endpoint: the seed's fields and thresholds, plus failures, age and relays."""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import uuid

import pytest
from django.urls import reverse
from django.utils import timezone

from event_stream.health import RELAY_ALIVE_SECONDS, collect
from event_stream.models import Outbox, RelayHeartbeat
from tests.integration.celery_support import ROOT

pytestmark = pytest.mark.django_db

URL = "/event-stream/health/"


def add_events(n: int, **fields) -> None:
    Outbox.objects.bulk_create(
        Outbox(
            event_type="test.changed", entity_type="test", payload={"secret": "s3cr3t"}, **fields
        )
        for _ in range(n)
    )


def heartbeat(age_seconds: float) -> None:
    now = timezone.now()
    RelayHeartbeat.objects.create(
        relay_id=uuid.uuid4(),
        hostname="host",
        pid=1,
        started_at=now - datetime.timedelta(hours=1),
        last_seen_at=now - datetime.timedelta(seconds=age_seconds),
    )


def test_the_url_is_documented():
    assert reverse("event_stream:health") == URL


def test_an_empty_outbox_is_healthy(client):
    response = client.get(URL)
    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert "no-cache" in response["Cache-Control"]
    assert response.json() == {
        "status": "healthy",
        "unprocessed_events": 0,
        "last_processed_at": None,
        "queue_health": "ok",
        "failed_events": 0,
        "oldest_pending_age_seconds": None,
        "relays_alive": 0,
        "counts_capped": False,
    }


def test_reports_failures_age_last_processed_and_live_relays(client):
    processed_at = timezone.now() - datetime.timedelta(minutes=5)
    add_events(3, created_at=timezone.now() - datetime.timedelta(minutes=10))
    add_events(2, processed_at=processed_at)
    add_events(4, failed_at=timezone.now(), last_error="boom")
    heartbeat(1)
    heartbeat(RELAY_ALIVE_SECONDS - 5)
    heartbeat(RELAY_ALIVE_SECONDS + 5)  # gone

    response = client.get(URL)
    body = response.json()
    assert response.status_code == 200
    assert body["unprocessed_events"] == 3
    assert body["failed_events"] == 4
    assert body["relays_alive"] == 2
    assert 599 < body["oldest_pending_age_seconds"] < 700
    # As the seed's endpoint writes it (JsonResponse): ISO 8601, milliseconds, Z.
    assert body["last_processed_at"] == (
        processed_at.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        + f"{processed_at.microsecond // 1000:03d}Z"
    )
    assert "s3cr3t" not in response.content.decode()


def test_the_seed_thresholds(client):
    # The seed's endpoint: healthy below 1,000 pending, warning from 1,000, critical from 5,000.
    add_events(5_000)
    pending = Outbox.objects.pending().order_by("id")

    def status():
        response = client.get(URL)
        body = response.json()
        return response.status_code, body["status"], body["queue_health"]

    def process(n):
        Outbox.objects.filter(id__in=pending.values("id")[:n]).update(processed_at=timezone.now())

    assert status() == (503, "critical", "critical")  # 5,000
    process(1)
    assert status() == (200, "warning", "ok")  # 4,999
    process(3_999)
    assert status() == (200, "warning", "ok")  # 1,000
    process(1)
    assert status() == (200, "healthy", "ok")  # 999


def test_failed_events_do_not_count_as_pending():
    add_events(6_000, failed_at=timezone.now(), last_error="x")
    report = collect()
    assert (report.status, report.unprocessed_events, report.failed_events) == (
        "healthy",
        0,
        6_000,
    )


def test_counts_stop_at_the_cap(monkeypatch):
    monkeypatch.setattr("event_stream.health.COUNT_CAP", 10)
    add_events(25)
    report = collect()
    assert report.unprocessed_events == 10 and report.counts_capped


def test_one_query(django_assert_num_queries):
    add_events(3)
    with django_assert_num_queries(1):
        collect()


def test_only_get_and_head(client):
    assert client.head(URL).status_code == 200  # monitors and load balancers send HEAD
    assert client.post(URL).status_code == 405


@pytest.mark.slow
def test_a_database_that_does_not_answer_is_a_503_not_a_server_error():
    # A real connection failure: the view runs in a process whose database is a port nothing
    # listens on.
    script = (
        "from django.test import Client; r = Client().get('/event-stream/health/'); "
        "print(r.status_code, r.content.decode())"
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "manage.py", "shell", "-c", script],
            cwd=ROOT,
            env={**os.environ, "DATABASE_URL": f"postgres://postgres@127.0.0.1:{port}/none"},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 0, result.stderr
    status, body = result.stdout.strip().splitlines()[-1].split(" ", 1)  # after shell's banner
    assert status == "503"
    assert json.loads(body) == {
        "status": "critical",
        "queue_health": "unknown",
        "error": "database unavailable",
    }
    assert "the database did not answer" in result.stderr
