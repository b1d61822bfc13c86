"""A batch's outcome recorded on the real PostgreSQL, whatever the handlers' errors and the
payloads hold: one event PostgreSQL or Python cannot take must not stop the relay."""

from __future__ import annotations

import asyncio
import time

import pytest

from event_stream.database import DatabaseConnection
from event_stream.handlers import HandlerRegistry
from event_stream.poller import OutboxPoller, StopReason
from event_stream.settings import RelaySettings

pytestmark = pytest.mark.django_db(transaction=True)


def insert(conn, payload_text: str) -> int:
    (row_id,) = conn.execute(
        "INSERT INTO outbox (event_type, entity_type, entity_id, payload)"
        " VALUES ('test.changed', 'test', gen_random_uuid(), %s::json) RETURNING id",
        (payload_text,),
    ).fetchone()
    return row_id


def outcome_of(conn, row_id: int) -> tuple:
    return conn.execute(
        "SELECT processed_at IS NOT NULL, failed_at IS NOT NULL, attempts, last_error"
        " FROM outbox WHERE id = %s",
        (row_id,),
    ).fetchone()


def test_error_texts_postgresql_text_cannot_hold_are_stored_escaped(conn, conninfo):
    retried, failed = insert(conn, "{}"), insert(conn, "{}")

    async def record():
        db = DatabaseConnection(conninfo)
        await db.connect_work()
        try:
            await db.fetch_and_lock_rows(10)
            await db.finish_batch(
                [], [(retried, 60.0, "hook: answered 500 a\x00b")], [(failed, "bad \udcff\x00")]
            )
        finally:
            await db.close()

    asyncio.run(record())

    assert outcome_of(conn, retried) == (False, False, 1, "hook: answered 500 a\\x00b")
    assert outcome_of(conn, failed) == (False, True, 1, "bad \\udcff\\x00")


def run_relay_until(conninfo, handler, done, **settings) -> OutboxPoller:
    registry = HandlerRegistry()
    registry.add(handler, name="under_test")
    settings = {"interval_min": 0.01, "interval_max": 0.05, **settings}
    poller = OutboxPoller(settings=RelaySettings(**settings), conninfo=conninfo, registry=registry)

    async def go():
        task = asyncio.create_task(poller.run())
        deadline = time.monotonic() + 10
        while not done(poller) and time.monotonic() < deadline and not task.done():
            await asyncio.sleep(0.02)
        poller.stop()
        return await asyncio.wait_for(task, 10)

    assert asyncio.run(go()) is StopReason.STOPPED
    return poller


def test_a_handler_error_quoting_a_nul_is_recorded_and_the_relay_goes_on(conn, conninfo):
    # json keeps \u0000 in a string; decoded, it is a NUL, which the handler's error quotes.
    bad = insert(conn, '{"name": "a\\u0000b"}')
    good = insert(conn, '{"name": "ok"}')

    def index_name(event):
        name = event["payload"]["name"]
        if name != "ok":
            raise ValueError(f"cannot index name {name}")

    poller = run_relay_until(
        conninfo,
        index_name,
        lambda p: p.failed_count == 1 and p.processed_count == 1,
        max_attempts=2,  # the first failure is a retry, the second a dead letter
        retry_base_delay=0.01,
        retry_max_delay=0.01,
    )

    assert (poller.processed_count, poller.failed_count) == (1, 1)
    assert outcome_of(conn, good)[:2] == (True, False)
    assert outcome_of(conn, bad) == (
        False,
        True,
        2,
        "under_test: ValueError: cannot index name a\\x00b",
    )


@pytest.mark.parametrize(
    "payload_text",
    [
        '{"a": ' + "[" * 5000 + "]" * 5000 + "}",  # deeper than orjson's and Python's limits
        '{"n": ' + "1" * 5000 + "}",  # more digits than Python turns into an int
    ],
)
def test_a_payload_python_cannot_decode_is_dead_lettered_and_the_others_flow(
    conn, conninfo, payload_text
):
    bad = insert(conn, payload_text)
    good = insert(conn, "{}")
    seen = []

    poller = run_relay_until(
        conninfo, lambda e: seen.append(e["id"]), lambda p: p.failed_count + p.processed_count == 2
    )

    assert seen == [good]
    assert outcome_of(conn, good)[:2] == (True, False)
    processed, failed, attempts, error = outcome_of(conn, bad)
    assert (processed, failed, attempts) == (False, True, 1)
    assert error.startswith("malformed event: ")
    assert poller.failed_count == 1


def test_a_celery_dead_letter_quoting_a_nul_is_recorded(conn):
    """The worker's record of a failure too: refused, it would keep its task for ever."""
    from event_stream.tasks import record_failure

    row_id = insert(conn, '{"name": "a"}')

    assert record_failure(row_id, "webhook: WebhookError: 503 Service\x00Unavailable")

    (error,) = conn.execute("SELECT last_error FROM outbox WHERE id = %s", (row_id,)).fetchone()
    assert error == "webhook: WebhookError: 503 Service\\x00Unavailable"
