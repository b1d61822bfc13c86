"""Plane's example handlers, fed with events the capture triggers really wrote.

Each handler is called directly with the `event_data` the relay would pass, built from the
outbox row; running it a second time must change nothing (the relay delivers at least once).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import threading
import time

import pytest
from django.contrib.auth.models import User
from django.utils import timezone

from event_stream.dispatch import BatchRunner, RetryPolicy
from event_stream.events import iso_utc
from event_stream.handlers import registry
from event_stream.models import Outbox
from plane import handlers as plane_handlers
from plane.handlers import (
    WebhookError,
    notify_assignee,
    plain_text,
    send_webhook,
    update_search_index,
)
from plane.models import (
    Issue,
    IssueAssignee,
    Notification,
    SearchDocument,
    WebhookDelivery,
)
from tests.integration.factories import issue_for, make_state

pytestmark = pytest.mark.django_db


def event_data(row: Outbox) -> dict:
    return row.event_data()


def captured(event_type: str) -> list[dict]:
    """The events of this type the triggers wrote, oldest first."""
    return [event_data(r) for r in Outbox.objects.filter(event_type=event_type).order_by("id")]


def snapshot(model) -> list[tuple]:
    return list(model.objects.order_by("pk").values_list())


def claimed_row(row: Outbox) -> tuple:
    """The row as the relay's claim returns it (ids, payload and time as text)."""
    return (row.id, str(row.event_id), row.event_type, row.entity_type, str(row.entity_id),
            json.dumps(row.payload), iso_utc(row.created_at), row.attempts)  # fmt: skip


@pytest.fixture(autouse=True)
def _no_receiver_known_down():
    plane_handlers._receiver_down_until.clear()
    yield
    plane_handlers._receiver_down_until.clear()


class TestRegistration:
    def test_plane_handlers_are_in_the_application_registry(self):
        def names(event_type):
            return {h.name for h in registry.for_event(event_type)}

        assert {"plane.webhook", "plane.search_index"} <= names("issue.created")
        assert {"plane.webhook", "plane.search_index"} <= names("issue.updated")
        assert {"plane.webhook", "plane.search_index"} <= names("issue.deleted")
        assert "plane.notify_assignee" in names("issue_assignee.created")
        assert all(registry.get(n).dispatch == "inline" for n in names("issue.created"))

    def test_the_search_index_runs_before_the_webhook(self):
        assert [h.name for h in registry.for_event("issue.updated")][:2] == [
            "plane.search_index",
            "plane.webhook",
        ]

    def test_while_the_webhook_receiver_is_down_the_search_index_still_applies(
        self, project, monkeypatch
    ):
        for name in ("one", "two", "three"):
            issue_for(project, name=name).save()
        rows = [claimed_row(r) for r in Outbox.objects.order_by("id")]

        with refusing_port() as port:
            monkeypatch.setenv("PLANE_WEBHOOK_URL", f"http://127.0.0.1:{port}/")
            outcome = BatchRunner(registry, RetryPolicy(10, 1.0, 300.0)).run(rows)

        assert [event_id for event_id, _delay, _error in outcome.retries] == [r[0] for r in rows]
        assert sorted(SearchDocument.objects.values_list("title", flat=True)) == [
            "one",
            "three",
            "two",
        ]


class TestSearchIndex:
    def test_created_issue_gets_a_document(self, project):
        state = make_state(project)
        issue = issue_for(
            project,
            name="Login fails",
            description_html="<p>Steps &amp; <b>logs</b></p><p>attached</p>",
            priority="high",
            state=state,
        )
        issue.save()
        (created,) = captured("issue.created")

        update_search_index(created)

        doc = SearchDocument.objects.get(issue_id=issue.id)
        assert doc.project_id == project.id
        assert doc.title == "Login fails"
        assert doc.text == "Steps & logs attached"
        assert doc.priority == "high"
        assert doc.state_id == state.id
        assert doc.deleted is False
        assert doc.last_event_id == created["id"]

    def test_applying_an_event_twice_changes_nothing(self, project):
        issue_for(project, name="Once").save()
        (created,) = captured("issue.created")
        update_search_index(created)
        before = snapshot(SearchDocument)

        update_search_index(created)

        assert snapshot(SearchDocument) == before

    def test_updates_apply_and_an_older_event_is_ignored(self, project):
        issue = issue_for(project, name="Old title")
        issue.save()
        issue.name = "New title"
        issue.priority = "urgent"
        issue.save()
        (created,) = captured("issue.created")
        (updated,) = captured("issue.updated")

        # Delivered out of order: the update first, then the (older) creation
        update_search_index(updated)
        update_search_index(created)

        doc = SearchDocument.objects.get(issue_id=issue.id)
        assert (doc.title, doc.priority) == ("New title", "urgent")
        assert doc.last_event_id == updated["id"]

    def test_soft_delete_marks_the_document_deleted(self, project):
        issue = issue_for(project, name="Doomed")
        issue.save()
        issue.deleted_at = timezone.now()
        issue.save()
        for event in captured("issue.created") + captured("issue.deleted"):
            update_search_index(event)

        doc = SearchDocument.objects.get(issue_id=issue.id)
        assert doc.deleted is True
        assert doc.title == "Doomed"

    def test_hard_delete_marks_the_document_deleted(self, project):
        issue = issue_for(project, name="Purged")
        issue.save()
        update_search_index(captured("issue.created")[0])

        Issue.objects.filter(pk=issue.pk).delete()
        (deleted,) = captured("issue.deleted")
        update_search_index(deleted)
        update_search_index(deleted)

        doc = SearchDocument.objects.get(issue_id=issue.id)
        assert doc.deleted is True
        assert doc.last_event_id == deleted["id"]

    def test_a_late_update_after_the_delete_leaves_the_document_deleted(self, project):
        issue = issue_for(project, name="Doomed")
        issue.save()
        issue.name = "Renamed"
        issue.save()
        issue.deleted_at = timezone.now()
        issue.save()
        (created,), (updated,), (deleted,) = map(
            captured, ("issue.created", "issue.updated", "issue.deleted")
        )

        # Unordered delivery (OUTBOX_POLLER_ORDERED=false, or a replay): the update comes last
        for event in (created, deleted, updated):
            update_search_index(event)

        doc = SearchDocument.objects.get(issue_id=issue.id)
        assert doc.deleted is True
        assert doc.last_event_id == deleted["id"]

    def test_a_restored_issue_is_searchable_again_with_what_changed_in_the_bin(self, project):
        issue = issue_for(project, name="Doomed")
        issue.save()
        issue.deleted_at = timezone.now()
        issue.save()
        issue.name = "Renamed in the bin"  # emits nothing: the row stays soft-deleted
        issue.save()
        issue.deleted_at = None
        issue.save()
        first, restored = captured("issue.created")
        assert "deleted_at" in restored["payload"]["previous_attributes"]

        for event in (first, *captured("issue.deleted"), restored, restored):
            update_search_index(event)

        doc = SearchDocument.objects.get(issue_id=issue.id)
        assert doc.deleted is False
        assert doc.title == "Renamed in the bin"
        assert doc.last_event_id == restored["id"]

    def test_bulk_update_events_each_update_their_document(self, project):
        Issue.objects.bulk_create(issue_for(project, name=f"i{n}") for n in range(20))
        Issue.objects.filter(project=project).update(priority="low")
        for event in captured("issue.created") + captured("issue.updated"):
            update_search_index(event)

        assert SearchDocument.objects.count() == 20
        assert set(SearchDocument.objects.values_list("priority", flat=True)) == {"low"}

    @pytest.mark.parametrize(
        ("html", "text"),
        [
            ("<p></p>", ""),
            ("", ""),
            (None, ""),
            ("<p>a</p><p>b</p>", "a b"),
            ("<h1>Title</h1>\n<ul><li>one &lt;two&gt;</li></ul>", "Title one <two>"),
        ],
    )
    def test_plain_text(self, html, text):
        assert plain_text(html) == text


class TestAssigneeNotification:
    def test_assigned_user_is_notified_once(self, project):
        issue = issue_for(project, name="Fix login")
        issue.save()
        ada = User.objects.create(username="ada")
        IssueAssignee.objects.create(issue=issue, assignee=ada)
        (assigned,) = captured("issue_assignee.created")

        notify_assignee(assigned)
        notify_assignee(assigned)

        (notification,) = Notification.objects.all()
        assert notification.receiver == ada
        assert notification.issue_id == issue.id
        assert str(notification.event_id) == assigned["event_id"]
        assert notification.title == "Assigned: Fix login"
        assert "You were assigned to Fix login" in notification.message

    def test_each_assignee_gets_their_own(self, project):
        issue = issue_for(project)
        issue.save()
        users = [User.objects.create(username=name) for name in ("ada", "grace")]
        for user in users:
            IssueAssignee.objects.create(issue=issue, assignee=user)

        for event in captured("issue_assignee.created"):
            notify_assignee(event)

        assert sorted(Notification.objects.values_list("receiver__username", flat=True)) == [
            "ada",
            "grace",
        ]

    def test_assignee_deleted_since_gets_nothing(self, project):
        issue = issue_for(project)
        issue.save()
        ada = User.objects.create(username="ada")
        IssueAssignee.objects.create(issue=issue, assignee=ada)
        (assigned,) = captured("issue_assignee.created")
        ada.delete()

        notify_assignee(assigned)

        assert Notification.objects.count() == 0


class Receiver(http.server.BaseHTTPRequestHandler):
    """Records each request; answers with the server's current `status`."""

    def do_POST(self):
        length = int(self.headers["Content-Length"])
        self.server.requests.append(
            {
                "path": self.path,
                "headers": dict(self.headers),
                "body": json.loads(self.rfile.read(length)),
            }
        )
        self.send_response(self.server.status)
        self.send_header("Content-Length", "0")
        if 300 <= self.server.status < 400:
            self.send_header("Location", "/elsewhere")
        self.end_headers()

    def log_message(self, format, *args):
        pass


@pytest.fixture
def receiver(monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    server.requests = []
    server.status = 200
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("PLANE_WEBHOOK_URL", f"http://127.0.0.1:{server.server_port}/hooks/plane")
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


class TestWebhook:
    def test_created_and_updated_are_posted_once_each(self, project, receiver):
        issue = issue_for(project, name="Before")
        issue.save()
        issue.name = "After"
        issue.save()
        events = captured("issue.created") + captured("issue.updated")

        for event in events + events:  # every event delivered twice
            send_webhook(event)

        assert len(receiver.requests) == 2
        created, updated = receiver.requests
        assert created["path"] == "/hooks/plane"
        assert created["headers"]["Content-Type"] == "application/json"
        assert created["headers"]["X-Event-Id"] == events[0]["event_id"]
        assert created["body"] == {
            "event_id": events[0]["event_id"],
            "event_type": "issue.created",
            "data": events[0]["payload"]["data"],
            "previous_attributes": {},
        }
        assert updated["body"]["event_type"] == "issue.updated"
        assert updated["body"]["data"]["name"] == "After"
        assert updated["body"]["previous_attributes"] == {"name": "Before"}
        deliveries = WebhookDelivery.objects.order_by("id")
        assert [str(d.event_id) for d in deliveries] == [e["event_id"] for e in events]
        assert {d.status_code for d in deliveries} == {200}

    def test_a_restore_is_posted_as_a_second_created_of_the_same_issue(self, project, receiver):
        issue = issue_for(project)
        issue.save()
        issue.deleted_at = timezone.now()
        issue.save()
        issue.deleted_at = None
        issue.save()
        events = captured("issue.created")

        for event in events + events:
            send_webhook(event)

        first, restored = (request["body"] for request in receiver.requests)
        assert first["data"]["id"] == restored["data"]["id"] == str(issue.id)
        assert first["event_id"] != restored["event_id"]
        assert list(restored["previous_attributes"]) == ["deleted_at"]
        assert WebhookDelivery.objects.count() == 2

    @pytest.mark.parametrize("status", [500, 404, 302])
    def test_refused_delivery_raises_and_is_retried_later(self, project, receiver, status):
        issue_for(project).save()
        (created,) = captured("issue.created")
        receiver.status = status

        with pytest.raises(WebhookError, match=str(status)):
            send_webhook(created)
        assert WebhookDelivery.objects.count() == 0

        receiver.status = 204
        send_webhook(created)
        assert len(receiver.requests) == 2
        assert WebhookDelivery.objects.get().status_code == 204

    def test_unreachable_receiver_raises(self, project, monkeypatch):
        with refusing_port() as port:
            monkeypatch.setenv("PLANE_WEBHOOK_URL", f"http://127.0.0.1:{port}/")
            issue_for(project).save()
            (created,) = captured("issue.created")

            with pytest.raises(OSError):
                send_webhook(created)
        assert WebhookDelivery.objects.count() == 0

    def test_a_delete_is_posted(self, project, receiver):
        issue = issue_for(project, name="Doomed")
        issue.save()
        issue.deleted_at = timezone.now()
        issue.save()
        (deleted,) = captured("issue.deleted")

        send_webhook(deleted)
        send_webhook(deleted)

        (request,) = receiver.requests
        assert request["body"]["event_type"] == "issue.deleted"
        assert request["body"]["data"]["id"] == str(issue.id)
        assert request["body"]["data"]["deleted_at"] is not None
        assert list(request["body"]["previous_attributes"]) == ["deleted_at"]

    def test_a_receiver_that_does_not_answer_fails_the_next_deliveries_at_once(
        self, project, monkeypatch
    ):
        monkeypatch.setattr(plane_handlers, "WEBHOOK_TIMEOUT", 0.5)
        for _ in range(4):
            issue_for(project).save()
        events = captured("issue.created")

        with silent_port() as port:
            monkeypatch.setenv("PLANE_WEBHOOK_URL", f"http://127.0.0.1:{port}/")
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                send_webhook(events[0])
            for event in events[1:]:
                with pytest.raises(WebhookError, match="did not answer lately"):
                    send_webhook(event)
            elapsed = time.monotonic() - started

        # One timeout, not one per event: inline, each would hold the relay and its handlers.
        assert 0.5 <= elapsed < 0.9
        assert WebhookDelivery.objects.count() == 0

    def test_a_receiver_known_down_is_tried_again_after_the_pause(self, project, receiver):
        issue_for(project).save()
        (created,) = captured("issue.created")
        url = f"http://127.0.0.1:{receiver.server_port}/hooks/plane"
        plane_handlers._receiver_down_until[url] = time.monotonic() - 0.1

        send_webhook(created)

        assert len(receiver.requests) == 1
        assert url not in plane_handlers._receiver_down_until

    def test_without_url_nothing_is_sent(self, project, monkeypatch):
        monkeypatch.delenv("PLANE_WEBHOOK_URL", raising=False)
        issue_for(project).save()
        (created,) = captured("issue.created")

        send_webhook(created)

        assert WebhookDelivery.objects.count() == 0


@contextlib.contextmanager
def refusing_port():
    """A local port nothing listens on (bound, never listening), for the block's lifetime."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@contextlib.contextmanager
def silent_port():
    """A local port that takes connections and never answers, for the block's lifetime."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]
