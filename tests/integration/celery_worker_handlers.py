"""Test-only handlers for the Celery worker that the integration tests start.

The worker imports this module with `celery -A celery_app worker -I
tests.integration.celery_worker_handlers`, after Django is set up; production code knows
nothing of it. Each handler leaves its trace in files under $EVENT_STREAM_TEST_RECORD_DIR:
`<handler>.<event_id>.jsonl`, one line with the event_data per run.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

from event_stream.handlers import registry

PATTERNS = ("test.*",)


def _record_dir() -> Path:
    return Path(os.environ["EVENT_STREAM_TEST_RECORD_DIR"])


def trace_path(record_dir: Path, handler: str, event_id: str) -> Path:
    return record_dir / f"{handler}.{event_id}.jsonl"


def runs(record_dir: Path, handler: str, event_id: str) -> list[dict]:
    path = trace_path(record_dir, handler, event_id)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _record(handler: str, event_data: dict) -> int:
    path = trace_path(_record_dir(), handler, event_data["event_id"])
    with path.open("a") as f:
        f.write(json.dumps(event_data) + "\n")
    return len(path.read_text().splitlines())


def record(event_data):
    _record("test.record", event_data)


async def record_async(event_data):
    await asyncio.sleep(0)
    _record("test.record_async", event_data)


def slow_first_time(event_data):
    """First run: leave a trace and the pid, then hang (the test kills the process running it).
    Later runs: return at once."""
    if _record("test.slow_first_time", event_data) == 1:
        pid_file = _record_dir() / f"test.slow_first_time.{event_data['event_id']}.pid"
        pid_file.write_text(str(os.getpid()))
        time.sleep(120)


def fails_once(event_data):
    if _record("test.fails_once", event_data) == 1:
        raise RuntimeError("first attempt fails")


def always_fails(event_data):
    _record("test.always_fails", event_data)
    raise RuntimeError("boom")


def fails_when_told(event_data):
    """Run n: leave a trace; while the test's file `hold.<event_id>.<n>` exists, wait (the test
    breaks the broker or the database meanwhile); then fail."""
    n = _record("test.fails_when_told", event_data)
    hold = _record_dir() / f"hold.{event_data['event_id']}.{n}"
    deadline = time.monotonic() + 60
    while hold.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    raise RuntimeError("told to fail")


def kills_its_worker(event_data):
    """Every run: leave a trace, then die as an OOM kill would (SIGKILL, no chance to ack)."""
    _record("test.kills_its_worker", event_data)
    os.kill(os.getpid(), signal.SIGKILL)


def takes_a_while(event_data):
    """Leave a trace, then take half a second: a backlog of these keeps a worker busy."""
    _record("test.takes_a_while", event_data)
    time.sleep(0.5)


def deployed_late(event_data):
    """Registered only where DEPLOYED_LATE_ENV is set: the worker of a newer release."""
    _record("test.deployed_late", event_data)


for _name, _func in [
    ("test.record", record),
    ("test.record_async", record_async),
    ("test.slow_first_time", slow_first_time),
    ("test.fails_once", fails_once),
    ("test.always_fails", always_fails),
    ("test.kills_its_worker", kills_its_worker),
    ("test.fails_when_told", fails_when_told),
    ("test.takes_a_while", takes_a_while),
]:
    registry.add(_func, PATTERNS, name=_name, dispatch="celery")

# A rolling deploy: the relay may publish a task for a handler that a worker of the older
# release does not have. Only a worker started with this variable set has it.
DEPLOYED_LATE_ENV = "EVENT_STREAM_TEST_DEPLOYED_LATE"
if os.environ.get(DEPLOYED_LATE_ENV):
    registry.add(deployed_late, PATTERNS, name="test.deployed_late", dispatch="celery")
