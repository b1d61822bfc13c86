"""The publisher's messages and the worker task's logic, without a database or a real broker."""

from __future__ import annotations

import logging
import uuid

import pytest
from celery import Celery
from celery.exceptions import Reject, Retry

from event_stream import tasks
from event_stream.celery_dispatch import TASK_NAME, CeleryPublisher, task_id_for
from event_stream.events import make_event_data
from event_stream.handlers import Handler, HandlerRegistry
from event_stream.settings import CelerySettings


def event(n: int = 1) -> dict:
    return make_event_data(
        id=n,
        event_id=uuid.uuid4(),
        event_type="issue.updated",
        entity_type="issue",
        entity_id=uuid.uuid4(),
        payload={"data": {"n": n}, "previous_attributes": {"n": n - 1}},
        created_at="2025-01-01T00:00:00+00:00",
    )


@pytest.fixture
def memory_app():
    url = f"memory://localhost/{uuid.uuid4().hex}"
    app = Celery("unit", broker=url, set_as_current=False)
    # Celery prefers the CELERY_BROKER_URL variable to broker_url; these two it does not.
    app.conf.broker_write_url = app.conf.broker_read_url = url
    app.conf.task_serializer = "json"
    return app


def drain(app, queue):
    with app.connection_for_read() as conn:
        q = conn.SimpleQueue(queue)
        messages = []
        while q.qsize():
            m = q.get(timeout=1)
            m.ack()
            messages.append(m)
        q.close()
        return messages


class TestPublisher:
    def test_one_task_message_per_event_and_handler(self, memory_app):
        e1, e2 = event(1), event(2)
        handler = Handler("search.index", print, dispatch="celery")
        with CeleryPublisher(memory_app, queue="q1") as publisher:
            assert publisher.publish([(handler, e1), ("webhooks.send", e1), (handler, e2)]) == 3

        messages = drain(memory_app, "q1")
        assert [m.headers["id"] for m in messages] == [
            task_id_for(e1["event_id"], "search.index"),
            task_id_for(e1["event_id"], "webhooks.send"),
            task_id_for(e2["event_id"], "search.index"),
        ]
        first = messages[0]
        assert first.headers["task"] == TASK_NAME
        assert first.headers["retries"] == 0
        assert first.content_type == "application/json"
        args, kwargs, embed = first.decode()
        assert args == ["search.index", e1]
        assert kwargs == {}
        assert embed == {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
        assert first.properties["correlation_id"] == first.headers["id"]

    def test_the_payload_stays_out_of_the_task_repr(self, memory_app):
        e = event()
        e["payload"] = {"data": {"secret": "s3cr3t"}}
        with CeleryPublisher(memory_app, queue="q2") as publisher:
            publisher.publish([("h", e)])
        (message,) = drain(memory_app, "q2")
        assert "s3cr3t" not in message.headers["argsrepr"]
        assert e["event_id"] in message.headers["argsrepr"]

    def test_the_task_id_is_stable(self):
        assert task_id_for("abc", "search.index") == "abc:search.index"

    def test_the_queue_follows_the_task_routes(self, memory_app):
        memory_app.conf.task_routes = {TASK_NAME: {"queue": "events"}}
        assert CeleryPublisher(memory_app).queue_name == "events"
        memory_app.conf.task_routes = None
        assert CeleryPublisher(memory_app, queue="mine").queue_name == "mine"

    @pytest.mark.parametrize(
        "kwargs", [{"connect_timeout": 0}, {"confirm_timeout": -1}, {"chunk_size": 0}]
    )
    def test_bad_arguments_fail_fast(self, memory_app, kwargs):
        with pytest.raises(ValueError):
            CeleryPublisher(memory_app, **kwargs)


@pytest.fixture
def handlers(monkeypatch):
    registry = HandlerRegistry()
    monkeypatch.setattr(tasks, "registry", registry)
    failures = []
    monkeypatch.setattr(
        tasks, "record_failure", lambda id, error, runs=0: failures.append((id, error))
    )
    monkeypatch.setenv("OUTBOX_CELERY_MAX_RETRIES", "2")
    monkeypatch.setenv("OUTBOX_CELERY_RETRY_BACKOFF", "0")
    return registry, failures


def run(name, event_data):
    return tasks.run_handler.apply(args=(name, event_data))


class TestRunHandler:
    def test_runs_the_registered_sync_handler(self, handlers):
        registry, _ = handlers
        seen = []
        registry.add(seen.append, name="search.index", dispatch="celery")
        e = event()
        assert run("search.index", e).successful()
        assert seen == [e]

    def test_runs_an_async_handler_to_completion(self, handlers):
        registry, _ = handlers
        seen = []

        async def handler(event_data):
            seen.append(event_data["id"])

        registry.add(handler, name="webhooks.send", dispatch="celery")
        assert run("webhooks.send", event()).successful()
        assert seen == [1]

    @pytest.mark.parametrize("name", ["os.system", "builtins.exec", "", None, ["x"]])
    def test_an_unknown_name_is_logged_and_nothing_runs(self, handlers, caplog, name):
        registry, _ = handlers
        registry.add(lambda e: pytest.fail("must not run"), name="other", dispatch="celery")
        with caplog.at_level(logging.ERROR, logger="event_stream.celery"):
            assert run(name, event()).successful()
        assert "is not a registered handler; nothing was run" in caplog.text

    def test_event_data_that_is_not_an_event_runs_nothing(self, handlers, caplog):
        registry, _ = handlers
        registry.add(lambda e: pytest.fail("must not run"), name="h", dispatch="celery")
        with caplog.at_level(logging.ERROR, logger="event_stream.celery"):
            run("h", "rm -rf /")
        assert "event_data is not an event" in caplog.text

    def test_retries_then_dead_letters_with_the_handler_name(self, handlers):
        registry, failures = handlers
        calls = []

        def broken(event_data):
            calls.append(event_data["id"])
            raise RuntimeError("search is down")

        registry.add(broken, name="search.index", dispatch="celery")
        result = run("search.index", event(7))

        assert result.failed()
        assert calls == [7, 7, 7]  # the first try and OUTBOX_CELERY_MAX_RETRIES=2 retries
        assert failures == [(7, "search.index: RuntimeError: search is down")]

    def test_a_retry_that_succeeds_records_nothing(self, handlers):
        registry, failures = handlers
        calls = []

        def flaky(event_data):
            calls.append(1)
            if len(calls) == 1:
                raise ConnectionError("blip")

        registry.add(flaky, name="flaky", dispatch="celery")
        assert run("flaky", event()).successful()
        assert len(calls) == 2
        assert failures == []


class TestNothingIsLostInTheWorker:
    """What happens when the broker or the database fails the task, run as a worker runs it
    (not eagerly: a retry is a message published by `Signature.apply_async`, faked here)."""

    @pytest.fixture
    def broker(self, monkeypatch):
        """The retries the task published; `broker.broken = True` makes publishing fail."""
        from celery.canvas import Signature

        broker = FakeBroker()
        monkeypatch.setattr(Signature, "apply_async", lambda sig, *a, **kw: broker.publish(sig))
        return broker

    def test_a_retry_the_broker_does_not_take_dead_letters_the_event(self, handlers, broker):
        registry, failures = handlers
        broker.broken = True
        registry.add(boom, name="search.index", dispatch="celery")

        with pytest.raises(RuntimeError, match="boom"):  # not Reject(requeue=False): acked, gone
            run_in_worker("search.index", event(7))

        ((outbox_id, error),) = failures
        assert outbox_id == 7
        assert error.startswith("search.index: RuntimeError: boom (its retry could not be publ")
        assert "broker gone" in error

    def test_a_dead_letter_the_database_does_not_take_keeps_the_message(
        self, handlers, broker, monkeypatch
    ):
        registry, _ = handlers
        monkeypatch.setattr(tasks, "record_failure", database_down)
        registry.add(boom, name="search.index", dispatch="celery")

        # The last retry (OUTBOX_CELERY_MAX_RETRIES=2) fails, and so does recording it
        with pytest.raises(Retry):
            run_in_worker("search.index", event(7), retries=2)

        # Then the task is sent again, to record the failure (or succeed) later
        ((args, options),) = broker.sent
        assert args[0] == "search.index"
        assert options["retries"] == 3 and options["countdown"] >= 0

    def test_when_neither_takes_it_the_message_goes_back_to_its_queue(
        self, handlers, broker, monkeypatch
    ):
        registry, _ = handlers
        broker.broken = True
        monkeypatch.setattr(tasks, "record_failure", database_down)
        registry.add(boom, name="search.index", dispatch="celery")

        with pytest.raises(Reject) as rejected:
            run_in_worker("search.index", event(7))
        assert rejected.value.requeue is True

    def test_a_redelivered_task_runs_until_its_runs_are_used_up(self, handlers, monkeypatch):
        registry, failures = handlers
        calls = []
        registry.add(calls.append, name="search.index", dispatch="celery")
        lost = []
        monkeypatch.setattr(tasks, "count_redelivery", lambda id, published: len(lost))

        # OUTBOX_CELERY_MAX_RETRIES=2: three runs in all, whatever ended the first ones
        for runs_lost, retries in [(1, 0), (2, 0), (1, 1)]:
            lost[:] = [None] * runs_lost
            run_in_worker("search.index", event(7), retries=retries, redelivered=True)
        assert len(calls) == 3 and failures == []

        for runs_lost, retries in [(3, 0), (1, 2)]:
            lost[:] = [None] * runs_lost
            run_in_worker("search.index", event(7), retries=retries, redelivered=True)
        assert len(calls) == 3  # not run again
        assert [id for id, _ in failures] == [7, 7]
        assert failures[0][1].startswith("search.index: WorkerLost: delivered again 3 time(s)")

    def test_a_first_delivery_writes_nothing(self, handlers, monkeypatch):
        registry, _ = handlers
        registry.add(lambda e: None, name="search.index", dispatch="celery")
        monkeypatch.setattr(tasks, "count_redelivery", lambda *a: pytest.fail("counted"))
        run_in_worker("search.index", event(7))

    def test_a_redelivery_the_database_cannot_count_is_kept(self, handlers, broker, monkeypatch):
        registry, _ = handlers
        registry.add(lambda e: pytest.fail("must not run"), name="h", dispatch="celery")
        monkeypatch.setattr(tasks, "count_redelivery", database_down)

        with pytest.raises(Retry):
            run_in_worker("h", event(7), redelivered=True)
        assert len(broker.sent) == 1


class FakeBroker:
    def __init__(self):
        self.sent = []
        self.broken = False

    def publish(self, sig):
        if self.broken:
            raise ConnectionError("broker gone")
        self.sent.append((sig.args, sig.options))


def boom(event_data):
    raise RuntimeError("boom")


def database_down(*args):
    from django.db import OperationalError

    raise OperationalError("the database is gone")


def run_in_worker(name, event_data, *, retries=0, redelivered=False):
    """Run the task as a worker does: a request of its own, not eager, so a retry publishes."""
    task = tasks.run_handler
    task.push_request(
        id=f"{event_data['event_id']}:{name}",
        args=[name, event_data],
        kwargs={},
        retries=retries,
        is_eager=False,
        called_directly=False,
        delivery_info={"exchange": "", "routing_key": "q", "redelivered": redelivered},
    )
    try:
        return task.run(name, event_data)
    finally:
        task.pop_request()


class TestRetryDelay:
    def test_backoff_is_exponential_with_jitter_and_capped(self):
        s = CelerySettings(retry_backoff=2, retry_backoff_max=10)
        assert tasks.retry_delay(s, 0, rand=lambda: 0) == 1  # half of 2
        assert tasks.retry_delay(s, 0, rand=lambda: 1) == 2
        assert tasks.retry_delay(s, 1, rand=lambda: 1) == 4
        assert tasks.retry_delay(s, 2, rand=lambda: 1) == 8
        assert tasks.retry_delay(s, 3, rand=lambda: 1) == 10  # capped
        assert tasks.retry_delay(s, 100, rand=lambda: 0.5) == 7.5


class TestCeleryApp:
    def test_transport_options_from_the_environment(self):
        from event_stream.settings import load_transport_options as transport_options_from_env

        assert transport_options_from_env({}) == {}
        assert transport_options_from_env(
            {"CELERY_BROKER_TRANSPORT_OPTIONS": '{"visibility_timeout": 60}'}
        ) == {"visibility_timeout": 60}
        with pytest.raises(ValueError, match="CELERY_BROKER_TRANSPORT_OPTIONS"):
            transport_options_from_env({"CELERY_BROKER_TRANSPORT_OPTIONS": "[1]"})


def test_a_claimed_events_payload_text_is_spliced_into_the_task_body_unchanged():
    import json as stdlib_json

    from event_stream.celery_dispatch import _task_body
    from event_stream.events import ClaimedEvent

    event = ClaimedEvent(id=7, event_id="e", payload={"n": 12345678901234567890123}, attempts=0)
    event.payload_json = '{"n": 12345678901234567890123}'

    handler_and_event, kwargs, embed = stdlib_json.loads(_task_body("h", event))

    assert handler_and_event == ["h", dict(event)]
    assert kwargs == {} and embed["chain"] is None
