"""Celery dispatch end to end: the relay's publisher, real Redis, a real worker process.

The worker runs `celery -A celery_app worker` against the pytest test database, with the test
handlers of `celery_worker_handlers` imported (`-I`), each leaving a trace file per run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import uuid
from urllib.parse import urlsplit, urlunsplit

import pytest
from kombu import Connection

from event_stream.celery_dispatch import TASK_NAME, CeleryPublisher, task_id_for
from event_stream.models import Outbox
from event_stream.replay import replay_failed
from tests.integration.celery_support import (
    RABBITMQ_URL,
    TcpProxy,
    Worker,
    forget_queue,
    make_app,
    port_open,
    running_worker,
    unique_queue,
    wait_until,
)
from tests.integration.celery_worker_handlers import DEPLOYED_LATE_ENV, runs

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.fixture(scope="module")
def record_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("celery_records")


@pytest.fixture(scope="module")
def worker(broker_url, test_database_url, record_dir, tmp_path_factory):
    """One worker for the module, on a queue of its own."""
    with running_worker(
        broker_url=broker_url,
        database_url=test_database_url,
        record_dir=record_dir,
        log_dir=tmp_path_factory.mktemp("worker"),
    ) as worker:
        yield worker


@pytest.fixture
def publisher(worker, broker_url):
    with CeleryPublisher(make_app(broker_url), queue=worker.queue) as p:
        yield p


def outbox_event(event_type="test.changed", payload=None) -> tuple[Outbox, dict]:
    """A committed outbox row, and the event_data the relay builds for it."""
    row = Outbox.objects.create(
        event_type=event_type,
        entity_type="test",
        entity_id=uuid.uuid4(),
        payload=payload if payload is not None else {"data": {"n": 1, "name": "é"}},
    )
    row.refresh_from_db()
    event = row.event_data()
    return row, event


def published_outbox_event() -> tuple[Outbox, dict]:
    """`outbox_event`, marked processed as the relay marks a row once its tasks are published."""
    row, event = outbox_event()
    Outbox.objects.filter(id=row.id).update(processed_at=row.created_at)
    return row, event


def test_published_tasks_run_the_handlers_with_the_inline_event_data(worker, publisher, record_dir):
    # Given an event, as the relay hands it to inline handlers
    _, event = outbox_event(
        payload={"data": {"id": str(uuid.uuid4()), "n": 3, "x": None}, "previous_attributes": {}}
    )
    # When it is published for a sync and an async handler
    assert publisher.publish([("test.record", event), ("test.record_async", event)]) == 2
    # Then each runs once in the worker, with exactly the same event_data
    for name in ("test.record", "test.record_async"):
        assert wait_until(lambda n=name: runs(record_dir, n, event["event_id"]), timeout=30), (
            worker.log()[-3000:]
        )
        assert runs(record_dir, name, event["event_id"]) == [json.loads(json.dumps(event))]
    assert f"[{task_id_for(event['event_id'], 'test.record')}] succeeded" in worker.log()


def test_a_failing_handler_is_retried_and_then_succeeds(worker, publisher, record_dir):
    row, event = outbox_event()
    publisher.publish([("test.fails_once", event)])

    assert wait_until(lambda: len(runs(record_dir, "test.fails_once", event["event_id"])) == 2)
    assert wait_until(
        lambda: f"[{task_id_for(event['event_id'], 'test.fails_once')}] succeeded" in worker.log()
    )
    row.refresh_from_db()
    assert row.failed_at is None


def test_when_retries_run_out_the_row_is_dead_lettered_and_replay_puts_it_back(
    worker, publisher, record_dir
):
    row, event = published_outbox_event()
    publisher.publish([("test.always_fails", event)])

    # OUTBOX_CELERY_MAX_RETRIES=2 in the worker: the first try and two retries
    assert _wait_dead_lettered(row, timeout=30), worker.log()[-3000:]
    assert len(runs(record_dir, "test.always_fails", event["event_id"])) == 3
    assert row.last_error == "test.always_fails: RuntimeError: boom"
    assert row.attempts == 3  # what outbox_status shows: "after 3 attempt(s)"
    assert Outbox.objects.failed().filter(id=row.id).exists()

    assert replay_failed(ids=[row.id]) == 1
    row.refresh_from_db()
    assert (row.processed_at, row.failed_at, row.attempts) == (None, None, 0)
    assert Outbox.objects.pending().filter(id=row.id).exists()


def test_forged_messages_run_nothing_and_import_nothing(
    worker, publisher, broker_url, record_dir, tmp_path
):
    app = make_app(broker_url)
    marker = tmp_path / "pwned"
    _, event = outbox_event()
    forged = {**event, "event_id": str(uuid.uuid4())}
    bad_handler_names = [
        "os.system",
        # the import path of a real handler function, which is registered under another name
        "tests.integration.celery_worker_handlers.record",
        "builtins.exec",
    ]
    for name in bad_handler_names:
        app.send_task(TASK_NAME, args=[name, forged], queue=worker.queue)
    app.send_task(TASK_NAME, args=["os.system", f"touch {marker}"], queue=worker.queue)
    app.send_task(TASK_NAME, args=[["test.record"], forged], queue=worker.queue)
    app.send_task("os.system", args=[f"touch {marker}"], queue=worker.queue)
    # A real task after them: once it ran, the worker has been through all the forged ones.
    publisher.publish([("test.record", event)])

    assert wait_until(lambda: runs(record_dir, "test.record", event["event_id"]), timeout=30)
    log = worker.log()
    assert log.count("is not a registered handler; nothing was run") == len(bad_handler_names) + 2
    assert "unregistered task of type 'os.system'" in log
    assert not marker.exists()
    assert not list(record_dir.glob(f"*.{forged['event_id']}.jsonl"))


@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_a_task_whose_worker_is_killed_mid_task_runs_again(
    pool, broker_url, test_database_url, tmp_path
):
    """acks_late: a SIGKILLed worker never acked, so the task comes back (Redis: after the
    visibility timeout). prefork: the pool's child is killed; reject_on_worker_lost requeues."""
    queue = unique_queue()
    record_dir = tmp_path / "records"
    record_dir.mkdir()

    def new_worker(n):
        return Worker(
            broker_url=broker_url,
            database_url=test_database_url,
            queue=queue,
            log_path=tmp_path / f"worker{n}.log",
            record_dir=record_dir,
            pool=pool,
        )

    _, event = outbox_event()
    first = new_worker(1).start()
    second = None
    try:
        with CeleryPublisher(make_app(broker_url), queue=queue) as publisher:
            publisher.publish([("test.slow_first_time", event)])
        # Given the task running (its first run hangs)
        assert wait_until(lambda: runs(record_dir, "test.slow_first_time", event["event_id"]))
        # When the process running it is killed with SIGKILL
        if pool == "solo":
            first.kill()
            second = new_worker(2).start()
            survivor = second
        else:
            child = int((record_dir / f"test.slow_first_time.{event['event_id']}.pid").read_text())
            os.kill(child, signal.SIGKILL)
            survivor = first
        # Then it runs again, to the end
        assert wait_until(
            lambda: len(runs(record_dir, "test.slow_first_time", event["event_id"])) >= 2,
            timeout=45,
        ), survivor.log()[-3000:]
        task_id = task_id_for(event["event_id"], "test.slow_first_time")
        assert wait_until(lambda: f"[{task_id}] succeeded" in survivor.log(), timeout=15)
    finally:
        first.stop()
        if second is not None:
            second.stop()
        forget_queue(queue, broker_url)


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_a_task_that_keeps_killing_its_worker_is_dead_lettered(
    broker, broker_url, test_database_url, tmp_path
):
    """Its message comes back each time without a retry counted (reject_on_worker_lost): the
    runs are counted in the row, and after OUTBOX_CELERY_MAX_RETRIES=2 it is not run again."""
    if broker == "rabbitmq":
        if not port_open("127.0.0.1", 5672):
            pytest.skip("RabbitMQ is not running on 127.0.0.1:5672")
        broker_url = RABBITMQ_URL
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    row, event = published_outbox_event()
    worker = Worker(
        broker_url=broker_url,
        database_url=test_database_url,
        queue=unique_queue(),
        log_path=tmp_path / "worker.log",
        record_dir=record_dir,
        pool="prefork",
    )
    try:
        worker.start()
        with CeleryPublisher(make_app(broker_url), queue=worker.queue) as publisher:
            publisher.publish([("test.kills_its_worker", event)])

        assert _wait_dead_lettered(row, timeout=40), worker.log()[-3000:]
        assert len(runs(record_dir, "test.kills_its_worker", event["event_id"])) == 3
        assert row.last_error.startswith("test.kills_its_worker: WorkerLost: delivered again 3")
        assert row.attempts == 3
        # And it stays so: the message was acked, nothing runs it again
        task_id = task_id_for(event["event_id"], "test.kills_its_worker")
        assert wait_until(lambda: f"[{task_id}] succeeded" in worker.log(), timeout=15)
        assert len(runs(record_dir, "test.kills_its_worker", event["event_id"])) == 3
    finally:
        worker.stop()
        if broker == "rabbitmq":
            with Connection(RABBITMQ_URL) as conn:
                conn.default_channel.queue_delete(worker.queue)
        else:
            forget_queue(worker.queue, broker_url)


def _tcp_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname, parts.port


def _through(url: str, proxy: TcpProxy) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{proxy.port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


@contextlib.contextmanager
def _proxied_worker(broker_url, database_url, record_dir, log_dir):
    """A worker whose database connections go through a proxy the test stops for an outage."""
    proxy = TcpProxy(*_tcp_port(database_url)).start()
    try:
        with running_worker(
            broker_url=broker_url,
            database_url=_through(database_url, proxy),
            record_dir=record_dir,
            log_dir=log_dir,
        ) as worker:
            yield worker, proxy
    finally:
        proxy.stop()


def _wait_dead_lettered(row, timeout):
    def dead_lettered():
        row.refresh_from_db()
        return row.failed_at is not None

    return wait_until(dead_lettered, timeout=timeout)


def test_a_retry_the_broker_does_not_take_dead_letters_the_event(
    broker_url, test_database_url, tmp_path
):
    """Celery rejects the message without requeueing it when it cannot publish the retry; the
    row must show the failure instead of staying processed."""
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    row, event = published_outbox_event()
    proxy = TcpProxy(*_tcp_port(broker_url)).start()
    try:
        with running_worker(
            broker_url=_through(broker_url, proxy),
            database_url=test_database_url,
            record_dir=record_dir,
            log_dir=tmp_path,
        ) as worker:
            hold = record_dir / f"hold.{event['event_id']}.1"
            hold.touch()
            with CeleryPublisher(make_app(broker_url), queue=worker.queue) as publisher:
                publisher.publish([("test.fails_when_told", event)])
            # Given the handler running, and the broker taking no new connection
            assert wait_until(lambda: runs(record_dir, "test.fails_when_told", event["event_id"]))
            proxy.refuse_new = True
            try:
                # When the handler fails (the retry needs a connection of its own)
                hold.unlink()
                # Then the event is dead-lettered, with why
                assert _wait_dead_lettered(row, timeout=30), worker.log()[-3000:]
            finally:
                proxy.refuse_new = False  # for the worker's teardown
            assert row.last_error.startswith(
                "test.fails_when_told: RuntimeError: told to fail (its retry could not be"
            )
            assert row.attempts == 1
    finally:
        proxy.stop()


def test_a_dead_letter_the_database_does_not_take_is_recorded_later(
    broker_url, test_database_url, tmp_path
):
    """The last retry fails while the database is gone: the message is kept, and the row is
    dead-lettered once the database is back."""
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    row, event = published_outbox_event()
    with _proxied_worker(broker_url, test_database_url, record_dir, tmp_path) as (worker, proxy):
        hold = record_dir / f"hold.{event['event_id']}.3"
        hold.touch()
        with CeleryPublisher(make_app(broker_url), queue=worker.queue) as publisher:
            publisher.publish([("test.fails_when_told", event)])
        # Given the last run (OUTBOX_CELERY_MAX_RETRIES=2: the third) under way
        assert wait_until(
            lambda: len(runs(record_dir, "test.fails_when_told", event["event_id"])) == 3,
            timeout=30,
        ), worker.log()[-3000:]
        # When it fails with the database gone
        proxy.stop()
        hold.unlink()
        assert wait_until(lambda: "keeping the task to record it later" in worker.log())
        row.refresh_from_db()
        assert row.failed_at is None
        # Then, once the database is back, the failure is recorded
        proxy.start()
        assert _wait_dead_lettered(row, timeout=30), worker.log()[-3000:]
        assert row.last_error == "test.fails_when_told: RuntimeError: told to fail"
        # the run kept for later ran the handler once more: four runs, four attempts
        assert len(runs(record_dir, "test.fails_when_told", event["event_id"])) == 4
        assert row.attempts == 4


# -- messages the worker cannot run -----------------------------------------------------------


def test_a_task_for_a_handler_the_worker_lacks_is_dead_lettered_and_replayable(
    worker, publisher, broker_url, test_database_url, record_dir, tmp_path
):
    """A rolling deploy: the relay knows a handler the worker's release does not (yet, or no
    longer) have. The relay marked the row processed when it published: acking the task away
    would lose the event."""
    row, event = published_outbox_event()
    # When the worker gets a task for a handler it does not have
    publisher.publish([("test.deployed_late", event)])
    # Then the row is dead-lettered, naming the handler, and nothing ran
    assert _wait_dead_lettered(row, timeout=30), worker.log()[-3000:]
    assert row.last_error == (
        "test.deployed_late: NotRegistered: no handler of this name in the worker "
        "(not deployed there yet, or no longer); nothing was run"
    )
    assert not runs(record_dir, "test.deployed_late", event["event_id"])

    # When it is replayed, once the workers have the handler
    assert replay_failed(ids=[row.id]) == 1
    row.refresh_from_db()
    assert (row.processed_at, row.failed_at, row.attempts) == (None, None, 0)
    assert Outbox.objects.pending().filter(id=row.id).exists()
    with running_worker(
        broker_url=broker_url,
        database_url=test_database_url,
        record_dir=record_dir,
        log_dir=tmp_path,
        env={DEPLOYED_LATE_ENV: "1"},
    ) as newer:
        # (the relay claims the pending row and publishes it again, as here)
        with CeleryPublisher(make_app(broker_url), queue=newer.queue) as relay_publisher:
            relay_publisher.publish([("test.deployed_late", row.event_data())])
        # Then the handler gets the event
        assert wait_until(
            lambda: runs(record_dir, "test.deployed_late", event["event_id"]), timeout=30
        ), newer.log()[-3000:]


def test_a_missing_handlers_dead_letter_the_database_does_not_take_is_recorded_later(
    broker_url, test_database_url, record_dir, tmp_path
):
    row, event = published_outbox_event()
    with _proxied_worker(broker_url, test_database_url, record_dir, tmp_path) as (worker, proxy):
        # Given the database gone
        proxy.stop()
        # When the worker gets a task for a handler it does not have
        with CeleryPublisher(make_app(broker_url), queue=worker.queue) as publisher:
            publisher.publish([("test.deployed_late", event)])
        # Then the message is kept
        assert wait_until(lambda: "keeping the task to record it later" in worker.log()), (
            worker.log()[-3000:]
        )
        row.refresh_from_db()
        assert row.failed_at is None
        # And, once the database is back, the row is dead-lettered
        proxy.start()
        assert _wait_dead_lettered(row, timeout=30), worker.log()[-3000:]
        assert row.last_error.startswith("test.deployed_late: NotRegistered:")


def test_event_data_lacking_fields_dead_letters_its_row_without_running_the_handler(
    worker, broker_url, record_dir
):
    row, event = published_outbox_event()
    garbled = {k: v for k, v in event.items() if k not in ("event_id", "payload")}
    make_app(broker_url).send_task(TASK_NAME, args=["test.record", garbled], queue=worker.queue)

    assert _wait_dead_lettered(row, timeout=30), worker.log()[-3000:]
    assert row.last_error == (
        "test.record: MalformedEvent: event_data lacks event_id, payload; nothing was run"
    )
    assert row.attempts == 0  # nothing ran
