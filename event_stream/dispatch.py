"""Dispatch: running one claimed batch through its handlers, and deciding each event's fate.

The batch runs in a worker thread, so a slow sync handler never freezes the relay's event loop
(signals, wake-ups and heartbeats go on); async handlers are run on the loop from that thread.
Each entity's events are handled in order, and an event that fails holds back the later events
of its own entity only. Handlers dispatched to Celery are published in one go at the end of
the batch; an event is done only when its inline handlers succeeded and its tasks were accepted.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import logging
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from event_stream.events import (
    ClaimedEvent,
    EventData,
    UndecodablePayload,
    decode_payload,
    has_long_digit_run,
)
from event_stream.handlers import Handler, HandlerRegistry

logger = logging.getLogger("event_stream.dispatch")

MALFORMED_PAYLOAD = "malformed event: payload is not a JSON object"


class Publisher(Protocol):
    """Sends Celery tasks; raises when the broker did not accept all of them."""

    def publish(self, messages: Sequence[tuple[Handler, EventData]]) -> None: ...


@dataclass
class BatchOutcome:
    processed: list[int] = field(default_factory=list)
    retries: list[tuple[int, float, str]] = field(default_factory=list)  # id, delay, error
    failures: list[tuple[int, str]] = field(default_factory=list)  # id, error (dead letter)
    held: list[int] = field(default_factory=list)  # untouched; claimed again later
    publish_error: BaseException | None = None


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    base_delay: float
    max_delay: float

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Exponential backoff with jitter: half to all of base * 2^(attempt-1), capped."""
        ceiling = min(self.max_delay, self.base_delay * 2 ** min(attempt - 1, 30))
        return ceiling * (0.5 + rand() / 2)


class BatchRunner:
    def __init__(
        self,
        registry: HandlerRegistry,
        retry: RetryPolicy,
        publisher: Publisher | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        ordered: bool = True,
    ):
        self.ordered = ordered
        self.registry = registry
        self.retry = retry
        self.publisher = publisher
        self.loop = loop

    def run(self, rows: Sequence[tuple]) -> BatchOutcome:
        """Handle rows (id, event_id, event_type, entity_type, entity_id, payload, created_at,
        attempts), in id order.

        The per-event path is kept to a few dictionary lookups: at tens of thousands of events a
        second, every function call here is a measurable share of the relay's time.
        """
        outcome = BatchOutcome()
        processed, held, failures = outcome.processed, outcome.held, outcome.failures
        blocked: set = set()  # entities with an earlier event not done in this batch
        to_publish: list[tuple[Handler, EventData]] = []
        publish_ids: list[int] = []
        route = self.registry.route
        long_numbers = _LongNumberCheck(rows)

        for index, row in enumerate(rows):
            event_id, entity_id = row[0], row[4]
            if entity_id is not None and entity_id in blocked:
                held.append(event_id)
                continue
            inline, celery = route(row[2])
            try:
                event = _event_data(
                    row,
                    decode=bool(inline),
                    # Only payloads decoded here need the check (Celery-only events are not).
                    digits_checked=bool(inline) and long_numbers.absent_near(index),
                )
            except UndecodablePayload as exc:
                failures.append((event_id, f"malformed event: {exc}"))
                continue
            if not _is_object(event, row[5]):
                # Retrying cannot fix it: dead-letter at once, without running handlers.
                failures.append((event_id, MALFORMED_PAYLOAD))
                continue
            error = self._run_inline(inline, event, bool(celery)) if inline else None
            if error is not None:
                self._schedule_retry_or_fail(outcome, event_id, row[7] + 1, error)
                if entity_id is not None and self.ordered:
                    blocked.add(entity_id)
            elif celery:
                to_publish.extend([(h, event) for h in celery])
                publish_ids.append(event_id)
            else:
                processed.append(event_id)

        if to_publish:
            self._publish(outcome, to_publish, publish_ids, {row[0]: row[4] for row in rows})
        return outcome

    def _run_inline(
        self, handlers: Sequence[Handler], event: EventData, sent_to_celery: bool
    ) -> str | None:
        """Run the handlers in turn; the first failure's text, or None.

        Each handler gets event_data of its own while another consumer of the event comes after
        it: what one handler changes in it (a parsed timestamp, a popped key) must reach neither
        the next handler nor the Celery message, where a value JSON cannot encode would fail the
        publish, and with it every batch holding the event. The last one, the only one in the
        common case, gets the event itself, uncopied."""
        last = len(handlers) - 1
        for index, handler in enumerate(handlers):
            given = event if index == last and not sent_to_celery else _copy_of(event)
            try:
                self._call(handler, given)
            except BaseException as exc:
                # Not only Exception: SystemExit from a library, CancelledError from an
                # asyncio.run inside a sync handler, let through, would kill the relay, and the
                # restarted relay would die on the same event. Only a Ctrl-C goes on up, and
                # only the main thread gets those: the relay's handler thread never does.
                if isinstance(exc, KeyboardInterrupt) and _in_main_thread():
                    raise
                logger.warning(
                    "handler %s failed on event %s (%s): %s: %s",
                    handler.name, event["id"], event["event_type"], type(exc).__name__, exc,
                )  # fmt: skip
                return f"{handler.name}: {type(exc).__name__}: {exc}"
        return None

    def _call(self, handler: Handler, event: EventData) -> None:
        """Call the handler, and await what it returns when that is awaitable: whether a
        handler is async is known for sure only from its result (an `async def` wrapped in a
        plain decorator, or an object with an async `__call__`, looks sync), and a coroutine
        left unawaited would be an event marked done that no handler ran."""
        result = handler.func(event)
        if result is not None and inspect.isawaitable(result):
            if self.loop is not None:
                stopped_by = asyncio.run_coroutine_threadsafe(_await(result), self.loop).result()
            else:
                stopped_by = asyncio.run(_await(result))
            if stopped_by is not None:
                raise stopped_by  # here, in the handler's thread: this handler's failure

    def _schedule_retry_or_fail(
        self, outcome: BatchOutcome, event_id: int, attempt: int, error: str
    ) -> None:
        if attempt >= self.retry.max_attempts:
            outcome.failures.append((event_id, error))
        else:
            outcome.retries.append((event_id, self.retry.delay(attempt), error))

    def _publish(
        self,
        outcome: BatchOutcome,
        messages: list[tuple[Handler, EventData]],
        publish_ids: list[int],
        entity_of: dict[int, object],
    ) -> None:
        if self.publisher is None:
            outcome.publish_error = RuntimeError("a handler wants Celery, but no publisher is set")
        else:
            try:
                self.publisher.publish(messages)
            except Exception as exc:
                outcome.publish_error = exc
        if outcome.publish_error is None:
            outcome.processed.extend(publish_ids)
            outcome.processed.sort()
            return
        # Not published: those events stay pending, untouched (the broker is at fault, not the
        # event), and so do the later events of their entities, to keep the order.
        first_unsent: dict[object, int] = {}
        for event_id in publish_ids:
            key = entity_of[event_id] if entity_of[event_id] is not None else ("event", event_id)
            first_unsent.setdefault(key, event_id)
        outcome.held.extend(publish_ids)
        still_done = []
        for event_id in outcome.processed:
            entity = entity_of[event_id]
            if entity in first_unsent and event_id > first_unsent[entity]:
                outcome.held.append(event_id)
            else:
                still_done.append(event_id)
        outcome.processed = still_done
        outcome.held.sort()


def _copy_of(event: EventData) -> EventData:
    """A deep copy of event_data. The payload is decoded again from the row's text, which is
    several times faster than copy.deepcopy; only its top level holds anything else, and that
    only scalars."""
    copied = dict(event)
    text = getattr(event, "payload_json", None)
    payload = event["payload"]
    copied["payload"] = decode_payload(text) if text is not None else copy.deepcopy(payload)
    return copied


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


async def _await(awaitable) -> BaseException | None:
    """Any awaitable as a coroutine, which is what the event loop's entry points take.

    Returns the SystemExit or KeyboardInterrupt it raised, if any: raised in a task, either
    would stop the relay's event loop itself rather than fail the handler.
    """
    try:
        await awaitable
    except (SystemExit, KeyboardInterrupt) as exc:
        return exc
    return None


# Payloads checked for long numbers at once (see decode_payload): one check per payload costs
# more, one over a whole batch holds a second copy of the batch's payloads in memory.
LONG_NUMBER_CHUNK = 64


class _LongNumberCheck:
    """Whether the payloads near a row hold no run of 19 digits, checked per chunk of
    LONG_NUMBER_CHUNK rows when a payload of the chunk is first decoded (rows come in order).
    The comma keeps two payloads' digits from forming one run."""

    def __init__(self, rows: Sequence[tuple]):
        self.rows = rows
        self.chunk = -1
        self.absent = False

    def absent_near(self, index: int) -> bool:
        chunk = index // LONG_NUMBER_CHUNK
        if chunk != self.chunk:
            start = chunk * LONG_NUMBER_CHUNK
            rows = self.rows[start : start + LONG_NUMBER_CHUNK]
            self.chunk = chunk
            self.absent = not has_long_digit_run(
                ",".join([r[5] for r in rows if isinstance(r[5], str)])
            )
        return self.absent


def _is_object(event: EventData, payload_text) -> bool:
    if event["payload"] is not None or not isinstance(payload_text, str):
        return isinstance(event["payload"], dict)
    # Valid JSON (PostgreSQL checked it on the way in), so a leading brace means an object; a
    # `json` column keeps the text as written, whitespace included.
    return payload_text.lstrip().startswith("{")


def _event_data(row: tuple, decode: bool = True, digits_checked: bool = False) -> EventData:
    """The seed's event_data from a claimed row (ids, payload and timestamp as text).

    With decode=False (no handler in the relay needs it) the payload stays text, carried as
    `payload_json` for the Celery message, and `payload` is filled in by the worker."""
    payload = row[5]
    if isinstance(payload, str):
        payload_value = decode_payload(payload, digits_checked=digits_checked) if decode else None
    else:
        payload_value = payload
    event = ClaimedEvent(
        id=row[0],
        event_id=row[1],
        event_type=row[2],
        entity_type=row[3],
        entity_id=row[4],
        payload=payload_value,
        processed_at=None,
        created_at=row[6],
        attempts=row[7],
    )
    event.payload_json = payload if isinstance(payload, str) else None
    return event
