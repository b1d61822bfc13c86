"""Helpers to start relay processes and write events for the process-level tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[2]

HANDLED_TABLE = """
CREATE TABLE IF NOT EXISTS relay_test_handled (
    seq bigserial PRIMARY KEY,
    outbox_id bigint NOT NULL,
    entity_id uuid,
    pid int NOT NULL,
    attempts int NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
)"""


def reset(conninfo: str) -> None:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(HANDLED_TABLE)
        conn.execute("TRUNCATE relay_test_handled, outbox, outbox_relay RESTART IDENTITY")


def start_relay(database_url: str, **env: str) -> subprocess.Popen:
    environ = {**os.environ, "DATABASE_URL": database_url, "PYTHONUNBUFFERED": "1"}
    environ.setdefault("OUTBOX_POLLER_INTERVAL_MAX", "0.5")
    environ.update({k: str(v) for k, v in env.items()})
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration.relay_process"],
        cwd=ROOT,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def write_events(conninfo: str, entities: list[uuid.UUID], per_entity: int) -> None:
    """Events in many small transactions, interleaving entities, as an app would write them."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        for n in range(per_entity):
            with conn.transaction():
                for entity in entities:
                    conn.execute(
                        "INSERT INTO outbox (event_type, entity_type, entity_id, payload)"
                        " VALUES ('test.changed', 'test', %s, %s)",
                        (entity, psycopg.types.json.Jsonb({"n": n})),
                    )


def wait_until(predicate, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def query(conninfo: str, sql: str, params=()) -> list[tuple]:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def pending_count(conninfo: str) -> int:
    return query(
        conninfo, "SELECT count(*) FROM outbox WHERE processed_at IS NULL AND failed_at IS NULL"
    )[0][0]


def stop(process: subprocess.Popen, timeout: float = 10) -> str:
    if process.poll() is None:
        process.terminate()
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
    return out or ""
