"""The relay side of Celery dispatch: publish one task per event and handler, in bulk.

The relay hands `CeleryPublisher.publish` a batch of `(handler, event_data)` pairs, from a thread
(`asyncio.to_thread`). It returns only once the broker has accepted every message of the batch,
or raises `PublishError`; the relay then keeps the rows unprocessed and backs off. At least once:
a batch that failed half way is published again in full later, under the same task ids.

Each message is an ordinary Celery protocol 2 task message for `event_stream.run_handler`
(`app.amqp.as_task_v2`), which the worker task in `event_stream.tasks` executes. What makes it
fast is how the messages reach the broker, over one long-lived connection:

- Redis: the messages of a batch pushed by one LPUSH (kombu's message format, see
  `_send_redis`); its reply is the broker's acceptance.
- AMQP (RabbitMQ): publisher confirms; the whole batch is written, then the confirms are awaited
  together (one round trip per batch, not one per message).
- Any other kombu transport: one `basic_publish` per message.

No internal retry loop: the connection is opened with a bounded timeout and a single attempt,
and any error closes it, so the next batch reconnects.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from celery.utils.nodenames import anon_nodename
from kombu.entity import maybe_delivery_mode

from event_stream.handlers import Handler

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger("event_stream.celery")

TASK_NAME = "event_stream.run_handler"

DEFAULT_CONNECT_TIMEOUT = 3.0  # seconds to open a broker connection
DEFAULT_CONFIRM_TIMEOUT = 10.0  # seconds for the broker to accept a whole batch
DEFAULT_CHUNK_SIZE = 1000  # messages per Redis pipeline / per wait for AMQP confirms

# Body of every message: no callbacks, errbacks, chain or chord.
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


_EMBED_JSON = json.dumps(_EMBED)

CONTENT_TYPE, CONTENT_ENCODING = "application/json", "utf-8"

# Markers in a batch's Redis entry skeleton (see CeleryPublisher._send_redis).
_TASK_ID, _ARGSREPR, _DELIVERY_TAG = "@@task-id@@", "@@argsrepr@@", "@@delivery-tag@@"


def _task_body(handler_name: str, event_data: dict) -> str:
    """The JSON body of one task: `[[handler_name, event_data], {}, embed]`.

    event_data holds JSON types only (see events.py), so the standard encoder writes the same
    document kombu's JSON serializer would, several times faster. A claimed event carries its
    payload's JSON text from PostgreSQL, which is spliced in rather than encoded again.
    """
    payload_json = getattr(event_data, "payload_json", None)
    if payload_json is None or len(event_data) < 2:
        return json.dumps(((handler_name, event_data), {}, _EMBED))
    others = json.dumps({k: v for k, v in event_data.items() if k != "payload"})
    event_json = f'{others[:-1]}, "payload": {payload_json}}}'
    return f"[[{json.dumps(handler_name)}, {event_json}], {{}}, {_EMBED_JSON}]"


class PublishError(Exception):
    """The broker did not accept the batch (unreachable, timed out, refused, nacked).

    Some messages of the batch may have been delivered: the relay must keep all rows of the batch
    unprocessed and publish them again later (handlers deduplicate by `event_id`).
    """


def task_id_for(event_id: str, handler_name: str) -> str:
    """The Celery task id of one event and handler: the same on every publication."""
    return f"{event_id}:{handler_name}"


def default_celery_app() -> Celery:
    """The host project's Celery app: `settings.EVENT_STREAM_CELERY_APP`, or `celery_app.app`."""
    from django.conf import settings
    from django.utils.module_loading import import_string

    return import_string(getattr(settings, "EVENT_STREAM_CELERY_APP", "celery_app.app"))


class CeleryPublisher:
    """Publishes `event_stream.run_handler` tasks in bulk over one long-lived connection.

    Thread-safe (one batch at a time). Close it when the relay stops, or use it as a context
    manager.
    """

    def __init__(
        self,
        app: Celery | None = None,
        *,
        queue: str | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        confirm_timeout: float = DEFAULT_CONFIRM_TIMEOUT,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        if connect_timeout <= 0 or confirm_timeout <= 0:
            raise ValueError("connect_timeout and confirm_timeout must be positive")
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        self.app = app if app is not None else default_celery_app()
        self.connect_timeout = connect_timeout
        self.confirm_timeout = confirm_timeout
        self.chunk_size = chunk_size
        self._queue_name = queue
        self._lock = threading.Lock()
        self._origin = anon_nodename()
        self._connection = None
        self._channel = None
        self._sender = None
        self._exchange = ""
        self._routing_key = ""
        self._delivery_mode = 2
        self._tag_prefix = f"{uuid.uuid4()}-"
        self._tags = itertools.count(1)

    # -- public API -------------------------------------------------------------------------

    def publish(self, batch: Iterable[tuple[Handler | str, dict[str, Any]]]) -> int:
        """Publish one task per `(handler, event_data)` pair; return how many were accepted.

        Returns only after the broker accepted all of them. Raises `PublishError` otherwise
        (after closing the connection: the next call reconnects).
        """
        items = list(batch)
        if not items:
            return 0
        with self._lock:
            try:
                sender = self._ensure_connected()
                for start in range(0, len(items), self.chunk_size):
                    sender(self._tasks(items[start : start + self.chunk_size]))
            except PublishError:
                self._discard_connection()
                raise
            except Exception as exc:
                self._discard_connection()
                raise PublishError(f"broker did not accept {len(items)} task(s): {exc!r}") from exc
        return len(items)

    def close(self) -> None:
        with self._lock:
            self._discard_connection()

    def __enter__(self) -> CeleryPublisher:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def queue_name(self) -> str:
        if self._queue_name is None:
            route = self.app.amqp.router.route({}, TASK_NAME)
            self._queue_name = route["queue"].name
        return self._queue_name

    # -- messages ---------------------------------------------------------------------------

    def _tasks(self, items):
        """(task_id, argsrepr, body) of each task: all that differs between the messages."""
        for handler, event_data in items:
            name = handler if isinstance(handler, str) else handler.name
            event_id = event_data["event_id"]
            # Never the payload in logs and monitors: just what identifies the task.
            argsrepr = f"({name!r}, <event {event_id} {event_data.get('event_type')}>)"
            yield task_id_for(event_id, name), argsrepr, _task_body(name, event_data)

    def _headers_template(self) -> dict:
        """Celery's headers of these tasks (`as_task_v2`), built once per chunk."""
        template, _, _, _ = self.app.amqp.as_task_v2(
            "", TASK_NAME, kwargsrepr="{}", origin=self._origin, ignore_result=True
        )
        return template

    def _message(self, template: dict, task_id: str, argsrepr: str) -> tuple[dict, dict]:
        """(headers, properties) of one task: the template with the task's own ids."""
        headers = dict(template, id=task_id, root_id=task_id, argsrepr=argsrepr)
        properties = {
            "correlation_id": task_id,
            "reply_to": "",
            "delivery_mode": self._delivery_mode,
        }
        return headers, properties

    # -- connection -------------------------------------------------------------------------

    def _ensure_connected(self):
        if self._sender is not None:
            return self._sender
        app = self.app
        connection = app.connection_for_write(connect_timeout=self.connect_timeout)
        self._connection = connection
        driver = connection.transport.driver_type
        # Bounded waits everywhere: a broker that stops answering raises instead of hanging.
        if driver == "redis":
            connection.transport_options.update(
                socket_connect_timeout=self.connect_timeout, socket_timeout=self.confirm_timeout
            )
        elif driver == "amqp":
            # Confirms are awaited per batch here, not per message by the channel.
            connection.transport_options.update(
                confirm_publish=False, write_timeout=self.confirm_timeout
            )
        # One attempt, bounded by connect_timeout: a dead broker raises here, quickly.
        connection.ensure_connection(max_retries=0)
        channel = connection.channel()
        self._channel = channel
        queue = app.amqp.queues[self.queue_name]
        # The queue must exist before the first message (AMQP drops messages to a missing queue).
        queue(channel).declare()
        exchange_type = queue.exchange.type if queue.exchange is not None else "direct"
        if exchange_type == "direct":
            # As Celery does: the default exchange, routed by queue name.
            self._exchange, self._routing_key = "", queue.name
        else:
            self._exchange = queue.exchange.name
            self._routing_key = queue.routing_key or queue.name
        self._delivery_mode = maybe_delivery_mode(
            queue.exchange.delivery_mode or app.conf.task_default_delivery_mode
        )

        if driver == "redis" and self._exchange == "":
            # The default exchange routes by queue name: the Redis list of the queue.
            self._redis_key = self._routing_key
            self._sender = self._send_redis
        elif driver == "amqp":
            self._setup_confirms(channel)
            self._sender = self._send_confirmed
        else:
            self._sender = self._send_one_by_one
        logger.debug(
            "publisher connected to %s (%s), queue %r",
            connection.as_uri(),
            self._sender.__name__,
            self.queue_name,
        )
        return self._sender

    def _discard_connection(self) -> None:
        connection, self._connection = self._connection, None
        self._channel = None
        self._sender = None
        if connection is not None:
            try:
                connection.collect()  # drop sockets without talking to a broker that is gone
            except Exception:  # pragma: no cover - best effort
                logger.debug("error while dropping the broker connection", exc_info=True)

    # -- senders ----------------------------------------------------------------------------

    def _prepare(self, template, task_id, argsrepr, body):
        headers, properties = self._message(template, task_id, argsrepr)
        return self._channel.prepare_message(
            body, 0, CONTENT_TYPE, CONTENT_ENCODING, headers, properties
        )

    def _send_redis(self, tasks) -> None:
        """Redis: the whole chunk in one variadic LPUSH; its reply is the acceptance.

        Each entry is exactly what kombu's Redis channel would push for that message (see
        `kombu.transport.virtual.Channel.basic_publish`): the prepared message with its body
        encoded as the channel says, its routing, and a fresh delivery tag. One command instead
        of one per message; LPUSH with several values keeps their order for the consumer.
        The entries are filled in from one JSON skeleton per chunk (the messages differ only in
        their ids, argsrepr, delivery tag and body), not prepared and encoded one by one.
        """
        channel = self._channel
        template = self._headers_template()
        skeleton = self._redis_skeleton(template)
        payloads = []
        for task_id, argsrepr, body in tasks:
            body, body_encoding = channel.encode_body(body, channel.body_encoding)
            tag = f"{self._tag_prefix}{next(self._tags)}"
            if body_encoding == "base64":
                # Base64 and the ids need no JSON escaping beyond what json.dumps gives a
                # string: splice them into the skeleton.
                payloads.append(
                    f'{{"body": "{body}", '
                    + skeleton.replace(_TASK_ID, json.dumps(task_id)[1:-1])
                    .replace(_ARGSREPR, json.dumps(argsrepr)[1:-1])
                    .replace(_DELIVERY_TAG, tag)
                )
            else:
                prepared = self._prepare(template, task_id, argsrepr, body)
                prepared["properties"].update(
                    body_encoding=body_encoding, delivery_tag=tag, delivery_info=self._routing()
                )
                payloads.append(json.dumps(prepared))
        with channel.conn_or_acquire() as client:
            client.lpush(self._redis_key, *payloads)

    def _redis_skeleton(self, template: dict) -> str:
        """The JSON of an entry after its body, with markers where each message's own task id,
        argsrepr and delivery tag go."""
        prepared = self._prepare(template, _TASK_ID, _ARGSREPR, "")
        del prepared["body"]
        prepared["properties"].update(
            body_encoding="base64", delivery_tag=_DELIVERY_TAG, delivery_info=self._routing()
        )
        return json.dumps(prepared)[1:]

    def _routing(self) -> dict:
        return {"exchange": self._exchange, "routing_key": self._routing_key}

    def _setup_confirms(self, channel) -> None:
        channel.confirm_select()
        self._next_tag = 1  # delivery tags of a confirm-mode channel count from 1
        self._acked_upto = 0
        self._nacked = False

        def on_ack(delivery_tag, multiple):
            self._acked_upto = max(self._acked_upto, delivery_tag)

        def on_nack(delivery_tag, multiple):
            self._nacked = True
            self._acked_upto = max(self._acked_upto, delivery_tag)

        channel.events["basic_ack"].add(on_ack)
        channel.events["basic_nack"].add(on_nack)

    def _send_confirmed(self, tasks) -> None:
        """AMQP: publish the chunk, then wait for the broker to confirm all of it."""
        publish = self._channel.basic_publish
        template = self._headers_template()
        self._nacked = False
        for task in tasks:
            publish(
                self._prepare(template, *task),
                exchange=self._exchange,
                routing_key=self._routing_key,
            )
            self._next_tag += 1
        last = self._next_tag - 1
        deadline = time.monotonic() + self.confirm_timeout
        while self._acked_upto < last:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PublishError(
                    f"broker did not confirm the batch within {self.confirm_timeout}s"
                )
            try:
                self._connection.drain_events(timeout=remaining)
            except TimeoutError as exc:
                raise PublishError(
                    f"broker did not confirm the batch within {self.confirm_timeout}s"
                ) from exc
        if self._nacked:
            raise PublishError("broker refused (nacked) messages of the batch")

    def _send_one_by_one(self, tasks) -> None:
        template = self._headers_template()
        for task in tasks:
            self._channel.basic_publish(
                self._prepare(template, *task),
                exchange=self._exchange,
                routing_key=self._routing_key,
            )
