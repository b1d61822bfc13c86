"""A relay process for the integration tests: `python -m tests.integration.relay_process`.

Its one handler records each event it handles in `relay_test_handled` (created by the tests),
so a test can check what was handled, by whom, and in which order, across processes and kills.
Behaviour comes from the environment:
  RELAY_TEST_SLEEP          seconds each event's handling takes (default 0)
  RELAY_TEST_FAIL_ENTITY    entity id whose events raise
  RELAY_TEST_ALLOCATE_MB    MB the handler keeps allocated once (for the memory-limit test)
Relay settings come from the usual OUTBOX_POLLER_* variables.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import django
import psycopg

_recorder = threading.local()
_ballast: list[bytes] = []


def _connection(conninfo: str) -> psycopg.Connection:
    conn = getattr(_recorder, "conn", None)
    if conn is None or conn.closed:
        conn = _recorder.conn = psycopg.connect(conninfo, autocommit=True)
        # One commit per handled event: don't wait for the disk on each (test records only).
        conn.execute("SET synchronous_commit = off")
    return conn


def make_handler(conninfo: str):
    sleep = float(os.environ.get("RELAY_TEST_SLEEP", "0") or 0)
    fail_entity = os.environ.get("RELAY_TEST_FAIL_ENTITY")
    allocate_mb = int(os.environ.get("RELAY_TEST_ALLOCATE_MB", "0") or 0)

    def record(event: dict) -> None:
        if allocate_mb and not _ballast:
            _ballast.append(bytes(allocate_mb * 1024 * 1024))
        if sleep:
            time.sleep(sleep)
        if fail_entity and event["entity_id"] == fail_entity:
            raise RuntimeError(f"refusing entity {fail_entity}")
        _connection(conninfo).execute(
            "INSERT INTO relay_test_handled (outbox_id, entity_id, pid, attempts)"
            " VALUES (%s, %s, %s, %s)",
            (event["id"], event["entity_id"], os.getpid(), event["attempts"]),
        )

    return record


def main() -> int:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "plane.settings")
    django.setup()
    from django.db import connection

    from event_stream.database import conninfo_from_django
    from event_stream.handlers import HandlerRegistry
    from event_stream.service import OutboxEventService
    from event_stream.settings import load_settings

    registry = HandlerRegistry()
    registry.add(make_handler(conninfo_from_django(connection.settings_dict)), name="record")
    print(f"relay ready pid={os.getpid()}", flush=True)
    return OutboxEventService(load_settings(), registry=registry).start()


if __name__ == "__main__":
    sys.exit(main())
