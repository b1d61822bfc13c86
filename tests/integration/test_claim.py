"""The relay's claim SQL on the real PostgreSQL: what one relay may take, with others around."""

from __future__ import annotations

import asyncio
import uuid

import psycopg
import pytest
from psycopg.types.json import Jsonb

from event_stream.database import DatabaseConnection

pytestmark = pytest.mark.django_db(transaction=True)


def insert(conn, entity, n=1):
    ids = []
    for _ in range(n):
        (row_id,) = conn.execute(
            "INSERT INTO outbox (event_type, entity_type, entity_id, payload)"
            " VALUES ('test.changed', 'test', %s, %s) RETURNING id",
            (entity, Jsonb({})),
        ).fetchone()
        ids.append(row_id)
    return ids


def claim(conninfo, batch_size):
    async def go():
        db = DatabaseConnection(conninfo)
        await db.connect_work()
        try:
            return [r[0] for r in await db.fetch_and_lock_rows(batch_size)]
        finally:
            await db.close()

    return asyncio.run(go())


def test_a_retrying_head_blocks_only_its_entity_even_behind_many_followers(conn, conninfo):
    # Given entity X whose first event waits for a retry, with 30 followers written before Y's
    hot, other = uuid.uuid4(), uuid.uuid4()
    head, *_followers = insert(conn, hot, 31)
    conn.execute(
        "UPDATE outbox SET available_at = now() + interval '1 hour' WHERE id = %s", (head,)
    )
    others = insert(conn, other, 3)

    # When a relay claims 10 events, then it gets Y's first event (its next ones come in the
    # next batch, once that one is done) and none of X's
    assert claim(conninfo, 10) == others[:1]


def test_events_behind_another_relays_claim_are_left_alone(conn, conninfo):
    x, y = uuid.uuid4(), uuid.uuid4()
    x_ids = insert(conn, x, 3)
    y_ids = insert(conn, y, 2)
    with psycopg.connect(conninfo) as other_relay:
        other_relay.execute("SELECT id FROM outbox WHERE id = %s FOR UPDATE", (x_ids[0],))

        taken = claim(conninfo, 100)

    assert taken == y_ids


def test_only_entities_with_an_event_in_the_gaps_are_held_back(conn, conninfo):
    # Given another relay holding X's first event and an event without entity, between others
    x, y, z = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    x_first, *x_rest = insert(conn, x, 3)
    loose = insert(conn, None)
    y_ids = insert(conn, y, 2)
    x_rest += insert(conn, x, 1)
    z_ids = insert(conn, z, 1)
    loose_later = insert(conn, None)
    with psycopg.connect(conninfo) as other_relay:
        other_relay.execute(
            "SELECT id FROM outbox WHERE id = ANY(%s) FOR UPDATE", ([x_first, *loose],)
        )

        taken = claim(conninfo, 100)

    # Then X waits (all of its later events) and nothing else does: an event without entity
    # neither holds back nor is held back
    assert taken == y_ids + z_ids + loose_later
    assert not set(taken) & set(x_rest)


def test_a_queue_front_full_of_retrying_heads_still_holds_their_followers(conn, conninfo):
    # Given 12 entities whose first event waits for a retry, each with a follower, then two
    # others: a front longer than the second look's first prefix (four batches), which grows
    blocked = [uuid.uuid4() for _ in range(12)]
    heads = [insert(conn, entity)[0] for entity in blocked]
    conn.execute(
        "UPDATE outbox SET available_at = now() + interval '1 hour' WHERE id = ANY(%s)", (heads,)
    )
    for entity in blocked:
        insert(conn, entity)
    free = insert(conn, uuid.uuid4()) + insert(conn, uuid.uuid4())

    # When a relay claims 2 events, then it gets the two free ones and no follower
    assert claim(conninfo, 2) == free


def test_the_second_look_leaves_alone_entities_whose_first_event_another_relay_holds(
    conn, conninfo
):
    # Given X's first event waiting for a retry and its follower, then Y's first event held by
    # another relay and its follower, then Z's event
    x, y, z = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    x_head, _x_next = insert(conn, x, 2)
    y_head, y_next = insert(conn, y, 2)
    z_ids = insert(conn, z)
    conn.execute(
        "UPDATE outbox SET available_at = now() + interval '1 hour' WHERE id = %s", (x_head,)
    )
    with psycopg.connect(conninfo) as other_relay:
        other_relay.execute("SELECT id FROM outbox WHERE id = %s FOR UPDATE", (y_head,))

        # When a relay claims 2 (its first look takes X's and Y's followers, both blocked, so
        # it looks past them for the heads of the queue)
        taken = claim(conninfo, 2)

    # Then it gets Z's event, and not Y's follower
    assert taken == z_ids
    assert y_next not in taken


def test_an_entitys_run_comes_in_one_batch_when_nothing_else_is_pending(conn, conninfo):
    x, y = uuid.uuid4(), uuid.uuid4()
    ids = insert(conn, x, 2) + insert(conn, y, 2) + insert(conn, x, 1)

    assert claim(conninfo, 100) == ids


@pytest.mark.parametrize("synchronous", [False, True])
def test_batches_are_recorded_with_the_configured_commit_mode(conninfo, synchronous):
    # Off by default: a database crash may hand the last moment's events out again, never lose
    # one (the events were committed by the writers). The setting turns the wait back on.
    async def go():
        db = DatabaseConnection(conninfo, synchronous_commit=synchronous)
        await db.connect_work()
        try:
            cursor = await db._work.execute("SHOW synchronous_commit")
            return (await cursor.fetchone())[0]
        finally:
            await db.close()

    assert asyncio.run(go()) == ("on" if synchronous else "off")


def test_an_empty_or_fully_blocked_queue_claims_nothing(conn, conninfo):
    # The claim's one row of NULLs (it carries how far the scan went) never reaches the caller.
    assert claim(conninfo, 10) == []
    entity = uuid.uuid4()
    head = insert(conn, entity, 3)[0]
    conn.execute(
        "UPDATE outbox SET available_at = now() + interval '1 hour' WHERE id = %s", (head,)
    )
    assert claim(conninfo, 10) == []  # the followers wait for their head's retry
