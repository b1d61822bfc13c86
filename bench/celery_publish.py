"""Micro-benchmark of Celery dispatch: events/s the relay's publisher gets into the broker, and
end to end through one worker.

    python bench/celery_publish.py                       # publisher only, Redis
    python bench/celery_publish.py --compare             # and the naive ways, for reference
    python bench/celery_publish.py --end-to-end          # and through one worker
    python bench/celery_publish.py --broker amqp://guest:guest@127.0.0.1:5672//

Needs the broker (default: CELERY_BROKER_URL, else redis://127.0.0.1:6379/0) and Django's
settings (DATABASE_URL; the handler touches no table). Uses a queue of its own, deleted after.
When a worker imports this module (`-I bench.celery_publish`), it only registers the no-op
handler `bench.noop`, which counts its runs in Redis.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "plane.settings")

COUNTER_URL = "BENCH_COUNTER_REDIS_URL"
COUNTER_KEY = "BENCH_COUNTER_KEY"


def noop(event_data):
    """The benchmark's handler: count the run, nothing else."""
    client = _counter_client()
    if client is not None:
        client.incr(os.environ[COUNTER_KEY])


_client = None


def _counter_client():
    global _client
    if _client is None and os.environ.get(COUNTER_URL):
        import redis

        _client = redis.Redis.from_url(os.environ[COUNTER_URL])
    return _client


def _register() -> None:
    from event_stream.handlers import registry

    if registry.get("bench.noop") is None:
        registry.add(noop, ["bench.*"], name="bench.noop", dispatch="celery")


def issue_event(n: int) -> dict:
    """An `issue.updated` event about the size Plane's issue rows have (~1 KB of JSON)."""
    from event_stream.events import make_event_data

    issue_id = str(uuid.uuid4())
    data = {
        "id": issue_id,
        "name": f"Login page fails on Safari when the password has an emoji #{n}",
        "description_stripped": "Steps to reproduce: open the login page, type a password " * 3,
        "priority": "high",
        "state_id": str(uuid.uuid4()),
        "project_id": str(uuid.uuid4()),
        "workspace_id": str(uuid.uuid4()),
        "parent_id": None,
        "estimate_point": 3,
        "sequence_id": n,
        "sort_order": 65535.0,
        "start_date": None,
        "target_date": "2025-03-01",
        "created_at": "2025-01-01T10:00:00.000000+00:00",
        "updated_at": "2025-01-02T10:00:00.000000+00:00",
        "deleted_at": None,
        "created_by_id": str(uuid.uuid4()),
        "updated_by_id": str(uuid.uuid4()),
    }
    return make_event_data(
        id=n,
        event_id=uuid.uuid4(),
        event_type="issue.updated",
        entity_type="issue",
        entity_id=issue_id,
        payload={"data": data, "previous_attributes": {"priority": "low", "sequence_id": n}},
        created_at=datetime.datetime.now(datetime.UTC),
    )


def make_app(broker: str):
    from celery import Celery

    app = Celery("bench", set_as_current=False)
    app.config_from_object("django.conf:settings", namespace="CELERY")
    app.conf.broker_url = broker
    # Celery prefers the CELERY_BROKER_URL variable to broker_url; these two it does not.
    app.conf.broker_write_url = app.conf.broker_read_url = broker
    return app


def bench_publisher(app, queue, events, batch) -> float:
    from event_stream.celery_dispatch import CeleryPublisher

    with CeleryPublisher(app, queue=queue) as publisher:
        publisher.publish([("bench.noop", events[0])])  # connect first
        started = time.perf_counter()
        for i in range(1, len(events), batch):
            publisher.publish([("bench.noop", e) for e in events[i : i + batch]])
        elapsed = time.perf_counter() - started
    return (len(events) - 1) / elapsed


def bench_apply_async(app, queue, events) -> float:
    from event_stream.celery_dispatch import TASK_NAME, task_id_for

    started = time.perf_counter()
    for e in events:
        app.send_task(
            TASK_NAME,
            args=("bench.noop", e),
            task_id=task_id_for(e["event_id"], "bench.noop"),
            queue=queue,
        )
    return len(events) / (time.perf_counter() - started)


def bench_kombu_batch(app, queue, events, batch) -> float:
    from kombu import Producer

    from event_stream.celery_dispatch import TASK_NAME, task_id_for

    started = time.perf_counter()
    with app.connection_for_write() as conn:
        producer = Producer(conn)
        for i in range(0, len(events), batch):
            with producer.batch(batch):
                for e in events[i : i + batch]:
                    task_id = task_id_for(e["event_id"], "bench.noop")
                    message = app.amqp.as_task_v2(task_id, TASK_NAME, ("bench.noop", e))
                    app.amqp.send_task_message(producer, TASK_NAME, message, queue=queue)
    return len(events) / (time.perf_counter() - started)


def delete_queue(app, queue) -> None:
    with app.connection_for_write() as conn, contextlib.suppress(Exception):  # best effort
        channel = conn.default_channel
        client = getattr(channel, "client", None)
        if client is None:
            channel.queue_delete(queue)
        else:  # Redis: the list, and kombu's bindings of the queue
            client.delete(queue, *client.scan_iter(match=f"_kombu.binding*{queue}*"))


def bench_end_to_end(broker, queue, events, batch, pool, concurrency, counter_url) -> float:
    import redis

    key = f"bench:done:{queue}"
    counter = redis.Redis.from_url(counter_url)
    counter.delete(key)
    env = {**os.environ, "CELERY_BROKER_URL": broker, COUNTER_URL: counter_url, COUNTER_KEY: key}
    log = open(ROOT / "bench" / f".worker-{queue}.log", "w+b")  # noqa: SIM115
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "celery_app", "worker", f"--pool={pool}",
         f"--concurrency={concurrency}", "-Q", queue, "-I", "bench.celery_publish",
         "--without-mingle", "--without-gossip", "--without-heartbeat", "-l", "WARNING",
         "-n", f"{queue}@%h"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        time.sleep(1)
        app = make_app(broker)
        from event_stream.celery_dispatch import CeleryPublisher

        # Warm up: the worker is ready once it ran the first task.
        with CeleryPublisher(app, queue=queue) as publisher:
            publisher.publish([("bench.noop", events[0])])
            deadline = time.monotonic() + 60
            while int(counter.get(key) or 0) < 1:
                if time.monotonic() > deadline or worker.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"worker did not start:\n{log.read().decode()[-3000:]}")
                time.sleep(0.05)
            counter.set(key, 0)
            rest = events[1:]
            started = time.perf_counter()
            for i in range(0, len(rest), batch):
                publisher.publish([("bench.noop", e) for e in rest[i : i + batch]])
            while int(counter.get(key) or 0) < len(rest):
                if worker.poll() is not None:
                    raise RuntimeError("worker died")
                time.sleep(0.01)
            elapsed = time.perf_counter() - started
        return len(rest) / elapsed
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        delete_queue(make_app(broker), queue)
        counter.delete(key)
        log.close()
        os.unlink(log.name)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--broker", default=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=1_000, help="events per publish() call")
    parser.add_argument("--compare", action="store_true", help="also the naive ways")
    parser.add_argument("--end-to-end", action="store_true", help="also through one worker")
    parser.add_argument("--e2e-events", type=int, default=10_000)
    parser.add_argument("--pool", default="solo", choices=["solo", "prefork", "threads"])
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument(
        "--counter-redis", default="redis://127.0.0.1:6379/0", help="where bench.noop counts"
    )
    args = parser.parse_args(argv)

    import django

    django.setup()
    _register()
    app = make_app(args.broker)
    events = [issue_event(n) for n in range(args.events)]
    import json

    size = len(json.dumps(events[0]))
    print(
        f"{args.events:,} events of {size:,} bytes of JSON, {args.batch:,} per batch, "
        f"broker {app.connection_for_write().as_uri()}"
    )
    queue = f"bench_{uuid.uuid4().hex[:8]}"
    try:
        rate = bench_publisher(app, queue, events, args.batch)
        print(f"  publish, CeleryPublisher:              {rate:>9,.0f} events/s")
        if args.compare:
            few = events[: max(1, args.events // 4)]
            rate = bench_kombu_batch(app, queue, few, args.batch)
            print(f"  publish, kombu Producer.batch():       {rate:>9,.0f} events/s")
            rate = bench_apply_async(app, queue, few)
            print(f"  publish, send_task one by one:         {rate:>9,.0f} events/s")
    finally:
        delete_queue(app, queue)
    if args.end_to_end:
        e2e = events[: args.e2e_events + 1]
        rate = bench_end_to_end(
            args.broker,
            f"bench_{uuid.uuid4().hex[:8]}",
            e2e,
            args.batch,
            args.pool,
            args.concurrency,
            args.counter_redis,
        )
        print(
            f"  end to end, one worker ({args.pool}, -c {args.concurrency}): {rate:>9,.0f} events/s"
        )


if __name__ == "__main__":
    main()
else:
    _register()
