"""Celery dispatch end to end: a relay process publishes, a real worker runs the handlers.

Real PostgreSQL (the pytest test database), real Redis (the test database of celery_support),
a real `celery -A celery_app worker` process and relay processes running the production
service (`tests.integration.relay_celery_process`), whose registry dispatches the worker's test
handlers to Celery under the names the worker knows. The relay publishes to a queue of this
module's own, through the Celery app's route for `event_stream.run_handler`.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
from django.utils import timezone

from event_stream.celery_dispatch import task_id_for
from event_stream.health import collect
from event_stream.models import Outbox
from event_stream.replay import replay_failed
from tests.integration.celery_support import (
    ROOT,
    LoggedProcess,
    TcpProxy,
    Worker,
    running_worker,
    wait_until,
)
from tests.integration.celery_worker_handlers import runs
from tests.integration.factories import issue_for, make_project
from tests.integration.relay_celery_process import (
    CELERY_HANDLERS_ENV,
    FAILS_UNTIL_FIXED,
    INLINE_NAME,
    INLINE_PATTERNS_ENV,
    QUEUE_ENV,
    fixed_marker,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

RELAY_MODULE = "tests.integration.relay_celery_process"
BROKER_REFUSED = "broker did not accept the batch's tasks"


@pytest.fixture(scope="module")
def record_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("relay_celery_records")


@pytest.fixture(scope="module")
def worker(broker_url, test_database_url, record_dir, tmp_path_factory):
    """One worker for the module, on a queue of its own, knowing the relay module's handler."""
    with running_worker(
        broker_url=broker_url,
        database_url=test_database_url,
        record_dir=record_dir,
        log_dir=tmp_path_factory.mktemp("relay_celery_worker"),
        queue_prefix="es_relay",
        imports=(RELAY_MODULE,),
    ) as worker:
        yield worker


@pytest.fixture
def empty_outbox(conninfo):
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("TRUNCATE outbox, outbox_relay RESTART IDENTITY")


class Relay(LoggedProcess):
    """A relay process (`relay_celery_process`), logging to a file."""

    def __init__(self, log_path: Path, env: dict[str, str]):
        self.log_path = log_path
        self.env = env
        self.process: subprocess.Popen | None = None
        self._log = None

    def start(self, timeout: float = 30) -> Relay:
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", RELAY_MODULE],
            cwd=ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        ready = wait_until(
            lambda: "relay ready" in self.log() or self.process.poll() is not None, timeout
        )
        if not ready or self.process.poll() is not None:
            self.stop()
            raise RuntimeError(f"the relay did not start:\n{self.log()[-4000:]}")
        return self


@pytest.fixture
def start_relay(worker, broker_url, database_url, record_dir, tmp_path, empty_outbox):
    """Start a relay process publishing to the worker's queue; every one is stopped after."""
    started: list[Relay] = []

    def start(
        celery_handlers: dict[str, list[str]],
        inline_patterns: list[str] | None = None,
        broker: str | None = None,
    ) -> Relay:
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "CELERY_BROKER_URL": broker or broker_url,
            QUEUE_ENV: worker.queue,
            CELERY_HANDLERS_ENV: json.dumps(celery_handlers),
            INLINE_PATTERNS_ENV: json.dumps(inline_patterns or []),
            "EVENT_STREAM_TEST_RECORD_DIR": str(record_dir),
            "OUTBOX_POLLER_INTERVAL_MIN": "0.1",
            "OUTBOX_POLLER_INTERVAL_MAX": "0.5",
            "PYTHONUNBUFFERED": "1",
        }
        relay = Relay(tmp_path / f"relay{len(started) + 1}.log", env)
        started.append(relay)
        return relay.start()

    yield start
    for relay in started:
        relay.stop()


def tail(process: Relay | Worker) -> str:
    """The end of a process's log, for assertion messages."""
    return process.log()[-3000:]


def event_data_of(row: Outbox) -> dict:
    """The event_data an inline handler gets for `row`, as JSON carries it.

    `created_at` is the row's time as an ISO 8601 string; the relay has PostgreSQL render it,
    which drops trailing zeros of the fraction (".18338" where Python writes ".183380"), so it
    is compared as a time, by `same_event`.
    """
    event = row.event_data()
    return json.loads(json.dumps(event))


def same_event(got: dict, row: Outbox) -> bool:
    """`got` is the event_data of `row` (its created_at the same time, however written)."""
    expected = event_data_of(row)
    return (
        set(got) == set(expected)
        and {**got, "created_at": None} == {**expected, "created_at": None}
        and datetime.datetime.fromisoformat(got["created_at"]) == row.created_at
    )


def insert_events(conninfo: str, events: list[tuple[str, uuid.UUID]]) -> None:
    """(event_type, entity_id) rows, each in its own transaction, as an app writes them."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        for n, (event_type, entity_id) in enumerate(events):
            conn.execute(
                "INSERT INTO outbox (event_type, entity_type, entity_id, payload)"
                " VALUES (%s, 'test', %s, %s)",
                (event_type, entity_id, psycopg.types.json.Jsonb({"data": {"n": n, "s": "é"}})),
            )


def rows_of(**filters) -> list[Outbox]:
    return list(Outbox.objects.filter(**filters).order_by("id"))


def all_processed(rows: list[Outbox]) -> bool:
    ids = [r.id for r in rows]
    return Outbox.objects.filter(id__in=ids, processed_at__isnull=False).count() == len(ids)


def succeeded_order(worker: Worker, handler: str, rows: list[Outbox]) -> list[int]:
    """Outbox ids of `rows` in the order the worker finished their `handler` tasks."""
    log = worker.log()
    position = {}
    for row in rows:
        task_id = re.escape(task_id_for(str(row.event_id), handler))
        match = re.search(rf"\[{task_id}\] succeeded", log)
        assert match, f"task {task_id} did not succeed:\n{log[-3000:]}"
        position[row.id] = match.start()
    return sorted(position, key=position.get)


def test_the_relay_publishes_and_the_worker_gets_the_event_data_inline_handlers_get(
    start_relay, worker, record_dir
):
    # Given a relay whose issue handlers are two Celery handlers (sync, async) and one inline
    relay = start_relay(
        {"test.record": ["issue.*"], "test.record_async": ["issue.*"]},
        inline_patterns=["issue.*"],
    )
    # When issues are created, changed and soft-deleted (the triggers write the events)
    project = make_project()
    issues = [issue_for(project, name=f"Issue {n}") for n in range(3)]
    for issue in issues:
        issue.save()
    for issue in issues:
        issue.name = f"{issue.name}, renamed"
        issue.priority = "high"
        issue.save()
    issues[0].deleted_at = timezone.now()
    issues[0].save()

    rows = rows_of(event_type__startswith="issue.")
    assert [r.event_type for r in rows].count("issue.updated") == 3
    assert len(rows) == 7
    # Then every event is relayed: the rows processed, and each task run once in the worker
    assert wait_until(lambda: all_processed(rows), timeout=30), tail(relay)
    for row in rows:
        for name in ("test.record", "test.record_async"):
            ran = wait_until(lambda r=row, n=name: runs(record_dir, n, str(r.event_id)))
            assert ran, tail(worker)
    assert wait_until(lambda: Outbox.objects.pending().count() == 0, timeout=10)
    assert not Outbox.objects.failed().exists()

    # with exactly the event_data the inline handler got, which is the row's
    for row in rows:
        event_id = str(row.event_id)
        inline = runs(record_dir, INLINE_NAME, event_id)
        assert len(inline) == 1 and same_event(inline[0], row), (inline, event_data_of(row))
        assert runs(record_dir, "test.record", event_id) == inline
        assert runs(record_dir, "test.record_async", event_id) == inline
    deleted = rows[-1]
    assert deleted.event_type == "issue.deleted"
    assert deleted.entity_id == issues[0].id

    # and each issue's tasks ran in the order of its events
    order = succeeded_order(worker, "test.record", rows)
    for issue in issues:
        ids = [r.id for r in rows if r.entity_id == issue.id]
        assert [i for i in order if i in ids] == ids

    assert relay.process.poll() is None
    assert relay.stop() == 0, tail(relay)


def test_while_the_broker_is_unreachable_events_wait_then_all_are_delivered(
    start_relay, worker, broker_url, record_dir, conninfo
):
    redis_address = re.match(r"redis://([^:/]+)(?::(\d+))?/(\d+)", broker_url)
    assert redis_address, broker_url
    host, port, db = redis_address[1], int(redis_address[2] or 6379), redis_address[3]
    proxy = TcpProxy(host, port)  # not started: nothing listens on its port, the broker is down
    try:
        # Given a relay whose broker is unreachable; test.sent goes to Celery, every test.*
        # event to an inline handler too
        relay = start_relay(
            {"test.record": ["test.sent"]},
            inline_patterns=["test.*"],
            broker=f"redis://127.0.0.1:{proxy.port}/{db}",
        )
        a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        # When events arrive: entity a's inline-only event sits between two Celery events;
        # entity b's events are all inline-only
        insert_events(
            conninfo,
            [("test.sent", a), ("test.note", b), ("test.note", a), ("test.sent", a),
             ("test.note", b)],
        )  # fmt: skip

        # Then b's events are done (they need no broker); a's wait, and the relay backs off
        b_rows = rows_of(entity_id=b)
        assert wait_until(lambda: all_processed(b_rows), timeout=20), tail(relay)
        assert wait_until(lambda: relay.log().count(BROKER_REFUSED) >= 3, timeout=20), tail(relay)
        # and events that arrive meanwhile wait too
        insert_events(conninfo, [("test.sent", c), ("test.sent", c)])
        refusals = relay.log().count(BROKER_REFUSED)
        assert wait_until(lambda: relay.log().count(BROKER_REFUSED) > refusals, timeout=20)
        waiting = rows_of(entity_id__in=[a, c])
        assert len(waiting) == 5
        untouched = (None, None, 0, None)
        for row in waiting:
            row.refresh_from_db()
            assert (row.processed_at, row.failed_at, row.attempts, row.last_error) == untouched
        assert relay.process.poll() is None
        # backing off (0.1 s, doubling): a handful of tries, not a busy loop
        assert relay.log().count(BROKER_REFUSED) <= 12, tail(relay)
        sent = rows_of(event_type="test.sent")
        assert not any(runs(record_dir, "test.record", str(r.event_id)) for r in sent)
        assert collect().failed_events == 0

        # When the broker is back
        proxy.start()
        # Then every event is delivered and processed
        assert wait_until(lambda: Outbox.objects.pending().count() == 0, timeout=30), tail(relay)
        assert not Outbox.objects.failed().exists()
        for row in sent:
            ran = wait_until(lambda r=row: runs(record_dir, "test.record", str(r.event_id)))
            assert ran, tail(worker)
            row.refresh_from_db()
            # the worker got what the inline handler got, on every try: the row untouched
            assert row.attempts == 0
            inline = runs(record_dir, INLINE_NAME, str(row.event_id))
            assert len(inline) >= 2  # run again on each try to publish
            assert same_event(inline[0], row), (inline[0], event_data_of(row))
            assert all(run == inline[0] for run in inline)
            assert all(
                run == inline[0] for run in runs(record_dir, "test.record", str(row.event_id))
            )
        assert relay.process.poll() is None
        assert relay.stop() == 0, tail(relay)
    finally:
        proxy.stop()


def test_a_celery_handler_that_gives_up_dead_letters_the_row_and_replay_relays_it_again(
    start_relay, worker, record_dir
):
    relay = start_relay({FAILS_UNTIL_FIXED: ["test.fixable"]})
    # Given an event whose Celery handler fails on every try
    row = Outbox.objects.create(
        event_type="test.fixable",
        entity_type="test",
        entity_id=uuid.uuid4(),
        payload={"data": {"id": 7}},
    )
    event_id = str(row.event_id)

    # When the worker's last retry fails (OUTBOX_CELERY_MAX_RETRIES=2: three tries)
    def dead_lettered():
        row.refresh_from_db()
        return row.failed_at is not None

    assert wait_until(dead_lettered, timeout=30), tail(worker) + tail(relay)
    # Then the row is failed, with the handler's error, and health counts it
    assert row.processed_at is not None  # the relay's part: the task was published
    assert row.last_error == f"{FAILS_UNTIL_FIXED}: RuntimeError: not fixed yet"
    assert len(runs(record_dir, FAILS_UNTIL_FIXED, event_id)) == 3
    report = collect()
    assert (report.failed_events, report.unprocessed_events) == (1, 0)

    # When the bug is fixed and the event replayed
    fixed_marker(record_dir, event_id).touch()
    assert replay_failed(ids=[row.id]) == 1

    # Then the relay publishes it again and the worker's handler succeeds
    def handled_again():
        row.refresh_from_db()
        return row.processed_at is not None and row.failed_at is None

    assert wait_until(handled_again, timeout=30), tail(relay)
    task = task_id_for(event_id, FAILS_UNTIL_FIXED)
    assert wait_until(lambda: f"[{task}] succeeded" in worker.log(), timeout=30), tail(worker)
    tries = runs(record_dir, FAILS_UNTIL_FIXED, event_id)
    assert len(tries) == 4
    assert tries[-1] == tries[0]  # replayed: attempts 0 again, the same event
    assert same_event(tries[-1], row)
    row.refresh_from_db()
    assert row.failed_at is None
    assert collect().failed_events == 0
    assert relay.stop() == 0, tail(relay)
