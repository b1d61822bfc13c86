"""The admin: outbox changelist with filters and search, the replay action, read-only views."""

from __future__ import annotations

import uuid

import pytest
from django.utils import timezone

from event_stream.models import Outbox, QueueCheck, RelayHeartbeat

pytestmark = pytest.mark.django_db

CHANGELIST = "/admin/event_stream/outbox/"


@pytest.fixture
def rows():
    now = timezone.now()
    entity = uuid.uuid4()

    def add(event_type, **fields):
        return Outbox.objects.create(
            event_type=event_type, entity_type="issue", entity_id=fields.pop("entity_id", None)
            or uuid.uuid4(), payload={"data": {}}, **fields,
        )  # fmt: skip

    return {
        "pending": add("issue.created", entity_id=entity),
        "processed": add("issue.updated", entity_id=entity, processed_at=now),
        "failed": add("issue.updated", failed_at=now, attempts=10, last_error="h: Boom: x"),
        "failed_celery": add("cycle.created", processed_at=now, failed_at=now, last_error="c: E"),
        "entity": entity,
    }


def listed(response) -> set[int]:
    return {obj.id for obj in response.context["cl"].result_list}


def test_changelist_with_filters(admin_client, rows):
    response = admin_client.get(CHANGELIST)
    assert response.status_code == 200
    assert listed(response) == {r.id for k, r in rows.items() if k != "entity"}

    for state, expected in [
        ("pending", {"pending"}),
        ("processed", {"processed"}),
        ("failed", {"failed", "failed_celery"}),
    ]:
        response = admin_client.get(CHANGELIST, {"state": state})
        assert response.status_code == 200
        assert listed(response) == {rows[k].id for k in expected}, state

    response = admin_client.get(CHANGELIST, {"event_type": "issue.updated", "state": "failed"})
    assert listed(response) == {rows["failed"].id}


def test_search_by_entity_id(admin_client, rows):
    response = admin_client.get(CHANGELIST, {"q": str(rows["entity"])})
    assert listed(response) == {rows["pending"].id, rows["processed"].id}
    response = admin_client.get(CHANGELIST, {"q": "not-a-uuid"})
    assert response.status_code == 200 and listed(response) == set()


def test_the_replay_action_puts_only_failed_events_back(admin_client, rows):
    selected = [rows[k].id for k in ("failed", "failed_celery", "processed")]
    response = admin_client.post(
        CHANGELIST,
        {"action": "replay_failed_events", "_selected_action": selected},
        follow=True,
    )
    assert response.status_code == 200
    text = response.content.decode()
    assert "2 failed event(s) put back in the queue." in text
    assert "1 selected event(s) were not failed" in text
    assert set(Outbox.objects.pending().values_list("id", flat=True)) == {
        rows["pending"].id,
        rows["failed"].id,
        rows["failed_celery"].id,
    }
    assert Outbox.objects.get(id=rows["processed"].id).processed_at is not None


def test_outbox_rows_are_read_only(admin_client, rows):
    row = rows["failed"]
    response = admin_client.get(f"{CHANGELIST}{row.id}/change/")
    assert response.status_code == 200
    assert "h: Boom: x" in response.content.decode()
    assert (
        admin_client.post(f"{CHANGELIST}{row.id}/change/", {"event_type": "x"}).status_code == 403
    )
    assert admin_client.get(f"{CHANGELIST}add/").status_code == 403
    assert admin_client.get(f"{CHANGELIST}{row.id}/delete/").status_code == 403


def test_heartbeats_and_queue_checks_are_visible(admin_client):
    now = timezone.now()
    RelayHeartbeat.objects.create(
        relay_id=uuid.uuid4(), hostname="relay-host", pid=7, started_at=now, last_seen_at=now
    )
    QueueCheck.objects.create(pending=1_234, failed=0, status="warning")
    response = admin_client.get("/admin/event_stream/relayheartbeat/")
    assert response.status_code == 200 and "relay-host" in response.content.decode()
    response = admin_client.get("/admin/event_stream/queuecheck/")
    assert response.status_code == 200 and "1234" in response.content.decode()
    assert admin_client.get("/admin/event_stream/queuecheck/add/").status_code == 403


def test_the_replay_action_from_the_failed_filter_reports_what_it_did(admin_client, rows):
    # Given the changelist filtered to failed events: the replayed rows leave that filter
    selected = [rows[k].id for k in ("failed", "failed_celery")]
    response = admin_client.post(
        f"{CHANGELIST}?state=failed",
        {"action": "replay_failed_events", "_selected_action": selected},
        follow=True,
    )
    text = response.content.decode()
    assert "2 failed event(s) put back in the queue." in text
    assert "were not failed" not in text, text


def outbox_queries(admin_client, params=None) -> list[str]:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as captured:
        response = admin_client.get(CHANGELIST, params or {})
    assert response.status_code == 200
    return [q["sql"] for q in captured.captured_queries if '"outbox"' in q["sql"]]


@pytest.mark.parametrize("params", [{}, {"state": "processed"}, {"event_type": "issue.updated"}])
def test_the_changelist_reads_a_bounded_part_of_a_large_outbox(admin_client, rows, params):
    """Its page count and its event type filter stop at a number of rows: a COUNT(*) or a
    DISTINCT over an outbox of millions takes seconds at every page view."""
    for sql in outbox_queries(admin_client, params):
        if "COUNT(" in sql.upper() or "DISTINCT" in sql.upper():
            assert "LIMIT" in sql.upper(), sql


def test_the_event_type_filter_offers_the_latest_types_and_takes_any(admin_client, rows):
    response = admin_client.get(CHANGELIST)
    [choices] = [
        [c["display"] for c in spec.choices(response.context["cl"])]
        for spec in response.context["cl"].filter_specs
        if spec.title == "event type"
    ]
    assert {"issue.created", "issue.updated", "cycle.created"} <= set(choices)

    response = admin_client.get(CHANGELIST, {"event_type": "cycle.created"})
    assert listed(response) == {rows["failed_celery"].id}
    response = admin_client.get(CHANGELIST, {"event_type": "no.such.type"})
    assert response.status_code == 200 and listed(response) == set()
