"""The poller's loop against the in-memory FakeDatabase."""

import asyncio
import functools
import os
import signal
import time
import uuid

import pytest

from event_stream import poller as poller_module
from event_stream.database import WakeupPromise
from event_stream.poller import OutboxPoller, StopReason
from event_stream.settings import RelaySettings
from tests.unit.fakes import FakeDatabase


def make_poller(db, **settings):
    settings.setdefault("interval_min", 0.01)
    settings.setdefault("interval_max", 0.05)
    settings.setdefault("heartbeat_interval", 0.05)
    return OutboxPoller(settings=RelaySettings(**settings), database=db)


async def run_until(poller, predicate, timeout=5.0):
    task = asyncio.create_task(poller.run())
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    poller.stop()
    reason = await asyncio.wait_for(task, 5)
    assert predicate()
    return reason


async def test_handles_every_event_and_stops_cleanly():
    db = FakeDatabase()
    ids = [db.add(entity_id=uuid.uuid4()) for _ in range(7)]
    poller = make_poller(db, batch_size=3)
    seen = []
    poller.add_handler(lambda e: seen.append(e["id"]))

    reason = await run_until(poller, lambda: len(seen) == 7)

    assert reason is StopReason.STOPPED
    assert seen == ids
    assert all(db.state(i) == "processed" for i in ids)
    assert poller.processed_count == 7
    assert db.heartbeats[-1] == {"removed": poller.relay_id}


async def test_a_notification_wakes_it_long_before_the_interval():
    db = FakeDatabase()
    poller = make_poller(db, interval_min=30, interval_max=30)
    seen = []
    poller.add_handler(lambda e: seen.append(time.monotonic()))
    task = asyncio.create_task(poller.run())
    await asyncio.sleep(0.2)  # idle, sleeping its 30 s interval

    db.add()
    sent = time.monotonic()
    db.notifications.put_nowait("outbox")
    while not seen and time.monotonic() - sent < 5:
        await asyncio.sleep(0.01)
    poller.stop()
    await task

    assert seen and seen[0] - sent < 2.0
    assert db.listening == ["event_stream_outbox"]


async def test_lost_work_connection_releases_the_batch_and_reconnects():
    db = FakeDatabase()
    db.fail_next_claims = 2
    ids = [db.add() for _ in range(3)]
    poller = make_poller(db)
    seen = []
    poller.add_handler(lambda e: seen.append(e["id"]))

    await run_until(poller, lambda: len(seen) == 3)

    assert seen == ids
    assert db.connects >= 3  # first connect + one per lost connection


async def test_failing_event_is_retried_then_dead_lettered():
    db = FakeDatabase()
    bad = db.add(entity_id=uuid.uuid4())
    poller = make_poller(db, max_attempts=3, retry_base_delay=0, retry_max_delay=0)
    poller.add_handler(lambda e: 1 / 0)

    await run_until(poller, lambda: db.state(bad) == "failed")

    assert db.rows[bad]["attempts"] == 3
    assert "ZeroDivisionError" in db.rows[bad]["error"]
    assert poller.failed_count == 1


async def test_a_slow_sync_handler_does_not_freeze_the_loop():
    db = FakeDatabase()
    db.add()
    poller = make_poller(db)
    poller.add_handler(lambda e: time.sleep(0.6))
    task = asyncio.create_task(poller.run())
    await asyncio.sleep(0.1)

    # While the handler sleeps, the loop still answers: heartbeats go on.
    beats_before = len(db.heartbeats)
    await asyncio.sleep(0.3)
    assert len(db.heartbeats) > beats_before

    poller.stop()
    await task


async def test_memory_over_the_limit_asks_for_a_restart_after_the_batch():
    db = FakeDatabase()
    ids = [db.add() for _ in range(3)]
    poller = make_poller(db, memory_limit_mb=1, memory_check_interval=0.01)
    seen = []
    poller.add_handler(lambda e: seen.append(e["id"]))
    await asyncio.sleep(0.02)

    reason = await asyncio.wait_for(poller.run(), 5)

    assert reason is StopReason.RESTART
    assert seen == ids  # the batch was finished and recorded first
    assert all(db.state(i) == "processed" for i in ids)


@pytest.mark.parametrize("ordered", [True, False])
async def test_per_entity_order_setting(ordered):
    db = FakeDatabase(ordered=ordered)
    entity = uuid.uuid4()
    first = db.add(entity_id=entity)
    db.add(entity_id=entity)
    poller = make_poller(db, ordered=ordered, retry_base_delay=0, retry_max_delay=0)
    seen = []

    def handler(event):
        seen.append(event["id"])
        if event["id"] == first and seen.count(first) == 1:
            raise RuntimeError("first try fails")

    poller.add_handler(handler)
    await run_until(poller, lambda: all(r["state"] == "processed" for r in db.rows.values()))

    second = first + 1
    # Ordered: the second event waits for the first's retry. Unordered: it does not.
    assert seen == ([first, first, second] if ordered else [first, second, first])


async def test_before_sleeping_it_promises_wakeups_then_claims_once_more():
    db = FakeDatabase()
    poller = make_poller(db, interval_min=30, interval_max=30)

    task = asyncio.create_task(poller.run())
    await asyncio.sleep(0.3)
    held_while_asleep, log = db.holds_wakeup_lock, list(db.log)
    poller.stop()
    await task

    # A writer that committed between the empty claim and the promise sent no NOTIFY: the
    # claim after the promise finds its events. Then the relay sleeps, promise kept (its one
    # more claim is the wake-up the listener gives when it starts).
    assert log[:3] == ["claim:0", "promise:mine", "claim:0"]
    assert set(log[3:]) <= {"claim:0"} and len(log) <= 4
    assert held_while_asleep
    assert not db.holds_wakeup_lock  # stopped: the lock went with the work connection


async def test_busy_it_releases_the_promise_and_takes_it_again_when_drained():
    db = FakeDatabase()
    poller = make_poller(db, interval_min=30, interval_max=30, batch_size=10)
    seen = []
    poller.add_handler(lambda e: seen.append(e["id"]))
    task = asyncio.create_task(poller.run())
    await asyncio.sleep(0.3)  # drained and asleep

    db.add()
    db.notifications.put_nowait("outbox")
    deadline = time.monotonic() + 5
    while db.log[-2:] != ["promise:mine", "claim:0"] and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    log = list(db.log)
    poller.stop()
    await task

    woken = log.index("claim:1")
    assert log[woken:] == ["claim:1", "release", "claim:0", "promise:mine", "claim:0"]


async def test_writers_still_committing_make_it_look_again_soon_not_sleep():
    db = FakeDatabase()
    db.wakeup_answers = [WakeupPromise.NONE, WakeupPromise.NONE, WakeupPromise.MINE]
    poller = make_poller(db, interval_min=30, interval_max=30)
    started = time.monotonic()

    await run_until(poller, lambda: "promise:mine" in db.log, timeout=2)

    assert time.monotonic() - started < 1.0  # not the 30 s interval
    assert db.log[:6] == [
        "claim:0", "promise:none", "claim:0", "promise:none", "claim:0", "promise:mine",
    ]  # fmt: skip


async def test_another_relays_promise_is_checked_again_after_each_sleep():
    db = FakeDatabase()
    db.wakeup_answers = [WakeupPromise.ANOTHER, WakeupPromise.ANOTHER]
    poller = make_poller(db, interval_min=0.05, interval_max=0.05)

    await run_until(poller, lambda: db.log.count("promise:another") == 2, timeout=2)

    assert db.log[:6] == [
        "claim:0", "promise:another", "claim:0", "claim:0", "promise:another", "claim:0",
    ]  # fmt: skip
    assert not db.holds_wakeup_lock


async def test_beside_another_holder_it_checks_the_lock_often_and_claims_seldom(monkeypatch):
    monkeypatch.setattr(poller_module, "HOLDER_CHECK_INTERVAL", 0.02)
    db = FakeDatabase()
    # Another relay holds the lock for three checks, then is gone (killed, or busy).
    db.wakeup_answers = [WakeupPromise.ANOTHER] * 3 + [WakeupPromise.MINE]
    poller = make_poller(db, interval_min=30, interval_max=30)
    started = time.monotonic()

    def took_over_and_claimed() -> bool:
        return "promise:mine" in db.log[:-1]

    await run_until(poller, took_over_and_claimed, timeout=2)

    assert time.monotonic() - started < 1.0  # not the 30 s polling interval
    # Checks while asleep are lock tries, no claims; the lock taken, one more claim.
    mine = db.log.index("promise:mine")
    assert db.log[mine - 1 : mine + 2] == ["promise:another", "promise:mine", "claim:0"]


async def test_stopping_while_holding_the_wakeup_lock_hands_it_over():
    db = FakeDatabase()
    poller = make_poller(db, interval_min=30, interval_max=30)
    task = asyncio.create_task(poller.run())
    await asyncio.sleep(0.3)
    assert db.holds_wakeup_lock

    poller.stop()
    await task

    assert db.log[-1] == "wake relays"  # after the work connection (and the lock) closed
    assert not db.holds_wakeup_lock


async def test_a_stop_during_the_batch_wins_over_a_memory_restart():
    # The batch ends over the memory limit, but a SIGTERM came while it ran: exit, as asked.
    db = FakeDatabase()
    db.add()
    poller = make_poller(db, memory_limit_mb=1, memory_check_interval=0.01)
    poller.add_handler(lambda e: time.sleep(0.3))
    task = asyncio.create_task(poller.run())
    await asyncio.sleep(0.1)  # the handler is running

    poller.stop()  # what the first SIGTERM does
    reason = await asyncio.wait_for(task, 5)

    assert reason is StopReason.STOPPED
    assert db.state(1) == "processed"  # the batch in flight was finished


async def test_a_signal_while_the_relay_closes_for_a_restart_still_stops_it():
    class RestartingPoller:
        """Chose to restart, and is closing its connections when the SIGTERM comes."""

        settings = RelaySettings()
        stopped = False
        unlisted = False

        def stop(self):
            self.stopped = True

        async def run(self):
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.sleep(0.05)  # the signal's handler runs on the loop meanwhile
            return StopReason.RESTART

        async def unlist(self):
            self.unlisted = True

    poller = RestartingPoller()

    reason = await poller_module.run_until_signalled(poller)

    assert poller.stopped
    assert reason is StopReason.STOPPED
    assert poller.unlisted  # no restart takes its heartbeat row on: it leaves the live list


async def test_every_retry_it_scheduled_wakes_it_not_only_the_earliest():
    # Two entities fail in one batch; their retries come due at different times. Once the
    # first retry is handled the queue is empty, and the polling interval is long: only the
    # second retry's own due time can wake the relay for it.
    db = FakeDatabase()
    soon = db.add(entity_id=uuid.uuid4())
    later = db.add(entity_id=uuid.uuid4())
    db.rows[later]["attempts"] = 2  # its third attempt: a longer backoff
    poller = make_poller(
        db, interval_min=30, interval_max=30, retry_base_delay=0.1, retry_max_delay=10
    )
    handled_at: dict[int, list[float]] = {soon: [], later: []}

    def fails_once(event):
        handled_at[event["id"]].append(time.monotonic())
        if len(handled_at[event["id"]]) == 1:
            raise RuntimeError("first try fails")

    poller.add_handler(fails_once)

    await run_until(poller, lambda: db.state(later) == "processed", timeout=3)

    # Backoff with jitter: the first retry 0.05-0.1 s after its failure, the second 0.2-0.4 s.
    first_try, retried = handled_at[later]
    assert retried - first_try < 0.4 + 1.0  # not the 30 s polling interval
    assert handled_at[soon][1] < retried
    assert len(poller._retries_due) == 0  # forgotten once claimed


def test_retry_due_times_are_kept_once_each_and_forgotten_once_past():
    due = poller_module.RetryDueTimes()
    for moment in (5.004, 3.004, 3.006, 9.004, 3.004):
        due.add(moment)

    assert len(due) == 3  # 3.004 and 3.006 share a resolution step
    assert due.next_after(0.0) == pytest.approx(3.01)  # rounded up: never woken too early
    assert due.next_after(4.0) == pytest.approx(5.01)
    assert len(due) == 2
    assert due.next_after(9.5) is None
    assert len(due) == 0


@pytest.mark.parametrize(
    "error",
    # No KeyboardInterrupt is a Ctrl-C in the handler thread: signals go to the main thread.
    [SystemExit(3), asyncio.CancelledError(), KeyboardInterrupt()],
)
@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
async def test_a_handler_raising_a_base_exception_fails_its_event_not_the_relay(error, is_async):
    db = FakeDatabase()
    bad = db.add(entity_id=uuid.uuid4())
    good = db.add(entity_id=uuid.uuid4())
    poller = make_poller(db, max_attempts=2, retry_base_delay=0, retry_max_delay=0)

    def handler(event):
        if event["id"] == bad:
            raise error

    async def async_handler(event):
        handler(event)

    poller.add_handler(async_handler if is_async else handler)

    reason = await run_until(poller, lambda: db.state(bad) == "failed")

    assert reason is StopReason.STOPPED
    assert db.state(good) == "processed"
    assert type(error).__name__ in db.rows[bad]["error"]


async def test_an_async_handler_behind_a_plain_decorator_runs_on_the_loop():
    db = FakeDatabase()
    ids = [db.add(), db.add()]
    poller = make_poller(db, max_attempts=1)
    seen = []

    def traced(func):
        @functools.wraps(func)
        def wrapper(event):
            return func(event)

        return wrapper

    @traced
    async def handler(event):
        asyncio.get_running_loop()  # on the relay's loop
        seen.append(event["id"])
        if event["id"] == ids[1]:
            raise RuntimeError("search backend down")

    poller.add_handler(handler)

    await run_until(poller, lambda: db.state(ids[1]) == "failed")

    assert seen == ids
    assert db.state(ids[0]) == "processed"
    assert "search backend down" in db.rows[ids[1]]["error"]
