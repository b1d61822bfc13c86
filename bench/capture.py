"""Capture benchmark: what the capture triggers cost the writes of the application.

    python bench/capture.py [--rows 2000] [--batches 40] [--batch-size 500] [--writers 8]
                            [--rounds 5] [--growing-outbox]

Creates its own database (`event_stream_bench_capture`) on the server named by DATABASE_URL
(unset: the embedded server), migrates it, and writes issues with raw psycopg (no ORM, so the
trigger cost is not hidden by Python overhead), with the capture triggers of `plane_issue`
enabled and with them disabled (`ALTER TABLE plane_issue DISABLE TRIGGER USER`; foreign-key
checks stay on). Each operation runs on both sides back to back, so a busy neighbour on the
machine slows both alike; rounds alternate which side goes first. Reported: the median rate of
each side, the median of the rounds' ratios, and the median time capture adds to a row's write
(microseconds: 1/rate with capture - 1/rate without). The database is dropped at the end.

The outbox is kept as a running system keeps it: after each round (and after a warm-up round
that is not reported), its events are marked processed and the project's own cleanup
(`cleanup_processed`, which deletes them and vacuums) frees their space, which the next round's
events take. With --growing-outbox, the outbox is never cleaned up: every event goes to a new
end of the file, which PostgreSQL 15 extends one page (about ten events) at a time.

Workloads:
- single-row: autocommit, one INSERT or UPDATE per transaction.
- 500-row batch: one INSERT of 500 rows per transaction, and one UPDATE of 500 rows per
  transaction. Every UPDATE changes a captured column, so every updated row emits an event.
- single-row UPDATE by 8 writers at once (threads, one connection each).

Writers send a NOTIFY only while a relay sleeps (it holds the wake-up lock). A relay that keeps
up with the writes is busy, so the plain rows are the writes of a loaded system; the rows marked
"relay asleep" hold the lock (and LISTEN) on a connection of their own, so that every write
notifies: the cost an isolated write pays when the relay is idle.

Goals: with capture, >= 75% of the single-row rate and >= 60% of the batch rate; the exit
status is 1 when one is missed. The variants of the single-row UPDATE have none of their own.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

BENCH_DATABASE = "event_stream_bench_capture"
GOALS = {"single": 0.75, "batch": 0.60}

INSERT_COLUMNS = (
    "id, created_at, updated_at, name, description_html, priority, sequence_id, sort_order, "
    "is_draft, project_id, workspace_id"
)
INSERT_ONE = (
    f"INSERT INTO plane_issue ({INSERT_COLUMNS}) "
    "VALUES (%s, now(), now(), %s, '<p>Steps to reproduce</p>', 'none', %s, 65535, false, %s, %s)"
)
INSERT_MANY = (
    f"INSERT INTO plane_issue ({INSERT_COLUMNS}) "
    "SELECT b.id, now(), now(), b.name, '<p>Steps to reproduce</p>', 'none', b.seq, 65535, "
    "false, %s, %s FROM unnest(%s::uuid[], %s::text[], %s::int[]) AS b(id, name, seq)"
)
UPDATE_ONE = "UPDATE plane_issue SET priority = %s, updated_at = now() WHERE id = %s"
UPDATE_MANY = "UPDATE plane_issue SET priority = %s, updated_at = now() WHERE id = ANY(%s)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2000, help="single-row writes per side")
    parser.add_argument("--batches", type=int, default=40, help="batches per side")
    parser.add_argument("--batch-size", type=int, default=500, help="rows per batch")
    parser.add_argument("--writers", type=int, default=8, help="concurrent writers")
    parser.add_argument("--rounds", type=int, default=5, help="with/without pairs to run")
    parser.add_argument("--database", default=BENCH_DATABASE, help="database to create and drop")
    parser.add_argument(
        "--growing-outbox",
        action="store_true",
        help="never clean the outbox up: every event extends its file",
    )
    return parser.parse_args(argv)


def setup_django(database: str) -> dict:
    """Django's settings for the bench database; starts the embedded server if needed."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "plane.settings")
    from django.conf import settings

    default = settings.DATABASES["default"]
    server_default_db = default["NAME"]
    default["NAME"] = database
    return {**default, "NAME": server_default_db}


def create_database(maintenance: dict, database: str) -> None:
    import psycopg
    from psycopg import sql

    from event_stream.database import conninfo_from_django

    with psycopg.connect(conninfo_from_django(maintenance), autocommit=True) as conn:
        # A database of this name is the benchmark's own, left over from an interrupted run.
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))


def drop_database(maintenance: dict, database: str) -> None:
    import psycopg
    from psycopg import sql

    from event_stream.database import conninfo_from_django

    with psycopg.connect(conninfo_from_django(maintenance), autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database))
        )


@contextmanager
def migrated_database(database: str) -> Iterator[str]:
    """A new database of this name on the bench's server, migrated: yields its conninfo, and
    drops it at the end, whatever happened."""
    maintenance = setup_django(database)
    import django

    create_database(maintenance, database)
    try:
        django.setup()
        from django.core.management import call_command
        from django.db import connection

        from event_stream.database import conninfo_from_django

        call_command("migrate", verbosity=0)
        conninfo = conninfo_from_django(connection.settings_dict)
        connection.close()
        yield conninfo
    finally:
        from django.db import connections

        connections.close_all()
        drop_database(maintenance, database)


class Bench:
    def __init__(self, conn, workspace_id: uuid.UUID, project_id: uuid.UUID) -> None:
        self.conn = conn
        self.workspace_id = workspace_id
        self.project_id = project_id
        self.relay: Any = None  # the connection of the sleeping relay, while one sleeps

    def relay_asleep(self, asleep: bool) -> None:
        """Hold the wake-up lock and LISTEN, as a sleeping relay does (or stop)."""
        import psycopg

        from event_stream.capture import NOTIFY_CHANNEL, WAKEUP_LOCK

        if asleep and self.relay is None:
            self.relay = psycopg.connect(self.conn.info.dsn, autocommit=True)
            self.relay.execute(f"LISTEN {NOTIFY_CHANNEL}")
            self.relay.execute("SELECT pg_advisory_lock(%s, %s)", WAKEUP_LOCK)
        elif not asleep and self.relay is not None:
            received = sum(1 for _ in self.relay.notifies(timeout=0.2))
            self.relay.close()
            self.relay = None
            if not received:
                raise RuntimeError("the sleeping relay received no NOTIFY")

    def reset(self) -> None:
        self.conn.execute("TRUNCATE plane_issue, outbox CASCADE")
        self.conn.execute("VACUUM ANALYZE plane_issue")
        self.conn.execute("VACUUM ANALYZE outbox")
        self.conn.execute("CHECKPOINT")

    def set_capture(self, capture: bool) -> None:
        # USER: the capture triggers only; foreign-key checks (internal triggers) stay on.
        action = "ENABLE" if capture else "DISABLE"
        self.conn.execute(f"ALTER TABLE plane_issue {action} TRIGGER USER")

    def single_insert(self, rows: int) -> list[uuid.UUID]:
        ids = [uuid.uuid4() for _ in range(rows)]
        with self.conn.cursor() as cur:
            for n, issue_id in enumerate(ids):
                cur.execute(
                    INSERT_ONE,
                    (issue_id, f"Issue {n}", n, self.project_id, self.workspace_id),
                    prepare=True,
                )
        return ids

    def single_update(self, ids: list[uuid.UUID], priority: str) -> None:
        with self.conn.cursor() as cur:
            for issue_id in ids:
                cur.execute(UPDATE_ONE, (priority, issue_id), prepare=True)

    def concurrent_update(self, ids: list[uuid.UUID], writers: int, priority: str) -> None:
        """The single-row UPDATEs of `ids`, shared among `writers` connections at once."""
        import psycopg

        connections = [psycopg.connect(self.conn.info.dsn, autocommit=True) for _ in range(writers)]
        errors: list[BaseException] = []

        def write(conn, share: list[uuid.UUID]) -> None:
            try:
                with conn.cursor() as cur:
                    for issue_id in share:
                        cur.execute(UPDATE_ONE, (priority, issue_id), prepare=True)
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        threads = [
            threading.Thread(target=write, args=(conn, ids[n::writers]))
            for n, conn in enumerate(connections)
        ]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            for conn in connections:
                conn.close()
        if errors:
            raise errors[0]

    def batch_insert(self, batches: int, size: int) -> list[list[uuid.UUID]]:
        all_ids = []
        with self.conn.cursor() as cur:
            for b in range(batches):
                ids = [uuid.uuid4() for _ in range(size)]
                names = [f"Batch {b} issue {n}" for n in range(size)]
                seqs = list(range(b * size, (b + 1) * size))
                cur.execute(
                    INSERT_MANY,
                    (self.project_id, self.workspace_id, ids, names, seqs),
                    prepare=True,
                )
                all_ids.append(ids)
        return all_ids

    def batch_update(self, batches: list[list[uuid.UUID]]) -> None:
        with self.conn.cursor() as cur:
            for ids in batches:
                cur.execute(UPDATE_MANY, ("urgent", ids), prepare=True)

    def last_event_id(self) -> int:
        return self.conn.execute("SELECT coalesce(max(id), 0) FROM outbox").fetchone()[0]

    def events_since(self, last_id: int) -> int:
        return self.conn.execute(
            "SELECT count(*) FROM outbox WHERE id > %s", (last_id,)
        ).fetchone()[0]

    def clean_up_outbox(self) -> None:
        """What a running system does to the handled events: its cleanup deletes and vacuums."""
        from event_stream.tasks import cleanup_processed

        self.conn.execute("UPDATE outbox SET processed_at = now() WHERE processed_at IS NULL")
        cleanup_processed(retention_days=0)


def run_round(bench: Bench, args: argparse.Namespace, order: tuple[bool, bool]) -> dict:
    """Rows per second of each operation in one round: {operation: {capture: rate}}.

    Each operation runs with and without capture back to back, so both sides see the same load
    on the machine; `order` says which side goes first. The UPDATEs rewrite the rows that the
    same side's INSERTs wrote.
    """
    rates: dict[str, dict[bool, float]] = {}
    written: dict[tuple[str, bool], Any] = {}

    def measure(
        name: str, rows: int, operation: Callable[[bool], object], *, asleep: bool = False
    ) -> None:
        for capture in order:
            bench.set_capture(capture)
            bench.relay_asleep(asleep and capture)
            start = time.perf_counter()
            written[name, capture] = operation(capture)
            rates.setdefault(name, {})[capture] = rows / (time.perf_counter() - start)
            bench.relay_asleep(False)

    single, batch = "single-row", f"{args.batch_size}-row"
    batch_rows = args.batches * args.batch_size
    inserted = f"{single} INSERT"
    measure(inserted, args.rows, lambda c: bench.single_insert(args.rows))
    # Each UPDATE of the same rows sets another priority, so that every one emits an event.
    measure(
        f"{single} UPDATE", args.rows, lambda c: bench.single_update(written[inserted, c], "high")
    )
    measure(
        f"{single} UPDATE, relay asleep",
        args.rows,
        lambda c: bench.single_update(written[inserted, c], "low"),
        asleep=True,
    )
    for asleep, priority in ((False, "medium"), (True, "urgent")):
        measure(
            f"{single} UPDATE, {args.writers} writers" + (", relay asleep" if asleep else ""),
            args.rows,
            lambda c, p=priority: bench.concurrent_update(written[inserted, c], args.writers, p),
            asleep=asleep,
        )
    measure(
        f"{batch} INSERT", batch_rows, lambda c: bench.batch_insert(args.batches, args.batch_size)
    )
    measure(
        f"{batch} UPDATE", batch_rows, lambda c: bench.batch_update(written[f"{batch} INSERT", c])
    )
    return rates


def report(rounds: list[dict]) -> bool:
    """Median rates, the median of the rounds' ratios (robust to a noisy neighbour), and what
    capture adds to each row's write in microseconds (median of the rounds' differences).

    The added time is the number that travels between machines: a single-row write's ratio
    moves with the disk's commit flush, which both sides pay alike.
    """
    width = max(len(op) for op in rounds[0])
    header = (
        f"{'operation':<{width}} {'with capture':>14} {'without':>14} {'ratio':>7} "
        f"{'added':>9}  goal"
    )
    print(header)
    print("-" * len(header))
    met = True
    for op in rounds[0]:
        rate_with = statistics.median(r[op][True] for r in rounds)
        rate_without = statistics.median(r[op][False] for r in rounds)
        ratio = statistics.median(r[op][True] / r[op][False] for r in rounds)
        added_us = statistics.median(1e6 / r[op][True] - 1e6 / r[op][False] for r in rounds)
        line = (
            f"{op:<{width}} {rate_with:>10,.0f} r/s {rate_without:>10,.0f} r/s {ratio:>6.1%} "
            f"{added_us:>6,.1f} us"
        )
        if "," in op:  # a variant of the single-row UPDATE, shown for comparison
            print(f"{line}  (no goal)")
            continue
        goal = GOALS["single" if op.startswith("single") else "batch"]
        ok = ratio >= goal
        met = met and ok
        print(f"{line}  >= {goal:.0%} {'ok' if ok else 'MISSED'}")
    return met


def check_events_written(found: int, args: argparse.Namespace) -> None:
    # Per round: the INSERTs and UPDATEs of both sizes, and three more single-row UPDATEs.
    expected = 2 * (args.rows + args.batches * args.batch_size) + 3 * args.rows
    if found != expected:
        raise RuntimeError(f"expected {expected} events from a round, found {found}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with migrated_database(args.database) as conninfo:
        # The cleanup between rounds logs a line at INFO; the report is what this prints.
        logging.getLogger("event_stream.celery").setLevel(logging.WARNING)
        import psycopg

        with psycopg.connect(conninfo, autocommit=True) as conn:
            server = conn.execute("SHOW server_version").fetchone()[0]
            workspace_id, project_id = uuid.uuid4(), uuid.uuid4()
            conn.execute(
                "INSERT INTO plane_workspace (id, created_at, updated_at, name, slug) "
                "VALUES (%s, now(), now(), 'Bench', 'bench')",
                (workspace_id,),
            )
            conn.execute(
                "INSERT INTO plane_project "
                "(id, created_at, updated_at, name, identifier, workspace_id) "
                "VALUES (%s, now(), now(), 'Bench', 'BENCH', %s)",
                (project_id, workspace_id),
            )
            bench = Bench(conn, workspace_id, project_id)
            outbox = "growing (never cleaned up)" if args.growing_outbox else "cleaned up"
            print(
                f"PostgreSQL {server}, database {args.database}: {args.rows} single-row writes, "
                f"{args.batches} x {args.batch_size}-row batches, median of {args.rounds} rounds "
                f"after a warm-up round; outbox {outbox} between rounds"
            )
            bench.reset()
            rounds = []
            for n in range(args.rounds + 1):
                last_id = bench.last_event_id()
                # Alternate which side goes first, so neither always runs on a warmer server.
                rates = run_round(bench, args, (True, False) if n % 2 == 0 else (False, True))
                check_events_written(bench.events_since(last_id), args)
                if n:  # round 0 warms the server up (and leaves space to reuse)
                    rounds.append(rates)
                if not args.growing_outbox:
                    bench.clean_up_outbox()
            print()
            met = report(rounds)
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
