"""Replay and per-entity order, on the relay's real claim SQL.

A replayed event keeps its id, so it is older than the events of its entity that flowed while
it was dead-lettered (guarantee 5 lets them pass it).
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from django.db import connection
from psycopg.types.json import Jsonb

from event_stream.database import DatabaseConnection
from event_stream.replay import replay_failed

pytestmark = pytest.mark.django_db(transaction=True)


def insert(conn, entity, state: str) -> int:
    processed, failed = {"pending": ("NULL", "NULL"), "processed": ("now()", "NULL"),
                         "failed": ("NULL", "now()")}[state]  # fmt: skip
    (row_id,) = conn.execute(
        "INSERT INTO outbox (event_type, entity_type, entity_id, payload, processed_at,"
        f" failed_at) VALUES ('test.changed', 'test', %s, %s, {processed}, {failed})"
        " RETURNING id",
        (entity, Jsonb({})),
    ).fetchone()
    return row_id


async def claim(conninfo, batch_size=10) -> tuple[DatabaseConnection, list[int]]:
    """A relay's claim, left open (its rows stay locked) until the connection closes."""
    db = DatabaseConnection(conninfo)
    await db.connect_work()
    return db, [row[0] for row in await db.fetch_and_lock_rows(batch_size)]


def test_a_replayed_event_is_handled_after_later_events_already_handled(conn, conninfo):
    # Given entity E whose first event was dead-lettered, and whose second one flowed
    entity = uuid.uuid4()
    first = insert(conn, entity, "failed")
    insert(conn, entity, "processed")
    third = insert(conn, entity, "pending")

    # When the first is replayed, then it is claimed with the third, before it (the batch is
    # handled in id order), and after the second, already handled
    assert replay_failed(ids=[first]) == 1

    async def go():
        db, claimed = await claim(conninfo)
        await db.close()
        return claimed

    assert asyncio.run(go()) == [first, third]


def replay_in_a_thread(row_id: int) -> int:
    """The replay as the command runs it, on a Django connection of its own, closed after."""
    try:
        return replay_failed(ids=[row_id])
    finally:
        connection.close()


def test_a_replay_waits_for_a_later_event_of_its_entity_in_flight(conn, conninfo):
    # Given entity E whose first event is dead-lettered and whose second one a relay is
    # handling right now
    entity = uuid.uuid4()
    first = insert(conn, entity, "failed")
    second = insert(conn, entity, "pending")

    async def go():
        relay_a, claimed_a = await claim(conninfo)
        assert claimed_a == [second]
        try:
            # When the first is replayed meanwhile
            replay = asyncio.create_task(asyncio.to_thread(replay_in_a_thread, first))
            await asyncio.sleep(0.5)
            # Then the replay waits for the batch, and no other relay gets an event of E
            assert not replay.done()
            relay_b, claimed_b = await claim(conninfo)
            await relay_b.close()
            assert claimed_b == []
            # And once the batch is done, the first is put back, and claimed
            await relay_a.mark_processed([second])
            await relay_a.commit()
            assert await asyncio.wait_for(replay, timeout=10) == 1
        finally:
            await relay_a.close()
        relay_c, claimed_c = await claim(conninfo)
        await relay_c.close()
        return claimed_c

    assert asyncio.run(go()) == [first]
