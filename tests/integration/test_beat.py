"""Beat: the schedule created by migrations, the cleanup and the queue-depth check."""

from __future__ import annotations

import datetime
import logging
import os
import subprocess
import sys
import uuid

import psycopg
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from celery_app import CHECKS_QUEUE
from event_stream.celery_dispatch import CeleryPublisher
from event_stream.events import make_event_data
from event_stream.models import Outbox, QueueCheck
from event_stream.tasks import QUEUE_CHECK_TASK_NAME, check_queue_depth, cleanup_processed
from tests.integration.celery_support import (
    DEFAULT_QUEUES_REDIS_DB,
    ROOT,
    Worker,
    database_url,
    forget_app_queues,
    forget_queue,
    make_app,
    redis_url_for_tests,
    wait_until,
)

pytestmark = pytest.mark.django_db

SENT = "Sending due task event_stream: queue depth check (event_stream.check_queue_depth)"


def add_events(n: int, **fields) -> None:
    fields.setdefault("payload", {})
    Outbox.objects.bulk_create(
        Outbox(event_type="test.changed", entity_type="test", **fields) for _ in range(n)
    )


class TestSchedule:
    def test_migrate_creates_the_periodic_tasks(self):
        tasks = {t.task: t for t in PeriodicTask.objects.filter(task__startswith="event_stream.")}
        cleanup = tasks["event_stream.cleanup_processed"]
        assert cleanup.enabled and cleanup.interval is None
        assert (cleanup.crontab.minute, cleanup.crontab.hour) == ("30", "3")
        assert cleanup.crontab.day_of_week == "*"
        check = tasks["event_stream.check_queue_depth"]
        assert check.enabled and check.crontab is None
        assert (check.interval.every, check.interval.period) == (1, "minutes")

    @pytest.mark.slow
    def test_beat_runs_on_the_database_schedule(self, tmp_path, conninfo):
        """`celery -A celery_app beat` starts on the DatabaseScheduler and sends the check."""
        # Given a check that last ran two minutes ago (committed, for beat to see), so it is due
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(
                "UPDATE django_celery_beat_periodictask SET last_run_at = now() - interval '2 min'"
                " WHERE task = 'event_stream.check_queue_depth'"
            )
        log = tmp_path / "beat.log"
        env = {
            **os.environ,
            "DATABASE_URL": database_url(connection.settings_dict),
            "CELERY_BROKER_URL": redis_url_for_tests(),
        }
        with log.open("wb") as out:
            beat = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "celery_app", "beat", "-l", "DEBUG",
                 "-s", str(tmp_path / "schedule")],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
            try:
                wait_until(lambda: SENT in log.read_text() or beat.poll() is not None, timeout=60)
            finally:
                beat.terminate()
                beat.wait(timeout=15)
                # what beat sent went to the check's queue of the test Redis database
                forget_queue(CHECKS_QUEUE)
        text = log.read_text()
        sent = SENT in text
        assert "DatabaseScheduler" in text, text[-3000:]
        assert sent, text[-3000:]


class TestCleanup:
    def test_deletes_only_processed_rows_past_retention_in_chunks(self):
        now = timezone.now()
        old, recent = now - datetime.timedelta(days=8), now - datetime.timedelta(days=6)
        add_events(5, processed_at=old)  # the only ones to go
        add_events(2, processed_at=recent)
        add_events(2, created_at=now - datetime.timedelta(days=30))  # pending, however old
        add_events(2, processed_at=old, failed_at=old, last_error="x")  # failed
        add_events(1, failed_at=old, last_error="x")

        with CaptureQueriesContext(connection) as queries:
            assert cleanup_processed(chunk_size=2) == 5
        deletes = [q["sql"] for q in queries.captured_queries if q["sql"].startswith("DELETE")]
        assert len(deletes) == 3  # 2 + 2 + 1

        assert Outbox.objects.count() == 7
        assert not Outbox.objects.filter(processed_at=old, failed_at__isnull=True).exists()
        assert Outbox.objects.pending().count() == 2
        assert Outbox.objects.failed().count() == 3

    def test_retention_comes_from_the_environment(self, monkeypatch):
        add_events(1, processed_at=timezone.now() - datetime.timedelta(days=3))
        monkeypatch.setenv("OUTBOX_RETENTION_DAYS", "2")
        assert cleanup_processed() == 1

    def test_inside_a_transaction_it_deletes_and_says_it_did_not_vacuum(self, caplog):
        add_events(1, processed_at=timezone.now() - datetime.timedelta(days=8))
        with caplog.at_level(logging.WARNING, logger="event_stream.celery"):
            assert cleanup_processed() == 1
        assert "not vacuuming the outbox" in caplog.text
        assert not Outbox.objects.exists()


def outbox_pages() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_relation_size('outbox') / current_setting('block_size')::int")
        return cursor.fetchone()[0]


@pytest.mark.django_db(transaction=True)
class TestCleanupFreesSpace:
    def test_the_outbox_keeps_its_pages_when_vacuumed(self):
        with connection.cursor() as cursor:
            cursor.execute("SELECT reloptions FROM pg_class WHERE relname = 'outbox'")
            assert "vacuum_truncate=false" in cursor.fetchone()[0]

    def test_the_next_events_take_the_space_of_the_deleted_ones(self, caplog):
        """Cleanup vacuums (the space is reused) and the file keeps its pages (not truncated)."""
        old = timezone.now() - datetime.timedelta(days=8)
        add_events(3_000, processed_at=old, payload={"data": "x" * 500})
        pages = outbox_pages()
        assert pages > 100

        with caplog.at_level(logging.WARNING, logger="event_stream.celery"):
            assert cleanup_processed() == 3_000
        assert "not vacuuming" not in caplog.text
        assert outbox_pages() == pages  # a VACUUM that truncates would leave none

        add_events(3_000, payload={"data": "x" * 500})
        assert outbox_pages() == pages  # without the VACUUM, the file would double

    def test_a_vacuum_already_running_does_not_hold_the_cleanup_up(self, conninfo):
        add_events(10, processed_at=timezone.now() - datetime.timedelta(days=8))
        with psycopg.connect(conninfo) as other:  # holds the lock a VACUUM takes, as one would
            other.execute("LOCK TABLE outbox IN SHARE UPDATE EXCLUSIVE MODE")
            with connection.cursor() as cursor:
                cursor.execute("SET lock_timeout = '5s'")  # a waiting VACUUM fails the test
            try:
                assert cleanup_processed() == 10
            finally:
                with connection.cursor() as cursor:
                    cursor.execute("RESET lock_timeout")


class TestQueueDepthCheck:
    @pytest.mark.parametrize(
        "pending, status, level",
        [
            (0, "healthy", logging.INFO),
            (999, "healthy", logging.INFO),
            (1_000, "warning", logging.WARNING),
            (4_999, "warning", logging.WARNING),
            (5_000, "critical", logging.ERROR),
        ],
    )
    def test_records_and_logs_what_it_saw(self, caplog, pending, status, level):
        add_events(pending)
        add_events(3, processed_at=timezone.now())
        add_events(2, failed_at=timezone.now(), last_error="x")

        with caplog.at_level(logging.INFO, logger="event_stream.celery"):
            check_queue_depth()

        check = QueueCheck.objects.get()
        assert (check.pending, check.failed, check.status) == (pending, 2, status)
        assert (check.oldest_pending_age_seconds is None) == (pending == 0)
        record = next(r for r in caplog.records if "queue depth" in r.getMessage())
        assert record.levelno == level
        assert f"{pending} pending" in record.getMessage()


def backlog_event(n: int) -> dict:
    return make_event_data(
        id=n,
        event_id=uuid.uuid4(),
        event_type="test.changed",
        entity_type="test",
        entity_id=uuid.uuid4(),
        payload={"data": {"n": n}},
        created_at=timezone.now(),
    )


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_the_check_does_not_wait_behind_a_backlog_of_handler_tasks(tmp_path):
    """The check expires a minute after beat sends it. Queued behind the handler tasks it would
    run only once the backlog is done, or expire unrun: exactly when the queue is deep. It has a
    queue of its own, which a worker started as the README says (no -Q) consumes as well."""
    broker_url = redis_url_for_tests(DEFAULT_QUEUES_REDIS_DB)
    forget_app_queues(broker_url)
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    worker = Worker(
        broker_url=broker_url,
        database_url=database_url(connection.settings_dict),
        queue=None,
        log_path=tmp_path / "worker.log",
        record_dir=record_dir,
    )
    backlog = 20  # half a second each: ten seconds of work for the worker's one process
    app = make_app(broker_url)
    try:
        worker.start()
        # Given a backlog of handler tasks, published where the relay publishes them
        with CeleryPublisher(app) as publisher:
            publisher.publish([("test.takes_a_while", backlog_event(n)) for n in range(backlog)])
        # When beat sends the check
        app.send_task(QUEUE_CHECK_TASK_NAME, expires=60)
        # Then it runs before the backlog is done
        assert wait_until(QueueCheck.objects.exists, timeout=30), worker.log()[-3000:]
        handled = len(list(record_dir.glob("test.takes_a_while.*.jsonl")))
        assert handled < backlog / 2, worker.log()[-3000:]
    finally:
        worker.stop()
        forget_app_queues(broker_url)
