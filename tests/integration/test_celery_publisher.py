"""The relay's Celery publisher against real brokers: what it writes, and how it fails."""

from __future__ import annotations

import base64
import json
import time
import uuid

import pytest
import redis
from kombu import Connection

from event_stream.celery_dispatch import TASK_NAME, CeleryPublisher, PublishError, task_id_for
from event_stream.events import make_event_data
from tests.integration.celery_support import (
    RABBITMQ_URL,
    TcpProxy,
    Worker,
    database_url,
    forget_queue,
    make_app,
    port_open,
    redis_url_for_tests,
    unique_queue,
    wait_until,
)
from tests.integration.celery_worker_handlers import runs


def event(n: int = 1) -> dict:
    return make_event_data(
        id=n,
        event_id=uuid.uuid4(),
        event_type="test.changed",
        entity_type="test",
        entity_id=uuid.uuid4(),
        payload={"data": {"n": n, "text": "ü" * 10}, "previous_attributes": {}},
        created_at="2025-01-01T00:00:00+00:00",
    )


@pytest.fixture
def redis_client():
    client = redis.Redis.from_url(redis_url_for_tests())
    queues = []
    yield client, queues
    client.close()
    for queue in queues:
        forget_queue(queue)


def test_a_message_is_the_one_celery_itself_would_send(redis_client):
    client, queues = redis_client
    ours, celerys = unique_queue(), unique_queue()
    queues += [ours, celerys]
    app = make_app(redis_url_for_tests())
    e = event()
    task_id = task_id_for(e["event_id"], "test.record")

    with CeleryPublisher(app, queue=ours) as publisher:
        publisher.publish([("test.record", e)])
    app.send_task(
        TASK_NAME,
        args=("test.record", e),
        task_id=task_id,
        queue=celerys,
        ignore_result=True,
    )
    mine = json.loads(client.rpop(ours))
    theirs = json.loads(client.rpop(celerys))

    assert set(mine) == set(theirs)
    assert mine["content-type"] == theirs["content-type"] == "application/json"
    assert set(mine["headers"]) == set(theirs["headers"])
    for key in ("lang", "task", "id", "root_id", "retries", "timelimit", "ignore_result", "eta"):
        assert mine["headers"][key] == theirs["headers"][key], key
    assert mine["headers"]["task"] == TASK_NAME and mine["headers"]["id"] == task_id
    assert "ü" not in mine["headers"]["argsrepr"] and e["event_id"] in mine["headers"]["argsrepr"]
    props_mine, props_theirs = mine["properties"], theirs["properties"]
    assert set(props_mine) == set(props_theirs)
    for key in ("correlation_id", "delivery_mode", "priority", "body_encoding"):
        assert props_mine[key] == props_theirs[key], key
    assert props_mine["delivery_info"] == {"exchange": "", "routing_key": ours}
    decode = lambda m: json.loads(base64.b64decode(m["body"]))  # noqa: E731
    assert decode(mine) == decode(theirs) == [["test.record", e], {}, decode(theirs)[2]]


def test_big_batches_arrive_whole_and_in_order(redis_client):
    client, queues = redis_client
    queue = unique_queue()
    queues.append(queue)
    events = [event(n) for n in range(2_500)]

    with CeleryPublisher(make_app(redis_url_for_tests()), queue=queue, chunk_size=1000) as p:
        assert p.publish(("test.record", e) for e in events) == 2_500

    assert client.llen(queue) == 2_500
    # Workers take from the right end (BRPOP): publication order
    entries = [json.loads(m) for m in client.lrange(queue, 0, -1)[::-1]]
    expected = [task_id_for(e["event_id"], "test.record") for e in events]
    assert [m["headers"]["id"] for m in entries] == expected
    # Each entry is filled in from the batch's skeleton: its own ids, argsrepr, tag and body.
    assert [m["headers"]["root_id"] for m in entries] == expected
    assert [m["properties"]["correlation_id"] for m in entries] == expected
    assert all(
        e["event_id"] in m["headers"]["argsrepr"] for e, m in zip(events, entries, strict=True)
    )
    assert len({m["properties"]["delivery_tag"] for m in entries}) == 2_500
    bodies = [json.loads(base64.b64decode(m["body"]))[0][1] for m in entries]
    assert [b["event_id"] for b in bodies] == [e["event_id"] for e in events]


def test_an_empty_batch_needs_no_broker():
    publisher = CeleryPublisher(make_app("redis://127.0.0.1:1/0"), queue="unused")
    assert publisher.publish([]) == 0


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:{port}/0", "amqp://guest:guest@127.0.0.1:{port}//"]
)
def test_an_unreachable_broker_raises_quickly(url):
    port = TcpProxy("127.0.0.1", 9).port  # a free port nothing listens on
    publisher = CeleryPublisher(make_app(url.format(port=port)), queue="unused", connect_timeout=1)
    started = time.monotonic()
    with pytest.raises(PublishError, match="broker did not accept 1 task"):
        publisher.publish([("test.record", event())])
    assert time.monotonic() - started < 3


def test_the_publisher_reconnects_after_the_broker_comes_back(redis_client):
    client, queues = redis_client
    queue = unique_queue()
    queues.append(queue)
    target = redis.Redis.from_url(redis_url_for_tests()).connection_pool.connection_kwargs
    proxy = TcpProxy(target.get("host", "127.0.0.1"), target.get("port", 6379)).start()
    url = f"redis://127.0.0.1:{proxy.port}/{target.get('db', 0)}"
    publisher = CeleryPublisher(make_app(url), queue=queue, connect_timeout=1, confirm_timeout=2)
    try:
        assert publisher.publish([("test.record", event(1))]) == 1
        # When the broker goes away
        proxy.stop()
        started = time.monotonic()
        with pytest.raises(PublishError):
            publisher.publish([("test.record", event(2))])
        with pytest.raises(PublishError):
            publisher.publish([("test.record", event(3))])
        assert time.monotonic() - started < 6
        # Then, once it is back, the same publisher works again
        proxy.start()
        assert publisher.publish([("test.record", event(4))]) == 1
    finally:
        publisher.close()
        proxy.stop()
    ids = [json.loads(m)["headers"]["id"] for m in client.lrange(queue, 0, -1)]
    assert len(ids) == 2


needs_rabbitmq = pytest.mark.skipif(
    not port_open("127.0.0.1", 5672), reason="RabbitMQ is not running on 127.0.0.1:5672"
)


@needs_rabbitmq
def test_rabbitmq_confirms_a_whole_batch():
    queue = unique_queue()
    try:
        with CeleryPublisher(make_app(RABBITMQ_URL), queue=queue, chunk_size=300) as publisher:
            assert publisher.publish([("test.record", event(n)) for n in range(1_000)]) == 1_000
            assert publisher.publish([("test.record", event(1_000))]) == 1
        with Connection(RABBITMQ_URL) as conn:
            _, count, _ = conn.default_channel.queue_declare(queue, passive=True)
        assert count == 1_001
    finally:
        with Connection(RABBITMQ_URL) as conn:
            conn.default_channel.queue_delete(queue)


@needs_rabbitmq
@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_rabbitmq_end_to_end_through_a_worker(tmp_path, django_db_blocker):
    from django.db import connection

    queue = unique_queue()
    worker = Worker(
        broker_url=RABBITMQ_URL,
        database_url=database_url(connection.settings_dict),
        queue=queue,
        log_path=tmp_path / "worker.log",
        record_dir=tmp_path,
    )
    e = event()
    try:
        worker.start()
        with CeleryPublisher(make_app(RABBITMQ_URL), queue=queue) as publisher:
            publisher.publish([("test.record", e), ("test.fails_once", e)])
        assert wait_until(lambda: runs(tmp_path, "test.record", e["event_id"]), timeout=30)
        assert runs(tmp_path, "test.record", e["event_id"]) == [e]
        # the retry goes back through RabbitMQ to the same queue
        assert wait_until(
            lambda: len(runs(tmp_path, "test.fails_once", e["event_id"])) == 2, timeout=30
        ), worker.log()[-3000:]
    finally:
        worker.stop()
        with Connection(RABBITMQ_URL) as conn:
            conn.default_channel.queue_delete(queue)
