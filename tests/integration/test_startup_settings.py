"""A bad setting stops the relay, the Celery worker and beat when they start, as real processes:
one line naming the variable, exit status 2. Never later, inside a task, where it would cost the
task's event."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.integration.celery_support import ROOT, unique_queue

pytestmark = pytest.mark.slow

RELAY = ["manage.py", "outbox_poller"]
SERVICE = ["-m", "event_stream.service"]
WORKER = ["-m", "celery", "-A", "celery_app", "worker", "--pool=solo",
          "--without-mingle", "--without-gossip", "--without-heartbeat"]  # fmt: skip
BEAT = ["-m", "celery", "-A", "celery_app", "beat"]


def run(args, env, *, database_url, broker_url, tmp_path, timeout=40):
    if args is WORKER:
        args = [*args, "-Q", unique_queue("es_startup")]
    if args is BEAT:
        args = [*args, "-s", str(tmp_path / "beat-schedule")]
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={
            **os.environ,
            "DATABASE_URL": database_url,
            "CELERY_BROKER_URL": broker_url,
            "PYTHONUNBUFFERED": "1",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    ("program", "variable", "value", "prefix"),
    [
        (WORKER, "OUTBOX_CELERY_MAX_RETRIES", "abc", "celery worker: "),
        (WORKER, "OUTBOX_CELERY_RETRY_BACKOFF", "-1", "celery worker: "),
        (WORKER, "OUTBOX_RETENTION_DAYS", "0", "celery worker: "),
        (WORKER, "CELERY_BROKER_TRANSPORT_OPTIONS", "[1]", "celery worker: "),
        (WORKER, "CELERY_BROKER_TRANSPORT_OPTIONS", "nonsense", "celery worker: "),
        (WORKER, "EVENT_STREAM_LOG_LEVEL", "loud", "celery worker: "),
        (BEAT, "CELERY_BROKER_TRANSPORT_OPTIONS", "nonsense", "celery beat: "),
        (BEAT, "OUTBOX_RETENTION_DAYS", "a week", "celery beat: "),
        (RELAY, "CELERY_BROKER_TRANSPORT_OPTIONS", "[1]", "CommandError: "),
        (RELAY, "EVENT_STREAM_LOG_LEVEL", "loud", "CommandError: "),
        (SERVICE, "EVENT_STREAM_LOG_LEVEL", "loud", "outbox relay: "),
        (RELAY, "OUTBOX_POLLER_HEARTBEAT_INTERVAL", "60", "CommandError: "),
    ],
)
def test_a_bad_value_stops_the_program_with_one_line_naming_it(
    program, variable, value, prefix, db, database_url, broker_url, tmp_path
):
    # db: the test database by name (beat's scheduler reads it before the check)
    result = run(
        program, {variable: value},
        database_url=database_url, broker_url=broker_url, tmp_path=tmp_path,
    )  # fmt: skip

    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    # Beat prints its banner before it checks (to stdout): the error is stderr's one line.
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{prefix}{variable}: must be ") and repr(value) in lines[0]


def test_a_lowercase_log_level_is_accepted(database_url, broker_url, tmp_path):
    result = run(
        ["manage.py", "check"], {"EVENT_STREAM_LOG_LEVEL": "debug"},
        database_url=database_url, broker_url=broker_url, tmp_path=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
