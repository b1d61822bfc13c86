"""Plane's example handlers: a webhook, a search index and assignee notifications.

Registered in the application's registry when `PlaneConfig.ready()` imports this module, and run
by the relay (`python manage.py outbox_poller`) in its handler thread. Each one is safe to run
again for the same event, because the relay delivers at least once:

- the webhook records every delivery by `event_id` and skips an event already delivered;
- the search index applies an event only if it is newer (outbox `id`) than the one applied last;
- a notification is unique per (`event_id`, receiver).

A handler that raises makes the relay retry the event later (with backoff), then dead-letter it.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request

from django.contrib.auth import get_user_model
from django.db import connection
from django.utils.html import strip_tags

from event_stream.handlers import EventData, handler
from plane.models import Issue, Notification, SearchDocument, WebhookDelivery

logger = logging.getLogger("plane.handlers")

WEBHOOK_URL_VARIABLE = "PLANE_WEBHOOK_URL"
WEBHOOK_TIMEOUT = 5.0  # seconds; the relay retries a delivery that timed out
# After the receiver did not answer (timed out, refused, unreachable), deliveries to it fail at
# once for this long instead of each waiting out its own timeout: the webhook runs inline, so
# every event of a batch would otherwise hold the relay, and every other handler, that long.
RECEIVER_DOWN_PAUSE = 30.0  # seconds


# -- search index --------------------------------------------------------------------------------

_SPACES = re.compile(r"\s+")


def plain_text(description_html: str | None) -> str:
    """`<p>Steps &amp; <b>logs</b></p>` -> `Steps & logs`."""
    if not description_html:
        return ""
    # A tag boundary separates words: `<p>a</p><p>b</p>` is "a b", not "ab".
    text = strip_tags(description_html.replace("<", " <"))
    return _SPACES.sub(" ", html.unescape(text)).strip()


_UPSERT_SEARCH_DOCUMENT = """
    INSERT INTO {table} AS doc
        (issue_id, project_id, title, text, priority, state_id, deleted, last_event_id)
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
    ON CONFLICT (issue_id) DO UPDATE SET
        project_id = EXCLUDED.project_id,
        title = EXCLUDED.title,
        text = EXCLUDED.text,
        priority = EXCLUDED.priority,
        state_id = EXCLUDED.state_id,
        deleted = EXCLUDED.deleted,
        last_event_id = EXCLUDED.last_event_id
    WHERE doc.last_event_id < EXCLUDED.last_event_id
"""


@handler("issue.created", "issue.updated", "issue.deleted", name="plane.search_index")
def update_search_index(event: EventData) -> None:
    """Keep the issue's search document in step with its latest event, in one statement.

    The outbox `id` orders the events of one issue as their transactions committed, so the
    document keeps the newest state even when events arrive out of order or twice.
    """
    data = event["payload"]["data"]
    deleted = event["event_type"] == "issue.deleted" or data.get("deleted_at") is not None
    title_length = SearchDocument._meta.get_field("title").max_length
    with connection.cursor() as cursor:
        cursor.execute(
            _UPSERT_SEARCH_DOCUMENT.format(table=SearchDocument._meta.db_table),
            [
                data["id"],
                data["project_id"],
                (data.get("name") or "")[:title_length],
                plain_text(data.get("description_html")),
                data.get("priority") or "none",
                data.get("state_id"),
                deleted,
                event["id"],
            ],
        )


# -- webhook ------------------------------------------------------------------------------------


class WebhookError(Exception):
    """The receiver did not accept the delivery; the relay retries the event."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is not an acceptance: urllib would turn the POST into a GET without a body."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_opener = urllib.request.build_opener(_NoRedirect)


def webhook_body(event: EventData) -> dict:
    payload = event["payload"]
    return {
        "event_id": event["event_id"],
        "event_type": event["event_type"],
        "data": payload.get("data"),
        "previous_attributes": payload.get("previous_attributes", {}),
    }


# Receiver URL -> time.monotonic() until which it counts as down (see RECEIVER_DOWN_PAUSE).
_receiver_down_until: dict[str, float] = {}


def _refuse_while_down(url: str) -> None:
    down_until = _receiver_down_until.get(url)
    if down_until is None:
        return
    left = down_until - time.monotonic()
    if left > 0:
        raise WebhookError(f"{url} did not answer lately; not tried again for {left:.0f} s")
    del _receiver_down_until[url]


# Registered after the search index, so that a receiver that is down fails an event only after
# the local, idempotent handler has applied it.
@handler("issue.created", "issue.updated", "issue.deleted", name="plane.webhook")
def send_webhook(event: EventData) -> None:
    """POST the change as JSON to `PLANE_WEBHOOK_URL` (read when called; unset: no webhook)."""
    url = os.environ.get(WEBHOOK_URL_VARIABLE, "").strip()
    if not url:
        return
    if WebhookDelivery.objects.filter(event_id=event["event_id"]).exists():
        return
    _refuse_while_down(url)
    request = urllib.request.Request(
        url,
        data=json.dumps(webhook_body(event)).encode(),
        method="POST",
        headers={
            "Content-Type": "application/json",
            # Receivers deduplicate on it: a crash between the POST and the record below
            # means the event is sent again.
            "X-Event-Id": event["event_id"],
            "X-Event-Type": event["event_type"],
        },
    )
    try:
        with _opener.open(request, timeout=WEBHOOK_TIMEOUT) as response:
            status = response.status
    except urllib.error.HTTPError as exc:  # 4xx, 5xx, and the redirects refused above
        exc.close()
        raise WebhookError(f"{url} answered {exc.code} {exc.reason}") from None
    except OSError:  # no answer: timed out, refused, unreachable (URLError is an OSError)
        _receiver_down_until[url] = time.monotonic() + RECEIVER_DOWN_PAUSE
        raise
    if not 200 <= status < 300:
        raise WebhookError(f"{url} answered {status}")
    WebhookDelivery.objects.get_or_create(
        event_id=event["event_id"],
        defaults={
            "event_type": event["event_type"],
            "entity_id": event["entity_id"],
            "url": url,
            "status_code": status,
        },
    )


# -- assignee notifications ----------------------------------------------------------------------


@handler("issue_assignee.created", name="plane.notify_assignee")
def notify_assignee(event: EventData) -> None:
    """Tell the user they were assigned to the issue."""
    data = event["payload"]["data"]
    receiver_id, issue_id = data["assignee_id"], data["issue_id"]
    if not get_user_model().objects.filter(pk=receiver_id).exists():
        logger.info("assignee %s of event %s is gone; no notification", receiver_id, event["id"])
        return
    issue = Issue.objects.filter(pk=issue_id).only("name").first()
    name = issue.name if issue is not None else "an issue"
    title_length = Notification._meta.get_field("title").max_length
    Notification.objects.get_or_create(
        event_id=event["event_id"],
        receiver_id=receiver_id,
        defaults={
            "issue_id": issue_id,
            "title": f"Assigned: {name}"[:title_length],
            "message": f"You were assigned to {name}.",
        },
    )
