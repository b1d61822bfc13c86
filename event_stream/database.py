"""All SQL of the relay, behind one narrow class: `DatabaseConnection`.

The relay uses its own psycopg 3 async connections built from Django's `DATABASES`, never the
ORM inside its loop.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Mapping, Sequence

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from event_stream.capture import NOTIFY_CHANNEL, WAKEUP_LOCK

# Keys of Django's OPTIONS that configure the Django backend, not libpq.
DJANGO_ONLY_OPTIONS = {"isolation_level", "pool", "server_side_binding", "assume_role"}


def conninfo_from_django(settings_dict: dict) -> str:
    """A libpq connection string for one entry of Django's `DATABASES`."""
    params = {
        "dbname": settings_dict.get("NAME"),
        "user": settings_dict.get("USER"),
        "password": settings_dict.get("PASSWORD"),
        "host": settings_dict.get("HOST"),
        "port": settings_dict.get("PORT"),
    }
    options = settings_dict.get("OPTIONS") or {}
    params.update({k: v for k, v in options.items() if k not in DJANGO_ONLY_OPTIONS})
    return make_conninfo(**{k: str(v) for k, v in params.items() if v not in (None, "")})


class DatabaseConnection:
    """The relay's two connections and every statement it sends.

    - The work connection claims a batch with `FOR UPDATE SKIP LOCKED` and keeps the
      transaction open while the batch is handled; `finish_batch` records the outcome and
      commits. Row locks belong to the session, so when a relay dies (even `kill -9`) PostgreSQL
      rolls its transaction back and the rows are claimable again at once: nothing is stuck.
    - The control connection (autocommit) listens for wake-ups and writes heartbeats.
    """

    def __init__(
        self,
        conninfo: str,
        *,
        ordered: bool = True,
        synchronous_commit: bool = False,
        application_name: str = "outbox_relay",
    ):
        self.conninfo = conninfo
        self.ordered = ordered
        self.synchronous_commit = synchronous_commit
        self.application_name = application_name
        self._work: psycopg.AsyncConnection | None = None
        self._control: psycopg.AsyncConnection | None = None
        # The work connection that holds the wake-up lock (a session lock dies with it).
        self._wakeup_lock_conn: psycopg.AsyncConnection | None = None
        # How much of the queue the last second look of the ordered claim read (`_claim_heads`).
        self._heads_prefix = 0

    # -- connections ---------------------------------------------------------------------------

    async def connect(self) -> None:
        await self.connect_work()
        await self.connect_control()

    async def connect_work(self) -> None:
        await self._close(self._work)
        self._work = await self._open(autocommit=False)
        if not self.synchronous_commit:
            # A batch's commit only records that its events were handled. Not waiting for the
            # disk there saves a WAL flush per batch (about a sixth of a relay's time at
            # batch 1000); what a database crash can lose is the last moment's records, so those
            # events are handed out again: a duplicate, which at-least-once allows, never a
            # lost event. The events themselves are written by the application's own commits.
            await self._work.execute("SET synchronous_commit = off")
            await self._work.commit()

    async def connect_control(self) -> None:
        await self._close(self._control)
        self._control = await self._open(autocommit=True)

    async def _open(self, *, autocommit: bool) -> psycopg.AsyncConnection:
        conn = await psycopg.AsyncConnection.connect(
            self.conninfo,
            autocommit=autocommit,
            application_name=self.application_name,
            connect_timeout=5,
            # A peer that vanished without closing the socket is noticed within about 30 s.
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=4,
        )
        return conn

    @staticmethod
    async def _close(conn: psycopg.AsyncConnection | None) -> None:
        if conn is not None and not conn.closed:
            with contextlib.suppress(Exception):
                await conn.close()

    async def close_work(self) -> None:
        await self._close(self._work)

    async def close_control(self) -> None:
        await self._close(self._control)

    async def close(self) -> None:
        """Close both connections; an open batch transaction is rolled back, releasing its rows."""
        await self._close(self._work)
        await self._close(self._control)

    @property
    def work_ok(self) -> bool:
        return self._work is not None and not self._work.closed and not self._work.broken

    @property
    def control_ok(self) -> bool:
        return self._control is not None and not self._control.closed and not self._control.broken

    # -- the batch -----------------------------------------------------------------------------

    async def fetch_and_lock_rows(self, batch_size: int) -> list[tuple]:
        """Claim up to `batch_size` events and lock them until `commit` or `rollback`.

        Rows: (id, event_id, event_type, entity_type, entity_id, payload, created_at, attempts),
        in id order; event_id, entity_id, payload (JSON) and created_at (ISO 8601) as text.
        Ordered mode leaves out events that have an earlier pending event of their entity
        outside the batch.
        """
        if not self.ordered:
            cursor = await self._work.execute(
                CLAIM_UNORDERED_SQL, {"limit": batch_size}, prepare=True
            )
            return await cursor.fetchall()
        cursor = await self._work.execute(CLAIM_ORDERED_SQL, {"limit": batch_size}, prepare=True)
        result = await cursor.fetchall()
        scanned = result[0][-1]
        rows = [row[:-1] for row in result if row[0] is not None]
        if len(rows) < batch_size and scanned == batch_size:
            # The first rows in id order may all be blocked (the followers of an entity whose
            # head waits for a retry): look past them, so that other entities never starve.
            more = await self._claim_heads(batch_size - len(rows), [r[0] for r in rows])
            if more:
                rows = sorted(rows + more, key=lambda row: row[0])
        return rows

    async def _claim_heads(self, limit: int, taken: list[int]) -> list[tuple]:
        """Up to `limit` more events, each the first pending one of its entity (CLAIM_HEADS_SQL).

        The prefix of the queue it reads doubles until it holds enough heads or the whole
        queue; a larger prefix holds every head of a smaller one, so the last look's rows
        include the ones the earlier looks locked. It starts at four batches, or at half the
        prefix the last second look needed: behind a lasting retry backlog the next claim needs
        about as much (two looks, not a doubling from the start), and once the backlog is gone
        the start halves back down claim after claim.
        """
        prefix = max(4 * (limit + len(taken)), self._heads_prefix // 2)
        while True:
            cursor = await self._work.execute(
                CLAIM_HEADS_SQL,
                {"limit": limit, "taken": id_array(taken), "prefix": prefix},
                prepare=True,
            )
            result = await cursor.fetchall()
            heads = [row[:-1] for row in result if row[0] is not None]
            if len(heads) == limit or result[0][-1] < prefix:
                self._heads_prefix = prefix
                return heads
            prefix *= 2

    async def mark_processed(self, ids: Sequence[int]) -> bool:
        """Mark events handled (the seed's call); part of the open batch transaction."""
        if ids:
            await self._work.execute(MARK_PROCESSED_SQL, (id_array(ids),), prepare=True)
        return True

    async def schedule_retries(self, retries: Sequence[tuple[int, float, str]]) -> None:
        """(id, delay seconds, error): count the attempt, and hold the event until the delay."""
        if retries:
            ids, delays, errors = zip(*retries, strict=True)
            await self._work.execute(RETRY_SQL, (list(ids), list(delays), storable(errors)))

    async def mark_failed(self, failures: Sequence[tuple[int, str]]) -> None:
        """(id, error): dead-letter the events; they stay until replayed."""
        if failures:
            ids, errors = zip(*failures, strict=True)
            await self._work.execute(FAIL_SQL, (list(ids), storable(errors)))

    async def finish_batch(
        self,
        processed: Sequence[int],
        retries: Sequence[tuple[int, float, str]],
        failures: Sequence[tuple[int, str]],
    ) -> None:
        """Record a batch's outcome and commit, in one round trip (pipeline mode): at a low
        event rate the round trips, not the statements, are what an event waits for."""
        async with self._work.pipeline():
            await self.mark_processed(processed)
            await self.schedule_retries(retries)
            await self.mark_failed(failures)
            await self._work.commit()

    async def commit(self) -> None:
        await self._work.commit()

    async def rollback(self) -> None:
        if self.work_ok:
            await self._work.rollback()

    # -- wake-ups and heartbeats ---------------------------------------------------------------

    async def promise_wakeups(self) -> WakeupPromise:
        """Before sleeping: make writers NOTIFY from now on (see `outbox_notify_trigger`).

        MINE: the wake-up lock is taken on the work connection. ANOTHER: another relay holds it,
        so writers notify, and every listener hears it. NONE: a writer that did not notify has
        not committed yet; claim again soon rather than sleep.
        """
        if self.holds_wakeup_lock:
            return WakeupPromise.MINE  # taken twice, it would need two unlocks
        cursor = await self._work.execute(TAKE_WAKEUP_LOCK_SQL, prepare=True)
        (answer,) = await cursor.fetchone()
        await self._work.commit()
        promise = WakeupPromise(answer)
        if promise is WakeupPromise.MINE:
            self._wakeup_lock_conn = self._work
        return promise

    async def release_wakeups(self) -> None:
        """Busy again: writers need not notify (unless another relay sleeps)."""
        if self.holds_wakeup_lock:
            await self._work.execute(RELEASE_WAKEUP_LOCK_SQL)
            await self._work.commit()
        self._wakeup_lock_conn = None

    async def wake_relays(self) -> None:
        """Send the writers' wake-up to every listening relay, from the control connection."""
        await self._control.execute("SELECT pg_notify(%s, '')", (NOTIFY_CHANNEL,))

    @property
    def holds_wakeup_lock(self) -> bool:
        return self.work_ok and self._wakeup_lock_conn is self._work

    async def listen(self, channel: str) -> None:
        await self._control.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))

    async def wait_for_notifications(self, timeout: float, on_arrival: Callable[[], None]) -> int:
        """Call `on_arrival` for each notification that arrives within `timeout` seconds; returns
        how many came. One wait for all of them: at a thousand writes a second, starting a new
        wait per notification cost the event loop more than the notifications themselves."""
        count = 0
        async for _ in self._control.notifies(timeout=timeout):
            on_arrival()
            count += 1
        return count

    async def record_heartbeat(self, beat: Mapping[str, object]) -> None:
        await self._control.execute(HEARTBEAT_SQL, beat)

    async def remove_heartbeat(self, relay_id) -> None:
        await self._control.execute("DELETE FROM outbox_relay WHERE relay_id = %s", (relay_id,))


def id_array(ids: Sequence[int]) -> str:
    """Outbox ids as a PostgreSQL array literal, for a `%s::bigint[]` parameter.

    psycopg adapts a list of ints one element at a time (about 3 us an id, a tenth of the
    relay's time per event at batch 1000); joining their text is a hundred times cheaper.
    """
    return "{" + ",".join(map(str, ids)) + "}"


def storable(errors: Sequence[str]) -> list[str]:
    """Error texts as PostgreSQL `text` can hold them: NUL written `\\x00`, and unpaired
    surrogates (from bytes decoded with `surrogateescape`) as their `\\udcXX` escapes.

    Handlers' errors quote what they met (a payload's string, a server's answer), and one
    character PostgreSQL refuses would fail the statement that records the whole batch: rolled
    back, claimed again, failed again, for ever.
    """
    return [
        error.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")
        for error in errors
    ]


class WakeupPromise(enum.Enum):
    MINE = "mine"  # this relay holds the wake-up lock
    ANOTHER = "another"  # another relay holds it; its NOTIFYs reach every listener
    NONE = "none"  # writers that did not notify are still committing


_WAKEUP_KEY = f"{WAKEUP_LOCK[0]}, {WAKEUP_LOCK[1]}"
# CASE evaluates its conditions in order and stops at the first true one. The exclusive lock
# failed: either a relay holds it (then the shared try fails too) or only writers do (then the
# shared try succeeds, and is undone at once). No look at pg_locks, which would copy the whole
# lock table under all its partition locks, every 10 ms while a writer's transaction is open.
TAKE_WAKEUP_LOCK_SQL = f"""
    SELECT CASE
        WHEN pg_try_advisory_lock({_WAKEUP_KEY}) THEN 'mine'
        WHEN NOT pg_try_advisory_lock_shared({_WAKEUP_KEY}) THEN 'another'
        WHEN pg_advisory_unlock_shared({_WAKEUP_KEY}) THEN 'none'
        ELSE 'none'
    END
"""
RELEASE_WAKEUP_LOCK_SQL = f"SELECT pg_advisory_unlock({_WAKEUP_KEY})"

_PENDING = "o.processed_at IS NULL AND o.failed_at IS NULL"
_COLUMNS = (
    "o.id, o.event_id, o.event_type, o.entity_type, o.entity_id, o.payload, o.created_at, "
    "o.attempts"
)


def _iso_utc(column: str) -> str:
    """ISO 8601 in UTC with microseconds, exactly as `events.iso_utc` writes it in Python."""
    return f"to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"')"


def _as_text(alias: str) -> str:
    """The claim's output: ids, payload and timestamp as text, the way handlers get them.

    PostgreSQL renders them faster than Python converts UUID and datetime objects, and the
    payload is decoded in the handler thread rather than on the event loop.
    """
    a = alias
    return (
        f"{a}.id, {a}.event_id::text, {a}.event_type, {a}.entity_type, {a}.entity_id::text, "
        f"{a}.payload::text, {_iso_utc(a + '.created_at')}, {a}.attempts"
    )


# Ordered claim, with no index on the entity: capture would pay for one on every event written
# (a 500-row UPDATE kept 52% of its bare rate with a per-entity pending index, 60% without:
# `bench/capture.py`). Take the first pending, available, unlocked events in id order (like
# the unordered claim), then keep only those with no earlier pending event of their entity
# outside the batch (held by another relay, or waiting for a retry). Such an event can only lie
# in the batch's gaps: the pending rows below the batch's last id that the batch did not take.
# `gaps` counts them (an index-only count); when there are none (a single relay's usual claim)
# nothing more is read. Otherwise `blockers` reads exactly those rows, walking the pending
# index in id order up to their count, and one hash anti join keeps the batch rows none of them
# holds back. Rows left out stay locked until the batch ends; they are blocked anyway.
# The last column, on every row, is how many rows the locking scan took (`scanned`); when there
# is nothing to return, one row of NULLs carries it. Fewer than the limit means the scan saw
# every available event, so the second look (below) would find nothing more.
CLAIM_ORDERED_SQL = f"""
WITH batch AS MATERIALIZED (
    SELECT {_COLUMNS}
    FROM outbox AS o
    WHERE {_PENDING} AND o.available_at <= now()
    ORDER BY o.id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), scan AS MATERIALIZED (
    SELECT count(*) AS scanned, max(id) AS last_id FROM batch
), gaps AS MATERIALIZED (
    SELECT (SELECT count(*) FROM outbox AS o
            WHERE {_PENDING} AND o.id <= scan.last_id) - scan.scanned AS skipped
    FROM scan
), blockers AS MATERIALIZED (
    SELECT o.entity_id, o.id
    FROM outbox AS o
    WHERE {_PENDING} AND NOT (o.id = ANY (SELECT id FROM batch))
    ORDER BY o.id
    LIMIT (SELECT skipped FROM gaps)
), taken AS (
    SELECT {_as_text("b")} FROM batch AS b
    WHERE NOT EXISTS (SELECT 1 FROM blockers AS k
                      WHERE k.entity_id = b.entity_id AND k.id < b.id)
)
SELECT taken.*, scan.scanned
FROM scan LEFT JOIN taken ON true
ORDER BY taken.id
"""

# The ordered claim's second look, when its batch was not full (its first rows were blocked,
# say behind events waiting for a retry): the heads of a prefix of the queue. The prefix is read
# without locking, from the first pending row on, so each entity's first row in it is its first
# pending event anywhere: a head. Every pending event counts, whoever holds it and whenever it
# is due, and so do the rows this claim already took. Heads that are available and not held by
# another relay are taken, in id order. How many rows the prefix held is the last column on
# every row (one row of NULLs when none is taken); a prefix with too few heads grows
# (`_claim_heads`).
CLAIM_HEADS_SQL = f"""
WITH prefix AS MATERIALIZED (
    SELECT o.id, o.entity_id
    FROM outbox AS o
    WHERE {_PENDING}
    ORDER BY o.id
    LIMIT %(prefix)s
), heads AS (
    SELECT min(id) AS id FROM prefix WHERE entity_id IS NOT NULL GROUP BY entity_id
    UNION ALL
    SELECT id FROM prefix WHERE entity_id IS NULL
), taken AS MATERIALIZED (
    -- Heads in id order, each looked up by id, until enough are locked: a long backlog has
    -- many heads waiting for a retry, and none of them is read more than once.
    SELECT {_as_text("o")}
    FROM (SELECT id FROM heads ORDER BY id) AS h
    JOIN outbox AS o ON o.id = h.id
    WHERE o.id <> ALL(%(taken)s::bigint[]) AND {_PENDING} AND o.available_at <= now()
    ORDER BY h.id
    LIMIT %(limit)s
    FOR UPDATE OF o SKIP LOCKED
)
SELECT taken.*, seen.rows
FROM (SELECT count(*) AS rows FROM prefix) AS seen LEFT JOIN taken ON true
ORDER BY taken.id
"""

CLAIM_UNORDERED_SQL = f"""
SELECT {_as_text("o")}
FROM outbox AS o
WHERE {_PENDING} AND o.available_at <= now()
ORDER BY o.id
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED
"""

# clock_timestamp(), not now(): the batch transaction began at the claim, before the handlers.
MARK_PROCESSED_SQL = (
    "UPDATE outbox SET processed_at = clock_timestamp() WHERE id = ANY(%s::bigint[])"
)

RETRY_SQL = """
UPDATE outbox AS o
SET attempts = o.attempts + 1,
    available_at = clock_timestamp() + make_interval(secs => r.delay),
    last_error = r.error
FROM unnest(%s::bigint[], %s::float8[], %s::text[]) AS r(id, delay, error)
WHERE o.id = r.id
"""

FAIL_SQL = """
UPDATE outbox AS o
SET attempts = o.attempts + 1, failed_at = clock_timestamp(), last_error = r.error
FROM unnest(%s::bigint[], %s::text[]) AS r(id, error)
WHERE o.id = r.id
"""

HEARTBEAT_SQL = """
INSERT INTO outbox_relay (relay_id, hostname, pid, started_at, last_seen_at,
                          processed_count, failed_count, memory_mb, restarts)
VALUES (%(relay_id)s, %(hostname)s, %(pid)s, %(started_at)s, now(),
        %(processed_count)s, %(failed_count)s, %(memory_mb)s, %(restarts)s)
ON CONFLICT (relay_id) DO UPDATE SET
    hostname = EXCLUDED.hostname, pid = EXCLUDED.pid, last_seen_at = now(),
    processed_count = EXCLUDED.processed_count, failed_count = EXCLUDED.failed_count,
    memory_mb = EXCLUDED.memory_mb, restarts = EXCLUDED.restarts
"""
