"""The outbox poller: claims batches, hands them to their handlers, records the outcome.

One loop around a stop event. It wakes on whichever comes first: a NOTIFY from the outbox
trigger, the adaptive polling interval (the seed's fallback when notifications are lost), or the
stop event. Writers send the NOTIFY only while a relay sleeps: before sleeping, the relay takes
the wake-up lock and claims once more; as soon as a claim finds events, it lets the lock go.
A relay that finds the lock held by another sleeps too, trying the lock again every
`HOLDER_CHECK_INTERVAL`: the holder may be gone without a word.
Side tasks (the listener, which also writes heartbeats) are named, watched, and cancelled on
exit with their errors logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import heapq
import logging
import math
import os
import queue
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any

from event_stream.capture import NOTIFY_CHANNEL
from event_stream.database import DatabaseConnection, WakeupPromise
from event_stream.dispatch import BatchOutcome, BatchRunner, Publisher, RetryPolicy
from event_stream.handlers import Dispatch, Handler, HandlerFunc, HandlerRegistry
from event_stream.memory import MemoryMonitor
from event_stream.settings import RelaySettings

logger = logging.getLogger("event_stream.poller")

RECONNECT_BACKOFF_MIN = 0.1
RECONNECT_BACKOFF_MAX = 10.0
# How soon to look again when writers that sent no wake-up are still committing: they are
# usually microseconds from their commit; a long transaction is looked at 100 times a second.
UNCOMMITTED_WRITERS_PAUSE = 0.01
# How often a relay sleeping beside the wake-up lock's holder checks that it still holds it:
# one statement of lock tries, no claim.
HOLDER_CHECK_INTERVAL = 0.25
# How finely the relay tells apart the due times of the retries it scheduled (RetryDueTimes).
RETRY_DUE_RESOLUTION = 0.01
# How long a stopping relay tries to reach the database to take itself off the live list.
GOODBYE_CONNECT_SECONDS = 2.0


class StopReason(enum.Enum):
    STOPPED = "stopped"  # a signal or stop(): exit 0
    RESTART = "restart"  # over the memory limit: restart in place
    ABORTED = "aborted"  # a second signal: stopped at once


class OutboxPoller:
    def __init__(
        self,
        batch_size: int = 250,
        interval_min: float = 0.25,
        interval_max: float = 2.0,
        memory_limit_mb: int = 500,
        memory_check_interval: float = 30,
        *,
        settings: RelaySettings | None = None,
        database: DatabaseConnection | None = None,
        conninfo: str | None = None,
        registry: HandlerRegistry | None = None,
        publisher: Publisher | None = None,
        relay_id: uuid.UUID | None = None,
        restarts: int = 0,
        after_batch=None,
    ):
        self.settings = settings or RelaySettings(
            batch_size=batch_size,
            interval_min=interval_min,
            interval_max=interval_max,
            memory_limit_mb=memory_limit_mb,
            memory_check_interval=memory_check_interval,
        )
        if database is None:
            if conninfo is None:
                raise ValueError("OutboxPoller needs a database or a conninfo")
            database = DatabaseConnection(
                conninfo,
                ordered=self.settings.ordered,
                synchronous_commit=self.settings.synchronous_commit,
            )
        self.db = database
        self.registry = registry if registry is not None else HandlerRegistry()
        self.publisher = publisher
        self.retry = RetryPolicy(
            self.settings.max_attempts,
            self.settings.retry_base_delay,
            self.settings.retry_max_delay,
        )
        self.memory = MemoryMonitor(
            self.settings.memory_limit_mb, self.settings.memory_check_interval
        )
        self.relay_id = relay_id or uuid.uuid4()
        self.restarts = restarts
        self.started_at = time.time()
        self.processed_count = 0
        self.failed_count = 0
        self._stop = asyncio.Event()
        self._wakeup = asyncio.Event()
        self._error_backoff = 0.0
        # Called in the handler thread after each batch (the service closes stale Django
        # connections there).
        self._after_batch = after_batch
        self._handler_thread: HandlerThread | None = None
        # When the retries this relay scheduled come due: a sleep ends at the next one, not at
        # the end of a long polling interval.
        self._retries_due = RetryDueTimes()
        # When the last claim began (monotonic): retries due by then were claimable by it.
        self._last_claim_at = 0.0

    # -- registration --------------------------------------------------------------------------

    def add_handler(
        self,
        func: HandlerFunc,
        patterns: Iterable[str] | str = ("*",),
        *,
        name: str | None = None,
        dispatch: Dispatch = "inline",
    ) -> Handler:
        """Register a handler: every event by default, or the event types matching patterns."""
        return self.registry.add(func, patterns, name=name, dispatch=dispatch)

    # -- lifecycle -----------------------------------------------------------------------------

    def stop(self) -> None:
        """No new claims; the batch in flight is finished (or released after the timeout)."""
        self._stop.set()
        self._wakeup.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def run(self) -> StopReason:
        """Run until stopped; returns why. Closes its connections before returning."""
        side_tasks: list[asyncio.Task] = []
        self._handler_thread = HandlerThread(self._after_batch)
        reason = None
        try:
            if not await self._connect_with_backoff(self.db.connect_work):
                return StopReason.STOPPED
            side_tasks.append(self._start_listener())
            reason = await self._loop(side_tasks)
            return reason
        finally:
            for task in side_tasks:
                task.cancel()
            for task in side_tasks:
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                except Exception:
                    logger.exception("side task %s failed", task.get_name())
            self._handler_thread.close()
            close_publisher = getattr(self.publisher, "close", None)
            if close_publisher is not None:
                close_publisher()
            await self._hand_over_wakeups()
            if reason is not StopReason.RESTART or self.stopping:
                # A restart in place is the same relay going on (same id): its heartbeat row
                # stays, and health does not count it gone while it restarts.
                await self._say_goodbye()
            await self.db.close()

    def _start_listener(self) -> asyncio.Task:
        return asyncio.create_task(self._listen_and_beat(), name="outbox-listener")

    def _watch(self, side_tasks: list[asyncio.Task]) -> None:
        """A side task that died is logged and started again: no silent loss of wake-ups."""
        listener = side_tasks[0]
        if listener.done() and not listener.cancelled():
            logger.error(
                "listener stopped unexpectedly; restarting it", exc_info=listener.exception()
            )
            side_tasks[0] = self._start_listener()

    async def _loop(self, side_tasks: list[asyncio.Task]) -> StopReason:
        interval = self.settings.interval_min
        promise: WakeupPromise | None = None  # whether writers will wake this relay
        while not self.stopping:
            self._watch(side_tasks)
            self._wakeup.clear()
            claimed = await self._process_one_batch()
            if claimed is None:
                promise = None  # the work connection, and the lock with it, may be gone
                continue  # the batch failed and the error backoff was the pause: try again
            if self.stopping:
                break  # asked to stop during the batch: a restart would lose the stop
            if self.memory.over_limit():
                logger.warning(
                    "memory %.0f MB is over the limit of %d MB: restarting in place",
                    self.memory.last_mb, self.settings.memory_limit_mb,
                )  # fmt: skip
                return StopReason.RESTART
            if claimed:
                # More may be waiting (a short batch can mean other relays hold the rest):
                # claim again at once; only an empty claim means the queue is drained.
                interval = self.settings.interval_min
                promise = None
                await self._release_wakeups()
                continue
            if promise is None:
                # Claim once more before sleeping: wake-ups are promised only for commits from
                # now on, and one may have come after the claim that found nothing.
                promise = await self._promise_wakeups()
                continue
            if promise is WakeupPromise.ANOTHER:
                promise = await self._sleep_beside_holder(self._until_retry_due(interval))
            else:
                await self._sleep(self._until_retry_due(interval))
            interval = min(interval * 2, self.settings.interval_max)
        return StopReason.STOPPED

    async def _sleep_beside_holder(self, seconds: float) -> WakeupPromise | None:
        """Sleep while another relay holds the wake-up lock, checking that it still does.

        The holder can stop promising without a word: killed (its lock dies with its session),
        or woken to work (it lets the lock go). From then on writers skip the NOTIFY, which this
        relay relies on; so every `HOLDER_CHECK_INTERVAL` it tries the lock again, and takes it
        over within that time rather than at the end of its polling interval. Returns MINE when
        it took the lock (the loop claims once more, then sleeps), else None: claim now.
        """
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > HOLDER_CHECK_INTERVAL:
            await self._sleep(HOLDER_CHECK_INTERVAL)
            if self._wakeup.is_set():
                return None  # a NOTIFY (or stop)
            promise = await self._promise_wakeups()
            if promise is not WakeupPromise.ANOTHER:
                return promise  # MINE, or None after the pause for uncommitted writers
        await self._sleep(max(left, 0))
        return None  # the polling interval is over: claim

    def _until_retry_due(self, interval: float) -> float:
        """The polling interval, cut short by the next retry this relay scheduled: a retry
        makes no NOTIFY when it comes due. Retries due before the last claim began were
        claimable by it (taken, or blocked behind others); one due since then, not yet claimed,
        makes the pause 0."""
        due = self._retries_due.next_after(self._last_claim_at)
        if due is None:
            return interval
        return min(interval, max(due - time.monotonic(), 0.0))

    async def _promise_wakeups(self) -> WakeupPromise | None:
        """Make writers notify while this relay sleeps; None when that cannot be promised yet
        (writers that sent no NOTIFY are still committing: after a short pause, look again)."""
        try:
            promise = await self.db.promise_wakeups()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._abandon_transaction("could not arm wake-ups", exc)
            return None
        if promise is WakeupPromise.NONE:
            await self._sleep(UNCOMMITTED_WRITERS_PAUSE)
            return None
        return promise

    async def _release_wakeups(self) -> None:
        """Busy: the relay needs no wake-ups, so writers skip the NOTIFY and its cost."""
        if not self.db.holds_wakeup_lock:
            return
        try:
            await self.db.release_wakeups()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The lock goes with the connection; the next claim reconnects.
            logger.warning("could not release wake-ups: %s: %s", type(exc).__name__, exc)
            await self.db.close_work()

    async def _sleep(self, seconds: float) -> None:
        """Until a notification, the stop event, or `seconds`."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout=seconds)

    async def _back_off(self, seconds: float) -> None:
        """Until the stop event or `seconds`: new events do not cut an error's pause short."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)

    # -- one batch -----------------------------------------------------------------------------

    async def _process_one_batch(self) -> int | None:
        """Claim, handle and record one batch; returns how many events were claimed, or None
        when the batch failed (its rows released) and the caller should try again."""
        try:
            if not self.db.work_ok and not await self._connect_with_backoff(self.db.connect_work):
                return None
            self._last_claim_at = time.monotonic()
            rows = await self.db.fetch_and_lock_rows(self.settings.batch_size)
            if not rows:
                await self.db.commit()
                return 0
            outcome = await self._handle(rows)
            await self._record(outcome)
            return len(rows)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The transaction is gone with the connection (or rolled back): every claimed row
            # is pending again, and handled again later. At least once, nothing lost.
            await self._abandon_transaction("batch aborted, rows released", exc)
            return None

    async def _handle(self, rows: list[tuple]) -> BatchOutcome:
        runner = BatchRunner(
            self.registry,
            self.retry,
            self.publisher,
            asyncio.get_running_loop(),
            ordered=self.settings.ordered,
        )
        return await self._handler_thread.run(runner.run, rows)

    async def _record(self, outcome: BatchOutcome) -> None:
        await self.db.finish_batch(outcome.processed, outcome.retries, outcome.failures)
        # Counted from after the batch's commit, so the database's own due time (counted from
        # inside it) has passed when the relay wakes.
        committed_at = time.monotonic()
        for _id, delay, _error in outcome.retries:
            self._retries_due.add(committed_at + delay)
        if outcome.publish_error is None:
            self._error_backoff = 0.0
        self.processed_count += len(outcome.processed)
        self.failed_count += len(outcome.failures)
        if outcome.publish_error is not None:
            logger.warning(
                "broker did not accept the batch's tasks; %d events stay pending: %s",
                len(outcome.held), outcome.publish_error,
            )  # fmt: skip
            await self._pause_after_error()

    async def _abandon_transaction(self, what: str, exc: Exception) -> None:
        """After a failed statement on the work connection: say so, roll back, pause."""
        logger.warning("%s: %s: %s", what, type(exc).__name__, exc)
        await self._safe_rollback()
        await self._pause_after_error()

    async def _safe_rollback(self) -> None:
        try:
            await self.db.rollback()
        except Exception:
            await self.db.close_work()

    async def _pause_after_error(self) -> None:
        """Exponential backoff across consecutive failed batches (database or broker)."""
        self._error_backoff = min(
            RECONNECT_BACKOFF_MAX, max(RECONNECT_BACKOFF_MIN, self._error_backoff * 2)
        )
        await self._back_off(self._error_backoff)

    async def _connect_with_backoff(self, connect) -> bool:
        """Connect, retrying with backoff until it works (True) or the relay stops (False)."""
        delay = RECONNECT_BACKOFF_MIN
        while not self.stopping:
            try:
                await connect()
                return True
            except Exception as exc:
                logger.warning("database unreachable (%s); retrying in %.1fs", exc, delay)
                await self._back_off(delay)
                delay = min(delay * 2, RECONNECT_BACKOFF_MAX)
        return False

    # -- the listener and heartbeats -----------------------------------------------------------

    async def _listen_and_beat(self) -> None:
        """Keep LISTEN on the control connection (restored after any reconnect) and record a
        heartbeat every `heartbeat_interval`. A wake-up is a hint; polling still finds all."""
        next_beat = 0.0
        while True:
            try:
                if not self.db.control_ok:
                    if not await self._connect_with_backoff(self.db.connect_control):
                        return
                    await self.db.listen(NOTIFY_CHANNEL)
                    self._wakeup.set()  # notifications may have been missed meanwhile
                if time.monotonic() >= next_beat:
                    await self.db.record_heartbeat(self.heartbeat())
                    next_beat = time.monotonic() + self.settings.heartbeat_interval
                wait = max(0.05, min(1.0, next_beat - time.monotonic()))
                await self.db.wait_for_notifications(wait, self._wakeup.set)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("listener connection lost (%s); reconnecting", exc)
                await self.db.close_control()
                await asyncio.sleep(RECONNECT_BACKOFF_MIN)

    def heartbeat(self) -> dict[str, Any]:
        return {
            "relay_id": self.relay_id,
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": _utc(self.started_at),
            "processed_count": self.processed_count,
            "failed_count": self.failed_count,
            "memory_mb": round(self.memory.last_mb, 1),
            "restarts": self.restarts,
        }

    async def _hand_over_wakeups(self) -> None:
        """A relay that stops while holding the wake-up lock lets it go and wakes the others:
        one of them takes it over, instead of sleeping on without wake-ups until its polling
        interval ends."""
        if not self.db.holds_wakeup_lock:
            return
        try:
            await self.db.close_work()  # the lock goes with the connection
            if self.db.control_ok:
                await self.db.wake_relays()
        except Exception as exc:
            logger.warning("could not hand over wake-ups: %s: %s", type(exc).__name__, exc)

    async def unlist(self) -> None:
        """Leave the list of live relays after `run` returned to restart in place, when a stop
        came after all (see run_until_signalled): no restart will take the heartbeat on."""
        await self._say_goodbye()
        await self.db.close()

    async def _say_goodbye(self) -> None:
        """A relay that stops cleanly leaves the list of live relays at once.

        Also one stopped before its control connection was up: after a restart in place its
        heartbeat row is the previous program's, still listed. A connection is tried for a
        moment only: with the database gone, the row ages out of the list instead.
        """
        try:
            if not self.db.control_ok:
                await asyncio.wait_for(self.db.connect_control(), GOODBYE_CONNECT_SECONDS)
            await self.db.remove_heartbeat(self.relay_id)
        except Exception as exc:
            logger.debug("could not remove heartbeat: %s", exc)


class RetryDueTimes:
    """When the retries a relay scheduled come due (monotonic seconds), each kept until a claim
    began after it.

    Every one of them, not only the earliest: a relay that sleeps until its first retry and
    then finds the queue drained would sleep through the others. Times are rounded up to
    RETRY_DUE_RESOLUTION and kept once each, so a relay that retries thousands of events a
    second keeps at most one time per resolution step of its backoff window, and wakes at most
    that much after a retry came due.
    """

    def __init__(self) -> None:
        self._steps: list[int] = []  # a heap of due times, in resolution steps
        self._known: set[int] = set()

    def __len__(self) -> int:
        return len(self._steps)

    def add(self, due: float) -> None:
        step = math.ceil(due / RETRY_DUE_RESOLUTION)
        if step not in self._known:
            self._known.add(step)
            heapq.heappush(self._steps, step)

    def next_after(self, moment: float) -> float | None:
        """The earliest due time after `moment`, forgetting those at or before it."""
        while self._steps and self._steps[0] * RETRY_DUE_RESOLUTION <= moment:
            self._known.discard(heapq.heappop(self._steps))
        return self._steps[0] * RETRY_DUE_RESOLUTION if self._steps else None


def _utc(timestamp: float):
    import datetime

    return datetime.datetime.fromtimestamp(timestamp, tz=datetime.UTC)


class HandlerThread:
    """One long-lived daemon thread that runs the batches' handlers, one batch at a time.

    Long-lived, so thread-bound resources of handlers (Django's connection) are reused across
    batches. Daemon, and not the default executor (whose threads are joined at interpreter
    exit), so a stuck handler cannot keep a relay that was told to stop from exiting.
    """

    def __init__(self, after_batch=None):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._after_batch = after_batch
        self._thread = threading.Thread(target=self._serve, name="outbox-handlers", daemon=True)
        self._thread.start()

    async def run(self, func, *args):
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._jobs.put((loop, future, func, args))
        return await future

    def close(self) -> None:
        self._jobs.put(None)

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, future, func, args = job
            try:
                result = func(*args)
            except BaseException as exc:
                loop.call_soon_threadsafe(_settle, future, None, exc)
            else:
                loop.call_soon_threadsafe(_settle, future, result, None)
            finally:
                if self._after_batch is not None:
                    try:
                        self._after_batch()
                    except Exception:
                        logger.exception("after-batch hook failed")


def _settle(future: asyncio.Future, result, exc: BaseException | None) -> None:
    if future.done():  # the relay stopped waiting (aborted)
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


async def run_until_signalled(poller: OutboxPoller, *, install_signal_handlers: bool = True):
    """Run the poller; the first SIGTERM/SIGINT stops it gracefully, a second one at once.

    Graceful: no new claims, the batch in flight finishes, or is released when it takes longer
    than the shutdown timeout. At once: the batch is abandoned and its rows released by the
    rollback. Either way nothing is lost. Signal handlers are restored on exit.
    """
    loop = asyncio.get_running_loop()
    main = asyncio.create_task(poller.run(), name="outbox-poller")
    signals = (signal.SIGTERM, signal.SIGINT)
    received: list[int] = []

    def on_signal(signum: int) -> None:
        received.append(signum)
        if len(received) == 1:
            logger.info("received %s: finishing the batch in flight, then stopping",
                        signal.Signals(signum).name)  # fmt: skip
            poller.stop()
            loop.call_later(poller.settings.shutdown_timeout, abort, "shutdown timeout")
        else:
            abort("second signal")

    def abort(why: str) -> None:
        if not main.done():
            logger.warning("stopping at once (%s); claimed events are released", why)
            main.cancel()

    if install_signal_handlers:
        for sig in signals:
            loop.add_signal_handler(sig, on_signal, sig)
    try:
        reason = await main
        if reason is StopReason.RESTART and received:
            # The signal came after the loop chose to restart (while it closed its
            # connections): a restart in place would forget it, so the stop wins, and the
            # relay leaves the live list as a stopping relay does.
            await poller.unlist()
            return StopReason.STOPPED
        return reason
    except asyncio.CancelledError:
        if not (main.cancelled() and received):
            raise
        return StopReason.ABORTED if len(received) > 1 else StopReason.STOPPED
    finally:
        if install_signal_handlers:
            for sig in signals:
                loop.remove_signal_handler(sig)
