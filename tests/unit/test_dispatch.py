import asyncio
import datetime
import functools
import json
import uuid

import pytest

from event_stream.dispatch import MALFORMED_PAYLOAD, BatchRunner, RetryPolicy
from event_stream.handlers import HandlerRegistry

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
X, Y = uuid.uuid4(), uuid.uuid4()


def row(id, entity=X, event_type="issue.updated", payload=None, attempts=0):
    """A claimed row as DatabaseConnection returns it: ids, payload and time as text."""
    payload = {"data": {"n": id}} if payload is None else payload
    entity = None if entity is None else str(entity)
    return (id, str(uuid.uuid4()), event_type, "issue", entity, json.dumps(payload),
            NOW.isoformat(), attempts)  # fmt: skip


def runner(registry, max_attempts=3, publisher=None):
    return BatchRunner(registry, RetryPolicy(max_attempts, 1.0, 60.0), publisher)


class RecordingPublisher:
    def __init__(self, fail=False):
        self.fail = fail
        self.sent = []

    def publish(self, messages):
        if self.fail:
            raise ConnectionError("broker unreachable")
        self.sent.extend((h.name, e["id"]) for h, e in messages)


def test_handlers_get_the_seed_event_data_in_order():
    seen = []
    registry = HandlerRegistry()
    registry.add(seen.append, name="all")

    outcome = runner(registry).run([row(1), row(2, Y), row(3)])

    assert outcome.processed == [1, 2, 3]
    assert [e["id"] for e in seen] == [1, 2, 3]
    assert set(seen[0]) >= {"id", "event_id", "event_type", "entity_type", "entity_id",
                            "payload", "processed_at", "created_at"}  # fmt: skip
    assert seen[0]["entity_id"] == str(X) and seen[0]["created_at"] == NOW.isoformat()


def test_patterns_pick_handlers():
    issue, everything = [], []
    registry = HandlerRegistry()
    registry.add(issue.append, "issue.*", name="issue")
    registry.add(everything.append, name="all")

    runner(registry).run([row(1), row(2, event_type="cycle.created")])

    assert [e["id"] for e in issue] == [1]
    assert [e["id"] for e in everything] == [1, 2]


def test_a_failure_holds_back_only_its_entity():
    def flaky(event):
        if event["id"] == 1:
            raise ValueError("boom")

    registry = HandlerRegistry()
    registry.add(flaky, name="flaky")

    outcome = runner(registry).run([row(1, X), row(2, Y), row(3, X), row(4, Y)])

    assert outcome.processed == [2, 4]
    assert [(i, e) for i, _d, e in outcome.retries] == [(1, "flaky: ValueError: boom")]
    assert outcome.held == [3]


def test_last_attempt_dead_letters():
    registry = HandlerRegistry()
    registry.add(lambda e: 1 / 0, name="broken")

    outcome = runner(registry, max_attempts=3).run([row(1, attempts=2)])

    assert outcome.failures == [(1, "broken: ZeroDivisionError: division by zero")]
    assert outcome.retries == []


def test_malformed_payload_is_dead_lettered_without_running_handlers():
    seen = []
    registry = HandlerRegistry()
    registry.add(seen.append, name="all")

    outcome = runner(registry).run([row(1, payload="text"), row(2, payload=[1]), row(3, None)])

    assert outcome.failures == [(1, MALFORMED_PAYLOAD), (2, MALFORMED_PAYLOAD)]
    assert outcome.processed == [3]
    assert [e["id"] for e in seen] == [3]


def test_unknown_event_type_is_done_with_nothing_to_do():
    registry = HandlerRegistry()
    registry.add(lambda e: None, "issue.*", name="issue")

    assert runner(registry).run([row(1, event_type="no.such")]).processed == [1]


def test_async_handlers_run_too():
    seen = []

    async def handler(event):
        seen.append(event["id"])

    registry = HandlerRegistry()
    registry.add(handler, name="async")

    assert runner(registry).run([row(1)]).processed == [1]
    assert seen == [1]


def test_celery_handlers_are_published_in_one_go():
    publisher = RecordingPublisher()
    registry = HandlerRegistry()
    registry.add(lambda e: None, name="inline")
    registry.add(lambda e: None, name="remote", dispatch="celery")

    outcome = runner(registry, publisher=publisher).run([row(1), row(2, Y)])

    assert outcome.processed == [1, 2]
    assert publisher.sent == [("remote", 1), ("remote", 2)]


def test_broker_down_keeps_events_and_their_entitys_later_events_pending():
    registry = HandlerRegistry()
    registry.add(lambda e: None, "issue.*", name="remote", dispatch="celery")
    registry.add(lambda e: None, "cycle.*", name="inline")
    rows = [row(1, X), row(2, X, event_type="cycle.updated"), row(3, Y, event_type="cycle.x")]

    outcome = runner(registry, publisher=RecordingPublisher(fail=True)).run(rows)

    assert outcome.processed == [3]
    assert outcome.held == [1, 2]
    assert outcome.retries == [] and outcome.failures == []
    assert isinstance(outcome.publish_error, ConnectionError)


@pytest.mark.parametrize("attempt", [1, 2, 5, 40])
def test_backoff_is_exponential_with_jitter_and_capped(attempt):
    policy = RetryPolicy(max_attempts=50, base_delay=1.0, max_delay=60.0)
    ceiling = min(60.0, 2 ** (attempt - 1))
    assert policy.delay(attempt, rand=lambda: 0.0) == ceiling / 2
    assert policy.delay(attempt, rand=lambda: 1.0) == ceiling


def test_registry_rejects_a_second_function_under_one_name():
    registry = HandlerRegistry()
    registry.add(lambda e: None, name="x")
    with pytest.raises(ValueError, match="already registered"):
        registry.add(lambda e: None, name="x")


def test_huge_numbers_keep_their_value_and_never_stall_the_batch():
    seen = []
    registry = HandlerRegistry()
    registry.add(seen.append, name="all")
    huge = '{"n": 123456789012345678901234567890, "big": 1e400, "small": -9223372036854775809}'
    rows = [row(1), row(2, Y), row(3)]
    rows[1] = (*rows[1][:5], huge, *rows[1][6:])

    outcome = runner(registry).run(rows)

    assert outcome.processed == [1, 2, 3]
    payload = seen[1]["payload"]
    assert payload["n"] == 123456789012345678901234567890
    assert payload["small"] == -9223372036854775809
    assert payload["big"] == float("inf")


def test_created_at_reads_the_same_inline_and_in_celery():
    from event_stream.events import iso_utc, make_event_data

    moment = datetime.datetime(2026, 3, 2, 10, 30, tzinfo=datetime.UTC)
    data = make_event_data(id=1, event_id=uuid.uuid4(), event_type="t", entity_type="t",
                           entity_id=None, payload={}, created_at=moment)  # fmt: skip
    assert data["created_at"] == iso_utc(moment) == "2026-03-02T10:30:00.000000+00:00"


def test_celery_only_events_are_not_decoded_in_the_relay_but_still_checked():
    publisher = RecordingPublisher()
    registry = HandlerRegistry()
    registry.add(lambda e: None, "issue.*", name="remote", dispatch="celery")
    not_an_object = (*row(2, Y)[:5], "[1, 2]", *row(2, Y)[6:])
    written_by_hand = (*row(3)[:5], ' \n {"message": "Hello"}', *row(3)[6:])

    outcome = runner(registry, publisher=publisher).run([row(1), not_an_object, written_by_hand])

    assert outcome.processed == [1, 3]
    assert outcome.failures == [(2, MALFORMED_PAYLOAD)]
    assert publisher.sent == [("remote", 1), ("remote", 3)]


@pytest.mark.parametrize(
    "text",
    [
        '{"n": 999999999999999999, "m": -999999999999999999}',  # 18 digits: orjson's
        '{"n": 9223372036854775807, "m": -9223372036854775808}',  # 64-bit edges: 19 digits
        '{"n": 18446744073709551616, "f": 1.7976931348623157e308}',
        '{"f": 0.1, "g": 65535.0, "h": -0.0, "i": 1.5e-7, "j": 123.456789012345678}',
        '{"s": "1234567890123456789012 in a string", "u": "é ✓ \\u00e9 \\" \\\\ \\n"}',
        '{"data": {"a": [1, 2.5, null, true, false, {"b": []}]}, "previous_attributes": {}}',
        '{"big": 1e400}',
        "[1, 2]",
        '"just a string"',
    ],
)
def test_payload_decoding_agrees_with_the_standard_library_on_values_and_types(text):
    from event_stream.events import decode_payload

    def typed(value):
        if isinstance(value, dict):
            return {k: typed(v) for k, v in value.items()}
        if isinstance(value, list):
            return [typed(v) for v in value]
        return (type(value).__name__, value)

    assert typed(decode_payload(text)) == typed(json.loads(text))


def with_payload(claimed_row: tuple, text: str) -> tuple:
    return (*claimed_row[:5], text, *claimed_row[6:])


DEEPER_THAN_ORJSON_AND_PYTHON = '{"a": ' + "[" * 5000 + "]" * 5000 + "}"
OVER_PYTHONS_DIGIT_LIMIT = '{"n": ' + "1" * 5000 + "}"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (DEEPER_THAN_ORJSON_AND_PYTHON, "malformed event: RecursionError: "),
        (OVER_PYTHONS_DIGIT_LIMIT, "malformed event: ValueError: Exceeds the limit"),
        ('{"a": ', "malformed event: JSONDecodeError: "),
    ],
)
def test_a_payload_python_cannot_decode_is_dead_lettered_and_the_others_flow(text, error):
    seen = []
    registry = HandlerRegistry()
    registry.add(seen.append, name="all")

    outcome = runner(registry).run([row(1), with_payload(row(2, Y), text), row(3)])

    assert [event_id for event_id, _error in outcome.failures] == [2]
    assert outcome.failures[0][1].startswith(error)
    assert outcome.processed == [1, 3]
    assert [e["id"] for e in seen] == [1, 3]


@pytest.mark.parametrize("text", [DEEPER_THAN_ORJSON_AND_PYTHON, OVER_PYTHONS_DIGIT_LIMIT, "{"])
def test_payload_decoding_fails_with_one_error_whatever_the_cause(text):
    from event_stream.events import UndecodablePayload, decode_payload

    with pytest.raises(UndecodablePayload):
        decode_payload(text)


def test_nesting_orjson_refuses_but_python_takes_is_decoded():
    from event_stream.events import decode_payload

    text = '{"a": ' + "[" * 1100 + "]" * 1100 + "}"

    assert decode_payload(text) == json.loads(text)


def traced(func):
    """A plain decorator, as handlers often get one: sync, so the handler no longer looks async."""

    @functools.wraps(func)
    def wrapper(event):
        return func(event)

    return wrapper


def test_an_async_handler_behind_a_plain_decorator_is_awaited_and_can_fail():
    seen = []

    @traced
    async def index_event(event):
        seen.append(event["id"])
        if event["id"] == 1:
            raise RuntimeError("search backend down")

    registry = HandlerRegistry()
    registry.add(index_event, name="index")

    outcome = runner(registry).run([row(1), row(2, Y)])

    assert seen == [1, 2]
    assert outcome.processed == [2]
    assert [(i, e) for i, _d, e in outcome.retries] == [
        (1, "index: RuntimeError: search backend down")
    ]


def test_an_object_with_an_async_call_is_awaited():
    class Indexer:
        def __init__(self):
            self.seen = []

        async def __call__(self, event):
            self.seen.append(event["id"])

    indexer = Indexer()
    registry = HandlerRegistry()
    registry.add(indexer, name="indexer")

    assert runner(registry).run([row(1)]).processed == [1]
    assert indexer.seen == [1]


@pytest.mark.parametrize("error", [SystemExit(3), asyncio.CancelledError()])
def test_a_base_exception_from_a_handler_is_that_events_failure(error):
    def handler(event):
        if event["id"] == 1:
            raise error

    registry = HandlerRegistry()
    registry.add(handler, name="exits")

    outcome = runner(registry).run([row(1), row(2, Y)])

    assert outcome.processed == [2]
    assert [(i, e.split(":")[:2]) for i, _d, e in outcome.retries] == [
        (1, ["exits", f" {type(error).__name__}"])
    ]


def test_ctrl_c_in_a_handler_run_in_the_main_thread_still_stops_the_caller():
    def handler(event):
        raise KeyboardInterrupt

    registry = HandlerRegistry()
    registry.add(handler, name="interrupted")

    with pytest.raises(KeyboardInterrupt):
        runner(registry).run([row(1)])


# -- registration ---------------------------------------------------------------------------


def test_the_same_function_registered_again_keeps_its_earlier_patterns():
    seen = []

    def audit(event):
        seen.append(event["event_type"])

    registry = HandlerRegistry()
    registry.add(audit, "issue.*")
    registry.add(audit, "cycle.*")
    registry.add(audit, "issue.*")

    runner(registry).run([row(1), row(2, Y, event_type="cycle.created")])

    assert seen == ["issue.updated", "cycle.created"]
    assert len(registry) == 1


def test_the_same_function_cannot_change_its_dispatch_by_registering_again():
    def audit(event):
        pass

    registry = HandlerRegistry()
    registry.add(audit, "issue.*")
    with pytest.raises(ValueError, match="already registered with dispatch='inline'"):
        registry.add(audit, "issue.*", dispatch="celery")


def test_a_bound_method_can_be_registered_again():
    class Indexer:
        def handle(self, event):
            pass

    indexer = Indexer()
    registry = HandlerRegistry()
    registry.add(indexer.handle, "issue.*", name="indexer")

    registry.add(indexer.handle, "cycle.*", name="indexer")

    assert registry.get("indexer").patterns == ("issue.*", "cycle.*")


@pytest.mark.parametrize("patterns", [[["issue.created"]], [None], [""], [("issue.*",)]])
def test_a_pattern_that_is_not_a_string_is_refused_at_registration(patterns):
    registry = HandlerRegistry()
    with pytest.raises(TypeError, match="pattern"):
        registry.add(lambda e: None, patterns, name="x")
    assert len(registry) == 0


def test_a_bare_handler_decorator_is_refused_rather_than_registering_nothing():
    from event_stream.handlers import handler

    def index_issue(event):
        pass

    with pytest.raises(TypeError, match="not a bare @handler"):
        handler(index_issue)


# -- what each handler gets --------------------------------------------------------------------


def test_what_a_handler_changes_in_event_data_reaches_no_other_handler():
    def mutate(event):
        event["payload"]["data"]["n"] = "changed"
        event["payload"].pop("previous_attributes", None)
        event["event_type"] = "changed"

    seen = []
    registry = HandlerRegistry()
    registry.add(mutate, name="mutate")
    registry.add(seen.append, name="read")
    claimed = with_payload(row(1), '{"data": {"n": 1}, "previous_attributes": {"n": 0}}')

    assert runner(registry).run([claimed]).processed == [1]

    (event,) = seen
    assert event["event_type"] == "issue.updated"
    assert event["payload"] == {"data": {"n": 1}, "previous_attributes": {"n": 0}}


def test_what_an_inline_handler_changes_reaches_no_celery_message():
    from event_stream.celery_dispatch import _task_body

    class EncodingPublisher(RecordingPublisher):
        def publish(self, messages):
            self.bodies = [json.loads(_task_body(h.name, e)) for h, e in messages]

    def parse_created_at(event):
        # A value JSON cannot encode: in the message, it failed the publish of every batch.
        event["created_at"] = datetime.datetime.fromisoformat(event["created_at"])
        event["payload"]["data"]["n"] = "changed"

    publisher = EncodingPublisher()
    registry = HandlerRegistry()
    registry.add(parse_created_at, name="parse")
    registry.add(lambda e: None, name="remote", dispatch="celery")

    outcome = runner(registry, publisher=publisher).run([row(1)])

    assert outcome.publish_error is None and outcome.processed == [1]
    ((_name, event), _kwargs, _embed) = publisher.bodies[0]
    assert event["created_at"] == NOW.isoformat()
    assert event["payload"] == {"data": {"n": 1}}
