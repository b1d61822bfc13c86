"""Relay benchmark: end-to-end throughput, latency and memory, against a bare claim loop.

    python bench/relay.py                 # everything; DATABASE_URL picks the server
    python bench/relay.py --events 60000 --quick --rounds 1

Events are written by the capture triggers (issues created, then updated: two events per
entity, so ordering is at work). Each relay is a separate process, as in production, with a
no-op handler; the parent measures wall time from "go" until the outbox is drained.
The raw ceiling is a bare claim-and-mark loop over the same rows with the same claim SQL and
no handler work, so the relay's figure is a ratio. Every throughput run is repeated
(`--rounds`, 3): the table shows medians and ranges, and the CPU each event cost the relay
processes and the rest of the machine (PostgreSQL, mostly). A fresh database is created and
dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# BENCH_RELAY_DATABASE: another name, so that two checkouts can run the benchmark at once.
BENCH_DB = os.environ.get("BENCH_RELAY_DATABASE", "event_stream_bench_relay")


# -- setup ---------------------------------------------------------------------------------------


def setup_django(dbname: str | None = None):
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "plane.settings")
    import django
    from django.conf import settings

    settings.DATABASES["default"]  # resolve the lazy settings before changing them
    if dbname:
        settings.DATABASES["default"]["NAME"] = dbname
    django.setup()
    from django.db import connection

    from event_stream.database import conninfo_from_django

    return conninfo_from_django(connection.settings_dict)


def create_database() -> str:
    import psycopg

    admin = setup_django()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {BENCH_DB}")
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connection

    connection.close()
    settings.DATABASES["default"]["NAME"] = BENCH_DB
    call_command("migrate", verbosity=0)
    connection.close()
    from event_stream.database import conninfo_from_django

    return conninfo_from_django(settings.DATABASES["default"])


def drop_database(conninfo: str) -> None:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(conninfo)
    params["dbname"] = "postgres"
    with psycopg.connect(make_conninfo(**params), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")


def write_trigger_events(conninfo: str, entities: int) -> int:
    """`entities` issues created, then each updated once: 2 events per issue, via triggers."""
    import psycopg

    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("TRUNCATE outbox, plane_issue CASCADE")
        # Start a checkpoint cycle here: writing the events and the run that follows stay well
        # inside max_wal_size, so a checkpoint requested by earlier runs' WAL (about one per
        # four runs) cannot land in the middle of this one at random.
        conn.execute("CHECKPOINT")
        ws = conn.execute(
            "INSERT INTO plane_workspace (id, name, slug, created_at, updated_at)"
            " VALUES (gen_random_uuid(), 'Bench', 'bench-' || gen_random_uuid(), now(), now())"
            " RETURNING id"
        ).fetchone()[0]
        project = conn.execute(
            "INSERT INTO plane_project (id, workspace_id, name, identifier, created_at, updated_at)"
            " VALUES (gen_random_uuid(), %s, 'Bench', 'B', now(), now()) RETURNING id",
            (ws,),
        ).fetchone()[0]
        for start in range(0, entities, 500):
            n = min(500, entities - start)
            conn.execute(
                """INSERT INTO plane_issue (id, workspace_id, project_id, name, description_html,
                       priority, sequence_id, sort_order, is_draft, created_at, updated_at)
                   SELECT gen_random_uuid(), %s, %s, 'Issue ' || g, '<p>Body</p>', 'none', g,
                          65535, false, now(), now()
                   FROM generate_series(%s::int, %s::int) AS g""",
                (ws, project, start, start + n - 1),
            )
        for _ in range(0, entities, 500):
            conn.execute(
                "UPDATE plane_issue SET priority = 'high'"
                " WHERE id IN (SELECT id FROM plane_issue WHERE priority = 'none' LIMIT 500)"
            )
        conn.execute("VACUUM ANALYZE outbox")
        return conn.execute("SELECT count(*) FROM outbox").fetchone()[0]


# -- a relay process -----------------------------------------------------------------------------


async def run_relay_worker(conninfo: str, batch_size: int, mode: str) -> dict:
    """Run a relay (or the bare loop) until the outbox is drained; report what it did."""
    import psycopg

    from event_stream.database import DatabaseConnection
    from event_stream.poller import OutboxPoller
    from event_stream.service import freeze_loaded_objects
    from event_stream.settings import RelaySettings

    latencies: list[float] = []
    freeze_loaded_objects()  # as the service does before it runs the relay
    print("ready", flush=True)
    sys.stdin.readline()  # the parent says go
    started = time.perf_counter()
    cpu_started = time.process_time()
    processed = 0
    if mode == "raw":
        # The relay's own DatabaseConnection (same claim SQL, same commit mode), no handlers.
        db = DatabaseConnection(conninfo)
        await db.connect_work()
        async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as watch:
            while True:
                rows = await db.fetch_and_lock_rows(batch_size)
                if rows:
                    await db.mark_processed([r[0] for r in rows])
                await db.commit()
                processed += len(rows)
                if not rows and await _drained(watch):
                    break
        await db.close()
    else:
        poller = OutboxPoller(
            settings=RelaySettings(batch_size=batch_size, interval_min=0.01, interval_max=0.05),
            conninfo=conninfo,
        )
        if mode == "celery":
            # One Celery handler: the relay's figure is its publishing rate (rows processed
            # only once the broker accepted the batch's tasks).
            from bench.celery_publish import make_app, noop
            from event_stream.celery_dispatch import CeleryPublisher

            broker, queue = os.environ["BENCH_BROKER"], os.environ["BENCH_QUEUE"]
            poller.publisher = CeleryPublisher(make_app(broker), queue=queue)
            poller.add_handler(noop, name="bench.noop", dispatch="celery")
        elif mode == "latency":
            import datetime

            def measure(event):
                created = datetime.datetime.fromisoformat(event["created_at"]).timestamp()
                latencies.append(time.time() - created)

            poller.add_handler(measure)
        else:
            poller.add_handler(lambda event: None)
        task = asyncio.create_task(poller.run())
        if mode == "latency":
            await asyncio.to_thread(sys.stdin.readline)  # the parent says stop
        else:
            async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as watch:
                while not task.done() and not await _drained(watch):
                    await asyncio.sleep(0.05)
        poller.stop()
        await task
        processed = poller.processed_count
    elapsed = time.perf_counter() - started
    report = {
        "processed": processed,
        "elapsed": elapsed,
        "cpu_s": time.process_time() - cpu_started,
        "maxrss_mb": peak_rss_mb(),
    }
    if latencies:
        latencies.sort()
        report["p50_ms"] = statistics.median(latencies) * 1000
        report["p99_ms"] = latencies[int(len(latencies) * 0.99) - 1] * 1000
        report["latency_samples"] = len(latencies)
    return report


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not getrusage's ru_maxrss: Linux carries
    ru_maxrss across exec, so a worker would report the benchmark parent's size when it forked
    (Django loaded, and growing from run to run) whenever that is larger than its own."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def _drained(conn) -> bool:
    cur = await conn.execute(
        "SELECT NOT EXISTS (SELECT 1 FROM outbox WHERE processed_at IS NULL AND failed_at IS NULL)"
    )
    (drained,) = await cur.fetchone()
    if not conn.autocommit:
        await conn.commit()
    return drained


def worker_main(args) -> None:
    conninfo = setup_django(BENCH_DB)
    report = asyncio.run(run_relay_worker(conninfo, args.batch_size, args.mode))
    print(json.dumps(report), flush=True)


# -- the parent ----------------------------------------------------------------------------------


def spawn(batch_size: int, mode: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, __file__, "worker", "--batch-size", str(batch_size), "--mode", mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def run_relays(count: int, batch_size: int, mode: str = "relay") -> dict:
    processes = [spawn(batch_size, mode) for _ in range(count)]
    for p in processes:
        assert p.stdout.readline().strip() == "ready"
    busy_before = machine_busy_seconds()
    started = time.perf_counter()
    for p in processes:
        p.stdin.write("go\n")
        p.stdin.flush()
    reports = [json.loads(p.stdout.readline()) for p in processes]
    elapsed = time.perf_counter() - started
    busy = machine_busy_seconds() - busy_before
    for p in processes:
        p.wait()
    total = sum(r["processed"] for r in reports)
    relays_cpu = sum(r["cpu_s"] for r in reports)
    return {
        "events": total,
        "seconds": elapsed,
        "rate": total / elapsed,
        "peak_rss_mb": max(r["maxrss_mb"] for r in reports),
        # CPU an event: the relay processes', and the rest of the machine's (PostgreSQL, mostly).
        "relay_cpu_us": relays_cpu / total * 1e6,
        "other_cpu_us": (busy - relays_cpu) / total * 1e6,
    }


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (Linux's /proc/stat)."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


def run_latency(conninfo: str, rate: int, seconds: float, batch_size: int) -> dict:
    import psycopg

    with psycopg.connect(conninfo, autocommit=True) as conn:
        # Only the events written at the steady rate count: start from an empty queue.
        conn.execute("UPDATE outbox SET processed_at = now() WHERE processed_at IS NULL")
    relay = spawn(batch_size, "latency")
    assert relay.stdout.readline().strip() == "ready"
    relay.stdin.write("go\n")
    relay.stdin.flush()
    time.sleep(0.5)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        # The writer must keep up with the rate; it does not wait for the disk on each commit.
        conn.execute("SET synchronous_commit = off")
        ids = [r[0] for r in conn.execute("SELECT id FROM plane_issue LIMIT 2000").fetchall()]
        total = int(rate * seconds)
        start = time.perf_counter()
        for n in range(total):
            due = start + n / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            conn.execute(
                "UPDATE plane_issue SET sequence_id = sequence_id + 1 WHERE id = %s",
                (ids[n % len(ids)],),
                prepare=True,
            )
        achieved = total / (time.perf_counter() - start)
    time.sleep(1.0)
    relay.stdin.write("stop\n")
    relay.stdin.flush()
    report = json.loads(relay.stdout.readline())
    relay.wait()
    report["write_rate"] = achieved
    return report


def run_celery(conninfo: str, entities: int, batch_size: int, end_to_end: bool) -> dict:
    """Events/s a relay publishes with one Celery handler; with end_to_end, until one worker
    (prefork, 2 processes) has run every task."""
    import uuid

    import redis

    from bench.celery_publish import COUNTER_KEY, COUNTER_URL, delete_queue, make_app

    broker = os.environ.get("BENCH_CELERY_BROKER", "redis://127.0.0.1:6379/12")
    queue = f"bench_relay_{uuid.uuid4().hex[:8]}"
    key = f"bench:done:{queue}"
    os.environ.update(BENCH_BROKER=broker, BENCH_QUEUE=queue)
    events = write_trigger_events(conninfo, entities)
    counter = redis.Redis.from_url(broker)
    worker = None
    try:
        if end_to_end:
            env = {**os.environ, "CELERY_BROKER_URL": broker, COUNTER_URL: broker, COUNTER_KEY: key}
            worker = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "celery_app", "worker", "--pool=prefork",
                 "--concurrency=2", "-Q", queue, "-I", "bench.celery_publish",
                 "--without-mingle", "--without-gossip", "--without-heartbeat", "-l", "ERROR"],
                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(5)  # the worker starts
        started = time.perf_counter()
        published = run_relays(1, batch_size, "celery")
        if end_to_end:
            while int(counter.get(key) or 0) < events:
                if worker.poll() is not None:
                    raise RuntimeError("the worker died")
                time.sleep(0.05)
            return {"rate": events / (time.perf_counter() - started), "events": events}
        return published
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=30)
        delete_queue(make_app(broker), queue)
        counter.delete(key)
        counter.close()


BATCH_SIZES = (50, 250, 1000)
RELAY_COUNTS = (2, 3)


def run_round(conninfo: str, entities: int) -> dict[str, dict]:
    """Every throughput run once, each over freshly written events: {name: run_relays report}."""
    runs = {}
    for batch in BATCH_SIZES:
        write_trigger_events(conninfo, entities)
        runs[f"raw {batch}"] = run_relays(1, batch, "raw")
        write_trigger_events(conninfo, entities)
        runs[f"1 relay, batch {batch}"] = run_relays(1, batch)
    for count in RELAY_COUNTS:
        write_trigger_events(conninfo, entities)
        runs[f"{count} relays, batch 1000"] = run_relays(count, 1000)
    return runs


def _median_range(values: list[float], fmt: str) -> str:
    """'median (low-high)'; the range only when there is more than one value."""
    text = format(statistics.median(values), fmt)
    if len(values) > 1:
        text += f" ({format(min(values), fmt)}-{format(max(values), fmt)})"
    return text


def print_throughput(rounds: list[dict[str, dict]]) -> None:
    """Medians and ranges over the rounds. Ratios are taken within each round (relay against
    the raw loop, several relays against one), so that a slow moment of a shared machine
    weighs on both sides of a ratio rather than on one."""
    print(f"\n{len(rounds)} round(s); median (lowest-highest)")
    print(
        f"{'run':<22}{'events/s':>26}{'raw events/s':>26}{'ratio':>22}{'peak MB':>9}"
        f"{'CPU us/event: relay, rest':>28}"
    )

    def rates(name: str) -> list[float]:
        return [r[name]["rate"] for r in rounds]

    def peak(name: str) -> float:
        return max(r[name]["peak_rss_mb"] for r in rounds)

    def cpu(name: str) -> str:
        relay = statistics.median(r[name]["relay_cpu_us"] for r in rounds)
        rest = statistics.median(r[name]["other_cpu_us"] for r in rounds)
        return f"{relay:.1f}, {rest:.1f}"

    for batch in BATCH_SIZES:
        name = f"1 relay, batch {batch}"
        ratios = [r[name]["rate"] / r[f"raw {batch}"]["rate"] * 100 for r in rounds]
        print(
            f"{name:<22}{_median_range(rates(name), ',.0f'):>26}"
            f"{_median_range(rates(f'raw {batch}'), ',.0f'):>26}"
            f"{_median_range(ratios, '.0f') + ' %':>22}{peak(name):>9.0f}{cpu(name):>28}"
        )
    for count in RELAY_COUNTS:
        name = f"{count} relays, batch 1000"
        ratios = [r[name]["rate"] / r["1 relay, batch 1000"]["rate"] for r in rounds]
        print(
            f"{name:<22}{_median_range(rates(name), ',.0f'):>26}{'':>26}"
            f"{_median_range(ratios, '.2f') + ' x':>22}{peak(name):>9.0f}{cpu(name):>28}"
        )


def print_latency(lat: dict) -> None:
    print(
        f"\nlatency at {lat['write_rate']:,.0f} events/s written "
        f"({lat['latency_samples']} events): p50 {lat['p50_ms']:.1f} ms, "
        f"p99 {lat['p99_ms']:.1f} ms; relay peak RSS {lat['maxrss_mb']:.0f} MB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    worker = sub.add_parser("worker")
    worker.add_argument("--batch-size", type=int, required=True)
    worker.add_argument("--mode", choices=["relay", "raw", "latency", "celery"], required=True)
    parser.add_argument("--events", type=int, default=100_000, help="events per run (even)")
    parser.add_argument("--quick", action="store_true", help="skip the latency run")
    parser.add_argument("--latency-only", action="store_true", help="only the latency run")
    parser.add_argument("--celery", action="store_true", help="also Celery dispatch (Redis)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="throughput rounds; medians and ranges are shown"
    )
    args = parser.parse_args()
    if args.command == "worker":
        worker_main(args)
        return

    conninfo = create_database()
    entities = args.events // 2
    try:
        if args.latency_only:
            write_trigger_events(conninfo, 2000)
            print_latency(run_latency(conninfo, rate=1000, seconds=10, batch_size=250))
            return
        rounds = [run_round(conninfo, entities) for _ in range(args.rounds)]
        print_throughput(rounds)
        if args.celery:
            published = run_celery(conninfo, entities, 1000, end_to_end=False)
            print(f"\n1 relay, 1 Celery handler, batch 1000: {published['rate']:,.0f} events/s "
                  "published to Redis")  # fmt: skip
            through = run_celery(conninfo, 2500, 250, end_to_end=True)
            print(f"end to end through one worker (prefork, 2 processes): "
                  f"{through['rate']:,.0f} events/s ({through['events']} events)")  # fmt: skip
        if not args.quick:
            write_trigger_events(conninfo, 2000)
            print_latency(run_latency(conninfo, rate=1000, seconds=10, batch_size=250))
    finally:
        drop_database(conninfo)


if __name__ == "__main__":
    main()
