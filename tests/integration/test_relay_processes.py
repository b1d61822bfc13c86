"""The relay's guarantees with real relay processes on the real PostgreSQL."""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid

import psycopg
import pytest

from event_stream.capture import WAKEUP_LOCK
from tests.integration.relays import (
    ROOT,
    pending_count,
    query,
    reset,
    start_relay,
    stop,
    wait_until,
    write_events,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

# Polling so slow that only a NOTIFY (or the mechanism under test) delivers within seconds.
SLOW_POLLING = {"OUTBOX_POLLER_INTERVAL_MIN": 30, "OUTBOX_POLLER_INTERVAL_MAX": 30}


@pytest.fixture
def db(conninfo):
    reset(conninfo)
    return conninfo


def handled_rows(conninfo):
    return query(conninfo, "SELECT outbox_id, entity_id, pid, seq FROM relay_test_handled")


def dead_lettered_count(conninfo) -> int:
    return query(conninfo, "SELECT count(*) FROM outbox WHERE failed_at IS NOT NULL")[0][0]


def assert_entity_order(conninfo):
    """For every entity, handling order (seq) follows outbox id order, i.e. commit order."""
    by_entity = collections.defaultdict(list)
    for outbox_id, entity_id, _pid, _seq in sorted(handled_rows(conninfo), key=lambda r: r[3]):
        by_entity[entity_id].append(outbox_id)
    for entity, ids in by_entity.items():
        assert ids == sorted(ids), f"entity {entity} handled out of order"


def wait_ready(process, timeout=30):
    line = process.stdout.readline()
    assert "relay ready" in line, line


def drain_with_a_fresh_relay(db, database_url, timeout=30):
    """Start a plain relay, wait until the outbox has nothing pending, stop it."""
    relay = start_relay(database_url)
    try:
        wait_ready(relay)
        assert wait_until(lambda: pending_count(db) == 0, timeout=timeout)
    finally:
        stop(relay)


def proxied_database():
    """A started TcpProxy to the test database, and the database's URL through it."""
    from django.db import connection

    from tests.integration.celery_support import TcpProxy
    from tests.integration.celery_support import database_url as url_of

    settings = connection.settings_dict
    if str(settings.get("HOST") or "").startswith("/"):
        pytest.skip("the database server listens on a socket only")
    proxy = TcpProxy(settings.get("HOST") or "127.0.0.1", int(settings.get("PORT") or 5432))
    proxy.start()
    return proxy, url_of({**settings, "HOST": "127.0.0.1", "PORT": proxy.port})


@pytest.mark.parametrize("relays", [2, 3])
def test_several_relays_handle_every_event_once_in_entity_order(db, database_url, relays):
    entities = [uuid.uuid4() for _ in range(100)]
    processes = [start_relay(database_url, OUTBOX_POLLER_BATCH_SIZE=50) for _ in range(relays)]
    try:
        for p in processes:
            wait_ready(p)
        write_events(db, entities, per_entity=100)  # 10,000 events, written while relays run

        assert wait_until(lambda: pending_count(db) == 0, timeout=120)
    finally:
        outputs = [stop(p) for p in processes]

    rows = handled_rows(db)
    ids = [r[0] for r in rows]
    assert len(ids) == 10_000, outputs
    assert len(set(ids)) == 10_000, "an event was handled twice without any crash"
    assert_entity_order(db)
    assert len({r[2] for r in rows}) >= 2, "the work was not shared between relays"
    assert all(p.returncode == 0 for p in processes), outputs


def test_sigkill_mid_batch_loses_nothing_and_leaves_nothing_stuck(db, database_url):
    entities = [uuid.uuid4() for _ in range(20)]
    write_events(db, entities, per_entity=5)
    victim = start_relay(database_url, OUTBOX_POLLER_BATCH_SIZE=100, RELAY_TEST_SLEEP=0.05)
    wait_ready(victim)
    # Given a relay in the middle of a batch (some events handled, its rows locked)
    assert wait_until(lambda: len(handled_rows(db)) >= 5, timeout=20)
    victim.send_signal(signal.SIGKILL)
    stop(victim)
    assert pending_count(db) > 0

    # When another relay starts, then it handles every event: nothing lost, nothing stuck
    drain_with_a_fresh_relay(db, database_url)
    handled = {r[0] for r in handled_rows(db)}
    all_ids = {r[0] for r in query(db, "SELECT id FROM outbox")}
    assert handled == all_ids
    assert_entity_order(db)


def test_sigterm_mid_batch_finishes_it_and_exits_0(db, database_url):
    write_events(db, [uuid.uuid4() for _ in range(10)], per_entity=3)
    relay = start_relay(database_url, OUTBOX_POLLER_BATCH_SIZE=10, RELAY_TEST_SLEEP=0.1)
    wait_ready(relay)
    assert wait_until(lambda: len(handled_rows(db)) >= 2, timeout=20)

    started = time.monotonic()
    relay.send_signal(signal.SIGTERM)
    out, _ = relay.communicate(timeout=15)

    assert relay.returncode == 0, out
    assert time.monotonic() - started < 5  # the batch in flight (10 x 0.1 s), then out
    done = query(db, "SELECT count(*) FROM outbox WHERE processed_at IS NOT NULL")[0][0]
    assert done == len(handled_rows(db))  # every handled event was recorded, no more
    assert done % 10 == 0  # whole batches only
    assert pending_count(db) == 30 - done
    assert query(db, "SELECT count(*) FROM outbox_relay")[0][0] == 0  # left the live list


def test_second_signal_stops_at_once_and_loses_nothing(db, database_url):
    write_events(db, [uuid.uuid4() for _ in range(5)], per_entity=2)
    relay = start_relay(
        database_url,
        OUTBOX_POLLER_BATCH_SIZE=10,
        RELAY_TEST_SLEEP=2,
        OUTBOX_POLLER_SHUTDOWN_TIMEOUT=60,
    )
    wait_ready(relay)
    assert wait_until(lambda: len(handled_rows(db)) >= 1, timeout=20)

    started = time.monotonic()
    relay.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    relay.send_signal(signal.SIGTERM)
    out, _ = relay.communicate(timeout=15)

    assert time.monotonic() - started < 3, out
    assert relay.returncode == 1, out
    # The batch was abandoned: its rows were released, none is processed, all pending again.
    assert pending_count(db) == 10
    drain_with_a_fresh_relay(db, database_url)


def start_relay_failing_three_times(database_url, entity, retry_delays, **env):
    """A relay whose handler raises on `entity`'s events: three attempts, then dead letter;
    retries wait between `retry_delays` (base, max) seconds."""
    base, most = retry_delays
    return start_relay(
        database_url,
        RELAY_TEST_FAIL_ENTITY=str(entity),
        OUTBOX_POLLER_MAX_ATTEMPTS=3,
        OUTBOX_POLLER_RETRY_BASE_DELAY=base,
        OUTBOX_POLLER_RETRY_MAX_DELAY=most,
        **env,
    )


def test_failing_entity_waits_while_others_flow_then_is_dead_lettered(db, database_url):
    bad, good = uuid.uuid4(), uuid.uuid4()
    write_events(db, [bad, good], per_entity=3)
    relay = start_relay_failing_three_times(
        database_url, bad, retry_delays=(0.2, 0.5),
        OUTBOX_POLLER_INTERVAL_MIN=0.1, OUTBOX_POLLER_INTERVAL_MAX=0.2,
    )  # fmt: skip
    try:
        wait_ready(relay)
        # The good entity flows at once; the bad one's later events wait behind its head.
        assert wait_until(lambda: len(handled_rows(db)) == 3, timeout=20)
        assert {r[1] for r in handled_rows(db)} == {good}
        # After 3 attempts the head is dead-lettered with its error; the next event is tried.
        assert wait_until(lambda: dead_lettered_count(db) == 3, timeout=30)
    finally:
        stop(relay)
    failed = query(
        db, "SELECT attempts, last_error FROM outbox WHERE entity_id = %s ORDER BY id", (bad,)
    )
    assert all(attempts == 3 for attempts, _ in failed)
    assert all("RuntimeError: refusing entity" in error for _, error in failed)

    # Once the handler is fixed, `outbox_replay` puts them back and a relay handles them.
    replay = subprocess.run(
        [sys.executable, "manage.py", "outbox_replay", "--all"],
        cwd=ROOT, env={**os.environ, "DATABASE_URL": database_url},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert replay.returncode == 0, replay.stderr
    drain_with_a_fresh_relay(db, database_url, timeout=20)
    assert {r[1] for r in handled_rows(db)} == {good, bad}
    assert_entity_order(db)


def test_a_retry_comes_due_on_time_however_long_the_polling_interval(db, database_url):
    """A retry coming due sends no NOTIFY; the relay that scheduled it wakes for it, so with
    30 s polling three attempts 0.3 s apart still end in the dead letter within seconds."""
    bad = uuid.uuid4()
    relay = start_relay_failing_three_times(
        database_url, bad, retry_delays=(0.3, 0.3), **SLOW_POLLING
    )
    try:
        wait_ready(relay)
        write_events(db, [bad], per_entity=1)
        assert wait_until(lambda: dead_lettered_count(db) == 1, timeout=8)
    finally:
        out = stop(relay)
    assert query(db, "SELECT attempts FROM outbox")[0][0] == 3, out


def test_malformed_rows_do_not_crash_the_relay(db, database_url):
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO outbox (event_type, entity_type, entity_id, payload) VALUES"
            " ('test.changed', 'test', gen_random_uuid(), '\"just a string\"'),"
            " ('test.changed', 'test', gen_random_uuid(), '[1, 2]'),"
            " ('no.such.type', 'test', gen_random_uuid(), '{}'),"
            " ('test.changed', 'test', NULL, '{\"ok\": true}')"
        )
    relay = start_relay(database_url)
    try:
        wait_ready(relay)
        assert wait_until(lambda: pending_count(db) == 0, timeout=20)
        assert relay.poll() is None
    finally:
        stop(relay)
    states = query(
        db, "SELECT event_type, payload, failed_at IS NOT NULL, last_error FROM outbox ORDER BY id"
    )
    # Not an object: dead-lettered at once, handlers not run
    assert states[0][2] and "not a JSON object" in states[0][3]
    assert states[1][2] and "not a JSON object" in states[1][3]
    # An unknown type is just another event for a catch-all handler; no entity id: handled alone
    assert not states[2][2] and not states[3][2]
    assert sorted(r[0] for r in handled_rows(db)) == [3, 4]


def start_relay_over_its_memory_limit(database_url, **env):
    """A relay whose memory limit is far below any Python process: it restarts in place at
    every memory check (5 a second)."""
    return start_relay(
        database_url,
        OUTBOX_POLLER_MEMORY_LIMIT_MB=1,
        OUTBOX_POLLER_MEMORY_CHECK_INTERVAL=0.2,
        **env,
    )


def test_memory_limit_restarts_in_place_and_counts_it(db, database_url):
    write_events(db, [uuid.uuid4()], per_entity=3)
    relay = start_relay_over_its_memory_limit(database_url, OUTBOX_POLLER_HEARTBEAT_INTERVAL=0.2)
    try:
        wait_ready(relay)
        assert wait_until(
            lambda: query(db, "SELECT coalesce(max(restarts), 0) FROM outbox_relay")[0][0] >= 2,
            timeout=30,
        )
        # Same process (exec in place), still relaying
        assert relay.poll() is None
        pids = {r[0] for r in query(db, "SELECT pid FROM outbox_relay")}
        assert pids == {relay.pid}
        write_events(db, [uuid.uuid4()], per_entity=2)
        assert wait_until(lambda: pending_count(db) == 0, timeout=20)
    finally:
        stop(relay)
    assert len(handled_rows(db)) == 5


def test_a_memory_restart_keeps_the_heartbeat_counts(db, database_url):
    """The relay that restarts in place is the same relay (same id): its heartbeat goes on
    counting the events it handled before, from the time it first started."""
    write_events(db, [uuid.uuid4()], per_entity=5)
    relay = start_relay_over_its_memory_limit(database_url, OUTBOX_POLLER_HEARTBEAT_INTERVAL=0.2)
    try:
        wait_ready(relay)
        assert wait_until(lambda: pending_count(db) == 0, timeout=20)
        first = query(db, "SELECT restarts, started_at FROM outbox_relay")

        def restarted_again() -> bool:
            rows = query(db, "SELECT restarts FROM outbox_relay")
            return bool(rows) and rows[0][0] >= first[0][0] + 2

        assert wait_until(restarted_again, timeout=30)
        [(processed, started_at)] = query(
            db, "SELECT processed_count, started_at FROM outbox_relay"
        )
    finally:
        stop(relay)
    assert processed == 5
    assert started_at == first[0][1]


def test_a_memory_restart_keeps_the_relay_listed_as_alive(db, database_url):
    """The heartbeat row stays while the relay restarts in place: health's relays_alive does
    not drop to 0 at each restart."""
    relay = start_relay_over_its_memory_limit(database_url, OUTBOX_POLLER_HEARTBEAT_INTERVAL=0.2)
    try:
        wait_ready(relay)
        assert wait_until(lambda: query(db, "SELECT restarts FROM outbox_relay"), timeout=20)
        listed = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            rows = query(db, "SELECT restarts FROM outbox_relay")
            listed.append(rows[0][0] if rows else None)
            if listed[-1] is not None and listed[-1] >= 3:
                break
            time.sleep(0.01)
    finally:
        stop(relay)
    assert listed[-1] is not None and listed[-1] >= 3, listed[-20:]
    assert None not in listed, f"the relay was unlisted {listed.count(None)} time(s)"


def test_a_memory_limit_below_the_relays_own_size_is_warned_of_once(db, database_url):
    relay = start_relay_over_its_memory_limit(database_url)
    try:
        lines = read_until(relay, "restart after")  # the first restart
        lines += read_until(relay, "restart after")  # and the next one
    finally:
        stop(relay)
    warnings = [line for line in lines if "below the relay's own size at start" in line]
    assert len(warnings) == 1, "".join(lines)
    assert "OUTBOX_POLLER_MEMORY_LIMIT_MB" in warnings[0]


def read_until(process, text: str, timeout: float = 30) -> list[str]:
    """The process's output lines up to the first that contains `text`."""
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"no {text!r} in the output: {''.join(lines)}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_a_memory_restart_stops_the_relay_gracefully(db, database_url, signum):
    """A signal that comes while the relay re-executes itself (its handlers gone, Django
    starting up again) is kept for the new program: it stops, with exit status 0, instead of
    dying of the signal's default action (or, as PID 1 in a container, ignoring it)."""
    relay = start_relay_over_its_memory_limit(database_url)
    try:
        wait_ready(relay)
        # The line logged once the relay has let its signal handlers go, just before the exec
        read_until(relay, "restart after")
        relay.send_signal(signum)
        out, _ = relay.communicate(timeout=20)
    finally:
        stop(relay)
    assert relay.returncode == 0, out
    assert f"received {signal.Signals(signum).name}" in out, out
    assert query(db, "SELECT count(*) FROM outbox_relay")[0][0] == 0  # left the live list


def test_a_memory_restart_while_the_database_is_gone_waits_for_it(db):
    """The program that replaces the relay in a restart in place finds the database gone: it
    retries with backoff instead of exiting, then relays what was written meanwhile."""
    proxy, proxied = proxied_database()
    relay = start_relay_over_its_memory_limit(proxied)
    try:
        wait_ready(relay)
        read_until(relay, "restarting in place")
        proxy.stop()  # the relay is closing its connections; the new program finds none
        write_events(db, [uuid.uuid4()], per_entity=3)
        read_until(relay, "database unreachable")
        time.sleep(1)
        assert relay.poll() is None
        proxy.start()
        assert wait_until(lambda: pending_count(db) == 0, timeout=30)
        assert relay.poll() is None
    finally:
        out = stop(relay)
        proxy.stop()
    assert relay.returncode == 0, out
    assert len(handled_rows(db)) == 3, out


def test_terminated_connections_are_restored_with_listen(db, database_url):
    relay = start_relay(database_url, **SLOW_POLLING)
    try:
        wait_ready(relay)
        write_events(db, [uuid.uuid4()], per_entity=1)
        assert wait_until(lambda: len(handled_rows(db)) == 1, timeout=10)

        killed = query(
            db,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'outbox_relay' AND datname = current_database()",
        )
        assert len(killed) == 2  # the work and the listening connection

        # After reconnecting with backoff, LISTEN is back: with 30 s polling, only a NOTIFY
        # can get a new event handled within seconds.
        time.sleep(1.5)
        write_events(db, [uuid.uuid4()], per_entity=3)
        assert wait_until(lambda: pending_count(db) == 0, timeout=8)
        assert relay.poll() is None
    finally:
        out = stop(relay)
    assert len(handled_rows(db)) == 4, out


def wakeup_lock_holders(db) -> int:
    """How many relays hold the wake-up lock (0 or 1)."""
    classid, objid = WAKEUP_LOCK
    return query(
        db,
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
        f" AND classid = {classid} AND objid = {objid} AND objsubid = 2"
        " AND mode = 'ExclusiveLock'",  # a relay's; a writer's is shared
    )[0][0]


def test_two_sleeping_relays_are_woken_by_each_write(db, database_url):
    """Writers notify only while a relay sleeps; with two relays asleep, one holds the wake-up
    lock and the other relies on it. Polling is slow: only a NOTIFY delivers within seconds."""
    relays = [start_relay(database_url, **SLOW_POLLING) for _ in range(2)]
    try:
        for relay in relays:
            wait_ready(relay)
        assert wait_until(lambda: wakeup_lock_holders(db) == 1, timeout=10)
        for n in range(1, 4):
            write_events(db, [uuid.uuid4()], per_entity=1)
            assert wait_until(lambda n=n: len(handled_rows(db)) == n, timeout=5)
            # Drained, one of them sleeps holding the lock again.
            assert wait_until(lambda: wakeup_lock_holders(db) == 1, timeout=5)
    finally:
        outs = [stop(relay) for relay in relays]
    assert len(handled_rows(db)) == 3, outs


def test_an_open_transaction_with_events_does_not_hold_back_other_writers_events(db, database_url):
    """A transaction that inserted events while no relay slept sends no NOTIFY, and keeps every
    relay from sleeping on the wake-up lock until it commits. Meanwhile the relay looks again
    every few milliseconds, so other writers' events flow; the open transaction's once it
    commits. Polling is 30 s: without that, none of these would be handled within seconds."""
    with psycopg.connect(db) as long_writer:
        long_writer.execute(
            "INSERT INTO outbox (event_type, entity_type, entity_id, payload)"
            " VALUES ('test.changed', 'test', %s, '{}')",
            (uuid.uuid4(),),
        )  # left open: no relay runs yet, so it took the wake-up lock shared
        relay = start_relay(database_url, **SLOW_POLLING)
        try:
            wait_ready(relay)
            for n in range(1, 4):
                time.sleep(0.3)
                write_events(db, [uuid.uuid4()], per_entity=1)
                assert wait_until(lambda n=n: len(handled_rows(db)) == n, timeout=3)
            assert wakeup_lock_holders(db) == 0
            long_writer.commit()
            assert wait_until(lambda: len(handled_rows(db)) == 4, timeout=3)
            assert wait_until(lambda: wakeup_lock_holders(db) == 1, timeout=5)
        finally:
            out = stop(relay)
    assert len(handled_rows(db)) == 4, out


@contextlib.contextmanager
def a_holder_and_a_relay_asleep_beside_it(db, database_url):
    """Two relays with 30 s polling, both asleep: the first holds the wake-up lock, the second
    relies on it. Stops whichever still runs at the end."""
    relays = [start_relay(database_url, **SLOW_POLLING)]
    try:
        wait_ready(relays[0])
        assert wait_until(lambda: wakeup_lock_holders(db) == 1, timeout=10)
        relays.append(start_relay(database_url, **SLOW_POLLING))
        wait_ready(relays[1])
        time.sleep(1)  # asleep, relying on the first relay's lock
        yield relays[0], relays[1]
    finally:
        for relay in relays:
            if relay.poll() is None:
                stop(relay)


def assert_the_lock_taken_over_and_a_write_handled_in_seconds(db):
    assert wait_until(lambda: wakeup_lock_holders(db) == 1, timeout=5)
    write_events(db, [uuid.uuid4()], per_entity=1)
    assert wait_until(lambda: len(handled_rows(db)) == 1, timeout=5)


def test_a_relay_stopping_with_the_wakeup_lock_hands_it_to_a_sleeping_one(db, database_url):
    """The second relay sleeps relying on the first one's lock; when the first stops, its
    goodbye wakes the second, which takes the lock long before its 30 s polling would."""
    with a_holder_and_a_relay_asleep_beside_it(db, database_url) as (first, _second):
        assert stop(first) is not None and first.returncode == 0

        assert_the_lock_taken_over_and_a_write_handled_in_seconds(db)


def test_a_relay_killed_with_the_wakeup_lock_leaves_a_sleeping_one_to_take_it(db, database_url):
    """Killed, the holder says no goodbye; its lock dies with its session and writers stop
    notifying. The relay sleeping beside it checks the lock every quarter second, takes it, and
    handles the next write within seconds, not at the end of its 30 s polling interval."""
    with a_holder_and_a_relay_asleep_beside_it(db, database_url) as (first, second):
        first.send_signal(signal.SIGKILL)
        stop(first)

        assert_the_lock_taken_over_and_a_write_handled_in_seconds(db)
        assert {pid for _id, _entity, pid, _seq in handled_rows(db)} == {second.pid}


def test_the_database_gone_for_seconds_loses_nothing_and_wakeups_come_back(db):
    """The relay reaches PostgreSQL through a TCP proxy that is switched off for 3 s, cutting
    both of its connections: it retries with backoff, does not crash, then handles what was
    written meanwhile; and, its LISTEN and wake-up lock restored, a later write wakes it (with
    30 s polling only a NOTIFY can get an event handled within seconds)."""
    proxy, proxied = proxied_database()
    relay = start_relay(proxied, **SLOW_POLLING)
    try:
        wait_ready(relay)
        write_events(db, [uuid.uuid4()], per_entity=1)
        assert wait_until(lambda: len(handled_rows(db)) == 1, timeout=10)

        proxy.stop()
        write_events(db, [uuid.uuid4(), uuid.uuid4()], per_entity=2)
        time.sleep(3)
        assert relay.poll() is None and len(handled_rows(db)) == 1
        proxy.start()
        assert wait_until(lambda: pending_count(db) == 0, timeout=20)

        assert wait_until(lambda: wakeup_lock_holders(db) == 1, timeout=10)
        write_events(db, [uuid.uuid4()], per_entity=1)
        assert wait_until(lambda: pending_count(db) == 0, timeout=5)
        assert relay.poll() is None
    finally:
        out = stop(relay)
        proxy.stop()
    assert len(handled_rows(db)) == 6, out
    assert_entity_order(db)


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--batch-size", "0"], {}, "--batch-size"),
        (["--interval-min", "soon"], {}, "--interval-min"),
        ([], {"OUTBOX_POLLER_MEMORY_LIMIT_MB": "lots"}, "OUTBOX_POLLER_MEMORY_LIMIT_MB"),
        ([], {"OUTBOX_POLLER_ORDERED": "maybe"}, "OUTBOX_POLLER_ORDERED"),
    ],
)
def test_bad_flags_and_variables_exit_2_with_one_line(database_url, args, env, named):
    result = subprocess.run(
        [sys.executable, "manage.py", "outbox_poller", *args],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": database_url, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], result.stderr


def test_the_demo_shows_events_flowing_to_the_handlers(db, database_url):
    """The README's first command, briefly."""
    result = subprocess.run(
        [sys.executable, "manage.py", "outbox_demo", "--seconds", "2", "--rate", "20"],
        cwd=ROOT, env={**os.environ, "DATABASE_URL": database_url},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "events handled" in result.stdout and "issue.created" in result.stdout
    assert pending_count(db) == 0
